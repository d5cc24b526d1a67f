"""optimizer.json: UNet and text-encoder optimizer settings, read as strictly as train.json.

The file keeps EveryDream2's layout (`base`, `text_encoder_overrides`, `text_encoder_freezing`, `doc`) so its
users' files load; SDXL's second text encoder adds `text_encoder_2_overrides` and `text_encoder_2_freezing`.
Resolution order for each value, highest first:
    lr only: `lr` from train.json / the command line (lr_override), for the UNet and every text encoder alike
    second text encoder only: `text_encoder_2_overrides` (null inherits; a literal 0 is kept)
    text encoders only: `text_encoder_overrides`
    `base`
    the chosen optimizer's own default (OPTIMIZER_DEFAULTS)
Freezing does not inherit: each encoder has its own section (their layer counts differ).
`lr_warmup_steps` / `lr_decay_steps` left null are resolved later from the run length (optimizer/schedules.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

# callers import these from here too (optimizer.config held them before optimizer/schema.py)
from optimizer.schema import (ADAPTIVE_OPTIMIZERS, CONFIG_VERSION, DECAYING_SCHEDULERS, IGNORED_EVERYDREAM2_PART_KEYS,
                              LR_SCHEDULERS, OPTIMIZERS, OVERRIDES_SECTION, SCHEDULE_FREE_OPTIMIZERS, SECTIONS,
                              TEXT_ENCODERS, UNSUPPORTED_EVERYDREAM2_OPTIMIZERS, FreezeSettings, PartSettings,
                              _OptimizerFile, keys_markdown)
from utils.core.config_schema import ConfigError, check_fields, did_you_mean, read_json, to_jsonable


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
    text_encoder_2: PartSettings | None = None     # None: the same as text_encoder (what the file gives unset)
    text_encoder_2_freezing: FreezeSettings = dataclasses.field(default_factory=FreezeSettings)

    def __post_init__(self):
        if self.text_encoder_2 is None:
            self.text_encoder_2 = dataclasses.replace(self.text_encoder, betas=_copy(self.text_encoder.betas))

    def settings(self, part: str) -> PartSettings:
        """The resolved settings of "unet", "text_encoder" or "text_encoder_2"."""
        return getattr(self, _part_name(part, OVERRIDES_SECTION))

    def freezing(self, text_encoder: str) -> FreezeSettings:
        return getattr(self, f"{_part_name(text_encoder, TEXT_ENCODERS)}_freezing")

    def trains_text_encoder(self, text_encoder: str) -> bool:
        """False when its freezing section says freeze_all: the caller then passes it to build_optimizer_parts as
        None and treats it as frozen (as train.json's disable_textenc_training does for all of them)."""
        return not self.freezing(text_encoder).freeze_all


def _part_name(name: str, names) -> str:
    if name not in names:
        raise ValueError(f"unknown part {name!r}{did_you_mean(name, names)}; valid: {', '.join(names)}")
    return name


def _copy(value):
    return list(value) if isinstance(value, list) else value


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
    return PartSettings(**{f.name: _copy(getattr(base, f.name) if getattr(overrides, f.name) is None
                                         else getattr(overrides, f.name)) for f in dataclasses.fields(PartSettings)})


def with_defaults(settings: PartSettings) -> PartSettings:
    """Fill nulls from the optimizer's and the scheduler's defaults; clear keys neither of them reads."""
    optimizer = settings.optimizer or DEFAULT_OPTIMIZER
    scheduler = settings.lr_scheduler or DEFAULT_SCHEDULER
    used = {**OPTIMIZER_DEFAULTS[optimizer], **SCHEDULER_DEFAULTS[scheduler]}
    values = {"optimizer": optimizer, "lr_scheduler": scheduler}
    for key in OPTIMIZER_KEYS | SCHEDULER_KEYS | {"lr"}:
        value = getattr(settings, key)
        if value is None and key in used:
            value = _copy(used[key])  # no list shared between parts
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


# Keys one may guess for switching a model's training off; for a text encoder it is its freezing section's
# freeze_all, for the UNet train.json's disable_unet_training.
_TRAINING_SWITCH_GUESSES = frozenset({"train", "trainable", "enabled", "freeze", "frozen", "freeze_all"})


def _without_switch_guesses(raw: dict, source: str, fix: str, problems: list[str], valid=frozenset()) -> dict:
    guesses = sorted(k for k in raw if k in _TRAINING_SWITCH_GUESSES - valid)
    problems += [f"{source}: unknown key '{key}' ({fix})" for key in guesses]
    return {k: v for k, v in raw.items() if k not in guesses}


def _read_part(raw: Any, source: str, problems: list[str], warn: Warn, part: str = "unet") -> PartSettings:
    if raw is None:
        return PartSettings()
    fix = ("train.json's disable_unet_training freezes the UNet" if part == "unet" else
           f"to freeze this text encoder set \"freeze_all\": true in {part}_freezing")
    raw = _without_switch_guesses(raw, source, fix, problems)
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
    raw = _without_switch_guesses(raw, source, "did you mean freeze_all? true freezes the whole encoder", problems,
                                  valid=frozenset({"freeze_all"}))
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
    if freezing.freeze_all:
        trains = [k for k, trains_some in (("unfreeze_last_n_layers", bool(freezing.unfreeze_last_n_layers)),
                                           ("freeze_front_n_layers", freezing.freeze_front_n_layers is not None),
                                           ("freeze_embeddings", freezing.freeze_embeddings is False)) if trains_some]
        if trains:
            problems.append(f"{source}: freeze_all true freezes the whole text encoder; set {', '.join(trains)} "
                            f"to null or freeze_all to false")
    return freezing


# How messages name each part's settings.
PART_LABELS = {"unet": "base", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


def validate(parts: dict[str, PartSettings], source: str) -> list[str]:
    """Cross-field checks on the resolved settings ({part: settings}), all gathered so the file is fixed in one
    pass. The second text encoder's problems that it inherits from the first are reported once, for the first."""
    problems, first = [], []
    for name, part in parts.items():
        found = _part_problems(part)
        if name == "text_encoder":
            first = found
        elif name == "text_encoder_2":
            found = [p for p in found if p not in first]
        problems += [f"{source}: {PART_LABELS[name]}: {p}" for p in found]
    return problems


def _part_problems(part: PartSettings) -> list[str]:
    problems = []
    if part.betas is not None:
        if part.optimizer == "adafactor" and len(part.betas) not in (1, 2):
            problems.append("adafactor reads only beta1: betas must be [beta1] or [beta1, beta2]")
        elif part.optimizer != "adafactor" and len(part.betas) != 2:
            problems.append(f"betas must be two numbers [beta1, beta2], got {json.dumps(part.betas)}")
        if any(b >= 1.0 for b in part.betas):
            problems.append(f"betas must be below 1, got {json.dumps(part.betas)}")
    if part.optimizer in SCHEDULE_FREE_OPTIMIZERS and part.lr_scheduler not in ("constant", "constant_with_warmup"):
        problems.append(f"{part.optimizer} replaces the LR schedule; set lr_scheduler to constant (or "
                        f"constant_with_warmup); lr_warmup_steps becomes its own warmup")
    if (part.lr_scheduler in DECAYING_SCHEDULERS and part.lr_warmup_steps is not None
            and part.lr_decay_steps is not None and part.lr_warmup_steps >= part.lr_decay_steps):
        problems.append(f"lr_warmup_steps ({part.lr_warmup_steps}) must be below lr_decay_steps "
                        f"({part.lr_decay_steps})")
    return problems


def load_optimizer_config(path: str | None, *, lr_override: float | None = None,
                          warn: Warn | None = None) -> OptimizerConfig:
    """Read optimizer.json (None: the defaults). lr_override (train.json / CLI `lr`) sets the lr of every part.
    Raises ConfigError listing every problem; warnings (legacy keys, unused keys) go to `warn`."""
    warn = warn or stderr_warn
    source = str(path) if path is not None else "optimizer defaults"
    raw = read_json(path, "optimizer config") if path is not None else {}
    top, problems = check_fields(_OptimizerFile, raw, source)
    if lr_override is not None and lr_override < 0:
        problems.append(f"lr must be at least 0, got {lr_override}")
    # the sections as written, in inheritance order: each text encoder's nulls come from the one before
    written = {part: _read_part(top.get(section), f"{source}: {section}", problems, warn, part)
               for part, section in OVERRIDES_SECTION.items()}
    freezing = {te: _read_freezing(top.get(f"{te}_freezing"), f"{source}: {te}_freezing", problems, warn)
                for te in TEXT_ENCODERS}
    if problems:
        raise ConfigError("\n".join(problems))

    base, te_overrides = written["unet"], written["text_encoder"]
    te_merged = inherit(te_overrides, base)
    te_lr_scale = top.get("text_encoder_lr_scale")
    if te_lr_scale is not None and te_overrides.lr is None and base.lr is not None and lr_override is None:
        # EveryDream2 documented this key but never read it; applied here as documented, so say so.
        if te_lr_scale != 1.0:
            warn(f"{source}: text_encoder_lr_scale {te_lr_scale} applied: text-encoder lr = {base.lr} * "
                 f"{te_lr_scale} (EveryDream2 documented this key but ignored it)")
        te_merged = dataclasses.replace(te_merged, lr=base.lr * te_lr_scale)
    merged = {"unet": base, "text_encoder": te_merged,
              "text_encoder_2": inherit(written["text_encoder_2"], te_merged)}
    if lr_override is not None:
        merged = {part: dataclasses.replace(s, lr=lr_override) for part, s in merged.items()}
    resolved = {part: with_defaults(s) for part, s in merged.items()}
    if problems := validate(resolved, source):
        raise ConfigError("\n".join(problems))

    _warn_unused_keys(written, resolved, source, warn)
    optimizers = {s.optimizer for s in resolved.values()}
    if top.get("triton_8bit_step") and not top.get("grouped_8bit_step", True):
        raise ConfigError(f"{source}: triton_8bit_step true needs grouped_8bit_step true (the kernel steps the "
                          f"grouped layout); set one of them")
    if top.get("triton_8bit_step") and "adamw8bit" not in optimizers:
        warn(f"{source}: triton_8bit_step is used by adamw8bit only; no part uses it")
    for name, part in resolved.items():
        first = resolved["text_encoder"]
        if name == "text_encoder_2" and (part.optimizer, part.lr) == (first.optimizer, first.lr):
            continue  # said for the first text encoder
        if part.optimizer in ADAPTIVE_OPTIMIZERS and part.lr is not None and part.lr < 0.1:
            label = {"unet": "UNet"}.get(name, PART_LABELS[name])
            warn(f"{source}: {label} lr {part.lr} with {part.optimizer}: it estimates the step size itself and lr "
                 f"multiplies that estimate; 1.0 (0.1 to 1.0) is usual")
    return OptimizerConfig(unet=resolved["unet"], text_encoder=resolved["text_encoder"],
                           text_encoder_2=resolved["text_encoder_2"],
                           text_encoder_freezing=freezing["text_encoder"],
                           text_encoder_2_freezing=freezing["text_encoder_2"],
                           apply_grad_scaler_step_tweaks=top.get("apply_grad_scaler_step_tweaks", True),
                           log_grad_norm=top.get("log_grad_norm", True),
                           grouped_8bit_step=top.get("grouped_8bit_step", True),
                           triton_8bit_step=top.get("triton_8bit_step", False), source=source)


def _warn_unused_keys(written: dict[str, PartSettings], resolved: dict[str, PartSettings], source: str,
                      warn: Warn) -> None:
    """One warning per section for keys no part reads. A section's key reaches the parts down its inheritance
    chain (base -> text_encoder -> text_encoder_2) until a later section sets the key itself: a base key may be
    meant for a text encoder that inherits it with another optimizer."""
    heirs = {"unet": ("text_encoder", "text_encoder_2"), "text_encoder": ("text_encoder_2",), "text_encoder_2": ()}
    for part, settings in written.items():
        unused = []
        for key in _unused_keys(settings, resolved[part].optimizer):
            readers = []
            for heir in heirs[part]:
                if getattr(written[heir], key) is not None:
                    break
                readers.append(heir)
            if not any(key in OPTIMIZER_DEFAULTS[resolved[r].optimizer] for r in readers):
                unused.append(key)
        if unused:
            warn(f"{source}: {OVERRIDES_SECTION[part]}: {', '.join(unused)} not used by {resolved[part].optimizer}")


def optimizer_config_to_json(cfg: OptimizerConfig) -> dict:
    """A complete optimizer.json for the resolved settings; loading it gives the same OptimizerConfig.
    The trainer saves this next to each checkpoint."""
    second = {}   # left out when it adds nothing (SD1/SD2 runs, EveryDream2 files): the file is EveryDream2's
    if cfg.text_encoder_2 != cfg.text_encoder:
        second["text_encoder_2_overrides"] = to_jsonable(cfg.text_encoder_2)
    if cfg.text_encoder_2_freezing != FreezeSettings():
        second["text_encoder_2_freezing"] = to_jsonable(cfg.text_encoder_2_freezing)
    return {
        "config_version": CONFIG_VERSION,
        "doc": f"Resolved from {cfg.source}; every value is the one the run used.",
        "base": to_jsonable(cfg.unet),
        "text_encoder_overrides": to_jsonable(cfg.text_encoder),
        "text_encoder_freezing": to_jsonable(cfg.text_encoder_freezing),
        **second,
        "apply_grad_scaler_step_tweaks": cfg.apply_grad_scaler_step_tweaks,
        "log_grad_norm": cfg.log_grad_norm,
        "grouped_8bit_step": cfg.grouped_8bit_step,
        "triton_8bit_step": cfg.triton_8bit_step,
    }


if __name__ == "__main__":
    for title, cls in SECTIONS.items():
        sys.stdout.write(f"<!-- keys: {title} -->\n{keys_markdown(cls)}\n\n")
