"""Captions: decode text files, read captions from text / yaml / file names, merge config layers, and build the
caption an image trains with (tag shuffle, weighted tags, conditional dropout). Pure functions on plain data.

EveryDream2 conventions: a text caption is split on commas, the first chunk is the main prompt and the rest are
tags; a file name is cut at its first '_' before that split (so `_(1)` de-duplication suffixes vanish).
"""
from __future__ import annotations

import codecs
import math
import random
import re
from dataclasses import dataclass, field, replace

from utils.core.config_schema import did_you_mean

DEFAULT_MAX_CAPTION_LENGTH = 2048   # characters; EveryDream2's default for weighted tag shuffling


class CaptionFileError(ValueError):
    """A caption file that cannot be used as text; the message says why."""


# ---------------------------------------------------------------------------------------------- decoding

def _has_control_chars(text: str) -> bool:
    # NUL and other C0/C1 controls do not occur in hand-written captions; they mean a binary file.
    return any((ord(c) < 32 and c not in "\t\n\r\f") or 0x7F <= ord(c) <= 0x9F for c in text)


def decode_text(raw: bytes) -> tuple[str, str]:
    """(text, encoding). UTF-8 (BOM or not) and UTF-16 with a BOM first, then Windows-1252, then Latin-1.

    Raises CaptionFileError for content that is clearly not text (control characters such as NUL).
    """
    if raw.startswith(codecs.BOM_UTF8):
        attempts = ["utf-8-sig"]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        attempts = ["utf-16"]        # what Windows Notepad writes for "Unicode"
    else:
        attempts = ["utf-8", "cp1252", "latin-1"]
    for encoding in attempts:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if _has_control_chars(text):
            continue
        return text, encoding
    raise CaptionFileError("not a text file (binary content or an unknown encoding)")


# ---------------------------------------------------------------------------------------------- parsing

def clean_chunk(text: str) -> str:
    """Collapse runs of whitespace (line breaks included) to one space and strip."""
    return re.sub(r"\s+", " ", text).strip()


def split_caption(text: str) -> tuple[str, list[str]]:
    """'a photo of ted, smiling, hat' -> ('a photo of ted', ['smiling', 'hat']). Empty chunks are dropped."""
    chunks = [clean_chunk(c) for c in text.split(",")]
    if not chunks:
        return "", []
    main, tags = chunks[0], [c for c in chunks[1:] if c]
    return main, tags


def caption_from_filename(stem: str) -> tuple[str, list[str]]:
    """EveryDream's file-name caption: cut at the first '_' (drops `_(1)`, `_2` suffixes), then split on commas."""
    return split_caption(stem.split("_", 1)[0])


def join_caption(main_prompt: str, tags: list[str]) -> str:
    return ", ".join([main_prompt] * bool(main_prompt) + list(tags))


# ---------------------------------------------------------------------------------------------- config layers

@dataclass(frozen=True)
class Layer:
    """What one source (global/local yaml, folder files, sidecar) says about an image. None = not said."""
    main_prompt: str | None = None
    tags: tuple[tuple[str, float], ...] = ()       # (tag, weight)
    multiply: float | None = None
    cond_dropout: float | None = None
    flip_p: float | None = None
    shuffle_tags: bool | None = None
    keep_tags: int | None = None
    batch_id: str | None = None
    loss_scale: float | None = None
    max_caption_length: int | None = None
    rating: float | None = None                    # accepted for EveryDream2 compatibility, not used


SCALAR_KEYS = ("main_prompt", "multiply", "cond_dropout", "flip_p", "shuffle_tags", "keep_tags", "batch_id",
               "loss_scale", "max_caption_length", "rating")
YAML_KEYS = SCALAR_KEYS + ("tags", "caption")


def union_tags(primary: tuple[tuple[str, float], ...], secondary: tuple[tuple[str, float], ...]):
    """primary's tags (with their weights), then secondary's tags that primary lacks; no tag twice."""
    weights: dict[str, float] = {}
    for tag, weight in primary:
        weights.setdefault(tag, weight)
    for tag, weight in secondary:
        weights.setdefault(tag, weight)
    return tuple(weights.items())


def merge_layers(base: Layer, over: Layer) -> Layer:
    """`over` is the more specific source: its scalars win; its tags come first (an image's own caption stays
    in one piece, inherited tags follow) and its weight wins for a tag both give."""
    changes = {k: getattr(over, k) for k in SCALAR_KEYS if getattr(over, k) is not None}
    return replace(base, tags=union_tags(over.tags, base.tags), **changes)


