"""The trainer's entry point to the data layer: scan, report, plan an epoch, and load batches.

    scan = scan_dataset(cfg.data_root, DataSettings(resolution=[512], flip_p=cfg.flip_p, ...))
    write_dataset_report(scan, run_dir / "dataset.jsonl"); print(summarize(scan))
    plans = epoch_batches(scan.items, batch_size=4, seed=cfg.seed, epoch=e, resolutions=[512])
    loader = DataLoader(BatchDataset(scan.items, plans[k:], seed=cfg.seed, epoch=e, first_position=k),
                        batch_size=None, num_workers=n)      # one index = one whole batch

With cached latents (data/latent_cache.py), BatchDataset(..., latents=index) returns "latent_moments" instead of
"pixel_values" and never decodes the image; captions, flips and masks come from the same RNG streams.
Every batch also carries "time_ids", SDXL's size and crop conditioning of each image (data.transforms.sdxl_time_ids).

Randomness at load time (crop jitter and offset, flip, tag shuffle, caption dropout) comes from an RNG seeded by
(seed, epoch, batch position in the epoch, slot in the batch), never from a worker's global state, so the result
does not depend on the number of DataLoader workers and a resumed run replays the same augmentation.
"""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from data.buckets import bucket_table, nearest_bucket
from data.captions import training_caption
from data.discovery import require_usable, scan_dataset
from data.items import DataScan, DataSettings, ImageItem
from data.latent_cache import LatentCacheIndex
from data.report import problem_summary, summarize, write_dataset_report
from data.sampler import BatchPlan, epoch_batches, schedule_filename, write_schedule
from data.transforms import BadImageError, Crop, Sample, crop_box, load_mask, load_sample, render_mask, sdxl_time_ids
from utils.core.config_schema import ConfigError

__all__ = ["DataSettings", "DataScan", "ImageItem", "BatchPlan", "BatchDataset", "ConfigError", "scan_dataset",
           "require_usable",
           "write_dataset_report", "summarize", "problem_summary", "epoch_batches", "write_schedule",
           "schedule_filename", "bucket_table", "nearest_bucket", "item_rng"]

log = logging.getLogger(__name__)


def item_rng(seed: int, epoch: int, position: int, slot: int, purpose: str) -> random.Random:
    """The RNG of one image in one epoch. `purpose` ("image", "caption") keeps the streams independent, so e.g.
    an image's size does not change its caption's shuffle."""
    return random.Random(f"{seed}:{epoch}:{position}:{slot}:{purpose}")


