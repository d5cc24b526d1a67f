"""Building a run's parts, in the order they are needed: run folder, data, model, latents, optimizers, EMA.

Bad data fails before any model loads; a model of an unsupported family fails before training; each function
fills its own fields of the Run (utils/run/run_state.py) and nothing else.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path

import torch

from data.dataset import require_usable, scan_dataset, summarize, write_dataset_report
from data.discovery import decode_problems
from data.latent_cache import ensure_latents, needed_entries
from optimizer.build import build_optimizer_parts, fused_backward_problems, stochastic_rounding_problems
from optimizer.config import optimizer_config_to_json
from utils.core.config_schema import ConfigError
from utils.core.file_writes import create_folder
from utils.core.run_logging import MetricsSink, add_log_file, get_logger, quiet_libraries
from utils.core.file_writes import write_json_atomic
from utils.run.checkpoint import TrainState, find_last, load_trainer_state
from utils.run.config import config_to_dict
from utils.run.preflight import data_settings
from utils.run.previews import hold_out_validation_images
from utils.run.processes import epoch_plans, steps_per_epoch
from utils.run.run_state import Models, Run, StepCounts
from utils.run.saving import restore_trainer_state
from utils.run.step_log import print_summary
from utils.run.torch_settings import compile_step_modules, enter_torch_settings
from utils.sd.ema import EMA, ema_decay_from_target
from utils.sd.models import load_sd_model, resolve_model_folder
from utils.sd.noise import make_noise_scheduler
from utils.sd.text_conditioning import PromptCache

log = get_logger()


def setup(run: Run) -> None:
    cfg = run.cfg
    quiet_libraries()
    run.run_dir = make_run_dir(run)
    if run.is_main:
        run.log_handler = add_log_file(run.run_dir / f"{run.run_dir.name}.log")
        write_json_atomic(run.run_dir / "train.json", config_to_dict(cfg))
    log.info(f"run folder: {run.run_dir}")
    enter_torch_settings(cfg, run.torch_settings)
    run.scan = scan_data(run)                  # bad data fails here, before minutes go into loading models
    hold_out_validation_images(run)            # held-out images leave run.scan.items before epochs are planned
    if run.previews.samples.current.note:
        log.info(run.previews.samples.current.note)
    # Downloads / conversions / built-ins land in .models: the main process first, then one per machine (a
    # machine-local disk), then the rest (each process goes through 2 barriers, in matching order).
    with run.accelerator.main_process_first(), run.accelerator.local_main_process_first():
        folder, resume_state = resolve_model(run)
    if resume_state is not None and resume_state["train_state"]["seed"] != cfg.seed:
        # data order and noise are functions of the seed: continuing exactly needs the checkpoint's
        log.info(f"warning: the checkpoint was trained with seed {resume_state['train_state']['seed']}, not "
                 f"{cfg.seed}; continuing with the checkpoint's seed so the resume is exact")
        run.cfg = cfg = dataclasses.replace(cfg, seed=resume_state["train_state"]["seed"])
        if run.is_main:
            write_json_atomic(run.run_dir / "train.json", config_to_dict(cfg))
    run.models = load_models(run, folder)
    run.latent_index = cache_latents(run) if cfg.cache_latents else None
    run.steps = count_steps(run)
    build_optimizers(run)
    wrap_for_ddp(run)
    if cfg.torch_compile:
        compile_step_modules(run)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    run.generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    run.state = TrainState(seed=cfg.seed)
    run.ema = build_ema(run) if run.is_main else None  # DDP keeps weights equal: EMA on main only
    if resume_state is not None:
        restore_trainer_state(run, resume_state)
    run.metrics = MetricsSink(run.run_dir, enabled=run.is_main)
    run.metrics.text("config", "```\n" + json.dumps(config_to_dict(cfg), indent=2) + "\n```")
    print_summary(run)


def make_run_dir(run: Run) -> Path:
    from accelerate.utils import broadcast_object_list
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)  # every process writes into the same run folder name
    run_dir = Path(run.cfg.logdir) / f"{run.cfg.project_name}-{stamp[0]}"
    if run.is_main:  # an unwritable logdir stops the run here, before anything loads
        create_folder(run_dir / "ckpts", "logdir")
    return run_dir


def scan_data(run: Run):
    """Every image is decoded once here (each process its share), so a broken one is skipped before epochs are
    planned (doc/DATA.md)."""
    def decode_shares(items) -> dict:
        n, rank = run.processes, run.accelerator.process_index
        problems = decode_problems(items, range(rank, len(items), n), progress=run.is_main)
        if n > 1:
            from accelerate.utils import gather_object
            problems = {i: p for share in gather_object([problems]) for i, p in share.items()}
        return problems

    scan = scan_dataset(run.cfg.data_root, data_settings(run.cfg, run.resolutions), decode=decode_shares,
                        progress=run.is_main, check_usable=False)
    if run.is_main:
        write_dataset_report(scan, run.run_dir / "dataset.jsonl")
    for line in summarize(scan).splitlines():
        log.info(line)
    require_usable(scan)  # nothing left to train on: stop before any model loads
    return scan


def _prediction_override(run: Run) -> str | None:
    return None if run.cfg.prediction_type == "auto" else run.cfg.prediction_type


def resolve_model(run: Run) -> tuple[Path, dict | None]:
    source, logdir = run.cfg.resume_ckpt, Path(run.cfg.logdir)
    folder = find_last(logdir) if source == "findlast" else None
    folder = folder or resolve_model_folder(source, logdir / ".models", _prediction_override(run))
    state = load_trainer_state(folder)
    log.info(f"model: {folder}" + ("  (resuming its trainer state)" if state else ""))
    return folder, state


def load_models(run: Run, folder: Path) -> Models:
    cfg = run.cfg
    sd = load_sd_model(folder, _prediction_override(run))
    train_unet = not cfg.disable_unet_training
    # train.json's disable_textenc_training freezes every text encoder; optimizer.json's freeze_all one of them
    train_tes = tuple(not cfg.disable_textenc_training and run.opt_cfg.trains_text_encoder(name)
                      for name, _ in sd.text_encoder_parts())
    frozen_dtype = run.amp_dtype or torch.float32
    # Frozen parts run in the autocast dtype: less memory, and no fp32 copy is needed. A VAE whose config asks
    # for it (force_upcast: SDXL's overflows fp16 to NaN) stays fp32 under fp16; bf16's range is fp32's.
    vae_dtype = torch.float32 if frozen_dtype == torch.float16 and sd.vae.config.get("force_upcast") else frozen_dtype
    sd.vae.requires_grad_(False).to(run.device, dtype=vae_dtype).eval()
    trained_dtype = torch.bfloat16 if cfg.weight_dtype == "bf16" else torch.float32
    modules = [(sd.unet, train_unet), *zip(sd.text_encoders, train_tes)]
    for module, trained in modules:
        module.to(run.device, dtype=trained_dtype if trained else frozen_dtype)
        if not trained:
            module.requires_grad_(False).eval()
    if cfg.channels_last:  # convolutions in NHWC: the layout cuDNN's tensor-core kernels want
        sd.unet.to(memory_format=torch.channels_last)
    if cfg.attn_type == "xformers":
        sd.unet.enable_xformers_memory_efficient_attention()
    elif cfg.attn_type == "slice":
        sd.unet.set_attention_slice("auto")
    if cfg.gradient_checkpointing and train_unet:
        sd.unet.enable_gradient_checkpointing()
    for text_encoder, trained in zip(sd.text_encoders, train_tes):
        if cfg.gradient_checkpointing and trained:
            text_encoder.gradient_checkpointing_enable()
    for module, trained in modules:
        if trained:
            module.train()
    return Models(sd=sd, folder=folder, train_unet=train_unet, train_text_encoders=train_tes, unet=sd.unet,
                  text_encoders=sd.text_encoders,
                  noise_scheduler=make_noise_scheduler(sd.scheduler_config,
                                                       zero_terminal_snr=cfg.enable_zero_terminal_snr),
                  te_cache=PromptCache() if not any(train_tes) and cfg.cache_te_outputs else None,
                  trained_params=trained_parameters(sd, train_unet, train_tes))


def trained_parameters(sd, train_unet: bool, train_tes: tuple[bool, ...]) -> list[torch.nn.Parameter]:
    """The trained modules' parameters in a fixed order: UNet, then each text encoder."""
    params = list(sd.unet.parameters()) if train_unet else []
    for text_encoder, trained in zip(sd.text_encoders, train_tes):
        params += list(text_encoder.parameters()) if trained else []
    return params


