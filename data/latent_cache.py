"""VAE latents cached on disk (train.json `cache_latents`): each (image, bucket size, flip) a run can use is encoded
once, with a centre crop, and every later step samples a fresh latent from the stored posterior.

    entries = needed_entries(scan.items, resolutions)
    report = ensure_latents(scan.items, entries, vae, cache_dir, rank=r, world_size=n)   # then a barrier (DDP)
    BatchDataset(scan.items, plans, seed=..., epoch=..., latents=report.index)           # -> "latent_moments"
    latents = DiagonalGaussianDistribution(batch["latent_moments"].to(device)).sample(generator)

A file holds one tensor "moments": `vae.encode(px).latent_dist.parameters` for one image, [2 * latent channels,
h / f, w / f] (mean and logvar) in the VAE's dtype. Sampling from it with the trainer's generator gives what
`vae.encode(px).latent_dist.sample(generator)` gives for the same pixels, so only the crop differs from the uncached
path (centre, no jitter). The key covers the image file (path, size, mtime), the bucket, the flip and the VAE's
weights, so a changed image, bucket or VAE is simply a miss; stale files are never deleted.

Layout: <cache_dir>/<vae fingerprint[:16]>/<key[:2]>/<key>.safetensors, written atomically (temp name + os.replace).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.buckets import nearest_bucket, resolution_list
from data.transforms import BadImageError, crop_box, load_rgb, render_image
from utils.core.file_writes import write_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1            # bump when what a file holds changes (crop rule, tensor layout), to orphan old files
TENSOR_NAME = "moments"
MIN_PICK = 1e-9             # data.sampler.epoch_picks's tolerance for fractional multipliers

Entry = tuple[int, tuple[int, int], bool]      # (item index, bucket (w, h), flip)


# ---------------------------------------------------------------------------------------------------- what to cache

def needed_entries(items, resolutions) -> list[Entry]:
    """Every (item index, bucket, flip) some epoch's plan can ask for. Mirrors data.sampler: an item is picked when
    its multiplier has a whole part, or a fractional part while the epoch has extra picks to hand out; the epoch's
    floor(sum of multipliers) picks are dealt to the resolutions in turn, each to the nearest bucket of the item's
    aspect, so a picked item can meet any of the first min(picks, len(resolutions)) resolutions. Flipped variants
    only for items that can be flipped (flip_p > 0)."""
    resolutions = resolution_list(resolutions)
    multipliers = [item.multiply for item in items]
    picks_per_epoch = math.floor(sum(multipliers) + MIN_PICK)
    extra_picks = picks_per_epoch - sum(int(m) for m in multipliers)
    reachable = resolutions[:picks_per_epoch]
    entries = set()
    for index, (item, m) in enumerate(zip(items, multipliers)):
        if int(m) < 1 and not (m - int(m) > MIN_PICK and extra_picks > 0):
            continue
        flips = (False, True) if item.flip_p > 0 else (False,)
        for res in reachable:
            size = nearest_bucket(item.width, item.height, res)
            entries.update((index, size, flip) for flip in flips)
    return sorted(entries)


# ---------------------------------------------------------------------------------------------------------- keys

def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 of the VAE's config and of every parameter and buffer (name, dtype, shape, bytes, by name). The dtype
    is part of it on purpose: a bf16 VAE produces other moments than the fp32 one."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}  # not the path
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = dict(vae.named_parameters())
    tensors.update(vae.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(image_path, file_size: int, mtime_ns: int, size: tuple[int, int], flip: bool, vae_fp: str) -> str:
    """The name of one cache entry. Pure: the caller stats the file."""
    fields = [CACHE_FORMAT, str(Path(image_path).absolute()), file_size, mtime_ns, list(size), bool(flip), vae_fp]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def image_key(image_path, size: tuple[int, int], flip: bool, vae_fp: str) -> str:
    """cache_key for the image file as it is now. Raises BadImageError when the file cannot be stat'ed."""
    try:
        stat = os.stat(image_path)
    except FileNotFoundError:
        raise BadImageError("file not found (deleted or moved after the scan?)") from None
    except OSError as e:
        raise BadImageError(f"cannot read the file ({type(e).__name__}: {e})") from None
    return cache_key(image_path, stat.st_size, stat.st_mtime_ns, size, flip, vae_fp)


# ---------------------------------------------------------------------------------------------------------- files

