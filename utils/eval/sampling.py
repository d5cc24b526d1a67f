"""Sample images during training: a pipeline around the modules being trained, batched generation with
per-image seeds, the labelled CFG grid and the files written. Nothing here touches the training's randomness.

    pipe = build_pipeline(sd, scheduler=scfg.scheduler)
    for request, images in generate(pipe, requests, cfg_scales=scfg.cfgs, steps=scfg.num_inference_steps,
                                    device=device, autocast_dtype=None, batch_size=scfg.batch_size,
                                    encode=prompt_encoder(sd, device)):
        grid = make_grid(images, scfg.cfgs)

The prompt file and the requests of one sampling (SampleConfigSource, plan_samples) are utils/eval/sample_config.py;
scheduler names are utils/eval/sample_schedulers.py.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Callable

import torch

from utils.eval.sample_config import SampleConfig, SampleRequest
from utils.eval.sample_schedulers import make_sampling_scheduler
from utils.sd.text_conditioning import Conditioning, conditioning_for, tokenize_all

# ---------------------------------------------------------------------------------------------- generation
# Pipeline arguments some families' pipelines take and training has no use for.
_UNUSED_PIPELINE_PARTS = {"safety_checker": None, "feature_extractor": None, "image_encoder": None,
                          "requires_safety_checker": False}


def build_pipeline(sd, *, scheduler: str = "ddim", zero_terminal_snr: bool = False, show_progress: bool = False):
    """The family's diffusers pipeline (ModelFamily.pipeline_class) around an SDModel's modules, the ones being
    trained (shared, not copied): cheap, so build one per sampling and the scheduler may change between them."""
    import diffusers
    cls = getattr(diffusers, sd.family.pipeline_class)
    parts = {"unet": sd.unet, "vae": sd.vae,
             "scheduler": make_sampling_scheduler(scheduler, sd.scheduler_config, zero_terminal_snr=zero_terminal_snr)}
    parts.update(sd.text_encoder_parts())
    parts.update(sd.tokenizer_parts())
    accepted = inspect.signature(cls.__init__).parameters
    parts.update({k: v for k, v in {**_UNUSED_PIPELINE_PARTS, **sd.family.pipeline_extras}.items() if k in accepted})
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=not show_progress)
    return pipe


def prompt_encoder(sd, device, clip_skip: int = 0) -> Callable[[list[str]], Conditioning]:
    """Prompts -> Conditioning exactly as training builds it (the family's conditioning function and the trainer's
    clip_skip), rather than through the pipeline's own encoding, whose clip_skip counts differently."""
    encode = conditioning_for(sd.family)

    def run(texts: list[str]) -> Conditioning:
        ids = [i.to(device) for i in tokenize_all(sd.tokenizers, texts)]
        return encode(sd.text_encoders, ids, clip_skip=clip_skip)
    return run


def _embeds(cond: Conditioning, uncond: Conditioning) -> dict:
    """The pipeline's precomputed-embedding arguments; the pooled ones where the family has them (SDXL)."""
    kwargs = {"prompt_embeds": cond.hidden, "negative_prompt_embeds": uncond.hidden}
    if cond.pooled is not None:
        kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    return kwargs


def _rng_devices(device) -> list:
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def generate(pipe, requests: list[SampleRequest], *, cfg_scales: list[float], steps: int, device,
             autocast_dtype: torch.dtype | None, batch_size: int = 1, guidance_rescale: float = 0.0,
             encode: Callable[[list[str]], Conditioning],
             output_type: str = "pil") -> list[tuple[SampleRequest, list]]:
    """[(request, [image per CFG scale])] in the order of `requests`.

    Requests of the same size run together, up to batch_size at a time. Each image has its own CPU generator
    seeded from its request, re-seeded for every CFG column: an image depends neither on its batch mates nor on
    the device, and every column starts from the same noise. The global RNGs are forked, so sampling does not
    change what training draws next. output_type "np" gives float arrays in [0, 1] instead of PIL images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images: list[list] = [[None] * len(cfg_scales) for _ in requests]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, req in enumerate(requests):
        by_size.setdefault(tuple(req.size), []).append(i)
    dev_type = torch.device(device).type
    with torch.random.fork_rng(devices=_rng_devices(device)), torch.no_grad(), \
            torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for (width, height), indices in by_size.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                embeds = _embeds(encode([requests[i].prompt for i in chunk]),
                                 encode([requests[i].negative_prompt for i in chunk]))
                for column, scale in enumerate(cfg_scales):
                    generators = [torch.Generator(device="cpu").manual_seed(requests[i].seed) for i in chunk]
                    out = pipe(**embeds, width=width, height=height,
                               num_inference_steps=steps, guidance_scale=scale, guidance_rescale=guidance_rescale,
                               generator=generators, output_type=output_type)
                    for k, i in enumerate(chunk):
                        images[i][column] = out.images[k]
    return [(req, imgs) for req, imgs in zip(requests, images)]


# ---------------------------------------------------------------------------------------------- output
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)      # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def cfg_label(scale: float) -> str:
    return f"CFG {scale:g}"


def make_grid(images: list, cfg_scales: list[float] | None = None, *, labels: list[str] | None = None):
    """One row: a column per CFG scale, its value ("CFG 7") written in the image's top-left corner on a dark box
    so it reads on any picture. Width = len(images) x image width; height = image height."""
    from PIL import Image, ImageDraw
    labels = labels if labels is not None else [cfg_label(s) for s in (cfg_scales or [])]
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h), "black")
    font = _font(max(8, min(w, h) // 12))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (i * w, 0))
        if i >= len(labels):
            continue
        left, top, right, bottom = draw.textbbox((0, 0), labels[i], font=font)
        pad = max(1, (bottom - top) // 4)
        draw.rectangle((i * w, 0, i * w + right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0))
        draw.text((i * w + pad - left, pad - top), labels[i], fill=(255, 255, 255), font=font)
    return grid


def grid_with_labels(images: list, labels: list[str]):
    """make_grid with labels given as text (the older name)."""
    return make_grid(images, labels=labels)


def safe_filename(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit] or "empty"


def sample_stem(prefix: str, step: int, index: int, request: SampleRequest) -> str:
    """File name without extension: <prefix>gs<step>-<index>-<prompt> (EveryDream2's pattern)."""
    return f"{prefix}gs{step:05d}-{index}-{safe_filename(request.prompt)}"


def sample_tag(prefix: str, index: int, request: SampleRequest) -> str:
    """TensorBoard image tag. Fixed per sample slot (a random caption changes each time, its tag does not), so
    TensorBoard's step slider walks one prompt through training."""
    label = "random_caption" if request.random_caption else safe_filename(request.prompt, 40)
    return f"samples/{prefix}{index:02d}_{label}"


def write_sample(out_dir: Path, stem: str, grid, request: SampleRequest, config: SampleConfig) -> Path:
    """<stem>.jpg (the grid) and <stem>.txt (what made it: prompt, seed, size, scheduler, steps, CFGs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.jpg"
    grid.save(path, quality=90)
    info = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
            "size": list(request.size), "random_caption": request.random_caption, "scheduler": config.scheduler,
            "num_inference_steps": config.num_inference_steps, "cfgs": config.cfgs}
    (out_dir / f"{stem}.txt").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path
