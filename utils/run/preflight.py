"""Before anything loads: the config against this machine, and every file the run will read.

`preflight` is the one place a run's settings are checked beyond the schema (utils/run/config.py checks keys,
types and combinations of keys): optimizer.json, the prompt file, the validation config and the data settings are
read here, and options that need a CUDA GPU, a package or a single process are refused here, so that a mistake
stops the run in seconds with one line, never after minutes of loading.
"""
from __future__ import annotations

import os

import torch

from data.items import DataSettings, require_valid_settings
from optimizer import triton8bit
from optimizer.build import fused_backward_problems, stochastic_rounding_problems
from optimizer.config import load_optimizer_config
from utils.core.config_schema import ConfigError
from utils.core.run_logging import get_logger
from utils.eval.sample_config import SampleConfigSource
from utils.eval.validation import ValidationHistory, load_validation_config
from utils.run.config import TrainConfig, live_settings
from utils.run.run_state import Previews, Run

log = get_logger()


def amp_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. auto: bf16 where the GPU has it, else fp16; fp32 on CPU."""
    if mixed_precision == "no" or (mixed_precision == "auto" and device.type != "cuda"):
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def data_settings(cfg: TrainConfig, resolutions: list[int]) -> DataSettings:
    return DataSettings(resolution=resolutions, flip_p=cfg.flip_p, cond_dropout=cfg.cond_dropout,
                        shuffle_tags=cfg.shuffle_tags, keep_tags=cfg.keep_tags, crop_jitter=cfg.crop_jitter)


def sample_source(cfg: TrainConfig, resolutions: list[int]) -> SampleConfigSource:
    """The prompt file's samples (a broken prompt file is a ConfigError here)."""
    return SampleConfigSource(cfg.sample_prompts, default_seed=cfg.seed, default_size=(resolutions[0],) * 2,
                              default_steps=cfg.sample_num_steps, default_batch_size=max(1, cfg.batch_size // 2),
                              zero_terminal_snr=cfg.enable_zero_terminal_snr)


def _start_accelerate():
    # Buckets of many sizes fragment the caching allocator; growable segments let freed memory be reused. Read
    # when CUDA first allocates, so set before anything touches the GPU; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from accelerate import Accelerator
    accelerator = Accelerator(mixed_precision="no")  # autocast and the GradScaler are ours (doc/MULTI_GPU.md)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"started as one of {os.environ['WORLD_SIZE']} processes, but accelerate set up no "
                          f"process group, so each would train alone over the same files. Without CUDA GPUs "
                          f"set ACCELERATE_USE_CPU=true (see doc/MULTI_GPU.md)")
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(f"accelerate's {accelerator.distributed_type.name} mode is not supported: this "
                          f"trainer builds its own optimizers and GradScaler and wraps the models in DDP itself. "
                          f"Launch plain data parallel (accelerate launch --multi_gpu), see doc/MULTI_GPU.md")
    return accelerator


def _check_machine(cfg: TrainConfig, opt_cfg, device: torch.device, processes: int, amp) -> None:
    """Options this machine cannot run."""
    if cfg.attn_type == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ConfigError("attn_type 'xformers': xformers is not installed; use 'sdp' (torch's "
                              "scaled-dot-product attention, as fast) or pip install xformers") from None
        if device.type != "cuda":
            raise ConfigError("attn_type 'xformers' needs a CUDA GPU; use 'sdp'")
    if opt_cfg.triton_8bit_step:
        triton8bit.check_available(device)
    if cfg.weight_dtype == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("weight_dtype 'bf16': this GPU has no bf16 (it needs an Ampere or newer card); set "
                              "weight_dtype 'fp32'")
        # the first text encoder: a second one (SDXL) is checked once the model has loaded (setup)
        if problems := stochastic_rounding_problems(
                opt_cfg, train_unet=not cfg.disable_unet_training,
                train_text_encoders=() if cfg.disable_textenc_training else ("text_encoder",)):
            raise ConfigError("weight_dtype 'bf16' cannot run with this optimizer.json:\n  - "
                              + "\n  - ".join(problems))
    if cfg.overlap_optimizer_step and device.type != "cuda":
        raise ConfigError(f"overlap_optimizer_step true needs a CUDA GPU (this run is on {device.type}); "
                          f"set it to false")
    if cfg.fused_backward_pass:
        problems = fused_backward_problems(
            opt_cfg, train_unet=not cfg.disable_unet_training,
            # the first text encoder: which others the model has is known once it loads (setup checks them)
            train_text_encoders=() if cfg.disable_textenc_training else ("text_encoder",),
            grad_accum=cfg.grad_accum, clip_grad_norm=cfg.clip_grad_norm, fp16=amp == torch.float16,
            processes=processes)
        if problems:
            raise ConfigError("fused_backward_pass true cannot run here:\n  - " + "\n  - ".join(problems))


def preflight(cfg: TrainConfig, config_path: str | None = None) -> Run:
    """A Run with the config checked against this machine and the side files read; loads no model, no image."""
    accelerator = _start_accelerate()
    device, processes = accelerator.device, accelerator.num_processes
    if not accelerator.is_main_process:
        log.setLevel("WARNING")  # the console shows the main process's lines once, not N times
    amp = amp_dtype(cfg.mixed_precision, device)
    if cfg.weight_dtype == "bf16":   # bf16 weights run under bf16 autocast, on the CPU too
        amp = torch.bfloat16
    elif cfg.mixed_precision in ("fp16", "bf16") and device.type != "cuda":
        log.info(f"mixed_precision {cfg.mixed_precision} needs a CUDA GPU; training in fp32 on {device}")
        amp = None
    opt_cfg = load_optimizer_config(cfg.optimizer_config, lr_override=cfg.lr)
    _check_machine(cfg, opt_cfg, device, processes, amp)
    run = Run(cfg=cfg, config_path=config_path, live=live_settings(cfg), opt_cfg=opt_cfg, accelerator=accelerator,
              device=device, is_main=accelerator.is_main_process, processes=processes, amp_dtype=amp)
    require_valid_settings(data_settings(cfg, run.resolutions))
    validation = load_validation_config(cfg.validation_config)
    run.previews = Previews(validation=validation, sets=[], samples=sample_source(cfg, run.resolutions),
                            history=ValidationHistory(relative=bool(validation and validation.use_relative_loss)))
    return run
