"""Sample images during training with diffusers' own pipeline, without disturbing the training's randomness."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 555
    size: tuple[int, int] = (512, 512)


def read_prompt_lines(path: str | None) -> list[str]:
    """Prompts from a .txt file, one a line; a missing or empty file gives none."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        return []
    return [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def plan_samples(prompt_file: str | None, captions: list[str], *, seed: int, size: tuple[int, int],
                 max_random: int = 4) -> list[SampleRequest]:
    """The prompts of the file, re-read at each sampling; random training captions when it has none."""
    prompts = read_prompt_lines(prompt_file)
    if not prompts:
        rng = random.Random(seed)
        prompts = rng.sample(captions, min(max_random, len(captions))) if captions else [""]
    return [SampleRequest(prompt=p, seed=seed + i, size=size) for i, p in enumerate(prompts)]


def build_pipeline(unet, text_encoder, vae, tokenizer, scheduler_config: dict):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    scheduler = DDIMScheduler.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, requests: list[SampleRequest], *, cfg_scales: list[float], steps: int, device,
             autocast_dtype: torch.dtype | None) -> list[tuple[SampleRequest, list]]:
    """One image per (request, CFG scale); each seeded on its own so the images do not depend on the batch."""
    results = []
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []), torch.no_grad():
        for req in requests:
            images = []
            for scale in cfg_scales:
                gen = torch.Generator(device="cpu").manual_seed(req.seed)
                with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    out = pipe(req.prompt, negative_prompt=req.negative_prompt or None, width=req.size[0],
                               height=req.size[1], num_inference_steps=steps, guidance_scale=scale, generator=gen,
                               output_type="pil")
                images.append(out.images[0])
            results.append((req, images))
    return results


def grid_with_labels(images: list, labels: list[str]):
    """Images side by side, a label over each column (the CFG scale)."""
    from PIL import Image, ImageDraw
    w, h = images[0].size
    band = max(12, h // 10)
    grid = Image.new("RGB", (w * len(images), h + band), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(images, labels)):
        grid.paste(img.convert("RGB"), (i * w, band))
        draw.text((i * w + 2, 0), label, fill="black")
    return grid


def safe_filename(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit] or "empty"
