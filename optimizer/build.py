"""Optimizers and LR schedulers for the UNet and the text encoders, from a resolved OptimizerConfig.

Each trained model (UNet, text_encoder, SDXL's text_encoder_2) gets its own optimizer (one parameter group) and
its own LambdaLR over optimizer/schedules.py; the trainer steps them all once per optimizer step, after
optimizer.step().
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import math
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Sequence

import torch

from optimizer.config import (ADAPTIVE_OPTIMIZERS, DECAYING_SCHEDULERS, OVERRIDES_SECTION, SCHEDULE_FREE_OPTIMIZERS,
                              TEXT_ENCODERS, OptimizerConfig, PartSettings, Warn, stderr_warn)
from optimizer.freezing import FreezePlan, apply_text_encoder_freezing
from optimizer.schedules import lr_multiplier, resolve_schedule_steps
from utils.core.config_schema import ConfigError

# EveryDream2's scale_lr exponent, fitted between SD's original (lr 1e-4 at batch 4096) and DreamBooth (1e-6 at 1-2).
SCALE_LR_EXPONENT = 0.55


@dataclass
class OptimizerPart:
    name: str                                          # "unet", "text_encoder" or "text_encoder_2"
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler    # step once per optimizer step
    params: list[torch.nn.Parameter]                   # the trainable parameters (for grad clipping / norms)
    settings: PartSettings | None = None               # resolved: scaled lr, warmup and decay steps filled in
    total_params: int = 0                              # trainable or not, for the run summary
    lr_scale: float = 1.0                              # the scale_lr factor applied to settings' lr
    freeze_plan: FreezePlan | None = None              # text encoders only


def scale_lr_factor(batch_size: int, grad_accum: int) -> float:
    """EveryDream2's scale_lr: lr * (batch_size * grad_accum) ^ 0.55."""
    return (batch_size * grad_accum) ** SCALE_LR_EXPONENT


# --- optimizer constructors: one small function per name; packages are imported only when chosen ---

PACKAGES = {"bitsandbytes": "bitsandbytes==0.50.2", "lion_pytorch": "lion-pytorch==0.2.5",
            "prodigyopt": "prodigyopt==1.1.2", "dadaptation": "dadaptation==3.2", "schedulefree": "schedulefree==1.4.1"}


def _package(module: str, optimizer: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"optimizer '{optimizer}' needs the package {PACKAGES[module]} "
                          f"(pip install -r requirements.txt), or choose another optimizer") from None


def _betas(s: PartSettings) -> tuple[float, float]:
    return (s.betas[0], s.betas[1])


def _adamw(params, s: PartSettings, device_type: str):
    # the fused CUDA kernel is the fastest torch AdamW; elsewhere torch picks its foreach path
    return torch.optim.AdamW(params, lr=s.lr, betas=_betas(s), eps=s.epsilon, weight_decay=s.weight_decay,
                             fused=True if device_type == "cuda" else None)


def _adamw8bit(params, s: PartSettings, device_type: str, grouped_8bit_step: bool = True,
               triton_8bit_step: bool = False, stochastic_rounding: bool = False):
    _package("bitsandbytes", "adamw8bit")
    from optimizer import grouped8bit  # imports bitsandbytes
    if not grouped_8bit_step:   # (triton_8bit_step true with it is refused by load_optimizer_config)
        return grouped8bit.AdamW8bit(params, lr=s.lr, betas=_betas(s), eps=s.epsilon, weight_decay=s.weight_decay)
    return grouped8bit.GroupedAdamW8bit(params, lr=s.lr, betas=_betas(s), eps=s.epsilon, weight_decay=s.weight_decay,
                                        triton=triton_8bit_step, stochastic_rounding=stochastic_rounding)


def _lion(params, s: PartSettings, device_type: str):
    return _package("lion_pytorch", "lion").Lion(params, lr=s.lr, betas=_betas(s), weight_decay=s.weight_decay)


def _lion8bit(params, s: PartSettings, device_type: str, grouped_8bit_step: bool = True,
              triton_8bit_step: bool = False, stochastic_rounding: bool = False):
    # Lion keeps the CUDA kernel (see triton_8bit_step's doc)
    _package("bitsandbytes", "lion8bit")
    from optimizer import grouped8bit
    if not grouped_8bit_step:
        return grouped8bit.Lion8bit(params, lr=s.lr, betas=_betas(s), weight_decay=s.weight_decay)
    return grouped8bit.GroupedLion8bit(params, lr=s.lr, betas=_betas(s), weight_decay=s.weight_decay,
                                       stochastic_rounding=stochastic_rounding)