def cache_latents(run: Run):
    """Encode what is not cached yet (each process its share), then every process reads the whole cache."""
    cfg, items, vae = run.cfg, run.scan.items, run.models.sd.vae
    cache_dir = Path(cfg.latent_cache_dir) if cfg.latent_cache_dir else Path(cfg.logdir) / ".latent_cache"
    report = ensure_latents(items, needed_entries(items, run.resolutions), vae, cache_dir,
                            rank=run.accelerator.process_index, world_size=run.processes, progress=run.is_main)
    log.info(report.summary())
    if cfg.crop_jitter or any(item.crop_jitter for item in items):
        log.info("cache_latents: images train with their centre crop; crop_jitter is not applied")
    run.accelerator.wait_for_everyone()
    if run.processes > 1:
        # what other processes encoded is here unless the cache is on another machine's disk: encode the rest
        report = ensure_latents(items, needed_entries(items, run.resolutions), vae, cache_dir, progress=False)
        if report.encoded:
            log.warning(f"latent cache: {report.encoded} entries were missing here (latent_cache_dir is not "
                        f"shared between machines?) and were encoded by this process too")
    return report.index


def count_steps(run: Run) -> StepCounts:
    cfg = run.cfg
    # Fractional multipliers and multi-resolution make epochs differ by a few batches: then count them all.
    varies = len(run.resolutions) > 1 or any(it.multiply % 1 for it in run.scan.items)
    epoch_steps = [steps_per_epoch(len(epoch_plans(run, e)), cfg.grad_accum)
                   for e in range(cfg.max_epochs if varies else 1)]
    epoch_steps += [epoch_steps[0]] * (cfg.max_epochs - len(epoch_steps))
    total = sum(epoch_steps)
    return StepCounts(epoch_steps=epoch_steps, total_steps=min(total, cfg.max_steps) if cfg.max_steps else total)


