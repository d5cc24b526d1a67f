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


def training_flops_per_image(unet_config: dict, text_encoder_config, vae_config: dict | None, *, width: int,
                             height: int, train_text_encoder: bool, batch_size: int = 2) -> float:
    """FLOPs of one image's training step. vae_config None: latents come from a cache (no VAE encode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    counter = FlopCounterMode(display=False)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(text_encoder_config)
        vae = AutoencoderKL.from_config(vae_config) if vae_config is not None else None
        text_encoder.requires_grad_(train_text_encoder)
        ids = torch.zeros(batch_size, text_encoder_config.max_position_embeddings, dtype=torch.long)
        latents = torch.zeros(batch_size, unet.config.in_channels, height // 8, width // 8)
        timesteps = torch.zeros(batch_size, dtype=torch.long)
        with counter:
            if vae is not None:
                with torch.no_grad():
                    vae.encode(torch.zeros(batch_size, 3, height, width))
            hidden = text_encoder(ids).last_hidden_state
            pred = unet(latents, timesteps, hidden).sample
            pred.float().square().mean().backward()
    return counter.get_total_flops() / batch_size
