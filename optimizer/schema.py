"""The keys of optimizer.json: names, types, help texts and ranges of each section, and the doc tables made
from them (doc/OPTIMIZER.md embeds them; `python -m optimizer.config` prints them). optimizer/config.py reads
and resolves a file against these."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from utils.core.config_schema import describe_type, doc, field_default, null_meaning, schema_fields

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


# What a null does in base / text_encoder_overrides / text_encoder_2_overrides, the same for every key (inherit,
# with_defaults): the docs' null column for PartSettings.
PART_NULL = ("in base: the default given in the meaning; in text_encoder_overrides: base's value; in "
             "text_encoder_2_overrides: text_encoder_overrides' value, else base's")

# The text encoders a model may have (diffusers subfolder names): SD1/SD2 the first, SDXL both.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Each trained part's settings section in optimizer.json.
OVERRIDES_SECTION = {"unet": "base", "text_encoder": "text_encoder_overrides",
                     "text_encoder_2": "text_encoder_2_overrides"}


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
    freeze_all: bool | None = doc(None, "Freeze this whole text encoder: it gets no optimizer (SDXL: true in "
                                        "text_encoder_freezing trains only the second encoder, in "
                                        "text_encoder_2_freezing only the first).", null="false")


@dataclass
class _OptimizerFile:
    """The top level of optimizer.json."""
    config_version: int = doc(CONFIG_VERSION, "Version of this file's format.", minimum=1, maximum=CONFIG_VERSION)
    base: dict | None = doc(None, "Settings for the UNet and the defaults for the text encoder (keys below).",
                            null="every key its default")
    text_encoder_overrides: dict | None = doc(None, "Text-encoder settings; same keys as base; null or missing "
                                                    "values inherit from base.", null="all from base")
    text_encoder_freezing: dict | None = doc(None, "Text-encoder freezing, partial or whole (keys below).",
                                             null="no freezing")
    text_encoder_2_overrides: dict | None = doc(None, "SDXL's second text encoder (OpenCLIP bigG, "
                                                      "text_encoder_2); same keys as base; null or missing values "
                                                      "inherit from text_encoder_overrides, then base.",
                                                null="all from text_encoder_overrides, then base")
    text_encoder_2_freezing: dict | None = doc(None, "SDXL's second text encoder's freezing; same keys as "
                                                     "text_encoder_freezing, nothing inherited from it.",
                                               null="no freezing")
    text_encoder_lr_scale: float | None = doc(None, "EveryDream2 key: when the text encoder inherits its lr from "
                                                    "base, multiply it by this (the second text encoder inherits "
                                                    "the result).", minimum=0.0, null="no scaling")
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


SECTIONS = {"top level": _OptimizerFile, "base / text_encoder_overrides / text_encoder_2_overrides": PartSettings,
            "text_encoder_freezing / text_encoder_2_freezing": FreezeSettings}