def layer_from_text_caption(text: str) -> Layer:
    main, tags = split_caption(text)
    return Layer(main_prompt=main or None, tags=tuple((t, 1.0) for t in tags))


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _check_probability(key: str, value, source: str, warnings: list[str]) -> float | None:
    number = _number(value)
    if number is None or not 0.0 <= number <= 1.0:
        warnings.append(f"{source}: '{key}' must be a number in [0, 1], got {value!r}; ignored")
        return None
    return number


def _parse_tags(value, source: str, warnings: list[str]) -> tuple[tuple[str, float], ...]:
    if isinstance(value, str):              # "a, b, c" written as one string: read it like a caption's tags
        value = [t for t in (clean_chunk(c) for c in value.split(",")) if t]
    if not isinstance(value, list):
        warnings.append(f"{source}: 'tags' must be a list, got {value!r}; ignored")
        return ()
    tags = []
    for entry in value:
        if isinstance(entry, (str, int, float)) and not isinstance(entry, bool):
            text, weight = clean_chunk(str(entry)), 1.0
        elif isinstance(entry, dict) and "tag" in entry:
            text = clean_chunk(str(entry["tag"]))
            weight = _number(entry.get("weight", 1.0))
            if weight is None or weight < 0:
                warnings.append(f"{source}: tag '{text}' has weight {entry.get('weight')!r}; "
                                f"a weight must be a number >= 0, using 1.0")
                weight = 1.0
            extra = sorted(set(entry) - {"tag", "weight"})
            if extra:
                warnings.append(f"{source}: tag '{text}' has unknown keys {extra} (a tag takes 'tag' and 'weight')")
        else:
            warnings.append(f"{source}: tag entry {entry!r} is neither text nor {{tag: ..., weight: ...}}; ignored")
            continue
        if text:
            tags.append((text, weight))
    return union_tags(tuple(tags), ())


def layer_from_yaml(data, source: str, caption_text: str | None = None) -> tuple[Layer, list[str]]:
    """Turn a parsed yaml mapping into a Layer; problems become warnings and the rest of the file is used.

    `caption_text`: when the yaml's `caption` names an existing file, the caller reads it and passes its text here.
    """
    warnings: list[str] = []
    if data is None:
        return Layer(), warnings
    if not isinstance(data, dict):
        warnings.append(f"{source}: expected 'key: value' lines (a mapping), got {type(data).__name__}; "
                        f"file ignored")
        return Layer(), warnings
    values: dict = {}
    caption_layer = Layer()
    for key, value in data.items():
        key = str(key)
        if key not in YAML_KEYS:
            warnings.append(f"{source}: unknown key '{key}'{did_you_mean(key, YAML_KEYS)}; ignored")
            continue
        if value is None:
            continue
        if key == "main_prompt":
            if isinstance(value, list):
                prompts = [clean_chunk(str(v)) for v in value if v is not None and clean_chunk(str(v))]
                if len(set(prompts)) > 1:
                    warnings.append(f"{source}: 'main_prompt' lists {len(prompts)} prompts; only the first, "
                                    f"'{prompts[0]}', is used")
                if prompts:
                    values[key] = prompts[0]
            elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                if clean_chunk(str(value)):
                    values[key] = clean_chunk(str(value))
            else:
                warnings.append(f"{source}: 'main_prompt' must be text or a list of text; ignored")
        elif key == "tags":
            values[key] = _parse_tags(value, source, warnings)
        elif key == "caption":
            text = caption_text if caption_text is not None else value
            if isinstance(text, str):
                caption_layer = layer_from_text_caption(text)
            else:
                warnings.append(f"{source}: 'caption' must be text or the name of a caption file; ignored")
        elif key in ("cond_dropout", "flip_p"):
            if (number := _check_probability(key, value, source, warnings)) is not None:
                values[key] = number
        elif key in ("multiply", "loss_scale", "rating"):
            number = _number(value)
            if number is None or (key == "multiply" and number < 0):
                rule = "a number >= 0" if key == "multiply" else "a number"
                warnings.append(f"{source}: '{key}' must be {rule}, got {value!r}; ignored")
            else:
                values[key] = number
        elif key in ("max_caption_length", "keep_tags"):
            low = 1 if key == "max_caption_length" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                warnings.append(f"{source}: '{key}' must be a whole number >= {low}, got {value!r}; ignored")
            else:
                values[key] = value
        elif key == "shuffle_tags":
            if isinstance(value, bool):
                values[key] = value
            else:
                warnings.append(f"{source}: 'shuffle_tags' must be true or false, got {value!r}; ignored")
        elif key == "batch_id":
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                values[key] = clean_chunk(str(value))
            else:
                warnings.append(f"{source}: 'batch_id' must be text, got {value!r}; ignored")
    # Explicit main_prompt / tags in the same file win over what `caption` says; tags are unioned.
    layer = Layer(**{k: v for k, v in values.items() if k != "tags"}, tags=values.get("tags", ()))
    return merge_layers(caption_layer, layer), warnings


