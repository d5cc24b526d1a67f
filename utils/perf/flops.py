"""FLOPs of one training image, counted from the model configs on the meta device (no memory, no GPU time).

The benchmark divides achieved FLOP/s by the GPU's peak to report model FLOP utilisation (MFU). Counted with
torch's FlopCounterMode over what a step computes: text encoder forward (+ backward when trained), UNet forward
and backward, and the VAE encoder's forward when latents are not cached. Attention is counted as its matmuls.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0, "A100": 312.0, "L40S": 362.1, "RTX 4090": 165.2, "RTX 3090": 71.0, "A6000": 154.8}


def peak_tflops(device_name: str) -> float | None:
    for fragment, tflops in PEAK_TFLOPS.items():  # ordered: specific names before their prefixes
        if fragment in device_name:
            return tflops
    return None


def training_flops_per_image(family, unet_config: dict, text_encoder_configs: list, vae_config: dict | None, *,
                             width: int, height: int, train_text_encoders, batch_size: int = 2) -> float:
    """FLOPs of one image's training step of a model family's architecture, from its configs (transformers config
    objects for the text encoders). vae_config None: latents come from a cache (no VAE encode)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from utils.sd.text_conditioning import added_conditioning, conditioning_for

    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        encoders = [getattr(transformers, spec.transformers_class)(config).requires_grad_(trained)
                    for spec, config, trained in zip(family.text_encoders, text_encoder_configs, train_text_encoders)]
        vae = AutoencoderKL.from_config(vae_config) if vae_config is not None else None
        ids = [torch.zeros(batch_size, e.config.max_position_embeddings, dtype=torch.long) for e in encoders]
        latents = torch.zeros(batch_size, unet.config.in_channels, height // 8, width // 8)
        timesteps = torch.zeros(batch_size, dtype=torch.long)
        with counter:
            if vae is not None:
                with torch.no_grad():
                    vae.encode(torch.zeros(batch_size, 3, height, width))
            cond = conditioning_for(family)(encoders, ids)
            added = added_conditioning(cond, torch.zeros(batch_size, 6))
            kwargs = {} if added is None else {"added_cond_kwargs": added}
            pred = unet(latents, timesteps, cond.hidden, **kwargs).sample
            pred.float().square().mean().backward()
    return counter.get_total_flops() / batch_size