def build_optimizers(run: Run) -> None:
    cfg, models = run.cfg, run.models
    text_encoders = [(name, module if trained else None)
                     for (name, module), trained in zip(models.sd.text_encoder_parts(), models.train_text_encoders)]
    if cfg.fused_backward_pass and (problems := fused_backward_problems(
            run.opt_cfg, train_unet=models.train_unet, grad_accum=cfg.grad_accum, clip_grad_norm=cfg.clip_grad_norm,
            train_text_encoders=[name for name, module in text_encoders if module is not None],
            fp16=run.amp_dtype == torch.float16, processes=run.processes)):
        # preflight checked the first text encoder; a second one (SDXL) is known now
        raise ConfigError("fused_backward_pass true cannot run here:\n  - " + "\n  - ".join(problems))
    rounding = cfg.weight_dtype == "bf16"
    if rounding and (problems := stochastic_rounding_problems(
            run.opt_cfg, train_unet=models.train_unet,
            train_text_encoders=[name for name, module in text_encoders if module is not None])):
        raise ConfigError("weight_dtype 'bf16' cannot run with this optimizer.json:\n  - " + "\n  - ".join(problems))
    run.parts = build_optimizer_parts(
        run.opt_cfg, unet=models.sd.unet if models.train_unet else None, text_encoders=text_encoders,
        total_steps=run.steps.total_steps, batch_size=cfg.batch_size * run.processes, grad_accum=cfg.grad_accum,
        scale_lr=cfg.scale_lr, device_type=run.device.type, stochastic_rounding=rounding)
    if cfg.fused_backward_pass:
        for part in run.parts:
            part.optimizer.step_in_backward(overlap=cfg.overlap_optimizer_step)
    if run.is_main:
        write_json_atomic(run.run_dir / "optimizer.json", optimizer_config_to_json(run.opt_cfg))


def wrap_for_ddp(run: Run) -> None:
    """DDP wraps only what trains (one process: prepare() returns the modules unchanged). After the optimizer
    setup, because DDP takes the parameters that require grad when it wraps: text_encoder_freezing must come
    first. A text encoder's last layers go unused with clip_skip >= 2 (a live key), so DDP looks for unused
    parameters there (cheap for a text encoder; the UNet uses all of its parameters)."""
    models = run.models
    if models.train_unet:
        models.unet = run.accelerator.prepare(models.sd.unet)
    wrapped = []
    for text_encoder, trained in zip(models.sd.text_encoders, models.train_text_encoders):
        if trained and run.processes > 1:
            from torch.nn.parallel import DistributedDataParallel
            text_encoder = DistributedDataParallel(
                text_encoder, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                find_unused_parameters=True)
        elif trained:
            text_encoder = run.accelerator.prepare(text_encoder)
        wrapped.append(text_encoder)
    models.text_encoders = tuple(wrapped)


def build_ema(run: Run):
    cfg, models = run.cfg, run.models
    if cfg.ema_decay_rate is None and cfg.ema_strength_target is None:
        return None
    decay = cfg.ema_decay_rate
    if cfg.ema_strength_target is not None:
        decay = ema_decay_from_target(cfg.ema_strength_target, run.steps.total_steps, cfg.ema_update_interval)
    device = run.device if cfg.ema_device == "cuda" and run.device.type == "cuda" else torch.device("cpu")
    ema = EMA(models.trained_params, decay=decay, device=device, update_interval=cfg.ema_update_interval)
    log.info(f"EMA: decay {decay:.6f} every {cfg.ema_update_interval} steps on {device}")
    if cfg.ema_resume_model:
        if cfg.ema_resume_model == "findlast":
            last = find_last(Path(cfg.logdir))
            folder = last.with_name(last.name + "_ema")
        else:
            folder = Path(cfg.ema_resume_model)
        if not (folder / "unet").is_dir():
            raise ConfigError(f"ema_resume_model: {folder} is not a diffusers model folder")
        ema.copy_from(trained_parameters(load_sd_model(folder), models.train_unet, models.train_text_encoders))
        log.info(f"EMA weights from {folder}")
    return ema
