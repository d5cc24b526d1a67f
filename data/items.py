"""Plain data of the data layer: settings from train.json, one training image, and the result of a scan.

No I/O and no torch here, so every other module (and every test) can build these by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.buckets import resolution_list, resolution_problems
from utils.core.config_schema import ConfigError


def printable(name: str) -> str:
    """A path or file name as text that can be printed and written as UTF-8. On Linux a name that is not valid
    UTF-8 reaches Python with its bad bytes as lone surrogates ('caf\\udce9.png'), which every UTF-8 write
    (dataset.jsonl, the log file, the console) rejects; they become visible escapes ('caf\\xe9.png')."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:          # a surrogate surrogateescape did not make (e.g. from Windows APIs)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class DataSettings:
    """Global defaults from train.json; per-folder files and yaml override them per image."""
    resolution: list[int]      # one or more base resolutions (multiples of 64); the first is the "base"
    flip_p: float = 0.0
    cond_dropout: float = 0.04
    shuffle_tags: bool = False
    keep_tags: int = 0
    crop_jitter: float = 0.02

    def __post_init__(self):
        # train.json's value may be one int; a list here, so callers need no special case
        self.resolution = resolution_list(self.resolution)


def check_settings(settings: DataSettings) -> list[str]:
    """Every problem with the global data settings, named by their train.json key."""
    problems = resolution_problems(settings.resolution)
    for key in ("flip_p", "cond_dropout"):
        value = getattr(settings, key)
        if not 0.0 <= value <= 1.0:
            problems.append(f"'{key}' must be in [0, 1], got {value}")
    if settings.keep_tags < 0:
        problems.append(f"'keep_tags' must be 0 or more, got {settings.keep_tags}")
    if not 0.0 <= settings.crop_jitter <= 0.25:
        problems.append(f"'crop_jitter' must be in [0, 0.25] (a fraction per side), got {settings.crop_jitter}")
    return problems


def require_valid_settings(settings: DataSettings) -> None:
    if problems := check_settings(settings):
        raise ConfigError("\n".join(problems))


@dataclass
class ImageItem:
    path: Path                          # absolute path of the image
    rel_path: str                       # relative to data_root, with '/' separators; printable()
    width: int                          # as displayed (EXIF orientation 5-8 already swaps w/h)
    height: int
    main_prompt: str
    tags: list[str] = field(default_factory=list)
    tag_weights: list[float] = field(default_factory=list)   # same length as tags; 1.0 unless yaml says otherwise
    caption: str = ""                   # main prompt and tags joined, unshuffled
    multiply: float = 1.0
    batch_id: str = ""                  # "" = the default group
    flip_p: float = 0.0
    cond_dropout: float = 0.04
    loss_scale: float = 1.0
    shuffle_tags: bool = False
    keep_tags: int = 0
    max_caption_length: int = 2048
    crop_jitter: float = 0.02
    mask_path: Path | None = None
    bucket: tuple[int, int] = (0, 0)    # (width, height) at the base resolution
    undersized: bool = False            # upscaled at one or more of the training resolutions
    notes: list[str] = field(default_factory=list)           # repairs and warnings about this image


@dataclass
class DataScan:
    root: Path
    settings: DataSettings
    items: list[ImageItem]
    skipped: list[tuple[str, str]]      # (rel_path, reason)
    undersized: list[str]               # rel_paths
    warnings: list[str]                 # one line each, naming the file