def is_complete(path: Path) -> bool:
    """A cheap check that a cache file is whole (header parses, names the tensor, file length matches) without
    reading its data: a run with a warm cache checks every file this way."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 1 << 20:
                return False
            header = json.loads(f.read(header_len))
        end = header[TENSOR_NAME]["data_offsets"][1]
        return os.path.getsize(path) == 8 + header_len + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def read_moments(path: Path) -> torch.Tensor | None:
    """The stored moments, or None for a missing, truncated or otherwise unreadable file."""
    from safetensors.torch import load_file
    try:
        moments = load_file(str(path))[TENSOR_NAME]
    except Exception:           # safetensors raises its own error types for damaged files; all mean "re-encode"
        return None
    return moments if moments.dim() == 3 else None


def write_moments(path: Path, moments: torch.Tensor) -> None:
    """Atomic: a crash or a concurrent reader never sees half a file (temp name in the same folder, os.replace).
    write_atomic gives the file the umask's modes: save_file creates 0600, and the cache may be shared with other
    users' runs."""
    from safetensors.torch import save_file
    tensors = {TENSOR_NAME: moments.detach().to("cpu").contiguous().clone()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


@dataclass(frozen=True)
class LatentCacheIndex:
    """Where the cached moments of one VAE live; what BatchDataset(latents=...) reads. Picklable (workers)."""
    folder: Path                # <cache_dir>/<vae_fp[:16]>
    vae_fp: str

    def key_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def entry_path(self, image_path, size: tuple[int, int], flip: bool) -> Path:
        return self.key_path(image_key(image_path, size, flip, self.vae_fp))

    def load(self, image_path, size: tuple[int, int], flip: bool) -> torch.Tensor:
        """The moments [2C, h, w]. Raises BadImageError (skip the image) when there is no usable entry."""
        moments = read_moments(self.entry_path(image_path, size, flip))
        if moments is None:
            raise BadImageError(f"no cached latent for {size[0]}x{size[1]}{' flipped' if flip else ''} (the image "
                                f"changed after caching, or it failed to encode)")
        return moments


def open_latent_cache(cache_dir, vae) -> LatentCacheIndex:
    fp = vae_fingerprint(vae)
    return LatentCacheIndex(Path(cache_dir) / fp[:16], fp)


# ------------------------------------------------------------------------------------------------------ encoding

@dataclass
class LatentCacheReport:
    """Counts cover this rank's share of the entries (all of them with one process); hits and encoded count
    entries, skipped lists images."""
    index: LatentCacheIndex
    hits: int = 0
    encoded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (rel_path, reason)
    seconds: float = 0.0

    def summary(self) -> str:
        line = (f"latent cache {self.index.folder}: {self.hits} cached, {self.encoded} encoded in "
                f"{self.seconds:.1f} s")
        return line + (f", {len(self.skipped)} skipped (see the warnings)" if self.skipped else "")


def centre_crop_pixels(image_path, size: tuple[int, int], flip: bool) -> np.ndarray:
    """What load_sample(augment=False) renders, but with the flip given: float32 [3, H, W] in [-1, 1]."""
    img = load_rgb(image_path, cover=size)
    box = crop_box(img.width, img.height, size, crop_jitter=0.0, rng=random.Random(0), augment=False)
    return render_image(img, box, size, flip)


def _try_pixels(item, size, flip):
    try:
        return centre_crop_pixels(item.path, size, flip), None
    except BadImageError as e:
        return None, str(e)


def encode_moments(vae, pixels: list[np.ndarray], device=None) -> torch.Tensor:
    """The posterior parameters of a batch of same-size images, on the CPU, in the VAE's dtype."""
    device = device if device is not None else vae.device
    px = torch.from_numpy(np.stack(pixels)).to(device, dtype=vae.dtype)
    with torch.no_grad():
        return vae.encode(px).latent_dist.parameters.cpu()


def _chunks_by_size(todo: list[tuple[Entry, str]], batch_size: int):
    by_size: dict[tuple[int, int], list] = {}
    for entry, key in todo:
        by_size.setdefault(entry[1], []).append((entry, key))
    for members in by_size.values():
        for k in range(0, len(members), batch_size):
            yield members[k:k + batch_size]


def one_per_image(skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """An image that fails fails for each of its entries; report it once, with its first reason."""
    first: dict[str, str] = {}
    for rel_path, reason in skipped:
        first.setdefault(rel_path, reason)
    return list(first.items())


def ensure_latents(items, entries: list[Entry], vae, cache_dir, *, device=None, batch_size: int = 8, rank: int = 0,
                   world_size: int = 1, progress: bool = True, workers: int | None = None) -> LatentCacheReport:
    """Encode this rank's missing entries (entry index % world_size == rank) and return the counts and the index
    for BatchDataset. Present entries cost a stat and a header read; their images are not opened. Images that fail
    to load are skipped and reported, never raised. With several ranks, wait for all of them before training.
    device: where the pixels go (default: the VAE's device; the VAE is not moved). workers: image-loading threads."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    report = LatentCacheReport(open_latent_cache(cache_dir, vae))
    todo = []                   # (entry, key) to encode
    for n, entry in enumerate(entries):
        if n % world_size != rank:
            continue
        index, size, flip = entry
        item = items[index]
        try:
            key = image_key(item.path, size, flip, report.index.vae_fp)
        except BadImageError as e:
            report.skipped.append((item.rel_path, str(e)))
            continue
        if is_complete(report.index.key_path(key)):
            report.hits += 1
        else:
            todo.append((entry, key))
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:       # PIL decodes and resizes outside the GIL

        def submit(chunk):
            return [pool.submit(_try_pixels, items[index], size, flip) for (index, size, flip), _ in chunk]
        chunks = list(_chunks_by_size(todo, batch_size))
        pending = submit(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []     # load ahead while the VAE runs
            good = [(key, px) for (_, key), (px, _) in zip(chunk, loaded) if px is not None]
            report.skipped += [(items[entry[0]].rel_path, reason)
                               for (entry, _), (_, reason) in zip(chunk, loaded) if reason is not None]
            if good:
                moments = encode_moments(vae, [px for _, px in good], device)
                for (key, _), m in zip(good, moments):
                    write_moments(report.index.key_path(key), m)
                report.encoded += len(good)
            bar.update(len(chunk))
    bar.close()
    report.skipped = one_per_image(report.skipped)
    for rel_path, reason in report.skipped:
        log.warning("latent cache: skipped %s: %s", rel_path, reason)
    report.seconds = time.monotonic() - started
    return report
