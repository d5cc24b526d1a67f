"""The training run, top to bottom: setup, train, save, cleanup.

The pieces (captions, buckets, batch order, loss, LR schedule, EMA) are pure functions in data/, optimizer/
and utils/; this file only wires them together and owns files, devices and time.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import signal
import time
import warnings
from collections import Counter
from datetime import datetime
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.dataset import (BatchDataset, DataSettings, epoch_batches, require_usable, scan_dataset, summarize,
                          write_dataset_report, write_schedule)
from data.discovery import decode_problems
from data.latent_cache import ensure_latents, needed_entries
from optimizer import triton8bit
from optimizer.build import (build_optimizer_parts, current_lr, describe, eval_weights, fused_backward_problems,
                             grad_scaler_tweak, set_train_mode)
from optimizer.config import load_optimizer_config, optimizer_config_to_json
from utils.run.compile_shapes import (CompiledShapes, choose_shapes, describe_shape, eager_unless, first_line,
                                  is_compile_error, shape_of_batch, shape_of_plan)
from utils.run.checkpoint import (STATE_FILE, TrainState, capture_rng, checkpoint_name, find_last, list_checkpoints,
                              load_trainer_state, prune_checkpoints, restore_rng, save_checkpoint_folder,
                              save_trainer_state, write_json_atomic)
from utils.run.config import TrainConfig, config_to_dict, reload_live_settings
from utils.core.config_schema import ConfigError
from utils.sd.convert_ldm import save_single_file
from utils.sd.ema import EMA, ema_decay_from_target, ema_weights
from utils.core.file_writes import create_folder
from utils.sd.losses import mask_to_latent_weight, use_mask_this_step
from utils.sd.models import load_sd_model, resolve_model_folder
from utils.sd.noise import make_noise_scheduler, sampling_settings
from utils.core.run_logging import MetricsSink, add_log_file, get_logger, quiet_libraries, read_later
from utils.eval.sampling import (SampleConfigSource, build_pipeline, generate, make_grid, plan_samples, sample_stem,
                            sample_tag, write_sample)
from utils.sd.step import LossSettings, batch_seed, compute_loss
from utils.sd.text_conditioning import PromptCache, encode_prompts, perturb_embeddings
from utils.eval.validation import (ValidationHistory, describe_split, evaluate_loss, load_validation_config,
                              split_for_validation, validation_due, validation_loss_settings, validation_sets)

log = get_logger()


OOM_ADVICE = ("error: CUDA out of memory. Lower, in this order: batch_size (now {batch_size}; grad_accum keeps the "
              "effective batch), resolution (now {resolution}); or turn on gradient_checkpointing, use "
              "mixed_precision bf16/fp16, attn_type slice, ema_device cpu, disable_textenc_training. Trying to save "
              "the current weights as an interrupted checkpoint.")
NONFINITE_STEP_LIMIT = 20  # skipped steps in a row before training stops: fp16 calibration skips only a few


# The profiler ranges of a step (utils.perf.benchmark --profile attributes the GPU's idle time to them); what falls
# outside them is the loop itself.
PHASE_DATA, PHASE_FORWARD, PHASE_BACKWARD = "step: data", "step: forward", "step: backward"
PHASE_OPTIMIZER, PHASE_AFTER = "step: optimizer", "step: logging, samples, saves"
PHASES = (PHASE_DATA, PHASE_FORWARD, PHASE_BACKWARD, PHASE_OPTIMIZER, PHASE_AFTER)


def annotated(iterable, name: str):
    """Yield from `iterable`, each fetch inside a profiler range called `name` (nearly free when not profiling)."""
    it, end = iter(iterable), object()
    while True:
        with torch.profiler.record_function(name):
            item = next(it, end)
        if item is end:
            return
        yield item


class StopTraining(Exception):
    """Raised inside the loop to end the run early with a message (e.g. repeated non-finite losses)."""


def amp_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. auto: bf16 where the GPU has it, else fp16; fp32 on CPU."""
    if mixed_precision == "no" or (mixed_precision == "auto" and device.type != "cuda"):
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return math.ceil(n_batches / grad_accum)


