"""The loss of one micro-batch: pure tensor code, no files, no logging, no device decisions.

latents (VAE-encoded upstream) + text embeddings -> noise, timesteps -> noisy latents -> UNet -> target
-> per-sample loss x timestep weights x per-image loss_scale -> mean.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from utils.sd.losses import loss_per_sample, training_target, timestep_weights
from utils.sd.noise import sample_noise, sample_timesteps


def batch_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one micro-batch's noise, timesteps and latent sample: a pure function of where the batch stands
    in the run, so a resumed run, or N processes splitting the batches, draw exactly what one process would."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{position}:step".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class LossSettings:
    prediction_type: str = "epsilon"
    loss_type: str = "mse"
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    zero_frequency_noise_ratio: float = 0.0
    pyramid_noise_discount: float | None = None
    timestep_start: int = 0
    timestep_end: int = 1000
    huber_delta: float = 1.0


def compute_loss(unet, noise_scheduler, latents: Tensor, encoder_hidden_states: Tensor, generator: torch.Generator,
                 s: LossSettings, *, loss_scale: Tensor | None = None, pixel_weight: Tensor | None = None,
                 added_cond: dict | None = None) -> tuple[Tensor, Tensor]:
    """(mean loss, per-sample loss detached). The caller runs this under autocast; the loss is computed in fp32.
    added_cond: the UNet's added_cond_kwargs (SDXL's pooled text embedding and time ids), None for SD1/SD2."""
    noise = sample_noise(latents, generator, zero_frequency_noise_ratio=s.zero_frequency_noise_ratio,
                         pyramid_noise_discount=s.pyramid_noise_discount)
    timesteps = sample_timesteps(latents.shape[0], generator, start=s.timestep_start, end=s.timestep_end,
                                 device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if added_cond is None:
        pred = unet(noisy, timesteps, encoder_hidden_states).sample
    else:
        pred = unet(noisy, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond).sample
    target = training_target(noise_scheduler, latents, noise, timesteps)
    per_sample = loss_per_sample(pred.float(), target.float(), timesteps, loss_type=s.loss_type,
                                 num_train_timesteps=noise_scheduler.config.num_train_timesteps,
                                 huber_delta=s.huber_delta, pixel_weight=pixel_weight)
    weights = timestep_weights(noise_scheduler, timesteps, prediction_type=s.prediction_type,
                               min_snr_gamma=s.min_snr_gamma, debiased_estimation=s.debiased_estimation)
    per_sample = per_sample * weights
    if loss_scale is not None:
        per_sample = per_sample * loss_scale.to(per_sample.device, per_sample.dtype)
    return per_sample.mean(), per_sample.detach()