class BatchDataset(torch.utils.data.Dataset):
    """One index = one whole batch of a plan; use with DataLoader(batch_size=None).

    first_position: the epoch position of plans[0] for plans that do not carry one (epoch_batches's plans do).
    augment=False (for validation): no crop jitter, centre crop, no flip, no tag shuffle, no caption dropout.
    latents: read each image's VAE moments from this cache (filled by data.latent_cache.ensure_latents) and return
    "latent_moments" [B, 2C, h, w] instead of "pixel_values"; always the centre crop, masks at pixel resolution.

    A batch: "pixel_values" [B, 3, H, W] float32 (or "latent_moments"), "captions", "loss_scale" [B] float32,
    "mask" [B, 1, H, W] or None, "time_ids" [B, 6] float32, "paths", "skipped" [(rel_path, reason)], "size" (w, h)
    and "position"; the per-image entries in the same order, images that failed to load left out of all of them.
    "time_ids" row: (original_height, original_width, crop_top, crop_left, target_height, target_width), SDXL's
    size and crop conditioning (data.transforms.sdxl_time_ids) of the crop and flip that image actually got; the
    original size is the image as displayed (item.width / height), so a JPEG decoded at reduced scale counts at
    full size. Models other than SDXL ignore it.
    """

    def __init__(self, items, plans: list[BatchPlan], *, seed: int, epoch: int, first_position: int = 0,
                 augment: bool = True, latents: LatentCacheIndex | None = None):
        self.items = items
        self.plans = plans
        self.seed = seed
        self.epoch = epoch
        self.first_position = first_position
        self.augment = augment
        self.latents = latents

    def __len__(self) -> int:
        return len(self.plans)

    def position(self, i: int) -> int:
        plan = self.plans[i]
        return plan.position if plan.position >= 0 else self.first_position + i

    def __getitem__(self, i: int) -> dict | None:
        plan, position = self.plans[i], self.position(i)
        pixels, masks, captions, scales, paths, skipped, time_ids = [], [], [], [], [], [], []
        for slot, index in enumerate(plan.indices):
            item: ImageItem = self.items[index]
            image_rng = item_rng(self.seed, self.epoch, position, slot, "image")
            try:
                if self.latents is None:
                    px, mask, mask_problem, crop = load_sample(item.path, plan.size, rng=image_rng,
                                                               crop_jitter=item.crop_jitter, flip_p=item.flip_p,
                                                               mask_path=item.mask_path, augment=self.augment)
                else:
                    px, mask, mask_problem, crop = self._cached_sample(item, plan.size, image_rng)
            except BadImageError as e:
                skipped.append((item.rel_path, str(e)))
                log.warning("skipped %s at load time: %s", item.rel_path, e)
                continue
            if mask_problem:
                log.warning("%s: %s; training it without a mask", item.rel_path, mask_problem)
            caption_rng = item_rng(self.seed, self.epoch, position, slot, "caption")
            captions.append(training_caption(
                item.main_prompt, item.tags, item.tag_weights, shuffle=item.shuffle_tags and self.augment,
                keep_tags=item.keep_tags, max_caption_length=item.max_caption_length,
                cond_dropout=item.cond_dropout if self.augment else 0.0, rng=caption_rng))
            pixels.append(torch.from_numpy(px) if isinstance(px, np.ndarray) else px)
            masks.append(None if mask is None else torch.from_numpy(mask))
            scales.append(item.loss_scale)
            paths.append(str(item.path))
            shown = crop.scaled_to((item.width, item.height))
            time_ids.append(sdxl_time_ids(shown.image_size, shown.box, plan.size, shown.flip))
        if not pixels:
            log.warning("batch %d of epoch %d: every image failed to load; batch skipped", position, self.epoch)
            return None
        mask = None
        if any(m is not None for m in masks):
            w, h = plan.size            # pixel resolution, also when `pixels` holds latent moments
            mask = torch.stack([m if m is not None else torch.ones(1, h, w) for m in masks])
        images = "pixel_values" if self.latents is None else "latent_moments"
        return {images: torch.stack(pixels), "captions": captions,
                "loss_scale": torch.tensor(scales, dtype=torch.float32), "mask": mask, "paths": paths,
                "time_ids": torch.tensor(time_ids, dtype=torch.float32),
                "skipped": skipped, "size": plan.size, "position": position}

    def _cached_sample(self, item: ImageItem, size: tuple[int, int], rng: random.Random) -> Sample:
        """Like load_sample, but the moments come from the latent cache. The RNG is drawn from as load_sample does
        (crop_box's 5 draws, then the flip), so the flips match the uncached run; the crop is always the centre one
        the cache was encoded with, and the Sample's crop is that one with the flip of the entry read."""
        image_size = (item.width, item.height)
        box = crop_box(*image_size, size, crop_jitter=item.crop_jitter, rng=rng, augment=False)
        flip = rng.random() < item.flip_p and self.augment
        crop = Crop(image_size, box, flip)
        moments = self.latents.load(item.path, size, flip)
        if item.mask_path is None:
            return Sample(moments, None, None, crop)
        try:
            mask = load_mask(item.mask_path)
        except BadImageError as e:
            return Sample(moments, None, f"mask {item.mask_path.name}: {e}", crop)
        return Sample(moments, render_mask(mask, box, image_size, size, flip), None, crop)