def accumulation_group_size(batch_index: int, n_batches: int, grad_accum: int, world_size: int = 1) -> float:
    """How many micro-batches share this one's optimizer step (the last group of an epoch may be short), per
    process. batch_index is this process's; n_batches counts the whole epoch before the DDP split. With N processes
    a step covers N * grad_accum consecutive epoch positions (rank r's batch i is position i * N + r) and DDP divides
    the summed gradient by N, so each process divides its loss by (real batches in the step) / N: the update is
    exactly one process's with N * grad_accum accumulation, also in a short last step (padding weighs 0)."""
    group_start = (batch_index // grad_accum) * grad_accum * world_size
    real = min(grad_accum * world_size, n_batches - group_start)
    return real if world_size == 1 else real / world_size


def due(step: int, every: int | None) -> bool:
    return bool(every) and step > 0 and step % every == 0


# each trained part's TensorBoard tags: (learning rate, gradient norm)
PART_TAGS = {"unet": ("hyperparameter/lr unet", "optimizer/unet_grad_norm"),
             "text_encoder": ("hyperparameter/lr text encoder", "optimizer/te_grad_norm")}


def step_schedule(part) -> None:
    """Advances a part's LR schedule by one optimizer step. A skipped step (non-finite loss, or fp16's GradScaler
    backing off) advances it too, so the schedule follows global_step; torch warns about a schedule step without
    an optimizer step, which here is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        part.scheduler.step()


class Trainer:
    def __init__(self, cfg: TrainConfig, config_path: str | None = None):
        """Cheap: checks option combinations against this machine; loads nothing."""
        self.cfg = cfg
        self.config_path = config_path  # re-read each epoch with load_settings_every_epoch
        # Buckets of many sizes fragment the caching allocator; growable segments let freed memory be reused. Read
        # when CUDA first allocates, so set before anything touches the GPU; a user's own setting wins.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        from accelerate import Accelerator
        self.accelerator = Accelerator(mixed_precision="no")  # autocast and the GradScaler are ours (see doc)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and self.accelerator.num_processes == 1:
            raise ConfigError(f"started as one of {os.environ['WORLD_SIZE']} processes, but accelerate set up no "
                              f"process group, so each would train alone over the same files. Without CUDA GPUs "
                              f"set ACCELERATE_USE_CPU=true (see doc/MULTI_GPU.md)")
        if self.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ConfigError(f"accelerate's {self.accelerator.distributed_type.name} mode is not supported: this "
                              f"trainer builds its own optimizers and GradScaler and wraps the models in DDP itself. "
                              f"Launch plain data parallel (accelerate launch --multi_gpu), see doc/MULTI_GPU.md")
        if not self.is_main:
            log.setLevel("WARNING")  # the console shows the main process's lines once, not N times
        self.amp_dtype = amp_dtype(cfg.mixed_precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the fastest convolution per input shape, picked once per bucket
        if cfg.mixed_precision in ("fp16", "bf16") and self.device.type != "cuda":
            log.info(f"mixed_precision {cfg.mixed_precision} needs a CUDA GPU; training in fp32 on {self.device}")
            self.amp_dtype = None
        if cfg.attn_type == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ConfigError("attn_type 'xformers': xformers is not installed; use 'sdp' (torch's "
                                  "scaled-dot-product attention, as fast) or pip install xformers") from None
            if self.device.type != "cuda":
                raise ConfigError("attn_type 'xformers' needs a CUDA GPU; use 'sdp'")
        # optimizer.json is read here, so its mistakes, and combinations that cannot run, stop the run before any
        # model loads
        self.opt_cfg = load_optimizer_config(cfg.optimizer_config, lr_override=cfg.lr)
        if self.opt_cfg.triton_8bit_step:
            triton8bit.check_available(self.device)
        if cfg.overlap_optimizer_step and self.device.type != "cuda":
            raise ConfigError(f"overlap_optimizer_step true needs a CUDA GPU (this run is on {self.device.type}); "
                              f"set it to false")
        if cfg.fused_backward_pass:
            problems = fused_backward_problems(
                self.opt_cfg, train_unet=not cfg.disable_unet_training, train_te=not cfg.disable_textenc_training,
                grad_accum=cfg.grad_accum, clip_grad_norm=cfg.clip_grad_norm, fp16=self.amp_dtype == torch.float16,
                processes=self.accelerator.num_processes)
            if problems:
                raise ConfigError("fused_backward_pass true cannot run here:\n  - " + "\n  - ".join(problems))
        self.stop_requested: str | None = None
        self._signals_seen, self._abort_signal = 0, None  # a second signal aborts (_install_signal_handlers)
        self._batches = None  # the DataLoader iterator of the epoch in progress (_loader, _close_loader)
        self._stop_signal, self._save_agreed, self._images_synced = None, False, 0  # N processes: _agree_at_step
        self.nonfinite_run = 0
        self.out_of_memory = False
        self.backward_skipped = False  # fused_backward_pass: this step's loss was not finite, no backward ran
        self.compiled_shapes: CompiledShapes | None = None  # torch_compile: which batch shapes run compiled
        self.log_hook = None  # benchmark timing: called with the step number at each logging step
        self.torch_settings = contextlib.ExitStack()  # process-wide kernel settings of this run, undone by cleanup

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        quiet_libraries()
        self.run_dir = self._make_run_dir()
        if self.is_main:
            self.log_handler = add_log_file(self.run_dir / f"{self.run_dir.name}.log")
            write_json_atomic(self.run_dir / "train.json", config_to_dict(cfg))
        log.info(f"run folder: {self.run_dir}")

        self._enter_torch_settings()
        self.scan = self._scan_data()              # bad data fails here, before minutes go into loading models
        self._setup_validation()                   # held-out images leave self.scan.items before epochs are planned
        self._setup_samples()                      # a broken prompt file fails here too
        # Downloads / conversions / built-ins land in .models: the main process first, then one per machine (a
        # machine-local disk), then the rest (each process goes through 2 barriers, in matching order).
        with self.accelerator.main_process_first(), self.accelerator.local_main_process_first():
            self.model_folder, resume_state = self._resolve_model()
        if resume_state is not None and resume_state["train_state"]["seed"] != cfg.seed:
            # data order and noise are functions of the seed: continuing exactly needs the checkpoint's
            log.info(f"warning: the checkpoint was trained with seed {resume_state['train_state']['seed']}, not "
                     f"{cfg.seed}; continuing with the checkpoint's seed so the resume is exact")
            cfg.seed = resume_state["train_state"]["seed"]
            if self.is_main:
                write_json_atomic(self.run_dir / "train.json", config_to_dict(cfg))
        self._load_models()
        self.latent_index = self._cache_latents() if cfg.cache_latents else None
        self._build_optimizers()
        self._wrap_for_ddp()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.state = TrainState(seed=cfg.seed)
        self.ema = self._build_ema() if self.is_main else None  # DDP keeps weights equal: EMA on main only
        if resume_state is not None:
            self._restore(resume_state)
        self.metrics = MetricsSink(self.run_dir, enabled=self.is_main)
        self.metrics.text("config", "```\n" + json.dumps(config_to_dict(cfg), indent=2) + "\n```")
        self._print_summary()

    def _enter_torch_settings(self) -> None:
        """Global torch switches this run asks for. They are read when a kernel is picked (SDPA, at each call or
        when compiling) and when a compiled graph's backward is partitioned (at its first step), so they hold for
        the whole run; cleanup restores them (tests run many trainers in one process)."""
        cfg = self.cfg
        if cfg.attn_type == "sdp" and cfg.sdp_backend != "auto":
            self.torch_settings.enter_context(sdpa_kernel(sdp_priority(cfg.sdp_backend), set_priority=True))
        if cfg.torch_compile and cfg.compile_memory_budget < 1.0:
            self.torch_settings.enter_context(
                torch._functorch.config.patch(activation_memory_budget=cfg.compile_memory_budget))
        if cfg.torch_compile:
            import torch._inductor.config as inductor
            # size asserts re-check every input of every compiled graph call on the host (the step waits on the
            # host); dynamo's guards check them already. The layout optimization: see compile_layout_optimization.
            self.torch_settings.enter_context(inductor.patch(
                size_asserts=False, force_layout_optimization=cfg.compile_layout_optimization))
            # One graph per batch shape (utils/run/compile_shapes.py): each shape is a recompile of the same frames.
            self.torch_settings.enter_context(torch._dynamo.config.patch(
                cache_size_limit=max(torch._dynamo.config.cache_size_limit, cfg.compile_max_shapes + 8)))
            if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
                # the backward graph compiles with the forward: a failing compile then fails in the forward, before
                # any gradient is touched, and the step can run again uncompiled
                self.torch_settings.enter_context(
                    torch._functorch.config.patch(force_non_lazy_backward_lowering=True))

    def _make_run_dir(self) -> Path:
        from accelerate.utils import broadcast_object_list
        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every process writes into the same run folder name
        run_dir = Path(self.cfg.logdir) / f"{self.cfg.project_name}-{stamp[0]}"
        if self.is_main:  # an unwritable logdir stops the run here, before anything loads
            create_folder(run_dir / "ckpts", "logdir")
        return run_dir

    def _scan_data(self):
        cfg = self.cfg
        settings = DataSettings(resolution=self.resolutions, flip_p=cfg.flip_p, cond_dropout=cfg.cond_dropout,
                                shuffle_tags=cfg.shuffle_tags, keep_tags=cfg.keep_tags, crop_jitter=cfg.crop_jitter)
        # every image is decoded once here, so a broken one is skipped before epochs are planned (doc/DATA.md)
        scan = scan_dataset(cfg.data_root, settings, decode=self._decode_shares, progress=self.is_main,
                            check_usable=False)
        if self.is_main:
            write_dataset_report(scan, self.run_dir / "dataset.jsonl")
        for line in summarize(scan).splitlines():
            log.info(line)
        require_usable(scan)  # nothing left to train on: stop before any model loads
        return scan

    def _decode_shares(self, items) -> dict:
        """The scan's full decode: process r decodes images r, r + N, ...; all get every process's verdicts."""
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        problems = decode_problems(items, range(rank, len(items), n), progress=self.is_main)
        if n > 1:
            from accelerate.utils import gather_object
            problems = {i: p for share in gather_object([problems]) for i, p in share.items()}
        return problems

    @property
    def prediction_override(self) -> str | None:
        return None if self.cfg.prediction_type == "auto" else self.cfg.prediction_type

    @property
    def resolutions(self) -> list[int]:
        r = self.cfg.resolution
        return list(r) if isinstance(r, list) else [r]

    def _resolve_model(self) -> tuple[Path, dict | None]:
        source = self.cfg.resume_ckpt
        folder = find_last(Path(self.cfg.logdir)) if source == "findlast" else None
        folder = folder or resolve_model_folder(source, Path(self.cfg.logdir) / ".models", self.prediction_override)
        state = load_trainer_state(folder)
        log.info(f"model: {folder}" + ("  (resuming its trainer state)" if state else ""))
        return folder, state

    def _load_models(self) -> None:
        cfg = self.cfg
        sd = load_sd_model(self.model_folder, self.prediction_override)
        self.sd = sd
        self.noise_scheduler = make_noise_scheduler(sd.scheduler_config,
                                                    zero_terminal_snr=cfg.enable_zero_terminal_snr)
        self.train_unet = not cfg.disable_unet_training
        self.train_te = not cfg.disable_textenc_training
        frozen_dtype = self.amp_dtype or torch.float32
        # Frozen parts run in the autocast dtype: less memory, and no fp32 copy is needed.
        sd.vae.requires_grad_(False).to(self.device, dtype=frozen_dtype).eval()
        sd.unet.to(self.device, dtype=torch.float32 if self.train_unet else frozen_dtype)
        sd.text_encoder.to(self.device, dtype=torch.float32 if self.train_te else frozen_dtype)
        if cfg.channels_last:  # convolutions in NHWC: the layout cuDNN's tensor-core kernels want
            sd.unet.to(memory_format=torch.channels_last)
        if not self.train_unet:
            sd.unet.requires_grad_(False).eval()
        if not self.train_te:
            sd.text_encoder.requires_grad_(False).eval()
        self.te_cache = PromptCache() if not self.train_te and cfg.cache_te_outputs else None
        if cfg.attn_type == "xformers":
            sd.unet.enable_xformers_memory_efficient_attention()
        elif cfg.attn_type == "slice":
            sd.unet.set_attention_slice("auto")
        if cfg.gradient_checkpointing:
            if self.train_unet:
                sd.unet.enable_gradient_checkpointing()
            if self.train_te:
                sd.text_encoder.gradient_checkpointing_enable()
        if self.train_unet:
            sd.unet.train()
        if self.train_te:
            sd.text_encoder.train()
        self.unet, self.text_encoder = sd.unet, sd.text_encoder  # DDP-wrapped by _wrap_for_ddp, after freezing

    def _cache_latents(self):
        """Encode what is not cached yet (each process its share), then every process reads the whole cache."""
        cfg = self.cfg
        cache_dir = Path(cfg.latent_cache_dir) if cfg.latent_cache_dir else Path(cfg.logdir) / ".latent_cache"
        report = ensure_latents(self.scan.items, needed_entries(self.scan.items, self.resolutions), self.sd.vae,
                                cache_dir, rank=self.accelerator.process_index,
                                world_size=self.accelerator.num_processes, progress=self.is_main)
        log.info(report.summary())
        if cfg.crop_jitter or any(item.crop_jitter for item in self.scan.items):
            log.info("cache_latents: images train with their centre crop; crop_jitter is not applied")
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1:
            # what other processes encoded is here unless the cache is on another machine's disk: encode the rest
            report = ensure_latents(self.scan.items, needed_entries(self.scan.items, self.resolutions), self.sd.vae,
                                    cache_dir, progress=False)
            if report.encoded:
                log.warning(f"latent cache: {report.encoded} entries were missing here (latent_cache_dir is not "
                            f"shared between machines?) and were encoded by this process too")
        return report.index

    def _build_optimizers(self) -> None:
        cfg = self.cfg
        # Fractional multipliers and multi-resolution make epochs differ by a few batches: then count them all.
        varies = len(self.resolutions) > 1 or any(it.multiply % 1 for it in self.scan.items)
        self.epoch_steps = [steps_per_epoch(len(self._epoch_plans(e, write=False)), cfg.grad_accum)
                            for e in range(cfg.max_epochs if varies else 1)]
        self.epoch_steps += [self.epoch_steps[0]] * (cfg.max_epochs - len(self.epoch_steps))
        self.steps_per_epoch = self.epoch_steps[0]
        self.total_steps = sum(self.epoch_steps)
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.parts = build_optimizer_parts(
            self.opt_cfg, unet=self.sd.unet if self.train_unet else None,
            text_encoder=self.sd.text_encoder if self.train_te else None, total_steps=self.total_steps,
            batch_size=cfg.batch_size * self.accelerator.num_processes, grad_accum=cfg.grad_accum,
            scale_lr=cfg.scale_lr, device_type=self.device.type)
        if cfg.fused_backward_pass:
            for part in self.parts:
                part.optimizer.step_in_backward(overlap=cfg.overlap_optimizer_step)
        if self.is_main:
            write_json_atomic(self.run_dir / "optimizer.json", optimizer_config_to_json(self.opt_cfg))

    @functools.cached_property
    def ema_params(self) -> list[torch.nn.Parameter]:
        """The trained modules' parameters in a fixed order (EMA state and swaps rely on the order)."""
        params = list(self.sd.unet.parameters()) if self.train_unet else []
        return params + (list(self.sd.text_encoder.parameters()) if self.train_te else [])

    def _build_ema(self):
        cfg = self.cfg
        if cfg.ema_decay_rate is None and cfg.ema_strength_target is None:
            return None
        decay = cfg.ema_decay_rate
        if cfg.ema_strength_target is not None:
            decay = ema_decay_from_target(cfg.ema_strength_target, self.total_steps, cfg.ema_update_interval)
        device = self.device if cfg.ema_device == "cuda" and self.device.type == "cuda" else torch.device("cpu")
        ema = EMA(self.ema_params, decay=decay, device=device, update_interval=cfg.ema_update_interval)
        log.info(f"EMA: decay {decay:.6f} every {cfg.ema_update_interval} steps on {device}")
        if cfg.ema_resume_model:
            if cfg.ema_resume_model == "findlast":
                last = find_last(Path(cfg.logdir))
                folder = last.with_name(last.name + "_ema")
            else:
                folder = Path(cfg.ema_resume_model)
            ema.copy_from(self._load_weights_like_trained(folder))
            log.info(f"EMA weights from {folder}")
        return ema

    def _load_weights_like_trained(self, folder: Path) -> list[torch.Tensor]:
        """The parameters of the trained parts as stored in another diffusers folder (for EMA resume)."""
        if not (folder / "unet").is_dir():
            raise ConfigError(f"ema_resume_model: {folder} is not a diffusers model folder")
        other = load_sd_model(folder)
        params = list(other.unet.parameters()) if self.train_unet else []
        return params + (list(other.text_encoder.parameters()) if self.train_te else [])

    def _print_summary(self) -> None:
        cfg, n = self.cfg, self.accelerator.num_processes
        precision = {None: "fp32", torch.float16: "fp16 autocast + GradScaler",
                     torch.bfloat16: "bf16 autocast"}[self.amp_dtype]
        log.info(f"images: {len(self.scan.items)}  steps/epoch: {self.steps_per_epoch}  total steps: "
                 f"{self.total_steps}  effective batch: {cfg.batch_size} x {n} GPU(s) x {cfg.grad_accum} accum "
                 f"= {cfg.batch_size * n * cfg.grad_accum}")
        compiled = cfg.compile_mode + (" (each UNet block)" if cfg.compile_blocks else "") + (
            f", memory budget {cfg.compile_memory_budget}" if cfg.compile_memory_budget < 1.0 else "") + (
            ", convolutions channels-last" if cfg.compile_layout_optimization else "")
        attention = cfg.attn_type + (f" ({cfg.sdp_backend} first)" if cfg.attn_type == "sdp" and
                                     cfg.sdp_backend != "auto" else "")
        log.info(f"device: {self.device}  precision: {precision}  attention: {attention}  "
                 f"gradient checkpointing: {cfg.gradient_checkpointing}  latents: "
                 f"{'cached' if cfg.cache_latents else 'VAE each step'}  torch.compile: "
                 f"{compiled if cfg.torch_compile else 'off'}  channels_last: {cfg.channels_last}")
        for line in describe(self.parts).splitlines():
            log.info(line)

    # ------------------------------------------------------------------ resume state
    def _state_dict(self) -> dict:
        return {
            "train_state": self.state.state_dict(),
            "optimizers": {p.name: p.optimizer.state_dict() for p in self.parts} if self.cfg.save_optimizer else {},
            "schedulers": {p.name: p.scheduler.state_dict() for p in self.parts},
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "validation": self.val_history.state_dict(),
            "rng": capture_rng(self.generator),
            "processes": self.accelerator.num_processes,  # batches_done and steps count per process
        }

    def _restore(self, sd: dict) -> None:
        self.state = TrainState(**sd["train_state"])
        for part in self.parts:
            if part.name in sd["optimizers"]:
                part.optimizer.load_state_dict(sd["optimizers"][part.name])
            else:
                log.info(f"warning: no optimizer state for {part.name} in the checkpoint (save_optimizer was "
                         f"false); its optimizer starts fresh")
            if part.name in sd["schedulers"]:
                part.scheduler.load_state_dict(sd["schedulers"][part.name])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        if sd.get("validation"):
            self.val_history.load_state_dict(sd["validation"])
        if self.ema is not None and sd.get("ema") is not None:
            self.ema.load_state_dict(sd["ema"])
        elif self.ema is not None:
            log.info("warning: the checkpoint has no EMA state; EMA starts from the current weights")
        restore_rng(sd["rng"], self.generator)
        self._images_synced = self.state.images_seen
        if sd.get("processes", 1) != self.accelerator.num_processes:
            log.info(f"warning: the checkpoint was trained with {sd.get('processes', 1)} process(es), this run has "
                     f"{self.accelerator.num_processes}: its step count, LR schedule position and place in the "
                     f"epoch are per-process counts, so they do not carry over exactly (doc/MULTI_GPU.md)")
        set_train_mode(self.parts, True)  # a schedule-free state saved in eval mode must step in train mode
        log.info(f"resumed at epoch {self.state.epoch}, batch {self.state.batches_done}, "
                 f"step {self.state.global_step}")

    # ------------------------------------------------------------------ train
    def train(self, final_outputs: bool = True) -> int:
        """Train to max_epochs / max_steps; then sample and save (final_outputs=False skips both: benchmarks).
        Returns the process exit code: 0 done, 130/143 stopped by SIGINT/SIGTERM (also when a second one
        aborted the interrupted save), 1 stopped by an error."""
        self._install_signal_handlers()
        try:
            return self._train(final_outputs)
        except KeyboardInterrupt:
            if self._abort_signal is None:
                raise  # not our handler's doing
            log.info(self._abort_message())
            return 143 if self._abort_signal == "SIGTERM" else 130
        finally:
            self._close_loader()

    def _train(self, final_outputs: bool) -> int:
        cfg, st = self.cfg, self.state
        from tqdm.auto import tqdm
        self.last_save_time = self.started = time.monotonic()
        epochs_bar = tqdm(total=cfg.max_epochs, initial=st.epoch, disable=not self.is_main, unit="epoch",
                          position=0, desc="epochs", dynamic_ncols=True)
        bar = tqdm(total=self.total_steps, initial=st.global_step, disable=not self.is_main, unit="step", position=1,
                   dynamic_ncols=True)
        self.window = {"loss": torch.zeros((), device=self.device), "micro": 0, "images": 0,
                       "t0": time.perf_counter()}
        self.staged_log = None  # a log step's scalars until they are written (_log_window)
        try:
            if st.global_step == 0:  # a fresh run: the baseline before any step (a resume does not repeat it)
                if self.val_sets:
                    self._validate()
                if self.sample_source.current.generate_pretrain_samples:
                    self.sample()
            self.loop_started = time.perf_counter()
            while st.epoch < cfg.max_epochs and not self._finished() and not self.stop_requested:
                self._reload_live_settings()
                self._train_epoch(bar)
                epochs_bar.n = st.epoch
                epochs_bar.refresh()
        except StopTraining as e:
            log.info(f"error: {e}")
            return 1
        except torch.OutOfMemoryError:
            self.out_of_memory = True
            log.info(OOM_ADVICE.format(batch_size=cfg.batch_size, resolution=cfg.resolution))
            self._rescue_save()
            return 1
        finally:
            self._close_loader()  # before the saves below: the workers' memory, and no prefetching meanwhile
            self._write_staged_log()
            bar.close()
            epochs_bar.close()
        if self.stop_requested:
            log.info(f"{self.stop_requested}: saving an interrupted checkpoint")
            self.save(prefix="interrupted-")
            # a process exiting non-zero makes the launcher (torchrun) kill the rest: not while main still writes
            self.accelerator.wait_for_everyone()
            return 143 if self.stop_requested == "SIGTERM" else 130
        if st.global_step == 0:  # nothing trained: no samples or checkpoint of an untrained model, and no "done"
            raise ConfigError("the run ended without a single optimizer step (no batch could be trained); see the "
                              "warnings above, and check the data with python train.py --config <your config> --check")
        if final_outputs:
            self.sample()
            final = self.save(prefix="" if cfg.no_prepend_last else "last-")
            self._print_end_summary(final)
        return 0

    def _print_end_summary(self, final: Path | None) -> None:
        minutes = (time.monotonic() - self.started) / 60
        if self.compiled_shapes is not None:
            log.info(self.compiled_shapes.summary())
        images = self.state.images_seen  # already every process's images: _agree_at_step sums them at each step
        log.info(f"done: {self.state.global_step} steps, {self.state.epoch} epochs, {images} images in "
                 f"{minutes:.1f} min ({images / max(minutes * 60, 1e-9):.1f} images/s over the whole run)")
        if final is not None:
            log.info(f"final checkpoint: {final}  (resume: --resume_ckpt {final}; TensorBoard: tensorboard "
                     f"--logdir {self.run_dir})")

    def _train_epoch(self, bar) -> None:
        """One epoch from where the state stands (mid-epoch after a resume) to its end, max_steps or a stop."""
        cfg, st, window = self.cfg, self.state, self.window
        epoch_loss, epoch_micro, epoch_t0 = torch.zeros((), device=self.device), 0, time.perf_counter()
        group_loss = torch.zeros((), device=self.device)
        plans = self._epoch_plans(st.epoch)
        n_batches, n_proc = self._epoch_batch_count(st.epoch, plans), self.accelerator.num_processes
        bar.set_description(f"epoch {st.epoch + 1}/{cfg.max_epochs}")
        # what a step must exceed to be one (images_seen is every process's once _agree_at_step ran), and the files
        # of batches that failed whole, for the error when nothing of the epoch trains
        step_images, steps_before, first, failed = st.images_seen, st.global_step, st.batches_done, {}
        batches = annotated(self._loader(plans, st.epoch, st.batches_done), PHASE_DATA)
        for i, batch in enumerate(batches, start=st.batches_done):
            boundary = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(plans)
            for path, reason in (batch or {}).get("skipped", []):
                log.info(f"warning: skipped {path} at load time: {reason}")
            if batch is None:
                names = [self.scan.items[j].rel_path for j in plans[i].indices]
                failed.update(dict.fromkeys(names))
                log.info(f"warning: every image of a batch failed to load ({', '.join(names)}); not trained")
            if n_proc > 1 and (batch is None or batch["position"] >= n_batches):
                # Padding (the epoch does not split evenly), or every image failed to load: DDP still needs this
                # process's forward and backward (its collectives), with weight 0 so nothing is trained twice.
                self._micro_step(batch or self._stand_in_batch(plans[i]), 1, sync_grads=boundary, weight=0.0)
                batch = None
            if batch is not None:
                loss = self._micro_step(batch, accumulation_group_size(i, n_batches, cfg.grad_accum, n_proc),
                                        sync_grads=boundary)
                group_loss += loss
                epoch_loss += loss
                epoch_micro += 1
                window["loss"] += loss
                window["micro"] += 1
                window["images"] += len(batch["captions"])
                st.images_seen += len(batch["captions"])
            if not boundary:
                continue
            with torch.profiler.record_function(PHASE_OPTIMIZER):
                group_loss = self._agree_at_step(group_loss)  # N processes: one small all-reduce (see there)
                trained = st.images_seen > step_images
                norms = self._optimizer_step(group_loss) if trained else self._discard_step()
                group_loss = torch.zeros((), device=self.device)
                if self.ema is not None and trained:
                    self.ema.update(self.ema_params)
            st.batches_done = i + 1
            if not trained:  # every image of the step failed to load, on every process: not a step
                if self.stop_requested:
                    break
                continue
            step_images = st.images_seen
            st.global_step += 1
            bar.update(1)
            with torch.profiler.record_function(PHASE_AFTER):
                self._after_step(norms, window, bar)
            if self._finished() or self.stop_requested:
                break
        if st.batches_done == len(plans):
            if st.global_step == steps_before and st.batches_done > first:  # nothing of this epoch trained
                if st.global_step:
                    self._rescue_save()  # the earlier epochs' steps were real: keep them
                raise ConfigError(self._nothing_loaded(list(failed)))
            self._end_epoch(epoch_loss, epoch_micro, epoch_t0)

    def _discard_step(self) -> dict:
        """In place of an optimizer step that has no image: no update, no LR schedule step (DDP's weight-0
        stand-in batches left zero gradients, which Adam's moments would still turn into an update)."""
        for part in self.parts:
            part.optimizer.zero_grad(set_to_none=True)
        return {}

    def _nothing_loaded(self, failed: list[str]) -> str:
        listed = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        return (f"epoch {self.state.epoch + 1}: every image failed to load ({len(failed)} file(s): {listed}; the "
                f"reasons are in the warnings above), so nothing was trained in it. Fix or replace these files "
                f"(python train.py --config <your config> --check decodes every image and lists the bad ones), "
                f"then run again")

    def _reload_live_settings(self) -> None:
        """EveryDream2's load_settings_every_epoch: re-read train.json for the keys that may change mid-run."""
        if not (self.cfg.load_settings_every_epoch and self.config_path):
            return
        try:
            changes = reload_live_settings(self.config_path, self.cfg) if self.is_main else {}
        except ConfigError as e:
            log.info(f"warning: load_settings_every_epoch: {e}; keeping the current settings")
            changes = {}
        if self.accelerator.num_processes > 1:  # main reads once for all: a file saved between two reads must
            from accelerate.utils import broadcast_object_list  # not leave processes with different log_step...
            box = [changes]
            broadcast_object_list(box)
            changes = box[0]
            for key, (_old, new) in changes.items():
                setattr(self.cfg, key, new)
        for key, (old, new) in changes.items():
            log.info(f"epoch {self.state.epoch + 1}: {key} {old} -> {new} (from {self.config_path})")
        if "clip_skip" in changes and self.te_cache is not None:
            self.te_cache = PromptCache()  # cached conditioning came from the other layer

    def _rescue_save(self) -> None:
        """After an error in the loop the weights are those of the last optimizer step: keep them if we can."""
        if self.accelerator.num_processes > 1:  # the others may be inside a collective save() would never meet
            log.warning("not saving: with several processes the error may be on this one only; the last "
                        "checkpoint is intact")
            return
        self._close_loader()  # its workers' memory, and no prefetching while saving
        try:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save(prefix="interrupted-")
        except Exception as e:  # the run is already failing; say why the rescue failed too
            log.info(f"could not save the current state ({type(e).__name__}: {e}); the last checkpoint is intact")

    @property
    def save_minutes(self) -> float | None:
        """EveryDream2's rule: with no save interval at all, save every 20 minutes."""
        cfg = self.cfg
        if cfg.ckpt_every_n_minutes is not None:
            return cfg.ckpt_every_n_minutes
        return None if cfg.save_every_n_epochs else 20.0

    def _finished(self) -> bool:
        return self.state.global_step >= self.total_steps

    def _epoch_plans(self, epoch: int, write: bool = True):
        plans = epoch_batches(self.scan.items, batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                              resolutions=self.resolutions, rank=self.accelerator.process_index,
                              world_size=self.accelerator.num_processes)
        if write and self.cfg.write_schedule and self.is_main:
            # the whole epoch, not this process's share: with N processes, line p is trained by process p % N
            full = plans if self.accelerator.num_processes == 1 else epoch_batches(
                self.scan.items, batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                resolutions=self.resolutions)
            write_schedule(full, self.scan.items, self.run_dir / f"ep{epoch}_batch_schedule.txt")
        return plans

    def _loader(self, plans, epoch: int, start: int):
        dataset = BatchDataset(self.scan.items, plans[start:], seed=self.cfg.seed, epoch=epoch, first_position=start,
                               latents=self.latent_index)
        workers = self.cfg.num_workers if self.cfg.num_workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=min(workers, len(dataset)),
            pin_memory=self.device.type == "cuda", worker_init_fn=_workers_ignore_stop_signals,
            prefetch_factor=4 if workers else None, persistent_workers=False)
        self._close_loader()  # an earlier epoch's, left unfinished by a stop
        self._batches = iter(loader)  # kept, so that _close_loader can end its workers whatever happens
        return self._batches

    def _close_loader(self) -> None:
        """Ends the DataLoader's worker processes now and waits for them. Torch does this itself when the iterator
        is exhausted or freed, but after an error the exception's traceback keeps the iterator (through the
        epoch's frames) alive until the interpreter exits. There torch skips its shutdown, and multiprocessing's
        exit handler sends the workers SIGTERM, which they ignore (_workers_ignore_stop_signals), then waits for
        them forever: the run hung instead of ending. So every way out of train() and cleanup() closes it."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # None: no workers (num_workers 0)
        if shutdown is None:
            return
        shutdown()  # asks each worker to stop and joins it (torch waits 5 s for one that does not)
        for worker in getattr(batches, "_workers", []):
            if worker.is_alive():  # stuck (in a decode, on a file system): SIGKILL is not ignorable
                worker.kill()
                worker.join(timeout=5)

    def _encode_captions(self, captions: list[str]) -> torch.Tensor:
        if self.te_cache is not None:
            hidden = self.te_cache.lookup(captions, self._run_text_encoder)
        else:
            hidden = self._run_text_encoder(captions)
        if self.cfg.embedding_perturbation:
            hidden = perturb_embeddings(hidden, self.generator, gamma=self.cfg.embedding_perturbation)
        return hidden

    def _run_text_encoder(self, captions: list[str]) -> torch.Tensor:
        tok = self.sd.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device, non_blocking=True)
        with torch.set_grad_enabled(self.train_te):
            return encode_prompts(self.text_encoder, ids, clip_skip=self.cfg.clip_skip)

    def _micro_step(self, batch: dict, group_size: float, sync_grads: bool, weight: float = 1.0) -> torch.Tensor:
        """The forward and backward pass of one micro-batch, compiled when its shape is (utils/run/compile_shapes.py):
        the first step of a compiled shape is timed, and one whose compile fails runs again uncompiled."""
        shapes = self.compiled_shapes
        shape = shape_of_batch(batch)
        if shapes is None or not shapes.is_new(shape):
            compiled = shapes is not None and shapes.runs_compiled(shape)
            with eager_unless(compiled or shapes is None):
                return self._forward_backward(batch, group_size, sync_grads, weight, compiled)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per shape: the compile's time, not the queue's
        t0 = time.perf_counter()
        try:
            loss = self._forward_backward(batch, group_size, sync_grads, weight, True)
        except Exception as e:
            if not is_compile_error(e):
                raise
            # non-lazy backward lowering: compiles fail in the forward, before any gradient was accumulated
            shapes.failed[shape] = first_line(e)
            log.info(f"warning: torch.compile failed for {describe_shape(shape)} ({shapes.failed[shape]}); this shape "
                     f"runs uncompiled from now on, training goes on")
            with eager_unless(False):
                return self._forward_backward(batch, group_size, sync_grads, weight, False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        shapes.seconds[shape] = time.perf_counter() - t0
        log.info(f"torch.compile: {describe_shape(shape)} compiled in {shapes.seconds[shape]:.1f} s (its first "
                 f"forward and backward); compiling so far: {self.compile_seconds:.1f} s")
        self.metrics.scalars(self.state.global_step + 1, {"performance/compile seconds": self.compile_seconds})
        return loss

    def _forward_backward(self, batch: dict, group_size: float, sync_grads: bool, weight: float,
                          compiled: bool) -> torch.Tensor:
        cfg, sd = self.cfg, self.sd
        phase = contextlib.ExitStack()   # the profiler's "forward" range; closed where the backward pass begins
        phase.enter_context(torch.profiler.record_function(PHASE_FORWARD))
        if compiled and cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()   # the last step's graph outputs may be overwritten now
        self.generator.manual_seed(batch_seed(cfg.seed, self.state.epoch, batch["position"]))
        if "latent_moments" in batch:  # cache_latents: the VAE posterior was stored; draw from it as below
            moments = batch["latent_moments"].to(self.device, non_blocking=True)
            latent_dist = DiagonalGaussianDistribution(moments)
        else:
            pixels = batch["pixel_values"].to(self.device, dtype=sd.vae.dtype, non_blocking=True)
            with torch.no_grad():
                latent_dist = sd.vae.encode(pixels).latent_dist
        latents = latent_dist.sample(self.generator).float() * sd.vae.config.scaling_factor
        pixel_weight = None
        if batch.get("mask") is not None and use_mask_this_step(self.generator, cfg.unmasked_probability):
            pixel_weight = mask_to_latent_weight(batch["mask"].to(self.device, non_blocking=True), latents.shape[-2:],
                                                 unmasked_weight=cfg.unmasked_weight,
                                                 normalize_masked_area_loss=cfg.normalize_masked_area_loss)
        no_sync = contextlib.ExitStack()
        if not sync_grads and self.accelerator.num_processes > 1:
            for model in (m for m, t in ((self.unet, self.train_unet), (self.text_encoder, self.train_te)) if t):
                no_sync.enter_context(self.accelerator.no_sync(model))
        with phase, no_sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                hidden = self._encode_captions(batch["captions"])
                # non_blocking: a blocking copy would make the host wait here for the GPU, every step
                loss_scale = batch["loss_scale"].to(self.device, non_blocking=True)
                loss, _ = compute_loss(self.unet, self.noise_scheduler, latents, hidden, self.generator,
                                       self.loss_settings, loss_scale=loss_scale, pixel_weight=pixel_weight)
            if cfg.fused_backward_pass:  # the backward pass steps the weights: decide before it
                self.backward_skipped = cfg.skip_nonfinite_steps and not bool(torch.isfinite(loss))
                if self.backward_skipped:
                    return loss.detach()     # no backward; _optimizer_step counts the skipped step
                log_now = due(self.state.global_step + 1, cfg.log_step) and self.opt_cfg.log_grad_norm
                for part in self.parts:
                    part.optimizer.record_grad_norm = log_now
            # Backward outside autocast (it reuses the forward's dtypes anyway), as torch recommends: leaving the
            # region frees autocast's cache of low-precision weight copies before the backward pass.
            # Micro-batches of one optimizer step are averaged, so grad_accum does not change the step size.
            phase.close()
            with torch.profiler.record_function(PHASE_BACKWARD):
                self.scaler.scale(loss / group_size if weight == 1.0 else loss * weight).backward()
        return loss.detach()

    @property
    def loss_settings(self):
        c = self.cfg
        return LossSettings(prediction_type=self.sd.prediction_type, loss_type=c.loss_type,
                            min_snr_gamma=c.min_snr_gamma, debiased_estimation=c.debiased_estimation,
                            zero_frequency_noise_ratio=c.zero_frequency_noise_ratio,
                            pyramid_noise_discount=c.pyramid_noise_discount, timestep_start=c.timestep_start,
                            timestep_end=c.timestep_end, huber_delta=c.huber_delta)

    def _optimizer_step(self, step_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unscale, clip, step every part, update the scaler once. Returns grad norms as device tensors.

        A step whose loss or gradients are not finite changes no weight: fp16's GradScaler skips it by itself
        (it syncs with the host each step anyway); in bf16/fp32 the loss is checked here, one host sync a step
        (with fused_backward_pass before the backward pass, which steps the weights)."""
        if self.scaler.is_enabled():
            scale_before = self.scaler.get_scale()
        elif self.cfg.skip_nonfinite_steps and (self.backward_skipped if self.cfg.fused_backward_pass
                                                else not torch.isfinite(step_loss)):
            for part in self.parts:
                part.optimizer.zero_grad(set_to_none=True)
                step_schedule(part)
            self._count_nonfinite(True)
            return {}
        norms = {}
        log_now = due(self.state.global_step + 1, self.cfg.log_step) and self.opt_cfg.log_grad_norm
        # fused_backward_pass: the gradients are gone by now (clip_grad_norm is refused); the norm is summed as
        # the backward pass steps them and is taken below
        if (self.cfg.clip_grad_norm or log_now) and not self.cfg.fused_backward_pass:
            for part in self.parts:
                self.scaler.unscale_(part.optimizer)
                max_norm = self.cfg.clip_grad_norm or float("inf")
                norms[part.name] = torch.nn.utils.clip_grad_norm_(part.params, max_norm)
        for part in self.parts:
            self.scaler.step(part.optimizer)
            if self.cfg.fused_backward_pass and (norm := part.optimizer.take_grad_norm()) is not None:
                norms[part.name] = norm  # measured as the backward pass stepped and freed the gradients
        self.scaler.update()
        self._count_nonfinite(self.scaler.is_enabled() and self.scaler.get_scale() < scale_before)
        if self.scaler.is_enabled() and self.opt_cfg.apply_grad_scaler_step_tweaks:
            if tweak := grad_scaler_tweak(self.state.global_step + 1):
                growth, backoff, interval = tweak
                self.scaler.set_growth_factor(growth)
                self.scaler.set_backoff_factor(backoff)
                self.scaler.set_growth_interval(interval)
        for part in self.parts:
            step_schedule(part)
            part.optimizer.zero_grad(set_to_none=True)
        return norms

    @property
    def compile_seconds(self) -> float | None:
        """Time spent in the first step of each compiled shape (compiling and its first run), over the run."""
        return sum(self.compiled_shapes.seconds.values()) if self.compiled_shapes else None

    def _count_nonfinite(self, skipped: bool) -> None:
        self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
        if skipped:
            log.info(f"warning: step {self.state.global_step + 1}: non-finite loss or gradients, step skipped "
                     f"({self.nonfinite_run} in a row)")
        if self.nonfinite_run >= NONFINITE_STEP_LIMIT:
            raise StopTraining(
                f"{NONFINITE_STEP_LIMIT} optimizer steps in a row had non-finite (NaN/inf) loss or gradients; the "
                f"weights were not changed by them, and no checkpoint is written from this state. Lower lr, set "
                f"clip_grad_norm (e.g. 1.0), or use mixed_precision bf16 instead of fp16, then resume from the "
                f"last checkpoint.")

    def _after_step(self, norms: dict, window: dict, bar) -> None:
        cfg, st = self.cfg, self.state
        self._write_staged_log()  # the last log step's: its copy finished while this step was queued
        if due(st.global_step, cfg.log_step):
            self._log_window(norms, window, bar)
            if self.log_hook:
                self.log_hook(st.global_step)
        if self.val_sets and validation_due(st.global_step, self.steps_per_epoch, self.vcfg.every_n_epochs):
            self._validate()
        if due(st.global_step, self.sample_source.current.every_n_steps or cfg.sample_steps):
            self.sample()
        if self._save_agreed if self.accelerator.num_processes > 1 else self._save_clock_due():
            self.save()

    def _log_window(self, norms: dict, window: dict, bar) -> None:
        """Takes the window's scalars and starts their copy to the host; _write_staged_log writes them at the
        next step (or when the loop ends), so a logging step makes the host wait for nothing: by then the copy
        has long finished while the GPU works on the next step."""
        elapsed = time.perf_counter() - window["t0"]
        window_loss, micro, images = self._sum_over_processes(window["loss"], window["micro"], window["images"])
        on_device = {"loss/log_step": window_loss / max(1, micro)}
        on_host = {"performance/images per second": images / max(elapsed, 1e-9)}
        for part in self.parts:
            lr_tag, norm_tag = PART_TAGS[part.name]
            on_host[lr_tag] = current_lr(part)
            if part.name in norms:
                on_device[norm_tag] = norms[part.name]
        if self.scaler.is_enabled():
            on_host["hyperparameter/grad scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":
            on_host["performance/vram"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.staged_log = (self.state.global_step, read_later(on_device), on_host, bar)
        window.update(loss=torch.zeros((), device=self.device), micro=0, images=0, t0=time.perf_counter())

    def _write_staged_log(self) -> None:
        """Writes the scalars _log_window took, if any (to TensorBoard, metrics.jsonl and the progress bar)."""
        if self.staged_log is None:
            return
        step, read, on_host, bar = self.staged_log
        self.staged_log = None
        values = {**read(), **on_host}
        for _, norm_tag in PART_TAGS.values():  # the norm as measured, and as the step used it
            if (pre := values.get(norm_tag)) is not None:
                values[norm_tag.replace("_grad_norm", "_pre_clip_norm")] = pre
                values[norm_tag] = min(pre, self.cfg.clip_grad_norm) if self.cfg.clip_grad_norm else pre
        self.metrics.scalars(step, values)
        lr = values.get("hyperparameter/lr unet", values.get("hyperparameter/lr text encoder", 0))
        postfix = {"loss": f"{values['loss/log_step']:.4f}", "lr": f"{lr:.2e}",
                   "img/s": f"{values['performance/images per second']:.1f}"}
        if "performance/vram" in values:
            postfix["vram"] = f"{values['performance/vram']:.1f}G"
        bar.set_postfix(postfix, refresh=False)

    def _end_epoch(self, epoch_loss, epoch_micro: int, t0: float) -> None:
        cfg, st = self.cfg, self.state
        self._write_staged_log()  # the epoch's line below waits for the GPU anyway
        minutes = (time.perf_counter() - t0) / 60
        epoch_loss, epoch_micro = self._sum_over_processes(epoch_loss, epoch_micro)
        if epoch_micro:
            self.metrics.scalars(st.global_step, {"loss/epoch": (epoch_loss / epoch_micro).item(),
                                                  "performance/minutes per epoch": minutes})
        st.epoch += 1
        st.batches_done = 0
        # Saved after the epoch's last step, so "ep N" holds exactly N epochs (EveryDream2 saved one step later).
        if (cfg.save_every_n_epochs and st.epoch % cfg.save_every_n_epochs == 0 and st.epoch < cfg.max_epochs
                and st.epoch >= cfg.save_ckpts_from_n_epochs):
            self.save()

    # ------------------------------------------------------------------ samples and checkpoints
    def _sample_all(self) -> None:
        cfg = self.cfg
        if self.ema is None:
            return self._sample_with_current_weights("")
        if cfg.ema_sample_nonema_model:
            self._sample_with_current_weights("")
        if cfg.ema_sample_ema_model or not cfg.ema_sample_nonema_model:
            with ema_weights(self.ema, self.ema_params):
                self._sample_with_current_weights("ema-")

    def _setup_validation(self) -> None:
        """Validation sets from validation_config; held-out images leave self.scan.items before epochs are planned."""
        cfg = self.cfg
        self.vcfg = load_validation_config(cfg.validation_config)
        self.val_history = ValidationHistory(relative=bool(self.vcfg and self.vcfg.use_relative_loss))
        self.val_sets = []
        if self.vcfg is None:
            return
        settings = DataSettings(resolution=self.resolutions, flip_p=0.0, cond_dropout=0.0, shuffle_tags=False,
                                keep_tags=cfg.keep_tags, crop_jitter=0.0)
        train_items, sets, stabilize = split_for_validation(self.scan.items, self.vcfg,
                                                            scan_fn=lambda folder: scan_dataset(folder, settings))
        self.scan.items = train_items
        self.val_sets = validation_sets(sets, stabilize, batch_size=self.vcfg.batch_size or cfg.batch_size,
                                        seed=self.vcfg.seed, resolution=self.resolutions[0])
        log.info(describe_split(len(train_items), sets, stabilize))


    def _setup_samples(self) -> None:
        base = self.resolutions[0]
        self.sample_source = SampleConfigSource(  # a broken prompt file is a ConfigError here, before models load
            self.cfg.sample_prompts, default_seed=self.cfg.seed, default_size=(base, base),
            default_steps=self.cfg.sample_num_steps, default_batch_size=max(1, self.cfg.batch_size // 2),
            zero_terminal_snr=self.cfg.enable_zero_terminal_snr)
        if self.sample_source.current.note:
            log.info(self.sample_source.current.note)


    def _validate(self) -> None:
        """Validation losses with fixed noise and timesteps. Every process computes them (same numbers, no
        collective); the main one logs."""
        vcfg, step = self.vcfg, self.state.global_step
        unet = self.sd.unet  # the plain module: DDP and torch.compile only wrap it for the step
        te = self.sd.text_encoder
        settings = validation_loss_settings(self.loss_settings)
        was_training = unet.training, te.training
        values = {}
        with eval_weights(self.parts):
            unet.eval(), te.eval()
            try:
                for vs in self.val_sets:
                    dataset = BatchDataset(vs.items, vs.plans, seed=vcfg.seed, epoch=0, augment=False)
                    values[vs.tag] = evaluate_loss(lambda batch, gen: self._val_loss(unet, te, settings, batch, gen),
                                                   dataset, seed=vcfg.seed)
            finally:
                unet.train(was_training[0]), te.train(was_training[1])
        extra, warnings = self.val_history.record(step, values)
        self.metrics.scalars(step, {**values, **extra})
        for warning in warnings:
            log.info(f"warning: {warning}")
        log.info(f"step {step} validation: " + "  ".join(f"{t.split('/', 1)[1]} {v:.5f}" for t, v in values.items()))


    def _val_loss(self, unet, te, settings, batch, generator) -> torch.Tensor:
        """The training forward path without gradients, augmentation or embedding perturbation; plain MSE."""
        sd, tok = self.sd, self.sd.tokenizer
        pixels = batch["pixel_values"].to(self.device, dtype=sd.vae.dtype, non_blocking=True)
        latents = sd.vae.encode(pixels).latent_dist.sample(generator) * sd.vae.config.scaling_factor
        ids = tok(batch["captions"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            hidden = encode_prompts(te, ids, clip_skip=self.cfg.clip_skip)
            loss, _ = compute_loss(unet, self.noise_scheduler, latents.float(), hidden, generator, settings)
        return loss


    def sample(self) -> None:
        """Sample grids with the trained weights and/or the EMA weights, as configured."""
        if not self.is_main:
            return
        self.sample_source.reload(lambda msg: log.info(f"warning: {msg}"))  # edits apply; a broken file keeps the last
        try:
            with eval_weights(self.parts):
                self._sample_all()
            return
        except torch.OutOfMemoryError:
            pass  # handled below, once the exception's frames (and the tensors they hold) are gone
        # A preview must not end the run: the step keeps its memory while sampling (with compile_mode
        # reduce-overhead the CUDA graphs' pool), so what is left may not hold the sampler's
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info(f"warning: sampling at step {self.state.global_step} ran out of GPU memory and was skipped "
                 f"(training is not affected). For samples, lower the sample batch_size or size in the prompt "
                 f"file ({self.cfg.sample_prompts}), or the training batch_size (now {self.cfg.batch_size})")


    def _sample_with_current_weights(self, prefix: str) -> None:
        cfg, sd, step = self.cfg, self.sd, self.state.global_step
        scfg = self.sample_source.current
        requests = plan_samples(scfg, [it.caption for it in self.scan.items], step=step)
        unet = self.sd.unet  # the plain module: DDP and torch.compile only wrap it for the step
        te = self.sd.text_encoder
        was_training = unet.training, te.training
        unet.eval(), te.eval()
        try:
            pipe = build_pipeline(unet, te, sd.vae, sd.tokenizer, sd.scheduler_config, scheduler=scfg.scheduler,
                                  zero_terminal_snr=cfg.enable_zero_terminal_snr, show_progress=scfg.show_progress_bars)
            results = generate(pipe, requests, cfg_scales=scfg.cfgs, steps=scfg.num_inference_steps, device=self.device,
                               autocast_dtype=self.amp_dtype, batch_size=scfg.batch_size, clip_skip=cfg.clip_skip,
                               guidance_rescale=sampling_settings(zero_terminal_snr=cfg.enable_zero_terminal_snr)
                               .guidance_rescale)
        finally:
            unet.train(was_training[0]), te.train(was_training[1])
        for idx, (req, images) in enumerate(results):
            grid = make_grid(images, scfg.cfgs)
            write_sample(self.run_dir / "samples", sample_stem(prefix, step, idx, req), grid, req, scfg)
            self.metrics.image(sample_tag(prefix, idx, req), grid, step)

    def save(self, prefix: str = "") -> Path | None:
        """A resumable diffusers checkpoint (and a single-file export); only the main process writes."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        cfg, st = self.cfg, self.state
        if st.global_step == 0:
            log.info("no optimizer step taken yet: nothing to save")
            return None
        name = checkpoint_name(cfg.project_name, st.epoch, st.global_step, prefix)
        final = self.run_dir / "ckpts" / name
        unet = self.sd.unet  # the plain module: DDP and torch.compile only wrap it for the step
        te = self.sd.text_encoder

        def write(tmp: Path) -> None:
            self._write_model_folder(tmp, unet, te)
            save_trainer_state(tmp, self._state_dict())
            write_json_atomic(tmp / "train.json", config_to_dict(cfg))
            write_json_atomic(tmp / "optimizer.json", optimizer_config_to_json(self.opt_cfg))

        with eval_weights(self.parts):  # schedule-free optimizers: the averaged weights are the model
            save_checkpoint_folder(final, write)
        saved = [final]
        if self.ema is not None:
            with ema_weights(self.ema, self.ema_params):
                saved.append(save_checkpoint_folder(final.with_name(name + "_ema"),
                                                    lambda tmp: self._write_model_folder(tmp, unet, te)))
        self.last_save_time = time.monotonic()
        for folder in saved:
            log.info(f"saved {folder}")
            if not cfg.no_save_ckpt:
                out_dir = Path(cfg.save_ckpt_dir) if cfg.save_ckpt_dir else self.run_dir / "ckpts"
                out_dir.mkdir(parents=True, exist_ok=True)
                path = save_single_file(folder, out_dir / f"{folder.name}.safetensors",
                                        half=not cfg.save_full_precision,
                                        zero_terminal_snr=cfg.enable_zero_terminal_snr)
                log.info(f"saved {path}")
        prune_checkpoints(self.run_dir / "ckpts", cfg.keep_last_n, protect={final})
        return final

    def _write_model_folder(self, folder: Path, unet, te) -> None:
        """A folder StableDiffusionPipeline.from_pretrained loads; frozen parts are copied byte for byte."""
        src = self.model_folder
        for part, module, trained in (("unet", unet, self.train_unet), ("text_encoder", te, self.train_te)):
            if trained:
                module.save_pretrained(folder / part, safe_serialization=True)
            else:
                shutil.copytree(src / part, folder / part)
        for part in ("vae", "tokenizer"):
            if (src / part).exists():
                shutil.copytree(src / part, folder / part)
        # the scheduler config as trained (a prediction_type override included), so a resume sees the same
        (folder / "scheduler").mkdir()
        write_json_atomic(folder / "scheduler" / "scheduler_config.json", self.sd.scheduler_config)
        shutil.copy2(src / "model_index.json", folder / "model_index.json")

    # ------------------------------------------------------------------ several processes (DDP, doc/MULTI_GPU.md)
    def _wrap_for_ddp(self) -> None:
        """DDP wraps only what trains (one process: prepare() returns the modules unchanged). After the optimizer
        setup, because DDP takes the parameters that require grad when it wraps: text_encoder_freezing must come
        first. The text encoder's last layers go unused with clip_skip >= 2 (a live key), so DDP looks for unused
        parameters there (cheap for the text encoder; the UNet uses all of its parameters)."""
        if self.train_unet:
            self.unet = self.accelerator.prepare(self.sd.unet)
        if self.train_te and self.accelerator.num_processes > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.text_encoder = DistributedDataParallel(
                self.sd.text_encoder, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        elif self.train_te:
            self.text_encoder = self.accelerator.prepare(self.sd.text_encoder)
        if self.cfg.torch_compile:
            self._compile_models()

    def _compile_models(self) -> None:
        """torch.compile wraps only the step's modules: sampling and saving use the plain ones (sd.unet), so a
        sample at another size or batch compiles nothing (compile_blocks: the blocks inside sd.unet, compiled only
        while gradients are on). Static shapes: each batch shape the plan allows gets its own graph
        (utils/run/compile_shapes.py)."""
        mode = None if self.cfg.compile_mode == "default" else self.cfg.compile_mode
        counts = Counter(shape_of_plan(plan) for epoch in range(min(self.cfg.max_epochs, 3))
                         for plan in epoch_batches(self.scan.items, batch_size=self.cfg.batch_size, seed=self.cfg.seed,
                                                   epoch=epoch, resolutions=self.resolutions))
        allowed, note = choose_shapes(counts, self.cfg.compile_max_shapes)
        self.compiled_shapes = CompiledShapes(allowed)
        if note:
            log.info(note)
        if self.cfg.compile_blocks:
            # each block is one graph: its backward hands over its own gradients as soon as it is done, so the
            # fused step can free them block by block; sampling (no grad) keeps running the blocks as they were
            unet = self.sd.unet
            for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
                if block is not None:
                    block.forward = compiled_when_grad_enabled(block.forward, mode)
        else:
            self.unet = torch.compile(self.unet, mode=mode, dynamic=False)
        if self.train_te:
            self.text_encoder = torch.compile(self.text_encoder, mode=mode, dynamic=False)
        log.info(f"torch.compile ({self.cfg.compile_mode}): each batch shape compiles at its first step; the time "
                 f"is logged per shape")

    def _epoch_batch_count(self, epoch: int, plans: list) -> int:
        """The epoch's batches before the DDP split; this process's plans at positions beyond it are padding."""
        if self.accelerator.num_processes == 1:
            return len(plans)
        return len(epoch_batches(self.scan.items, batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                                 resolutions=self.resolutions))

    def _stand_in_batch(self, plan) -> dict:
        """One black image at the plan's size, empty caption: trained with weight 0 in place of a batch whose
        images all failed to load, only so that this process joins DDP's collectives."""
        width, height = plan.size
        return {"pixel_values": torch.zeros(1, 3, height, width), "captions": [""], "loss_scale": torch.zeros(1),
                "mask": None, "position": plan.position, "size": plan.size}

    def _save_clock_due(self) -> bool:
        return bool(self.save_minutes) and time.monotonic() - self.last_save_time >= self.save_minutes * 60

    def _agree_at_step(self, group_loss: torch.Tensor) -> torch.Tensor:
        """N processes must decide alike at each step, or one waits forever in a collective the others never join.
        One all-reduce of five numbers per optimizer step carries the decisions; reading it is one host sync a step,
        which the finite-loss check (skip_nonfinite_steps, the default) or fp16's GradScaler make anyway:
        - the group loss, summed: a non-finite loss on any process skips the step on all of them;
        - SIGINT/SIGTERM seen by any process (a scheduler may signal only some): all stop after this step;
        - the main process's save_minutes clock: all save after this step;
        - the images trained since the last step, so that images_seen counts every process's.
        Returns the loss summed over processes (only its finiteness is used). One process: nothing to agree."""
        if self.accelerator.num_processes == 1:
            return group_loss
        st = self.state
        local = [float(self._stop_signal == "SIGINT"), float(self._stop_signal == "SIGTERM"),
                 float(self.is_main and self._save_clock_due()), float(st.images_seen - self._images_synced)]
        vec = torch.cat([group_loss.detach().reshape(1).double(),
                         torch.tensor(local, dtype=torch.float64, device=self.device)])
        total, sigint, sigterm, save, images = self.accelerator.reduce(vec, "sum").tolist()
        st.images_seen = self._images_synced = self._images_synced + int(images)
        if sigint or sigterm:
            self.stop_requested = "SIGTERM" if sigterm else "SIGINT"
        self._save_agreed = bool(save)
        return torch.tensor(total)

    def _sum_over_processes(self, loss: torch.Tensor, *counts: int) -> tuple:
        """(loss, *counts) summed over all processes: the logged loss and images/s are the whole job's. Called
        only at logging steps and epoch ends, which every process reaches at the same step."""
        if self.accelerator.num_processes == 1:
            return (loss, *counts)
        vec = torch.cat([loss.detach().reshape(1).double(),
                         torch.tensor(counts, dtype=torch.float64, device=self.device)])
        total, *sums = self.accelerator.reduce(vec, "sum").tolist()
        return (torch.tensor(total), *(int(c) for c in sums))

    # ------------------------------------------------------------------ signals and cleanup
    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._signals_seen += 1
            if self._signals_seen > 1:  # a second Ctrl-C: stop now, no save; train() reports it in one line
                self._abort_signal = signal.Signals(signum).name
                raise KeyboardInterrupt
            if self.accelerator.num_processes > 1:  # it may reach only some processes: _agree_at_step decides
                self._stop_signal = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
                log.warning(f"\n{self._stop_signal} received by process {self.accelerator.process_index}: all "
                            f"processes stop after the next optimizer step (again to abort without saving)")
                return
            self.stop_requested = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
            log.info(f"\n{self.stop_requested} received: stopping after this step (again to abort without saving)")
        self._old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _abort_message(self) -> str:
        """One line after a second SIGINT/SIGTERM: what was abandoned and which checkpoint to resume from.
        Every save is written under a temporary name and renamed when complete, so nothing half-written is left."""
        done = list_checkpoints(self.run_dir / "ckpts") if self.is_main else []
        if done:
            where = f"the newest complete checkpoint {done[-1]} is intact (resume: --resume_ckpt {done[-1]})"
        elif (self.model_folder / STATE_FILE).is_file():
            where = f"this run wrote no checkpoint; the one it resumed from, {self.model_folder}, is intact"
        else:
            where = "this run wrote no checkpoint"
        return (f"error: {self._abort_signal} again: stopped at once, the interrupted save was not made or was "
                f"abandoned (nothing half-written is left); {where}")

    def cleanup(self) -> None:
        for s, h in getattr(self, "_old_handlers", {}).items():  # first: a further Ctrl-C is the default's again
            signal.signal(s, h)
        self._close_loader()
        self.torch_settings.close()
        if getattr(self, "ema", None) is not None:
            self.ema.close()
        if getattr(self, "metrics", None):
            self.metrics.close()
        if getattr(self, "log_handler", None):
            log.removeHandler(self.log_handler)
            self.log_handler.close()


def sdp_priority(first: str) -> list[SDPBackend]:
    """SDPA backends in the order torch tries them: `first`, then flash, memory-efficient, math, cuDNN. Every
    backend stays enabled, so a shape the first refuses (e.g. a head dim beyond its limit) falls back instead of
    failing."""
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}[first]
    return [chosen] + [b for b in order if b != chosen]


def compiled_when_grad_enabled(forward, mode: str | None):
    """forward compiled for training steps; with gradients off (sampling, validation) the original forward runs,
    so inference shapes compile nothing."""
    compiled = torch.compile(forward, mode=mode, dynamic=False)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else forward)(*args, **kwargs)
    return run


def _workers_ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; workers must keep feeding the batches the main process still needs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # So does SIGTERM from torchrun/accelerate launch (os.killpg) or a scheduler: a worker killed by it makes the
    # DataLoader raise in the main process before it can save. Therefore multiprocessing's exit handler, which ends
    # leftover workers with SIGTERM, cannot end them: Trainer._close_loader does, on every way out of train().
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
