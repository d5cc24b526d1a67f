"""Sample schedulers by name: EveryDream2's names (ddim, euler_a, dpm++_2m_k, ...) mapped to diffusers classes
and settings, checked when the sample-prompt file is read and built from the model's own scheduler config at each
sampling.

    parse_scheduler_name("DPM++ 2M Karras")            # -> ("dpm++_2m", True); ConfigError for an unknown name
    scheduler = make_sampling_scheduler("euler_a", pipe_scheduler_config, zero_terminal_snr=False)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from utils.core.config_schema import ConfigError, did_you_mean


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str                       # a diffusers scheduler class
    kwargs: dict = field(default_factory=dict)


# EveryDream2's names (doc/LOGGING.md). Each base name whose class has use_karras_sigmas also takes a `_k` suffix.
SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler"),
    "ddpm": SchedulerSpec("DDPMScheduler"),
    # SD's own PNDM config skips the Runge-Kutta warm-up; without it a few steps are spent on warm-up alone.
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler"),
    "kdpm2": SchedulerSpec("KDPM2DiscreteScheduler"),
    "kdpm2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler"),
    "dpm++_2m": SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # lower_order_final: what diffusers switches to anyway (with a warning) for a final sigma of zero.
    "dpm++_2s": SchedulerSpec("DPMSolverSinglestepScheduler",
                              {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}),
    # The stochastic DPM++ sampler without torchsde (DPMSolverSDEScheduler needs it): the multistep solver's
    # SDE variant, i.e. "DPM++ 2M SDE". EveryDream2's dpm++_2m_sde is the same sampler.
    "dpm++_sde": SchedulerSpec("DPMSolverMultistepScheduler",
                               {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
}
SCHEDULER_ALIASES = {"dpm++": "dpm++_2m", "dpm++_2m_sde": "dpm++_sde", "euler_ancestral": "euler_a",
                     "k_euler": "euler", "k_euler_a": "euler_a", "k_lms": "lms", "k_heun": "heun"}
KARRAS_SUFFIX = "_k"


def _scheduler_class(class_name: str):
    import diffusers
    return getattr(diffusers, class_name)


def _has_init_arg(cls, name: str) -> bool:
    import inspect
    return name in inspect.signature(cls.__init__).parameters


def scheduler_names() -> list[str]:
    """Every canonical name: the base names, then their Karras variants (aliases are accepted too)."""
    karras = [n + KARRAS_SUFFIX for n, s in SCHEDULERS.items()
              if _has_init_arg(_scheduler_class(s.class_name), "use_karras_sigmas")]
    return list(SCHEDULERS) + karras


def parse_scheduler_name(name: str) -> tuple[str, bool]:
    """'DPM++ 2M Karras' -> ('dpm++_2m', True). Case, spaces and '-' vs '_' do not matter. ConfigError if unknown."""
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    karras = False
    for suffix in ("_karras", KARRAS_SUFFIX):
        base = SCHEDULER_ALIASES.get(key[:-len(suffix)], key[:-len(suffix)]) if key.endswith(suffix) else None
        if base in SCHEDULERS:
            key, karras = base, True
            break
    key = SCHEDULER_ALIASES.get(key, key)
    if key not in SCHEDULERS:
        known = scheduler_names()
        raise ConfigError(f"unknown sample scheduler '{name}'{did_you_mean(key, known + list(SCHEDULER_ALIASES))}; "
                          f"choose one of: {', '.join(known)}")
    if karras and not _has_init_arg(_scheduler_class(SCHEDULERS[key].class_name), "use_karras_sigmas"):
        raise ConfigError(f"sample scheduler '{name}': {key} has no Karras-sigmas variant; use '{key}'")
    return key, karras


def _resolve_scheduler(name: str, zero_terminal_snr: bool) -> tuple[type, dict]:
    """(diffusers class, from_config overrides) for a name; ConfigError for an unknown name or a scheduler that
    cannot sample a zero-terminal-SNR model."""
    from utils.sd.noise import sampling_settings
    key, karras = parse_scheduler_name(name)
    spec = SCHEDULERS[key]
    cls = _scheduler_class(spec.class_name)
    overrides = dict(spec.kwargs)
    if karras:
        overrides["use_karras_sigmas"] = True
    if _has_init_arg(cls, "rescale_betas_zero_snr"):
        # Sample with the betas the model was trained with: the trainer's flag decides, not a key in the config.
        overrides["rescale_betas_zero_snr"] = bool(zero_terminal_snr)
    elif zero_terminal_snr:
        able = [n for n, s in SCHEDULERS.items()
                if _has_init_arg(_scheduler_class(s.class_name), "rescale_betas_zero_snr")]
        raise ConfigError(f"sample scheduler '{name}' cannot sample a zero-terminal-SNR model "
                          f"(enable_zero_terminal_snr); use one of: {', '.join(able)}")
    if zero_terminal_snr:
        overrides.update(sampling_settings(zero_terminal_snr=True).scheduler_overrides)
    return cls, overrides


def check_scheduler(name: str, *, zero_terminal_snr: bool = False) -> None:
    """Raise ConfigError now for a scheduler name that make_sampling_scheduler would refuse later."""
    _resolve_scheduler(name, zero_terminal_snr)


def make_sampling_scheduler(name: str, scheduler_config: dict, *, zero_terminal_snr: bool):
    """A diffusers scheduler for sampling, built from the model's own scheduler config (betas, prediction type,
    steps offset). With zero terminal SNR: rescaled betas and trailing timesteps (utils/sd/noise.py
    sampling_settings; the pipeline then needs guidance_rescale 0.7). ConfigError for an unknown name or a
    scheduler that cannot sample a zero-terminal-SNR model."""
    cls, overrides = _resolve_scheduler(name, zero_terminal_snr)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return cls.from_config(config, **overrides)