def _growth_rate(s: PartSettings) -> float:
    return math.inf if s.growth_rate is None else s.growth_rate


def _prodigy(params, s: PartSettings, device_type: str):
    with redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"; describe() says what runs
        return _package("prodigyopt", "prodigy").Prodigy(
            params, lr=s.lr, betas=_betas(s), eps=s.epsilon, weight_decay=s.weight_decay, decouple=s.decouple,
            use_bias_correction=s.use_bias_correction, safeguard_warmup=s.safeguard_warmup, d0=s.d0,
            d_coef=s.d_coef, growth_rate=_growth_rate(s))


def _dadapt_adam(params, s: PartSettings, device_type: str):
    with redirect_stdout(io.StringIO()):  # the same print as prodigy's
        return _package("dadaptation", "dadapt_adam").DAdaptAdam(
            params, lr=s.lr, betas=_betas(s), eps=s.epsilon, weight_decay=s.weight_decay, decouple=s.decouple,
            use_bias_correction=s.use_bias_correction, d0=s.d0, growth_rate=_growth_rate(s))


def _dadapt_lion(params, s: PartSettings, device_type: str):
    return _package("dadaptation", "dadapt_lion").DAdaptLion(params, lr=s.lr, betas=_betas(s),
                                                              weight_decay=s.weight_decay, d0=s.d0)


def _dadapt_sgd(params, s: PartSettings, device_type: str):
    return _package("dadaptation", "dadapt_sgd").DAdaptSGD(params, lr=s.lr, momentum=s.momentum,
                                                            weight_decay=s.weight_decay, d0=s.d0,
                                                            growth_rate=_growth_rate(s))


def _adafactor(params, s: PartSettings, device_type: str):
    from transformers.optimization import Adafactor
    # relative_step off: the LR comes from lr and our scheduler, like every other optimizer here.
    # beta1 None (not 0) is what skips the first-moment buffer.
    return Adafactor(params, lr=s.lr, eps=(s.epsilon, 1e-3), clip_threshold=s.clip_threshold,
                     decay_rate=s.decay_rate, beta1=s.betas[0] or None, weight_decay=s.weight_decay,
                     scale_parameter=s.scale_parameter, relative_step=False, warmup_init=False)


def _adamw_schedulefree(params, s: PartSettings, device_type: str):
    optimizer = _package("schedulefree", "adamw_schedulefree").AdamWScheduleFree(
        params, lr=s.lr, betas=_betas(s), eps=s.epsilon, weight_decay=s.weight_decay,
        warmup_steps=s.lr_warmup_steps, r=s.r, weight_lr_power=s.weight_lr_power)
    optimizer.train()  # it starts in eval mode and refuses to step there
    return optimizer


OPTIMIZER_BUILDERS: dict[str, Callable] = {
    "adamw": _adamw, "adamw8bit": _adamw8bit, "lion": _lion, "lion8bit": _lion8bit, "prodigy": _prodigy,
    "dadapt_adam": _dadapt_adam, "dadapt_lion": _dadapt_lion, "dadapt_sgd": _dadapt_sgd, "adafactor": _adafactor,
    "adamw_schedulefree": _adamw_schedulefree,
}
# Builders that take grouped_8bit_step (optimizer.json's top-level key): chunked step or bitsandbytes' own loop.
GROUPED_8BIT_OPTIMIZERS = frozenset({"adamw8bit", "lion8bit"})


