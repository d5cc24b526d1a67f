"""Training target, per-sample loss, mask weights and timestep weights.

Pure functions on tensors; losses are computed in float32 whatever the model's dtype. The step combines them as

    loss = mean_over_batch(loss_per_sample(...) * timestep_weights(...) * loss_scale)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("mse", "mae", "huber", "smooth_l1", "mse_huber", "huber_mse")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Debiased estimation, epsilon: SNR is clamped into this range before 1/sqrt(SNR). The top is sd-scripts'
# value (SNR is inf or ~1e3+ at t = 0); the bottom keeps the weight <= ~31.6 where zero terminal SNR drives
# SNR to 0 (the epsilon target is degenerate there anyway: x_T = noise).
DEBIASED_SNR_RANGE = (1e-3, 1e3)


def training_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity v = sqrt(ab)*eps - sqrt(1-ab)*x0
    (v_prediction, Salimans & Ho, arXiv 2202.00512), chosen by the scheduler's prediction_type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def _elementwise(pred: Tensor, target: Tensor, kind: str, delta: float) -> Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "mae":
        return F.l1_loss(pred, target, reduction="none")
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=delta)
    return F.smooth_l1_loss(pred, target, reduction="none", beta=delta)  # = huber / delta


def loss_per_sample(pred: Tensor, target: Tensor, timesteps: Tensor, *, loss_type: str = "mse",
                    num_train_timesteps: int = 1000, huber_delta: float = 1.0,
                    pixel_weight: Tensor | None = None) -> Tensor:
    """Loss per sample, shape [B], float32.

    loss_type:
      mse        squared error
      mae        absolute error (L1)
      huber      Huber with threshold huber_delta: quadratic below it, linear above
      smooth_l1  Huber / huber_delta (the same shape, gradient capped at 1 instead of delta)
      mse_huber  MSE at t = 0 blending linearly to Huber at t = T-1: (1-s)*MSE + s*Huber, s = t / (T-1).
                 The name reads low-t -> high-t, as EveryDream2's doc says; EveryDream2's code did the reverse
                 (D19), so a config that relied on that code should use huber_mse.
      huber_mse  the mirror: Huber at t = 0 blending to MSE at t = T-1.

    pixel_weight: optional per-element weights broadcastable to the loss, [B, 1, h, w] or [B, C, h, w] (mask
    weights at latent resolution, see mask_to_latent_weight). The loss is mean(weight * elementwise loss):
    weights are multipliers, so with weights whose per-sample mean is 1 this is the weighted mean
    sum(w*l) / sum(w), and with smaller weights the loss shrinks (OneTrainer's behaviour).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    if huber_delta <= 0:
        raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred, target = pred.float(), target.float()
    if loss_type in ("mse_huber", "huber_mse"):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        s = (timesteps.to(device=pred.device, dtype=torch.float32) / (num_train_timesteps - 1)).clamp(0, 1)
        s = s.view(-1, *([1] * (pred.ndim - 1)))
        mse = _elementwise(pred, target, "mse", huber_delta)
        huber = _elementwise(pred, target, "huber", huber_delta)
        low, high = (mse, huber) if loss_type == "mse_huber" else (huber, mse)
        per_element = torch.lerp(low, high, s)
    else:
        per_element = _elementwise(pred, target, loss_type, huber_delta)
    if pixel_weight is not None:
        weight = pixel_weight.to(device=per_element.device, dtype=torch.float32)
        try:
            fits = weight.ndim == per_element.ndim and \
                torch.broadcast_shapes(weight.shape, per_element.shape) == per_element.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"pixel_weight {tuple(pixel_weight.shape)} does not broadcast to the loss "
                             f"{tuple(per_element.shape)}")
        per_element = per_element * weight
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))


