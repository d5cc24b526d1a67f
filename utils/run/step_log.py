"""What the run logs as it trains: the logging window's scalars, epoch losses, the progress bar, the end summary.

A logging step takes its scalars on the device and starts their copy to the host; they are written at the next
step (or when the loop ends), so logging never makes the host wait for the GPU.
"""
from __future__ import annotations

import time

import torch

from optimizer.build import current_lr
from utils.core.run_logging import get_logger, read_later
from utils.run.processes import sum_over_processes
from utils.run.run_state import LogWindow, Run, StagedLog

log = get_logger()

# each trained part's TensorBoard tags: (learning rate, gradient norm)
PART_TAGS = {"unet": ("hyperparameter/lr unet", "optimizer/unet_grad_norm"),
             "text_encoder": ("hyperparameter/lr text encoder", "optimizer/te_grad_norm"),
             "text_encoder_2": ("hyperparameter/lr text encoder 2", "optimizer/te2_grad_norm")}


def new_window(run: Run) -> LogWindow:
    return LogWindow(loss=torch.zeros((), device=run.device))


def add_to_window(window: LogWindow, loss: torch.Tensor, images: int) -> None:
    window.loss += loss
    window.micro += 1
    window.images += images


def stage_window(run: Run, norms: dict) -> None:
    """Takes the window's scalars and starts their copy to the host (write_staged waits for it later)."""
    window = run.window
    elapsed = time.perf_counter() - window.t0
    window_loss, micro, images = sum_over_processes(run, window.loss, window.micro, window.images)
    on_device = {"loss/log_step": window_loss / max(1, micro)}
    on_host = {"performance/images per second": images / max(elapsed, 1e-9)}
    for part in run.parts:
        lr_tag, norm_tag = PART_TAGS[part.name]
        on_host[lr_tag] = current_lr(part)
        if part.name in norms:
            on_device[norm_tag] = norms[part.name]
    if run.scaler.is_enabled():
        on_host["hyperparameter/grad scale"] = run.scaler.get_scale()
    if run.device.type == "cuda":
        on_host["performance/vram"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.staged_log = StagedLog(step=run.state.global_step, read=read_later(on_device), on_host=on_host)
    run.window = new_window(run)


def write_staged(run: Run, bar) -> None:
    """Writes the scalars stage_window took, if any (to TensorBoard, metrics.jsonl and the progress bar)."""
    staged, run.staged_log = run.staged_log, None
    if staged is None:
        return
    values = {**staged.read(), **staged.on_host}
    clip = run.cfg.clip_grad_norm
    for _, norm_tag in PART_TAGS.values():  # the norm as measured, and as the step used it
        if (pre := values.get(norm_tag)) is not None:
            values[norm_tag.replace("_grad_norm", "_pre_clip_norm")] = pre
            values[norm_tag] = min(pre, clip) if clip else pre
    run.metrics.scalars(staged.step, values)
    lr = values.get("hyperparameter/lr unet", values.get("hyperparameter/lr text encoder", 0))
    postfix = {"loss": f"{values['loss/log_step']:.4f}", "lr": f"{lr:.2e}",
               "img/s": f"{values['performance/images per second']:.1f}"}
    if "performance/vram" in values:
        postfix["vram"] = f"{values['performance/vram']:.1f}G"
    if bar is not None:
        bar.set_postfix(postfix, refresh=False)


def log_epoch(run: Run, epoch_loss: torch.Tensor, epoch_micro: int, t0: float) -> None:
    minutes = (time.perf_counter() - t0) / 60
    epoch_loss, epoch_micro = sum_over_processes(run, epoch_loss, epoch_micro)
    if epoch_micro:
        run.metrics.scalars(run.state.global_step, {"loss/epoch": (epoch_loss / epoch_micro).item(),
                                                    "performance/minutes per epoch": minutes})


def print_summary(run: Run) -> None:
    """What the run is about to do, before the first step."""
    from optimizer.build import describe
    cfg, n = run.cfg, run.processes
    precision = {None: "fp32", torch.float16: "fp16 autocast + GradScaler",
                 torch.bfloat16: "bf16 autocast"}[run.amp_dtype]
    log.info(f"images: {len(run.scan.items)}  steps/epoch: {run.steps.per_epoch}  total steps: "
             f"{run.steps.total_steps}  effective batch: {cfg.batch_size} x {n} GPU(s) x {cfg.grad_accum} accum "
             f"= {cfg.batch_size * n * cfg.grad_accum}")
    compiled = cfg.compile_mode + (" (each UNet block)" if cfg.compile_blocks else "") + (
        f", memory budget {cfg.compile_memory_budget}" if cfg.compile_memory_budget < 1.0 else "") + (
        ", convolutions channels-last" if cfg.compile_layout_optimization else "")
    attention = cfg.attn_type + (f" ({cfg.sdp_backend} first)" if cfg.attn_type == "sdp" and
                                 cfg.sdp_backend != "auto" else "")
    log.info(f"device: {run.device}  precision: {precision}  attention: {attention}  "
             f"gradient checkpointing: {cfg.gradient_checkpointing}  latents: "
             f"{'cached' if cfg.cache_latents else 'VAE each step'}  torch.compile: "
             f"{compiled if cfg.torch_compile else 'off'}  channels_last: {cfg.channels_last}")
    for line in describe(run.parts).splitlines():
        log.info(line)


def print_end_summary(run: Run, final) -> None:
    minutes = (time.monotonic() - run.started) / 60
    if run.compiled_shapes is not None:
        log.info(run.compiled_shapes.summary())
    st = run.state
    images = st.images_seen  # already every process's images: agree_at_step sums them at each step
    log.info(f"done: {st.global_step} steps, {st.epoch} epochs, {images} images in {minutes:.1f} min "
             f"({images / max(minutes * 60, 1e-9):.1f} images/s over the whole run)")
    if final is not None:
        log.info(f"final checkpoint: {final}  (resume: --resume_ckpt {final}; TensorBoard: tensorboard "
                 f"--logdir {run.run_dir})")
