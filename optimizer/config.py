"""optimizer.json: UNet and text-encoder optimizer settings, read as strictly as train.json.

The file keeps EveryDream2's layout (`base`, `text_encoder_overrides`, `text_encoder_freezing`, `doc`) so its
users' files load. Resolution order for each value, highest first:
    lr only: `lr` from train.json / the command line (lr_override), for UNet and text encoder alike
    text encoder only: `text_encoder_overrides` (null inherits; a literal 0 is kept)
    `base`
    the chosen optimizer's own default (OPTIMIZER_DEFAULTS)
`lr_warmup_steps` / `lr_decay_steps` left null are resolved later from the run length (optimizer/schedules.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal

from utils.core.config_schema import (ConfigError, check_fields, describe_type, did_you_mean, doc, field_default,
                                 null_meaning, read_json, schema_fields, to_jsonable)

CONFIG_VERSION = 1

OPTIMIZERS = ("adamw8bit", "adamw", "lion", "lion8bit", "prodigy", "dadapt_adam", "dadapt_lion", "dadapt_sgd",
              "adafactor", "adamw_schedulefree")
# These estimate the step size themselves; their lr is a multiplier on that estimate (usually 1.0).
ADAPTIVE_OPTIMIZERS = frozenset({"prodigy", "dadapt_adam", "dadapt_lion", "dadapt_sgd"})
# These need optimizer.train() / .eval() around evaluation and saving, and bring their own warmup.
SCHEDULE_FREE_OPTIMIZERS = frozenset({"adamw_schedulefree"})

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "cosine_with_hard_restarts", "polynomial", "rex")
DECAYING_SCHEDULERS = frozenset(LR_SCHEDULERS) - {"constant", "constant_with_warmup"}

# EveryDream2 optimizer names this trainer does not offer, with what to use instead.
UNSUPPORTED_EVERYDREAM2_OPTIMIZERS = {
    "dadapt_adan": "EveryDream2's dadapt_adan is not supported; dadapt_adam or prodigy are the closest",
    "coordinate_dowg": "EveryDream2's DoWG optimizers are not supported; prodigy is the closest",
    "scalar_dowg": "EveryDream2's DoWG optimizers are not supported; prodigy is the closest",
    "adacoor": "EveryDream2's adacoor is not supported; prodigy is the closest",
}
# EveryDream2 per-part keys with no meaning here: accepted with a warning so its files still load.
IGNORED_EVERYDREAM2_PART_KEYS = {"no_prox": "only EveryDream2's dadapt_adan read it"}

OptimizerName = Literal[OPTIMIZERS]  # type: ignore[valid-type]
SchedulerName = Literal[LR_SCHEDULERS]  # type: ignore[valid-type]


@dataclass
class PartSettings:
    """One optimizer + LR schedule. In `base` a null takes the default; in `text_encoder_overrides` it inherits."""
    optimizer: OptimizerName | None = doc(None, "Optimizer (see the table of optimizers). Default adamw8bit.")
    lr: float | None = doc(None, "Peak learning rate. Default depends on the optimizer: 1e-6 (AdamW family, "
                                 "adafactor), 1e-7 (lion, lion8bit), 1.0 (prodigy, dadapt_*: a multiplier on the "
                                 "step size they estimate).", minimum=0.0)
    lr_scheduler: SchedulerName | None = doc(None, "LR schedule (see the formulas). Default constant.")
    lr_warmup_steps: int | None = doc(None, "Optimizer steps of linear warmup. Default: 0 for constant and rex, "
                                            "else 2% of lr_decay_steps.", minimum=0)
    lr_decay_steps: int | None = doc(None, "Optimizer step at which the schedule reaches its end value (warmup "
                                           "included). Default: the run's total optimizer steps.", minimum=1)
    lr_num_cycles: float | None = doc(None, "cosine_with_restarts / cosine_with_hard_restarts: how many times the "
                                            "LR falls from peak to minimum. Default 3.", minimum=1.0)
    lr_power: float | None = doc(None, "polynomial: exponent of the decay. Default 1.0 (linear).", minimum=0.0)
    lr_min_factor: float | None = doc(None, "Decaying schedules end at lr * lr_min_factor instead of 0. "
                                            "Default 0.0.", minimum=0.0, maximum=1.0)
    betas: list[float] | None = doc(None, "Moment decay rates [beta1, beta2]. Default [0.9, 0.999]; lion, "
                                          "lion8bit, dadapt_lion [0.9, 0.99]; adafactor reads beta1 only, "
                                          "default [0.0] (0: no first moment, saves memory).",
                                    minimum=0.0, maximum=1.0)
    epsilon: float | None = doc(None, "Denominator term for numerical stability. Default 1e-8 (adafactor: 1e-30, "
                                      "its eps1).", minimum=0.0)
    weight_decay: float | None = doc(None, "Decoupled weight decay. Default 0.01 (lion, lion8bit: 0.1).",
                                     minimum=0.0)
    d0: float | None = doc(None, "prodigy, dadapt_*: initial step-size estimate. Default 1e-6.", minimum=0.0)
    d_coef: float | None = doc(None, "prodigy: multiplier on the estimated step size. Default 1.0.", minimum=0.0)
    decouple: bool | None = doc(None, "prodigy, dadapt_adam: AdamW-style decoupled weight decay. Default true.")
    growth_rate: float | None = doc(None, "prodigy, dadapt_adam, dadapt_sgd: cap on how fast the step-size "
                                          "estimate may grow per step. Default unlimited (written Infinity in "
                                          "a saved optimizer.json).", minimum=1.0, allow_infinity=True)
    safeguard_warmup: bool | None = doc(None, "prodigy: keep the LR warmup out of the step-size estimate "
                                              "(recommended with warmup). Default true.")
    use_bias_correction: bool | None = doc(None, "prodigy, dadapt_adam: Adam bias correction. Default true for "
                                                 "prodigy (its authors' advice for diffusion models), false for "
                                                 "dadapt_adam.")
    momentum: float | None = doc(None, "dadapt_sgd: momentum. Default 0.0.", minimum=0.0, maximum=1.0)
    scale_parameter: bool | None = doc(None, "adafactor: scale the LR by each tensor's RMS. Default false.")
    clip_threshold: float | None = doc(None, "adafactor: RMS clipping of the update. Default 1.0.", minimum=0.0)
    decay_rate: float | None = doc(None, "adafactor: exponent of the second-moment decay. Default -0.8.",
                                   minimum=-1.0, maximum=0.0)
    r: float | None = doc(None, "adamw_schedulefree: polynomial weighting power of the average. Default 0.0.",
                          minimum=0.0)
    weight_lr_power: float | None = doc(None, "adamw_schedulefree: weight of each step in the average is "
                                              "lr^weight_lr_power. Default 2.0.", minimum=0.0)


# What a null does in base / text_encoder_overrides, the same for every key (inherit, with_defaults): the docs'
# null column for PartSettings.
PART_NULL = "in base: the default given in the meaning; in text_encoder_overrides: base's value"


@dataclass
class FreezeSettings:
    """Which text-encoder parameters stay frozen (requires_grad False, not in the optimizer)."""
    unfreeze_last_n_layers: int | None = doc(None, "Train only the last N encoder layers (0: none).", minimum=0,
                                             null="train all layers")
    freeze_embeddings: bool | None = doc(None, "Freeze token and position embeddings.",
                                         null="frozen exactly when unfreeze_last_n_layers leaves some layers "
                                              "frozen (EveryDream2)")
    freeze_final_layer_norm: bool | None = doc(None, "Freeze the final layer norm.", null="false")
    freeze_front_n_layers: int | None = doc(None, "Legacy EveryDream2 key: freeze the first N layers (negative "
                                                  "N: train only the last -N). Prefer unfreeze_last_n_layers.",
                                            null="not used")


@dataclass
class _OptimizerFile:
    """The top level of optimizer.json."""
    config_version: int = doc(CONFIG_VERSION, "Version of this file's format.", minimum=1, maximum=CONFIG_VERSION)
    base: dict | None = doc(None, "Settings for the UNet and the defaults for the text encoder (keys below).",
                            null="every key its default")
    text_encoder_overrides: dict | None = doc(None, "Text-encoder settings; same keys as base; null or missing "
                                                    "values inherit from base.", null="all from base")
    text_encoder_freezing: dict | None = doc(None, "Partial text-encoder freezing (keys below).",
                                             null="no freezing")
    text_encoder_lr_scale: float | None = doc(None, "EveryDream2 key: when the text encoder inherits its lr from "
                                                    "base, multiply it by this.", minimum=0.0, null="no scaling")
    apply_grad_scaler_step_tweaks: bool = doc(True, "fp16 only: slow the GradScaler's growth at optimizer steps "
                                                    "500/1000/2000/4000 (EveryDream2).")
    log_grad_norm: bool = doc(True, "Log each part's gradient norm at every logged optimizer step.")
    grouped_8bit_step: bool = doc(True, "adamw8bit, lion8bit: step groups of tensors at once with bitsandbytes' "
                                        "kernels (the same math, much faster on the GPU); false: bitsandbytes' "
                                        "own classes, one tensor at a time. Checkpoints' optimizer state loads "
                                        "only with the setting it was saved with.")
    triton_8bit_step: bool = doc(False, "adamw8bit with grouped_8bit_step, on CUDA: our Triton kernel for the 8-bit "
                                        "update (reads gradients and writes weights in place, all tensors in one "
                                        "launch; the same state format, not bit-identical; faster, doc/OPTIMIZER.md "
                                        "has the measurement). lion8bit keeps bitsandbytes' kernel.")
    # last: from here on the class body's `doc` is this field, not the helper
    doc: Any = doc(None, "Free text (string, list or object), ignored; optional.", null="ignored")


@dataclass
class OptimizerConfig:
    """The resolved settings: what each part will actually use (warmup/decay null = from the run length)."""
    unet: PartSettings
    text_encoder: PartSettings
    text_encoder_freezing: FreezeSettings = dataclasses.field(default_factory=FreezeSettings)
    apply_grad_scaler_step_tweaks: bool = True
    log_grad_norm: bool = True
    grouped_8bit_step: bool = True
    triton_8bit_step: bool = False
    source: str = "defaults"


# What each optimizer reads besides lr, and its default for each. A key the optimizer does not read is set to
# null in the resolved settings, so the run summary and the saved optimizer.json show only what takes effect.
# No default is null: a resolved text-encoder value of null would read back as "inherit from base".
_ADAM_LIKE = {"betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.01}
_ADAPTIVE = {"d0": 1e-6, "growth_rate": math.inf}
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw8bit": {"lr": 1e-6, **_ADAM_LIKE},
    "adamw": {"lr": 1e-6, **_ADAM_LIKE},
    # EveryDream2's lion advice: a tenth of AdamW's LR, ten times its weight decay.
    "lion": {"lr": 1e-7, "betas": [0.9, 0.99], "weight_decay": 0.1},
    "lion8bit": {"lr": 1e-7, "betas": [0.9, 0.99], "weight_decay": 0.1},
    # prodigy's authors recommend safeguard_warmup, use_bias_correction and weight decay 0.01 for diffusion models
    "prodigy": {"lr": 1.0, **_ADAM_LIKE, **_ADAPTIVE, "d_coef": 1.0, "decouple": True, "safeguard_warmup": True,
                "use_bias_correction": True},
    "dadapt_adam": {"lr": 1.0, **_ADAM_LIKE, **_ADAPTIVE, "decouple": True, "use_bias_correction": False},
    "dadapt_lion": {"lr": 1.0, "betas": [0.9, 0.99], "weight_decay": 0.01, "d0": 1e-6},
    "dadapt_sgd": {"lr": 1.0, "weight_decay": 0.01, **_ADAPTIVE, "momentum": 0.0},
    "adafactor": {"lr": 1e-6, "betas": [0.0], "epsilon": 1e-30, "weight_decay": 0.01, "scale_parameter": False,
                  "clip_threshold": 1.0, "decay_rate": -0.8},
    "adamw_schedulefree": {"lr": 1e-6, **_ADAM_LIKE, "r": 0.0, "weight_lr_power": 2.0},
}
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "constant": {}, "constant_with_warmup": {},
    "linear": {"lr_min_factor": 0.0}, "cosine": {"lr_min_factor": 0.0}, "rex": {"lr_min_factor": 0.0},
    "cosine_with_restarts": {"lr_num_cycles": 3.0, "lr_min_factor": 0.0},
    "cosine_with_hard_restarts": {"lr_num_cycles": 3.0, "lr_min_factor": 0.0},
    "polynomial": {"lr_power": 1.0, "lr_min_factor": 0.0},
}
OPTIMIZER_KEYS = {f.name for f in dataclasses.fields(PartSettings)} - {
    "optimizer", "lr", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps", "lr_num_cycles", "lr_power",
    "lr_min_factor"}
SCHEDULER_KEYS = {"lr_num_cycles", "lr_power", "lr_min_factor"}
DEFAULT_OPTIMIZER = "adamw8bit"
DEFAULT_SCHEDULER = "constant"

Warn = Callable[[str], None]


def stderr_warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def inherit(overrides: PartSettings, base: PartSettings) -> PartSettings:
    """overrides where set, else base. `is None`, not `or`: a literal 0 or false in overrides is kept."""
    return PartSettings(**{f.name: getattr(base, f.name) if getattr(overrides, f.name) is None
                           else getattr(overrides, f.name) for f in dataclasses.fields(PartSettings)})


def with_defaults(settings: PartSettings) -> PartSettings:
    """Fill nulls from the optimizer's and the scheduler's defaults; clear keys neither of them reads."""
    optimizer = settings.optimizer or DEFAULT_OPTIMIZER
    scheduler = settings.lr_scheduler or DEFAULT_SCHEDULER
    used = {**OPTIMIZER_DEFAULTS[optimizer], **SCHEDULER_DEFAULTS[scheduler]}
    values = {"optimizer": optimizer, "lr_scheduler": scheduler}
    for key in OPTIMIZER_KEYS | SCHEDULER_KEYS | {"lr"}:
        value = getattr(settings, key)
        if value is None and key in used:
            value = list(used[key]) if isinstance(used[key], list) else used[key]  # no list shared between parts
        values[key] = value if key in used else None
    values["lr_warmup_steps"] = settings.lr_warmup_steps
    values["lr_decay_steps"] = settings.lr_decay_steps
    return PartSettings(**values)


def _unused_keys(settings: PartSettings, optimizer: str) -> list[str]:
    return sorted(k for k in OPTIMIZER_KEYS
                  if getattr(settings, k) is not None and k not in OPTIMIZER_DEFAULTS[optimizer])


def _check_choice(raw: dict, key: str, choices: tuple[str, ...], source: str, problems: list[str]) -> dict:
    """Unknown optimizer/scheduler names: one message with a suggestion and every valid name. Returns raw
    without the bad value so check_fields does not report it a second time."""
    value = raw.get(key)
    if not isinstance(value, str) or value in choices:
        return raw
    hint = UNSUPPORTED_EVERYDREAM2_OPTIMIZERS.get(value, "")
    hint = f" ({hint})" if hint else did_you_mean(value, choices)
    problems.append(f"{source}: unknown {key} '{value}'{hint}; valid: {', '.join(choices)}")
    return {k: v for k, v in raw.items() if k != key}


def _read_part(raw: Any, source: str, problems: list[str], warn: Warn) -> PartSettings:
    if raw is None:
        return PartSettings()
    raw = _check_choice(raw, "optimizer", OPTIMIZERS, source, problems)
    raw = _check_choice(raw, "lr_scheduler", LR_SCHEDULERS, source, problems)
    ignored = sorted(k for k in raw if k in IGNORED_EVERYDREAM2_PART_KEYS)
    for key in ignored:
        warn(f"{source}: '{key}' is ignored ({IGNORED_EVERYDREAM2_PART_KEYS[key]})")
    values, part_problems = check_fields(PartSettings, raw, source, ignore=set(ignored))
    problems += part_problems
    return PartSettings(**values)


def _read_freezing(raw: Any, source: str, problems: list[str], warn: Warn) -> FreezeSettings:
    if raw is None:
        return FreezeSettings()
    raw = dict(raw)
    if "unfreeze_final_n_layers" in raw:  # the name EveryDream2's OPTIMIZER.md used; its code read the other
        warn(f"{source}: 'unfreeze_final_n_layers' is read as 'unfreeze_last_n_layers'")
        if "unfreeze_last_n_layers" in raw:
            problems.append(f"{source}: set unfreeze_last_n_layers or unfreeze_final_n_layers, not both")
        raw.setdefault("unfreeze_last_n_layers", raw.pop("unfreeze_final_n_layers"))
    values, freeze_problems = check_fields(FreezeSettings, raw, source)
    problems += freeze_problems
    freezing = FreezeSettings(**values)
    front = freezing.freeze_front_n_layers
    if front is not None:
        if freezing.unfreeze_last_n_layers is not None:
            problems.append(f"{source}: set unfreeze_last_n_layers or freeze_front_n_layers, not both")
        elif front < 0:
            warn(f"{source}: 'freeze_front_n_layers' is deprecated; converted to unfreeze_last_n_layers = {-front}")
            freezing = dataclasses.replace(freezing, unfreeze_last_n_layers=-front, freeze_front_n_layers=None)
        else:
            warn(f"{source}: 'freeze_front_n_layers' is deprecated; converted to unfreeze_last_n_layers = "
                 f"(text-encoder layers - {front}) when the model is loaded")
    return freezing


def validate(unet: PartSettings, text_encoder: PartSettings, source: str) -> list[str]:
    """Cross-field checks on the resolved settings, all gathered so the file is fixed in one pass."""
    problems = []
    for name, part in (("base", unet), ("text encoder", text_encoder)):
        where = f"{source}: {name}"
        if part.betas is not None:
            if part.optimizer == "adafactor" and len(part.betas) not in (1, 2):
                problems.append(f"{where}: adafactor reads only beta1: betas must be [beta1] or [beta1, beta2]")
            elif part.optimizer != "adafactor" and len(part.betas) != 2:
                problems.append(f"{where}: betas must be two numbers [beta1, beta2], got {json.dumps(part.betas)}")
            if any(b >= 1.0 for b in part.betas):
                problems.append(f"{where}: betas must be below 1, got {json.dumps(part.betas)}")
        if part.optimizer in SCHEDULE_FREE_OPTIMIZERS and part.lr_scheduler not in ("constant", "constant_with_warmup"):
            problems.append(f"{where}: {part.optimizer} replaces the LR schedule; set lr_scheduler to constant "
                            f"(or constant_with_warmup); lr_warmup_steps becomes its own warmup")
        if (part.lr_scheduler in DECAYING_SCHEDULERS and part.lr_warmup_steps is not None
                and part.lr_decay_steps is not None and part.lr_warmup_steps >= part.lr_decay_steps):
            problems.append(f"{where}: lr_warmup_steps ({part.lr_warmup_steps}) must be below lr_decay_steps "
                            f"({part.lr_decay_steps})")
    return problems


def load_optimizer_config(path: str | None, *, lr_override: float | None = None,
                          warn: Warn | None = None) -> OptimizerConfig:
    """Read optimizer.json (None: the defaults). lr_override (train.json / CLI `lr`) sets the lr of both parts.
    Raises ConfigError listing every problem; warnings (legacy keys, unused keys) go to `warn`."""
    warn = warn or stderr_warn
    source = str(path) if path is not None else "optimizer defaults"
    raw = read_json(path, "optimizer config") if path is not None else {}
    top, problems = check_fields(_OptimizerFile, raw, source)
    if lr_override is not None and lr_override < 0:
        problems.append(f"lr must be at least 0, got {lr_override}")
    base_raw = top.get("base")
    te_raw = top.get("text_encoder_overrides")
    base = _read_part(base_raw, f"{source}: base", problems, warn)
    te_overrides = _read_part(te_raw, f"{source}: text_encoder_overrides", problems, warn)
    freezing = _read_freezing(top.get("text_encoder_freezing"), f"{source}: text_encoder_freezing", problems, warn)
    if problems:
        raise ConfigError("\n".join(problems))

    te_merged = inherit(te_overrides, base)
    te_lr_scale = top.get("text_encoder_lr_scale")
    if lr_override is not None:
        base = dataclasses.replace(base, lr=lr_override)
        te_merged = dataclasses.replace(te_merged, lr=lr_override)
    elif te_lr_scale is not None and te_overrides.lr is None and base.lr is not None:
        # EveryDream2 documented this key but never read it; applied here as documented, so say so.
        if te_lr_scale != 1.0:
            warn(f"{source}: text_encoder_lr_scale {te_lr_scale} applied: text-encoder lr = {base.lr} * "
                 f"{te_lr_scale} (EveryDream2 documented this key but ignored it)")
        te_merged = dataclasses.replace(te_merged, lr=base.lr * te_lr_scale)

    unet, text_encoder = with_defaults(base), with_defaults(te_merged)
    if problems := validate(unet, text_encoder, source):
        raise ConfigError("\n".join(problems))

    for name, settings, optimizer in (("base", base, unet.optimizer), ("text_encoder_overrides", te_overrides,
                                                                       text_encoder.optimizer)):
        if unused := _unused_keys(settings, optimizer):
            # a base key may be meant for a text encoder that inherits it with another optimizer
            if name == "base":
                unused = [k for k in unused if k not in OPTIMIZER_DEFAULTS[text_encoder.optimizer]
                          or getattr(te_overrides, k) is not None]
            if unused:
                warn(f"{source}: {name}: {', '.join(unused)} not used by {optimizer}")
    if top.get("triton_8bit_step") and not top.get("grouped_8bit_step", True):
        raise ConfigError(f"{source}: triton_8bit_step true needs grouped_8bit_step true (the kernel steps the "
                          f"grouped layout); set one of them")
    if top.get("triton_8bit_step") and "adamw8bit" not in (unet.optimizer, text_encoder.optimizer):
        warn(f"{source}: triton_8bit_step is used by adamw8bit only; neither part uses it")
    for name, part in (("UNet", unet), ("text encoder", text_encoder)):
        if part.optimizer in ADAPTIVE_OPTIMIZERS and part.lr is not None and part.lr < 0.1:
            warn(f"{source}: {name} lr {part.lr} with {part.optimizer}: it estimates the step size itself and lr "
                 f"multiplies that estimate; 1.0 (0.1 to 1.0) is usual")
    return OptimizerConfig(unet=unet, text_encoder=text_encoder, text_encoder_freezing=freezing,
                           apply_grad_scaler_step_tweaks=top.get("apply_grad_scaler_step_tweaks", True),
                           log_grad_norm=top.get("log_grad_norm", True),
                           grouped_8bit_step=top.get("grouped_8bit_step", True),
                           triton_8bit_step=top.get("triton_8bit_step", False), source=source)


def optimizer_config_to_json(cfg: OptimizerConfig) -> dict:
    """A complete optimizer.json for the resolved settings; loading it gives the same OptimizerConfig.
    The trainer saves this next to each checkpoint."""
    return {
        "config_version": CONFIG_VERSION,
        "doc": f"Resolved from {cfg.source}; every value is the one the run used.",
        "base": to_jsonable(cfg.unet),
        "text_encoder_overrides": to_jsonable(cfg.text_encoder),
        "text_encoder_freezing": to_jsonable(cfg.text_encoder_freezing),
        "apply_grad_scaler_step_tweaks": cfg.apply_grad_scaler_step_tweaks,
        "log_grad_norm": cfg.log_grad_norm,
        "grouped_8bit_step": cfg.grouped_8bit_step,
        "triton_8bit_step": cfg.triton_8bit_step,
    }


def keys_markdown(cls) -> str:
    """A markdown table of a section's keys, generated from the schema; doc/OPTIMIZER.md embeds these tables
    and a test fails when they are stale (`python -m optimizer.config` prints them)."""
    lines = ["| key | type | default | null | meaning |", "|---|---|---|---|---|"]
    for name, (f, tp) in schema_fields(cls).items():
        lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
        bounds = "" if lo is None and hi is None else f" Range: [{'' if lo is None else lo}, {'' if hi is None else hi}]."
        type_text = describe_type(tp).replace("|", "\\|")  # a bare | would split the table cell
        default = json.dumps(field_default(f))
        null = PART_NULL if cls is PartSettings else null_meaning(f, tp)
        lines.append(f"| `{name}` | `{type_text}` | `{default}` | {null} | {f.metadata['help']}{bounds} |")
    return "\n".join(lines)


SECTIONS = {"top level": _OptimizerFile, "base / text_encoder_overrides": PartSettings,
            "text_encoder_freezing": FreezeSettings}


if __name__ == "__main__":
    for title, cls in SECTIONS.items():
        sys.stdout.write(f"<!-- keys: {title} -->\n{keys_markdown(cls)}\n\n")
