"""Validation losses and sample images during a run, with the current (or EMA) weights, in eval mode.

The pieces are in utils/eval/ (sampling, validation); this module runs them on the run's models and logs the
results. They use the plain modules (sd.unet), not the step's DDP-wrapped or compiled ones.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from data.dataset import BatchDataset, scan_dataset
from optimizer.build import eval_weights
from utils.core.run_logging import get_logger
from utils.eval.sample_config import plan_samples
from utils.eval.sampling import (build_pipeline, generate, make_grid, prompt_encoder, sample_stem, sample_tag,
                                 write_sample)
from utils.eval.validation import (describe_split, evaluate_loss, split_for_validation, validation_loss_settings,
                                   validation_sets)
from utils.run.preflight import data_settings
from utils.run.run_state import Run
from utils.run.train_step import loss_settings
from utils.sd.ema import ema_weights
from utils.sd.noise import sampling_settings
from utils.sd.step import compute_loss
from utils.sd.text_conditioning import added_conditioning, conditioning_for, tokenize_all

log = get_logger()


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """modules in eval mode (no dropout), each put back in the mode it was in."""
    was_training = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, training in zip(modules, was_training):
            m.train(training)


def hold_out_validation_images(run: Run) -> None:
    """Validation sets from validation_config; held-out images leave run.scan.items before epochs are planned."""
    vcfg, previews = run.previews.validation, run.previews
    if vcfg is None:
        return
    settings = dataclasses.replace(data_settings(run.cfg, run.resolutions), flip_p=0.0, cond_dropout=0.0,
                                   shuffle_tags=False, crop_jitter=0.0)   # held-out images are not augmented
    train_items, sets, stabilize = split_for_validation(run.scan.items, vcfg,
                                                        scan_fn=lambda folder: scan_dataset(folder, settings))
    run.scan.items = train_items
    previews.sets = validation_sets(sets, stabilize, batch_size=vcfg.batch_size or run.cfg.batch_size,
                                    seed=vcfg.seed, resolution=run.resolutions[0])
    log.info(describe_split(len(train_items), sets, stabilize))


def validate(run: Run) -> None:
    """Validation losses with fixed noise and timesteps. Every process computes them (same numbers, no
    collective); the main one logs."""
    vcfg, step, sd = run.previews.validation, run.state.global_step, run.models.sd
    settings = validation_loss_settings(loss_settings(run))
    encode = conditioning_for(sd.family)

    def batch_loss(batch, generator) -> torch.Tensor:
        """The training forward path without gradients, augmentation or embedding perturbation; plain MSE."""
        pixels = batch["pixel_values"].to(run.device, dtype=sd.vae.dtype, non_blocking=True)
        latents = sd.vae.encode(pixels).latent_dist.sample(generator) * sd.vae.config.scaling_factor
        ids = [i.to(run.device) for i in tokenize_all(sd.tokenizers, batch["captions"])]
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            cond = encode(sd.text_encoders, ids, clip_skip=run.live.clip_skip)
            loss, _ = compute_loss(sd.unet, run.models.noise_scheduler, latents.float(), cond.hidden, generator,
                                   settings, added_cond=added_conditioning(cond, batch.get("time_ids")))
        return loss

    values = {}
    with eval_weights(run.parts), eval_mode(sd.unet, *sd.text_encoders):
        for vs in run.previews.sets:
            dataset = BatchDataset(vs.items, vs.plans, seed=vcfg.seed, epoch=0, augment=False)
            values[vs.tag] = evaluate_loss(batch_loss, dataset, seed=vcfg.seed)
    extra, warnings = run.previews.history.record(step, values)
    run.metrics.scalars(step, {**values, **extra})
    for warning in warnings:
        log.info(f"warning: {warning}")
    log.info(f"step {step} validation: " + "  ".join(f"{t.split('/', 1)[1]} {v:.5f}" for t, v in values.items()))


def sample(run: Run) -> None:
    """Sample grids with the trained weights and/or the EMA weights, as configured."""
    if not run.is_main:
        return
    run.previews.samples.reload(lambda msg: log.info(f"warning: {msg}"))  # edits apply; a broken file keeps the last
    try:
        with eval_weights(run.parts):
            _sample_each_weight_set(run)
        return
    except torch.OutOfMemoryError:
        pass  # handled below, once the exception's frames (and the tensors they hold) are gone
    # A preview must not end the run: the step keeps its memory while sampling (with compile_mode reduce-overhead
    # the CUDA graphs' pool), so what is left may not hold the sampler's
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    log.info(f"warning: sampling at step {run.state.global_step} ran out of GPU memory and was skipped (training "
             f"is not affected). For samples, lower the sample batch_size or size in the prompt file "
             f"({run.cfg.sample_prompts}), or the training batch_size (now {run.cfg.batch_size})")


def _sample_each_weight_set(run: Run) -> None:
    cfg = run.cfg
    if run.ema is None:
        return _sample_with_current_weights(run, "")
    if cfg.ema_sample_nonema_model:
        _sample_with_current_weights(run, "")
    if cfg.ema_sample_ema_model or not cfg.ema_sample_nonema_model:
        with ema_weights(run.ema, run.models.trained_params):
            _sample_with_current_weights(run, "ema-")


def _sample_with_current_weights(run: Run, prefix: str) -> None:
    cfg, sd, step = run.cfg, run.models.sd, run.state.global_step
    scfg = run.previews.samples.current
    requests = plan_samples(scfg, [it.caption for it in run.scan.items], step=step)
    with eval_mode(sd.unet, *sd.text_encoders):
        pipe = build_pipeline(sd, scheduler=scfg.scheduler, zero_terminal_snr=cfg.enable_zero_terminal_snr,
                              show_progress=scfg.show_progress_bars)
        results = generate(pipe, requests, cfg_scales=scfg.cfgs, steps=scfg.num_inference_steps, device=run.device,
                           autocast_dtype=run.amp_dtype, batch_size=scfg.batch_size,
                           encode=prompt_encoder(sd, run.device, run.live.clip_skip),
                           guidance_rescale=sampling_settings(zero_terminal_snr=cfg.enable_zero_terminal_snr)
                           .guidance_rescale)
    for idx, (req, images) in enumerate(results):
        grid = make_grid(images, scfg.cfgs)
        write_sample(run.run_dir / "samples", sample_stem(prefix, step, idx, req), grid, req, scfg)
        run.metrics.image(sample_tag(prefix, idx, req), grid, step)