FOLDER_FILES = {            # file name -> the key it sets, for that folder only
    "multiply.txt": "multiply",
    "batch_id.txt": "batch_id",
    "cond_dropout.txt": "cond_dropout",
    "flip_p.txt": "flip_p",
    "loss_scale.txt": "loss_scale",
    "shuffle_tags.txt": "shuffle_tags",
}


def layer_from_folder_file(name: str, text: str, source: str) -> tuple[Layer, list[str]]:
    """One folder file (multiply.txt and friends). shuffle_tags.txt turns shuffling on by being there."""
    key = FOLDER_FILES[name]
    value = clean_chunk(text)
    if key == "shuffle_tags":
        return Layer(shuffle_tags=True), []
    if key == "batch_id":
        if not value:
            return Layer(), [f"{source}: empty; write the batch id on the first line"]
        return Layer(batch_id=value), []
    try:
        number = float(value)
    except ValueError:
        return Layer(), [f"{source}: expected one number, got {value[:40]!r}; ignored"]
    if not math.isfinite(number):
        return Layer(), [f"{source}: expected a finite number, got {value!r}; ignored"]
    if key in ("cond_dropout", "flip_p") and not 0.0 <= number <= 1.0:
        return Layer(), [f"{source}: must be in [0, 1], got {number}; ignored"]
    if key == "multiply" and number < 0:
        return Layer(), [f"{source}: must be 0 or more, got {number}; ignored"]
    return Layer(**{key: number}), []


# ---------------------------------------------------------------------------------------------- per-load caption

def weighted_draw(tags: list[str], weights: list[float], start_length: int, max_length: int,
                  rng: random.Random) -> list[str]:
    """Draw tags without replacement with probability proportional to weight, until the next one would make the
    caption longer than max_length characters (or only zero-weight tags remain)."""
    pool = list(zip(tags, weights))
    chosen, length = [], start_length
    while pool:
        total = sum(w for _, w in pool)
        if total <= 0:
            break
        point, i = rng.random() * total, 0
        while i < len(pool) - 1 and point >= pool[i][1]:
            point -= pool[i][1]
            i += 1
        tag, _ = pool.pop(i)
        added = len(tag) + (2 if length else 0)        # ", " between chunks
        if length + added > max_length:
            break
        chosen.append(tag)
        length += added
    return chosen


def training_caption(main_prompt: str, tags: list[str], weights: list[float], *, shuffle: bool, keep_tags: int,
                     max_caption_length: int, cond_dropout: float, rng: random.Random) -> str:
    """The caption for one load of one image. The main prompt always comes first; the first keep_tags tags stay in
    place; the rest are shuffled (weighted when tags carry more than one distinct weight); with probability
    cond_dropout the whole caption becomes "" (the unconditional caption)."""
    if rng.random() < cond_dropout:
        return ""
    if not shuffle:
        return join_caption(main_prompt, tags)
    kept, rest = list(tags[:keep_tags]), list(tags[keep_tags:])
    rest_weights = list(weights[keep_tags:])
    if len(set(weights)) > 1:
        start = len(join_caption(main_prompt, kept))
        rest = weighted_draw(rest, rest_weights, start, max_caption_length, rng)
    else:
        rng.shuffle(rest)
    return join_caption(main_prompt, kept + rest)


@dataclass
class CaptionParts:
    """The result of resolving an image's caption sources."""
    main_prompt: str
    tags: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    from_filename: bool = False


def resolve_caption(layer: Layer, stem: str) -> CaptionParts:
    """Main prompt and tags of an image from its merged layer; the file name fills in when no source gave a main
    prompt (its tags are added to any the yaml files gave)."""
    if layer.main_prompt:
        return CaptionParts(layer.main_prompt, [t for t, _ in layer.tags], [w for _, w in layer.tags])
    main, file_tags = caption_from_filename(stem)
    yaml_weights = dict(layer.tags)         # a yaml weight for a tag also in the file name is kept
    tags = union_tags(tuple((t, yaml_weights.get(t, 1.0)) for t in file_tags), layer.tags)
    return CaptionParts(main, [t for t, _ in tags], [w for _, w in tags], from_filename=True)
