"""Training noise, timesteps and the training noise scheduler.

Pure functions on tensors. Every random draw goes through the `torch.Generator` passed in, on that generator's
device, and the result is then moved to the latents' device. With a CPU generator (what the trainer uses) the
noise is therefore the same on CPU and GPU for a given seed, and resuming means restoring one generator state.
Drawing on the CPU costs a few milliseconds per step at SD sizes (8x4x64x64 floats); that is the price of
device-independent, resumable noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

# EveryDream2 (after Whitaker's multi-resolution noise report) stops after 10 levels or at 1 pixel.
PYRAMID_MAX_LEVELS = 10


def _pyramid_noise(shape: tuple[int, ...], generator: torch.Generator, discount: float) -> Tensor:
    """Multi-resolution noise (J. Whitaker, "Multi-Resolution Noise for Diffusion Model Training", 2023), as
    EveryDream2 draws it, renormalised to unit std per sample.

    Level i adds bilinearly upsampled white noise weighted discount**i. Level 0 is a second full-resolution
    draw, and the size shrinks cumulatively (level i is level i-1's size divided by r_i**i, r_i uniform in
    [2, 4)): both are what EveryDream2 does, kept so that a discount value means what it meant there.
    """
    b, c, h, w = shape
    dev = generator.device
    noise = torch.randn(shape, generator=generator, device=dev)
    scales = torch.rand(PYRAMID_MAX_LEVELS, generator=generator, device=dev) * 2 + 2
    lh, lw = h, w
    for i in range(PYRAMID_MAX_LEVELS):
        r = float(scales[i]) ** i
        lh, lw = max(1, int(lh / r)), max(1, int(lw / r))
        level = torch.randn((b, c, lh, lw), generator=generator, device=dev)
        if (lh, lw) != (h, w):
            level = F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)
        noise += level * discount ** i
        if lh == 1 or lw == 1:
            break
    # Per sample rather than over the batch (EveryDream2): a sample's noise does not depend on its batch mates.
    std = noise.flatten(1).std(dim=1).clamp_min(1e-12).view(b, 1, 1, 1)
    return noise / std


def sample_noise(latents: Tensor, generator: torch.Generator, *, zero_frequency_noise_ratio: float = 0.0,
                 pyramid_noise_discount: float | None = None) -> Tensor:
    """Noise shaped like `latents` [B, C, H, W], on its device and dtype.

    White Gaussian noise, or pyramid noise when `pyramid_noise_discount` is a positive number (None or 0: off);
    then offset noise: `zero_frequency_noise_ratio` times a per-sample, per-channel N(0, 1) constant (shape
    [B, C, 1, 1]), after N. Guttenberg's "Diffusion with offset noise" (2023). The result is the noise actually
    added to the latents, so it is also the epsilon target.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    if zero_frequency_noise_ratio < 0:
        raise ValueError(f"zero_frequency_noise_ratio must be >= 0, got {zero_frequency_noise_ratio}")
    if pyramid_noise_discount is not None and pyramid_noise_discount < 0:
        raise ValueError(f"pyramid_noise_discount must be >= 0, got {pyramid_noise_discount}")
    shape = tuple(latents.shape)
    if pyramid_noise_discount:
        noise = _pyramid_noise(shape, generator, pyramid_noise_discount)
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device)
    if zero_frequency_noise_ratio:
        offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=generator.device)
        noise = noise + zero_frequency_noise_ratio * offset
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(batch_size: int, generator: torch.Generator, *, start: int = 0, end: int = 1000,
                     device: torch.device | str | None = None) -> Tensor:
    """`batch_size` timesteps drawn uniformly from [start, end) (int64), moved to `device`."""
    if not 0 <= start < end:
        raise ValueError(f"need 0 <= timestep_start < timestep_end, got start={start}, end={end}")
    t = torch.randint(start, end, (batch_size,), generator=generator, device=generator.device)
    return t.to(device) if device is not None else t


def make_noise_scheduler(scheduler_config: dict, *, zero_terminal_snr: bool):
    """The training scheduler: a DDPMScheduler built from the model's scheduler config (any scheduler class's
    config: DDPM, DDIM, PNDM, Euler... share the beta keys; keys DDPM does not know are ignored).

    Training needs only the noise schedule (`add_noise`, `get_velocity`, `alphas_cumprod`), which does not
    depend on the sampler class. `zero_terminal_snr` is applied exactly as given (it overrides a
    `rescale_betas_zero_snr` already in the config): betas are rescaled so the last alpha_bar is exactly 0
    (arXiv 2305.08891, Algorithm 1; diffusers' rescale_zero_terminal_snr).
    """
    from diffusers import DDPMScheduler

    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config, rescale_betas_zero_snr=bool(zero_terminal_snr))


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample a model trained with (or without) zero terminal SNR."""
    scheduler_overrides: dict = field(default_factory=dict)  # kwargs for <SchedulerClass>.from_config(cfg, **...)
    guidance_rescale: float = 0.0                              # StableDiffusionPipeline(..., guidance_rescale=...)


def sampling_settings(*, zero_terminal_snr: bool) -> SamplingSettings:
    """arXiv 2305.08891: a zero-terminal-SNR model must be sampled with the same rescaled betas, timesteps
    spaced so the first step is t = T-1 ("trailing", Sec. 3.3) and classifier-free guidance rescaled with
    phi = 0.7 (Sec. 3.4) against over-exposure."""
    if not zero_terminal_snr:
        return SamplingSettings()
    return SamplingSettings(scheduler_overrides={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                            guidance_rescale=0.7)


def scheduler_supports_zero_terminal_snr(scheduler_class: type) -> bool:
    """Whether a diffusers scheduler class can rescale its betas (DDIM, DDPM, Euler, Euler a, DPM++ 2M, UniPC
    can; PNDM, LMS, Heun, KDPM2, DPM++ 2S/SDE cannot and would sample a zero-terminal-SNR model wrongly)."""
    import inspect
    return "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters
