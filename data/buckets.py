"""Aspect-ratio buckets: generated tables (no hand-typed lists, so no EveryDream2 D11 typos) and the nearest-aspect
assignment. Pure functions.

Table rule for a resolution R (a multiple of 64): pixel budget P = R². For every width w = 64, 128, ... the height
is the largest multiple of 64 with w·h <= P; (w, h) and its transpose are buckets when both sides are at least 64
and the long side is at most 4x the short side. So no bucket has more pixels than the square R x R (a batch size
that fits at R x R fits every bucket), every side is a multiple of 64, and the table is symmetric.
"""
from __future__ import annotations

import math
from functools import lru_cache

from utils.core.config_schema import ConfigError

SIDE_STEP = 64          # SD's VAE (8x) and UNet (3 downsamplings) need sides divisible by 64
MAX_ASPECT = 4.0        # EveryDream2: up to 4:1 both ways


def resolution_list(value) -> list[int]:
    """train.json's `resolution`, an int or a list of ints, as a list (the first is the base resolution). The one
    place that normalises it; resolution_problems checks the values."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _bad_resolution(resolution) -> bool:
    return isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < SIDE_STEP \
        or resolution % SIDE_STEP != 0


def _resolution_message(resolution) -> str:
    return (f"'resolution' values must each be a multiple of {SIDE_STEP} from {SIDE_STEP} up "
            f"(e.g. 512 or [448, 512, 576]), got {resolution!r}")


def resolution_problems(value) -> list[str]:
    """Every problem with a `resolution` value (an int or a list of them), named by its train.json key."""
    values = resolution_list(value)
    if not values:
        return ["'resolution' is an empty list: give at least one value, e.g. 512 or [448, 512, 576]"]
    problems = [_resolution_message(r) for r in values if _bad_resolution(r)]
    if len(set(values)) != len(values):
        problems.append(f"'resolution' lists a value twice: {values}")
    return problems


def check_resolution(resolution: int) -> None:
    """ConfigError for one resolution that no bucket table can be built for."""
    if _bad_resolution(resolution):
        raise ConfigError(_resolution_message(resolution))


@lru_cache(maxsize=None)
def bucket_table(resolution: int) -> tuple[tuple[int, int], ...]:
    """All (width, height) buckets for a resolution, from the tallest to the widest."""
    check_resolution(resolution)
    budget = resolution * resolution
    sizes = set()
    for w in range(SIDE_STEP, int(resolution * MAX_ASPECT) + 1, SIDE_STEP):
        h = budget // w // SIDE_STEP * SIDE_STEP
        if h >= SIDE_STEP and max(w, h) <= MAX_ASPECT * min(w, h):
            sizes.update({(w, h), (h, w)})
    return tuple(sorted(sizes, key=lambda s: (s[0] / s[1], s[0])))


def aspect_distance(width: float, height: float, bucket: tuple[int, int]) -> float:
    """Distance of aspect ratios on a log scale, so 2:1 and 1:2 are equally far from 1:1."""
    return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))


def nearest_in_table(width: int, height: int, table) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's; ties go to the bucket with more pixels, then the
    narrower one."""
    return min(table, key=lambda b: (round(aspect_distance(width, height, b), 12), -b[0] * b[1], b[0]))


@lru_cache(maxsize=65536)       # image sizes repeat a lot in real folders
def nearest_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    return nearest_in_table(width, height, bucket_table(resolution))


def is_undersized(width: int, height: int, bucket: tuple[int, int]) -> bool:
    """True when covering the bucket needs upscaling (a side is smaller than the bucket's)."""
    return width < bucket[0] or height < bucket[1]


def table_markdown(resolution: int) -> str:
    """One markdown table row per bucket, for doc/DATA.md."""
    budget = resolution * resolution
    rows = ["| bucket (w x h) | aspect | pixels | % of budget |", "|---|---|---|---|"]
    for w, h in bucket_table(resolution):
        rows.append(f"| {w} x {h} | {w / h:.3g} | {w * h:,} | {100 * w * h / budget:.0f} % |")
    return "\n".join(rows)