def mask_to_latent_weight(mask: Tensor | None, latent_hw: tuple[int, int], *, unmasked_weight: float = 0.1,
                          normalize_masked_area_loss: bool = False) -> Tensor | None:
    """OneTrainer-style masked training: a mask [B, 1, H, W] (or [B, H, W]) in [0, 1] at pixel resolution ->
    loss weights [B, 1, h, w] at latent resolution (None stays None).

    The mask is area-averaged down to the latent grid (a latent cell's value is the fraction of white under
    it), then w = unmasked_weight + (1 - unmasked_weight) * m: 1 where white, unmasked_weight where black,
    linear in between. normalize_masked_area_loss divides each sample's weights by their mean, so the mean
    weight is 1 and loss_per_sample becomes the weighted mean sum(w*l)/sum(w): the loss magnitude no longer
    shrinks with the white area.
    """
    if mask is None:
        return None
    if not 0.0 <= unmasked_weight <= 1.0:
        raise ValueError(f"unmasked_weight must be in [0, 1], got {unmasked_weight}")
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W] or [B, H, W], got {tuple(mask.shape)}")
    m = F.adaptive_avg_pool2d(mask.float().clamp(0, 1), tuple(latent_hw))
    weight = unmasked_weight + (1.0 - unmasked_weight) * m
    if normalize_masked_area_loss:
        # mean >= unmasked_weight > 0 unless unmasked_weight == 0 and the mask is all black: keep those at 0.
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        weight = torch.where(mean > 0, weight / mean.clamp_min(1e-12), weight)
    return weight


def use_mask_this_step(generator: torch.Generator, unmasked_probability: float) -> bool:
    """True if this step uses the masks; False (train on the whole image) with probability
    `unmasked_probability` (OneTrainer's "unmasked probability"). Always draws one number, so the generator
    advances the same way whatever the probability."""
    if not 0.0 <= unmasked_probability <= 1.0:
        raise ValueError(f"unmasked_probability must be in [0, 1], got {unmasked_probability}")
    u = float(torch.rand((), generator=generator, device=generator.device))
    return u >= unmasked_probability


def timestep_weights(scheduler, timesteps: Tensor, *, prediction_type: str, min_snr_gamma: float | None = None,
                     debiased_estimation: bool = False) -> Tensor:
    """Per-sample loss weights [B] (float32, on timesteps' device) from the signal-to-noise ratio
    SNR = ab / (1 - ab); all ones when neither option is set. Both options multiply when both are set.

    min_snr_gamma (Min-SNR-gamma, arXiv 2303.09556): the x0-space weight min(SNR, gamma), expressed for the
    loss actually computed: epsilon: min(SNR, gamma) / SNR; v_prediction: min(SNR, gamma) / (SNR + 1).
    EveryDream2 used the epsilon formula for v-prediction too, which over-weights low-SNR steps there.
    Limits are taken exactly, never NaN: epsilon -> 1 at SNR = 0 and 0 at SNR = inf; v -> 0 at both ends (so
    with zero terminal SNR the terminal step of a v model gets weight 0, as the formula says).

    debiased_estimation (arXiv 2310.08442): epsilon: 1 / sqrt(SNR), SNR clamped to DEBIASED_SNR_RANGE;
    v_prediction: 1 / sqrt(SNR + 1) (the same for SNR >> 1, bounded by 1 where SNR -> 0, 0 at SNR = inf).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
    weight = torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if min_snr_gamma is None and not debiased_estimation:
        return weight
    from diffusers.training_utils import compute_snr  # imported here: diffusers.training_utils takes ~2 s to load

    snr = compute_snr(scheduler, timesteps).float()
    if min_snr_gamma is not None:
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if prediction_type == "epsilon":
            weight = weight * (min_snr_gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, exact at 0 and inf
        else:
            weight = weight * torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
    if debiased_estimation:
        if prediction_type == "epsilon":
            weight = weight * torch.rsqrt(snr.clamp(*DEBIASED_SNR_RANGE))
        else:
            weight = weight * torch.rsqrt(snr + 1)
    return weight
