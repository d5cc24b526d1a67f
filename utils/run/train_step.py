"""One training step: the forward and backward pass of each micro-batch, then the optimizer step.

The loss itself is a pure function (utils/sd/step.py); this module feeds it a batch on the device and applies
what it returns: autocast, gradient scaling and accumulation, torch.compile per batch shape, the non-finite guard.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from optimizer.build import grad_scaler_tweak
from utils.core.run_logging import get_logger
from utils.run.compile_shapes import describe_shape, eager_unless, first_line, is_compile_error, shape_of_batch
from utils.run.run_state import Run
from utils.sd.losses import mask_to_latent_weight, use_mask_this_step
from utils.sd.step import LossSettings, batch_seed, compute_loss
from utils.sd.text_conditioning import (Conditioning, added_conditioning, conditioning_for, perturb_embeddings,
                                       tokenize_all)

log = get_logger()

NONFINITE_STEP_LIMIT = 20  # skipped steps in a row before training stops: fp16 calibration skips only a few

# The profiler ranges of a step (utils.benchmark --profile attributes the GPU's idle time to them); what falls
# outside them is the loop itself.
PHASE_DATA, PHASE_FORWARD, PHASE_BACKWARD = "step: data", "step: forward", "step: backward"
PHASE_OPTIMIZER, PHASE_AFTER = "step: optimizer", "step: logging, samples, saves"
PHASES = (PHASE_DATA, PHASE_FORWARD, PHASE_BACKWARD, PHASE_OPTIMIZER, PHASE_AFTER)


class StopTraining(Exception):
    """Raised inside the loop to end the run early with a message (e.g. repeated non-finite losses)."""


def due(step: int, every: int | None) -> bool:
    return bool(every) and step > 0 and step % every == 0


def loss_settings(run: Run) -> LossSettings:
    c, live = run.cfg, run.live
    return LossSettings(prediction_type=run.models.sd.prediction_type, loss_type=c.loss_type,
                        min_snr_gamma=live.min_snr_gamma, debiased_estimation=c.debiased_estimation,
                        zero_frequency_noise_ratio=live.zero_frequency_noise_ratio,
                        pyramid_noise_discount=c.pyramid_noise_discount, timestep_start=c.timestep_start,
                        timestep_end=c.timestep_end, huber_delta=c.huber_delta)


def encode_captions(run: Run, captions: list[str]) -> Conditioning:
    """The UNet's conditioning for a batch's captions (from the cache while the text encoders are frozen)."""
    models = run.models
    encode = conditioning_for(models.sd.family)

    def run_text_encoders(texts: list[str]) -> Conditioning:
        ids = [i.to(run.device, non_blocking=True) for i in tokenize_all(models.sd.tokenizers, texts)]
        with torch.set_grad_enabled(models.train_te):
            return encode(models.text_encoders, ids, clip_skip=run.live.clip_skip)

    cond = models.te_cache.lookup(captions, run_text_encoders) if models.te_cache else run_text_encoders(captions)
    if run.cfg.embedding_perturbation:
        cond.hidden = perturb_embeddings(cond.hidden, run.generator, gamma=run.cfg.embedding_perturbation)
    return cond


def micro_step(run: Run, batch: dict, group_size: float, sync_grads: bool, weight: float = 1.0) -> torch.Tensor:
    """The forward and backward pass of one micro-batch, compiled when its shape is (utils/run/compile_shapes.py):
    the first step of a compiled shape is timed, and one whose compile fails runs again uncompiled."""
    shapes = run.compiled_shapes
    shape = shape_of_batch(batch)
    if shapes is None or not shapes.is_new(shape):
        compiled = shapes is not None and shapes.runs_compiled(shape)
        with eager_unless(compiled or shapes is None):
            return forward_backward(run, batch, group_size, sync_grads, weight, compiled)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # once per shape: the compile's time, not the queue's
    t0 = time.perf_counter()
    try:
        loss = forward_backward(run, batch, group_size, sync_grads, weight, True)
    except Exception as e:
        if not is_compile_error(e):
            raise
        # non-lazy backward lowering: compiles fail in the forward, before any gradient was accumulated
        shapes.failed[shape] = first_line(e)
        log.info(f"warning: torch.compile failed for {describe_shape(shape)} ({shapes.failed[shape]}); this shape "
                 f"runs uncompiled from now on, training goes on")
        with eager_unless(False):
            return forward_backward(run, batch, group_size, sync_grads, weight, False)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    shapes.seconds[shape] = time.perf_counter() - t0
    log.info(f"torch.compile: {describe_shape(shape)} compiled in {shapes.seconds[shape]:.1f} s (its first forward "
             f"and backward); compiling so far: {run.compile_seconds:.1f} s")
    run.metrics.scalars(run.state.global_step + 1, {"performance/compile seconds": run.compile_seconds})
    return loss


def _latents(run: Run, batch: dict) -> torch.Tensor:
    vae = run.models.sd.vae
    if "latent_moments" in batch:  # cache_latents: the VAE posterior was stored; draw from it as below
        latent_dist = DiagonalGaussianDistribution(batch["latent_moments"].to(run.device, non_blocking=True))
    else:
        pixels = batch["pixel_values"].to(run.device, dtype=vae.dtype, non_blocking=True)
        with torch.no_grad():
            latent_dist = vae.encode(pixels).latent_dist
    return latent_dist.sample(run.generator).float() * vae.config.scaling_factor


def forward_backward(run: Run, batch: dict, group_size: float, sync_grads: bool, weight: float,
                     compiled: bool) -> torch.Tensor:
    cfg, models = run.cfg, run.models
    phase = contextlib.ExitStack()   # the profiler's "forward" range; closed where the backward pass begins
    phase.enter_context(torch.profiler.record_function(PHASE_FORWARD))
    if compiled and cfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()   # the last step's graph outputs may be overwritten now
    run.generator.manual_seed(batch_seed(cfg.seed, run.state.epoch, batch["position"]))
    latents = _latents(run, batch)
    pixel_weight = None
    if batch.get("mask") is not None and use_mask_this_step(run.generator, cfg.unmasked_probability):
        pixel_weight = mask_to_latent_weight(batch["mask"].to(run.device, non_blocking=True), latents.shape[-2:],
                                             unmasked_weight=cfg.unmasked_weight,
                                             normalize_masked_area_loss=cfg.normalize_masked_area_loss)
    no_sync = contextlib.ExitStack()
    if not sync_grads and run.processes > 1:
        for model, trained in models.step_modules():
            if trained:
                no_sync.enter_context(run.accelerator.no_sync(model))
    with phase, no_sync:
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            cond = encode_captions(run, batch["captions"])
            # non_blocking: a blocking copy would make the host wait here for the GPU, every step
            loss_scale = batch["loss_scale"].to(run.device, non_blocking=True)
            loss, _ = compute_loss(models.unet, models.noise_scheduler, latents, cond.hidden, run.generator,
                                   loss_settings(run), loss_scale=loss_scale, pixel_weight=pixel_weight,
                                   added_cond=added_conditioning(cond, batch.get("time_ids")))
        if cfg.fused_backward_pass:  # the backward pass steps the weights: decide before it
            run.backward_skipped = cfg.skip_nonfinite_steps and not bool(torch.isfinite(loss))
            if run.backward_skipped:
                return loss.detach()     # no backward; optimizer_step counts the skipped step
            log_now = due(run.state.global_step + 1, run.live.log_step) and run.opt_cfg.log_grad_norm
            for part in run.parts:
                part.optimizer.record_grad_norm = log_now
        # Backward outside autocast (it reuses the forward's dtypes anyway), as torch recommends: leaving the
        # region frees autocast's cache of low-precision weight copies before the backward pass.
        # Micro-batches of one optimizer step are averaged, so grad_accum does not change the step size.
        phase.close()
        with torch.profiler.record_function(PHASE_BACKWARD):
            run.scaler.scale(loss / group_size if weight == 1.0 else loss * weight).backward()
    return loss.detach()


def step_schedule(part) -> None:
    """Advances a part's LR schedule by one optimizer step. A skipped step (non-finite loss, or fp16's GradScaler
    backing off) advances it too, so the schedule follows global_step; torch warns about a schedule step without
    an optimizer step, which here is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        part.scheduler.step()