def make_scheduler(optimizer: torch.optim.Optimizer, s: PartSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over lr_multiplier. A functools.partial, not a closure or an object: LambdaLR's state_dict then
    carries no schedule parameters, so the current config's schedule stands after a resume."""
    if s.optimizer in SCHEDULE_FREE_OPTIMIZERS:
        # the optimizer applies the warmup itself; a scheduler on top would distort its averaging weights
        fn = functools.partial(lr_multiplier, schedule="constant", warmup_steps=0, decay_steps=1)
    else:
        fn = functools.partial(lr_multiplier, schedule=s.lr_scheduler, warmup_steps=s.lr_warmup_steps,
                               decay_steps=s.lr_decay_steps, num_cycles=s.lr_num_cycles or 1.0,
                               power=s.lr_power or 1.0, min_factor=s.lr_min_factor or 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def resolve_for_run(name: str, s: PartSettings, *, total_steps: int, lr_scale: float, warn: Warn) -> PartSettings:
    """Fill warmup/decay from the run length and scale the lr; raises ConfigError when they cannot fit."""
    warmup, decay = resolve_schedule_steps(s.lr_scheduler, s.lr_warmup_steps, s.lr_decay_steps, total_steps)
    if s.lr_scheduler in DECAYING_SCHEDULERS:
        if warmup >= decay:
            raise ConfigError(f"{name}: lr_warmup_steps ({warmup}) must be below lr_decay_steps ({decay}; "
                              f"the run has {total_steps} optimizer steps)")
        if decay < total_steps:
            warn(f"{name}: the {s.lr_scheduler} schedule ends at step {decay}; the last {total_steps - decay} of "
                 f"{total_steps} optimizer steps run at lr * {s.lr_min_factor or 0.0}")
    return dataclasses.replace(s, lr=s.lr * lr_scale, lr_warmup_steps=warmup, lr_decay_steps=decay)


def build_part(name: str, settings: PartSettings, params: list[torch.nn.Parameter], *, total_steps: int,
               lr_scale: float, device_type: str, warn: Warn, total_params: int = 0,
               freeze_plan: FreezePlan | None = None, grouped_8bit_step: bool = True,
               triton_8bit_step: bool = False, stochastic_rounding: bool = False) -> OptimizerPart:
    resolved = resolve_for_run(name, settings, total_steps=total_steps, lr_scale=lr_scale, warn=warn)
    extra = ({"grouped_8bit_step": grouped_8bit_step, "triton_8bit_step": triton_8bit_step,
              "stochastic_rounding": stochastic_rounding} if resolved.optimizer in GROUPED_8BIT_OPTIMIZERS else {})
    optimizer = OPTIMIZER_BUILDERS[resolved.optimizer](params, resolved, device_type, **extra)
    return OptimizerPart(name=name, optimizer=optimizer, scheduler=make_scheduler(optimizer, resolved),
                         params=params, settings=resolved, total_params=total_params, lr_scale=lr_scale,
                         freeze_plan=freeze_plan)


def _lr_scale_for(name: str, s: PartSettings, scale: float, warn: Warn) -> float:
    if scale != 1.0 and s.optimizer in ADAPTIVE_OPTIMIZERS:
        warn(f"{name}: scale_lr is not applied to {s.optimizer}: its lr multiplies the step size it estimates")
        return 1.0
    return scale


def fused_backward_problems(opt_cfg: OptimizerConfig, *, train_unet: bool,
                            train_text_encoders: Collection[str] = (), grad_accum: int,
                            clip_grad_norm: float | None, fp16: bool, processes: int) -> list[str]:
    """Why train.json's fused_backward_pass cannot run with these settings (empty: it can). Each chunk of the
    grouped 8-bit step is applied as the backward pass completes its gradients, so nothing may need all the
    gradients at once (clipping, an fp16 GradScaler's overflow check, DDP's all-reduce) or several backward
    passes (grad_accum). train_text_encoders: the names of the text encoders the run trains (those whose
    freezing section says freeze_all are skipped)."""
    problems = _grouped_8bit_problems(opt_cfg, train_unet, train_text_encoders)
    if grad_accum != 1:
        problems.append(f"grad_accum is {grad_accum}: set it to 1 (use a larger batch_size)")
    if clip_grad_norm:
        problems.append(f"clip_grad_norm is {clip_grad_norm}: set it to null")
    if fp16:
        problems.append("fp16 needs a GradScaler, which checks all gradients before any step: use mixed_precision "
                        "bf16 (on a GPU without bf16, fused_backward_pass false)")
    if processes > 1:
        problems.append(f"{processes} processes: DDP averages the gradients after the backward pass; "
                        f"fused_backward_pass runs on one GPU")
    return problems


def stochastic_rounding_problems(opt_cfg: OptimizerConfig, *, train_unet: bool,
                                 train_text_encoders: Collection[str] = ()) -> list[str]:
    """Why train.json's weight_dtype bf16 cannot run with these settings (empty: it can): the stochastic rounding
    of bf16 weights happens inside the grouped 8-bit step, so every trained part must use it."""
    return _grouped_8bit_problems(opt_cfg, train_unet, train_text_encoders)


def _grouped_8bit_problems(opt_cfg: OptimizerConfig, train_unet: bool, train_text_encoders: Collection[str]):
    """Each trained part must use the grouped 8-bit step (adamw8bit / lion8bit, grouped_8bit_step true)."""
    trained = ["unet"] if train_unet else []
    trained += [te for te in TEXT_ENCODERS if te in _checked_names(train_text_encoders)
                and opt_cfg.trains_text_encoder(te)]
    problems = []
    for part in trained:
        s = opt_cfg.settings(part)
        if s.optimizer not in GROUPED_8BIT_OPTIMIZERS:
            problems.append(f"optimizer.json {OVERRIDES_SECTION[part]}: optimizer {s.optimizer!r}: use adamw8bit "
                            f"or lion8bit")
    if not opt_cfg.grouped_8bit_step:
        problems.append("optimizer.json grouped_8bit_step is false: set it to true")
    return problems


def _checked_names(names: Collection[str]) -> Collection[str]:
    if unknown := [n for n in names if n not in TEXT_ENCODERS]:
        raise ValueError(f"unknown text encoder {unknown[0]!r}; valid: {', '.join(TEXT_ENCODERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a text encoder is named twice: {list(names)}")
    return names


def build_optimizer_parts(opt_cfg: OptimizerConfig, *, unet: torch.nn.Module | None,
                          text_encoders: Sequence[tuple[str, torch.nn.Module | None]] = (), total_steps: int,
                          batch_size: int, grad_accum: int, scale_lr: bool = False, device_type: str = "cuda",
                          warn: Warn | None = None, stochastic_rounding: bool = False) -> list[OptimizerPart]:
    """One OptimizerPart per trained model, named "unet", "text_encoder", "text_encoder_2", in that order.
    text_encoders: (name, module) pairs, name "text_encoder" or "text_encoder_2" (SD1/SD2 pass only the
    first); module None = that encoder is not trained. None (also unet=None): the caller freezes that model
    (module.requires_grad_(False)); this function never sees it. Each text encoder's freezing section is applied
    first (freeze_all, or nothing left to train: it gets no part); the caller should pass None for an encoder
    whose opt_cfg.trains_text_encoder(name) is false. Sets requires_grad on every parameter of the models it is
    given. total_steps = optimizer steps of the run (for the automatic warmup/decay); batch_size (summed over
    GPUs) and grad_accum only feed scale_lr. stochastic_rounding: bf16 weights are rounded stochastically in the
    grouped 8-bit step (train.json weight_dtype bf16; stochastic_rounding_problems says what it needs). Raises
    ConfigError."""
    warn = warn or stderr_warn
    _checked_names([name for name, _ in text_encoders])
    if total_steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"total_steps, batch_size and grad_accum must be at least 1, "
                         f"got {total_steps}, {batch_size}, {grad_accum}")
    scale = scale_lr_factor(batch_size, grad_accum) if scale_lr else 1.0

    def part(name: str, params: list[torch.nn.Parameter], total: int, plan: FreezePlan | None) -> OptimizerPart:
        settings = opt_cfg.settings(name)
        return build_part(name, settings, params, total_steps=total_steps,
                          lr_scale=_lr_scale_for(name, settings, scale, warn), device_type=device_type, warn=warn,
                          total_params=total, freeze_plan=plan, grouped_8bit_step=opt_cfg.grouped_8bit_step,
                          triton_8bit_step=opt_cfg.triton_8bit_step, stochastic_rounding=stochastic_rounding)

    parts = []
    if unet is not None:
        unet.requires_grad_(True)
        params = list(unet.parameters())
        parts.append(part("unet", params, sum(p.numel() for p in params), None))
    given = dict(text_encoders)
    for name in (te for te in TEXT_ENCODERS if given.get(te) is not None):
        module, section = given[name], f"{name}_freezing"
        params, plan = apply_text_encoder_freezing(module, opt_cfg.freezing(name), warn, section)
        if params:
            parts.append(part(name, params, sum(p.numel() for p in module.parameters()), plan))
        elif not opt_cfg.freezing(name).freeze_all:
            warn(f"{section} freezes every {name} parameter: {name} is not trained")
    if not parts:
        raise ConfigError("nothing to train: no UNet and no trainable text-encoder parameter")
    return parts


# --- what the trainer asks during the run ---

def current_lr(part: OptimizerPart) -> float:
    """The step size the next optimizer step uses, for logging. prodigy / dadapt_*: d * lr (their estimate times
    the scheduled multiplier); adamw_schedulefree: lr times its own warmup ramp."""
    group = part.optimizer.param_groups[0]
    lr = float(group["lr"])
    if "d" in group:
        return float(group["d"]) * lr
    if "train_mode" in group and group.get("warmup_steps"):
        return lr * min(1.0, (group["k"] + 1) / group["warmup_steps"])
    return lr


def describe(parts: list[OptimizerPart]) -> str:
    """One line per part for the run summary."""
    return "\n".join(_describe_part(part) for part in parts)


def _describe_part(part: OptimizerPart) -> str:
    s = part.settings
    if s is None:
        return f"{part.name}: {type(part.optimizer).__name__}"
    lr = f"lr {s.lr:.3g}"
    if part.lr_scale != 1.0:
        lr += f" ({s.lr / part.lr_scale:.3g} x {part.lr_scale:.3g} scale_lr)"
    if s.optimizer in ADAPTIVE_OPTIMIZERS:
        lr += " (multiplier on its own step-size estimate)"
    if s.optimizer in SCHEDULE_FREE_OPTIMIZERS:
        schedule = f"schedule-free, own warmup {s.lr_warmup_steps}"
    elif s.lr_scheduler in DECAYING_SCHEDULERS:
        schedule = f"{s.lr_scheduler} (warmup {s.lr_warmup_steps}, decay to step {s.lr_decay_steps})"
    else:
        schedule = s.lr_scheduler + (f" (warmup {s.lr_warmup_steps})" if s.lr_warmup_steps else "")
    trainable = sum(p.numel() for p in part.params)
    line = (f"{part.name}: {s.optimizer} ({type(part.optimizer).__name__}), {lr}, {schedule}; "
            f"{trainable:,} of {part.total_params or trainable:,} parameters train")
    plan = part.freeze_plan
    if plan is not None and plan.freezes_anything:
        frozen = [f"last {plan.trained_layers} of {plan.total_layers} layers train"]
        frozen += ["embeddings frozen"] if plan.freeze_embeddings else []
        frozen += ["final layer norm frozen"] if plan.freeze_final_layer_norm else []
        line += f" ({', '.join(frozen)})"
    return line


def uses_train_eval_modes(part: OptimizerPart) -> bool:
    """Schedule-free optimizers keep two weight sets: train mode for steps, eval mode for using the model."""
    return callable(getattr(part.optimizer, "train", None)) and callable(getattr(part.optimizer, "eval", None))


def set_train_mode(parts: list[OptimizerPart], train: bool) -> None:
    """optimizer.train() / .eval() on the parts that have them (schedule-free); a no-op for the others.
    Eval mode puts the averaged weights into the model: use it for sampling, validation and saving."""
    for part in parts:
        if uses_train_eval_modes(part):
            part.optimizer.train() if train else part.optimizer.eval()


@contextmanager
def eval_weights(parts: list[OptimizerPart]) -> Iterator[None]:
    """`with eval_weights(parts): sample(); save()`: the model holds the weights to evaluate and export."""
    set_train_mode(parts, False)
    try:
        yield
    finally:
        set_train_mode(parts, True)


# EveryDream2's GradScaler retuning (apply_grad_scaler_step_tweaks): at these optimizer steps the fp16 loss
# scale grows more slowly, since late in training overflow-and-back-off cycles cost more than they gain.
GRAD_SCALER_TWEAKS = {500: (1.8, 100), 1000: (1.6, 200), 2000: (1.3, 500), 4000: (1.15, 2000)}


def grad_scaler_tweak(optimizer_step: int) -> tuple[float, float, int] | None:
    """(growth_factor, backoff_factor, growth_interval) to set on the GradScaler at this step, else None."""
    if optimizer_step not in GRAD_SCALER_TWEAKS:
        return None
    factor, interval = GRAD_SCALER_TWEAKS[optimizer_step]
    return factor, 1.0 / factor, interval
