"""Epoch batch plans: which images train together, at which size, in which order. A pure function of
(items, batch_size, seed, epoch, resolutions, rank, world_size), so a resumed run can rebuild any epoch's plan and
slice it, and every DDP rank computes the same plan independently.

Rules (see doc/DATA.md):
- multiply: the whole part of an image's multiplier gives guaranteed copies; the fractional parts add
  K = floor(sum of all multipliers) - sum of whole parts extra copies per epoch, picked by systematic sampling
  over the fractions in a seeded random order (image i is picked with probability f_i * K / sum(f), about f_i).
  So an epoch always has floor(sum of multipliers) images.
- several resolutions: the epoch's images are shuffled and dealt to the resolutions in turn (equal shares), each
  image going to the bucket of nearest aspect in that resolution's table.
- a batch holds one (batch_id, resolution, bucket) group; the leftovers of a group form one smaller final batch
  (a "runt"), so no image is dropped or duplicated.
- batches are shuffled. With world_size > 1 the list is padded to a multiple of world_size by repeating batches
  from its start, then rank r takes batches r, r + world_size, ... (equal length, disjoint positions).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from data.buckets import nearest_bucket, resolution_list


@dataclass
class BatchPlan:
    indices: list[int]          # into scan.items
    size: tuple[int, int]       # (width, height) in pixels this batch trains at
    position: int = -1          # this batch's index in the whole epoch, before the DDP split (-1: unknown)
    resolution: int = 0         # the training resolution whose table `size` comes from


def plan_rng(seed: int, epoch: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across processes and PYTHONHASHSEED.
    return random.Random(f"{seed}:{epoch}:plan")


def epoch_picks(multipliers: list[float], rng: random.Random) -> list[int]:
    """Item indices for one epoch (unordered): floor(m) copies each, plus floor(sum m) - sum floor(m) extra picks
    among items with a fractional part, by systematic sampling (probability f * K / sum f, never twice)."""
    picks = [i for i, m in enumerate(multipliers) for _ in range(int(m))]
    fractions = [(i, m - int(m)) for i, m in enumerate(multipliers) if m - int(m) > 1e-9]
    total_fraction = sum(f for _, f in fractions)
    extra = math.floor(sum(multipliers) + 1e-9) - len(picks)
    if extra <= 0 or not fractions:
        return picks
    rng.shuffle(fractions)
    step = total_fraction / extra            # >= 1 > any single fraction, so nobody is picked twice
    point, cumulative = rng.random() * step, 0.0
    chosen = set()
    for i, f in fractions:
        cumulative += f
        if point < cumulative and len(chosen) < extra:
            chosen.add(i)
            point += step
    for i, _ in reversed(fractions):         # float rounding can leave the last point just past the end
        if len(chosen) >= extra:
            break
        chosen.add(i)
    return picks + sorted(chosen)


def epoch_batches(items, *, batch_size: int, seed: int, epoch: int, resolutions: list[int], rank: int = 0,
                  world_size: int = 1) -> list[BatchPlan]:
    """This rank's batches for one epoch (see the module docstring for the rules)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
    resolutions = resolution_list(resolutions)
    if not resolutions:
        raise ValueError("resolutions is empty")
    rng = plan_rng(seed, epoch)
    picks = epoch_picks([item.multiply for item in items], rng)
    rng.shuffle(picks)
    groups: dict[tuple, list[int]] = {}
    for n, i in enumerate(picks):
        res = resolutions[n % len(resolutions)]
        bucket = nearest_bucket(items[i].width, items[i].height, res)
        groups.setdefault((items[i].batch_id, res, bucket), []).append(i)
    batches = [BatchPlan(members[k:k + batch_size], size, resolution=res)
               for (_, res, size), members in groups.items()
               for k in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    for position, plan in enumerate(batches):
        plan.position = position
    if world_size == 1:
        return batches
    n = len(batches)
    padding = [BatchPlan(list(batches[k % n].indices), batches[k % n].size, n + k, batches[k % n].resolution)
               for k in range((-n) % world_size)] if n else []
    return (batches + padding)[rank::world_size]


def schedule_filename(epoch: int) -> str:
    return f"ep{epoch}_batch_schedule.txt"


def write_schedule(plans: list[BatchPlan], items, path: Path) -> None:
    """One line per batch: step, bucket WxH, batch size, then the image paths (relative to data_root), tab-separated."""
    lines = ["# step\tsize\tbatch_size\tpaths"]
    for step, plan in enumerate(plans):
        paths = "\t".join(items[i].rel_path for i in plan.indices)
        lines.append(f"{step}\t{plan.size[0]}x{plan.size[1]}\t{len(plan.indices)}\t{paths}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