def optimizer_step(run: Run, step_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unscale, clip, step every part, update the scaler once. Returns grad norms as device tensors.

    A step whose loss or gradients are not finite changes no weight: fp16's GradScaler skips it by itself (it
    syncs with the host each step anyway); in bf16/fp32 the loss is checked here, one host sync a step (with
    fused_backward_pass before the backward pass, which steps the weights)."""
    cfg, scaler = run.cfg, run.scaler
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
    elif cfg.skip_nonfinite_steps and (run.backward_skipped if cfg.fused_backward_pass
                                       else not torch.isfinite(step_loss)):
        for part in run.parts:
            part.optimizer.zero_grad(set_to_none=True)
            step_schedule(part)
        count_nonfinite(run, True)
        return {}
    norms = {}
    log_now = due(run.state.global_step + 1, run.live.log_step) and run.opt_cfg.log_grad_norm
    # fused_backward_pass: the gradients are gone by now (clip_grad_norm is refused); the norm is summed as the
    # backward pass steps them and is taken below
    if (cfg.clip_grad_norm or log_now) and not cfg.fused_backward_pass:
        for part in run.parts:
            scaler.unscale_(part.optimizer)
            norms[part.name] = torch.nn.utils.clip_grad_norm_(part.params, cfg.clip_grad_norm or float("inf"))
    for part in run.parts:
        scaler.step(part.optimizer)
        if cfg.fused_backward_pass and (norm := part.optimizer.take_grad_norm()) is not None:
            norms[part.name] = norm  # measured as the backward pass stepped and freed the gradients
    scaler.update()
    count_nonfinite(run, scaler.is_enabled() and scaler.get_scale() < scale_before)
    if scaler.is_enabled() and run.opt_cfg.apply_grad_scaler_step_tweaks:
        if tweak := grad_scaler_tweak(run.state.global_step + 1):
            growth, backoff, interval = tweak
            scaler.set_growth_factor(growth)
            scaler.set_backoff_factor(backoff)
            scaler.set_growth_interval(interval)
    for part in run.parts:
        step_schedule(part)
        part.optimizer.zero_grad(set_to_none=True)
    return norms


def discard_step(run: Run) -> dict:
    """In place of an optimizer step that has no image: no update, no LR schedule step (DDP's weight-0 stand-in
    batches left zero gradients, which Adam's moments would still turn into an update)."""
    for part in run.parts:
        part.optimizer.zero_grad(set_to_none=True)
    return {}


def count_nonfinite(run: Run, skipped: bool) -> None:
    run.nonfinite_run = run.nonfinite_run + 1 if skipped else 0
    if skipped:
        log.info(f"warning: step {run.state.global_step + 1}: non-finite loss or gradients, step skipped "
                 f"({run.nonfinite_run} in a row)")
    if run.nonfinite_run >= NONFINITE_STEP_LIMIT:
        raise StopTraining(
            f"{NONFINITE_STEP_LIMIT} optimizer steps in a row had non-finite (NaN/inf) loss or gradients; the "
            f"weights were not changed by them, and no checkpoint is written from this state. Lower lr, set "
            f"clip_grad_norm (e.g. 1.0), or use mixed_precision bf16 instead of fp16, then resume from the "
            f"last checkpoint.")
