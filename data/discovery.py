"""Walk data_root: images, their masks and caption sidecars, folder files and global/local yaml, into ImageItems
plus a list of skipped files and warnings. The walk reads image headers only; then every image (and mask) is
decoded in full, in parallel threads, with the training loader's own functions, so an image the scan keeps is one
the loader can read (a truncated file is skipped here, before epochs are planned, not at load time).

Precedence per image (later wins for single values, tags are unioned):
  global.yaml/.yml of data_root and every folder down to the image's folder (nearer folders win)
  -> folder files of the image's folder (multiply.txt, batch_id.txt, ...)
  -> local.yaml/.yml of the image's folder
  -> the image's sidecars, merged in the order .yaml, .yml, .caption, .txt
  -> train.json's flip_p / cond_dropout / shuffle_tags / keep_tags fill whatever is still unset
The file name gives the caption only when no source gave a main prompt.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

import data.transforms as transforms      # load_rgb / load_mask through the module: the loader's, even if patched

from data.buckets import is_undersized, nearest_bucket
from data.captions import (DEFAULT_MAX_CAPTION_LENGTH, FOLDER_FILES, CaptionFileError, Layer, decode_text,
                           join_caption, layer_from_folder_file, layer_from_text_caption, layer_from_yaml,
                           merge_layers, resolve_caption)
from data.items import DataScan, DataSettings, ImageItem, printable, require_valid_settings
from data.transforms import BadImageError, read_image_size
from utils.core.config_schema import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jfif")
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".psd")
MASK_SUFFIX = "-masklabel.png"
SIDECAR_ORDER = (".yaml", ".yml", ".caption", ".txt")
GLOBAL_YAML = ("global.yaml", "global.yml")
LOCAL_YAML = ("local.yaml", "local.yml")
RESERVED_STEMS = {Path(n).stem for n in (*FOLDER_FILES, *GLOBAL_YAML, *LOCAL_YAML)}
# PIL releases the GIL while decoding: measured on 16 cores, 6 MP JPEGs decode at 16 images/s on 1 thread, 116 on 8,
# 177 on 16. Each thread holds one decoded image, so the count is capped.
DECODE_THREADS = min(16, os.cpu_count() or 1)
Problems = dict[int, tuple[str | None, str | None]]   # item index -> (image problem, mask problem)


@dataclass
class _Scan:
    """Accumulates the results of one walk."""
    root: Path
    settings: DataSettings
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    visited: set[str] = field(default_factory=set)

    def rel(self, path: Path) -> str:
        """The path as reports show it: relative to data_root, non-UTF-8 bytes escaped."""
        return printable(path.relative_to(self.root).as_posix())


def is_image_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(IMAGE_EXTENSIONS) and not lower.endswith(MASK_SUFFIX)


def mask_owner_stem(name: str) -> str | None:
    """'cat-masklabel.png' -> 'cat'; None for other names."""
    return name[:-len(MASK_SUFFIX)] if name.lower().endswith(MASK_SUFFIX) else None


def _entry_kind(entry: os.DirEntry) -> tuple[str, str | None]:
    """("dir" | "file" | "other", None), or ("bad", reason) for an entry that cannot be followed. Never raises:
    is_dir() raises OSError for a symbolic link loop (ELOOP) and one bad link must not stop the whole scan."""
    try:
        if entry.is_dir():
            return "dir", None
        if entry.is_file():
            return "file", None
        os.stat(entry.path)             # a dangling link: is_dir/is_file just said False, stat says why
        return "other", None            # a pipe, socket or device (opening a pipe would hang)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "bad", "symbolic link loop (the link leads back to itself); fix or remove the link"
        if isinstance(e, FileNotFoundError):
            return "bad", "broken symbolic link (its target does not exist)"
        return "bad", f"cannot read ({e.strerror or e})"


def _caption_stem(name: str, notes: list[str]) -> str:
    """The file name without its extension, as caption text. A name that is not UTF-8 (its bytes kept as
    surrogates, which tokenizers reject) is decoded like a caption file: Windows-1252, then Latin-1."""
    stem = Path(name).stem
    if stem == printable(stem):
        return stem
    try:
        text, encoding = decode_text(stem.encode("utf-8", "surrogateescape"))
        encoding = {"cp1252": "Windows-1252", "latin-1": "Latin-1"}.get(encoding, encoding)
    except (UnicodeEncodeError, CaptionFileError):
        text, encoding = printable(stem), "UTF-8 with \\x escapes"
    notes.append(f"file name is not valid UTF-8; its caption was read as {encoding}: '{text}' (rename the file or "
                 f"add a .txt caption if that is wrong)")
    return text


def read_text_file(path: Path) -> str:
    """Decoded text of a caption or folder file. Raises CaptionFileError (or OSError)."""
    text, _ = decode_text(path.read_bytes())
    return text


def read_yaml_layer(path: Path, source: str) -> tuple[Layer | None, list[str]]:
    """A yaml file as a Layer. Broken files give (None, [reason]) so the caller can fall back."""
    try:
        text = read_text_file(path)
        data = yaml.safe_load(text)
    except CaptionFileError as e:
        return None, [f"{source}: {e}; file ignored"]
    except OSError as e:
        return None, [f"{source}: cannot read ({e.strerror}); file ignored"]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid yaml"
        return None, [f"{source}: broken yaml{where} ({problem}); file ignored"]
    caption_text = None
    if isinstance(data, dict) and isinstance(data.get("caption"), str):
        value = data["caption"].strip()
        candidate = path.parent / value
        if value and "\n" not in value and len(value) < 256 and candidate.is_file():
            try:
                caption_text = read_text_file(candidate)
            except (CaptionFileError, OSError) as e:
                return None, [f"{source}: caption file '{value}': {e}; file ignored"]
        elif value.lower().endswith((".txt", ".caption")):
            return None, [f"{source}: caption file '{value}' not found next to the yaml; file ignored"]
    return layer_from_yaml(data, source, caption_text)


def _folder_layers(folder: Path, names: set[str], scan: _Scan) -> tuple[Layer, Layer]:
    """(global layer of this folder, folder files + local yaml of this folder)."""
    global_layer, local_layer = Layer(), Layer()
    for name in GLOBAL_YAML:
        if name in names:
            layer, problems = read_yaml_layer(folder / name, scan.rel(folder / name))
            scan.warnings += problems
            global_layer = merge_layers(global_layer, layer or Layer())
    for name in FOLDER_FILES:
        if name in names:
            source = scan.rel(folder / name)
            try:
                layer, problems = layer_from_folder_file(name, read_text_file(folder / name), source)
            except (CaptionFileError, OSError) as e:
                layer, problems = Layer(), [f"{source}: {e}; ignored"]
            scan.warnings += problems
            local_layer = merge_layers(local_layer, layer)
    for name in LOCAL_YAML:
        if name in names:
            layer, problems = read_yaml_layer(folder / name, scan.rel(folder / name))
            scan.warnings += problems
            local_layer = merge_layers(local_layer, layer or Layer())
    return global_layer, local_layer


def _sidecar_layer(folder: Path, stem: str, sidecars: dict[str, str], scan: _Scan, notes: list[str]) -> Layer:
    """The image's own sidecars merged; problems go to notes (the caption then falls back)."""
    merged, prompt_source = Layer(), None
    for ext in SIDECAR_ORDER:
        name = sidecars.get(ext)
        if name is None:
            continue
        path = folder / name
        source = scan.rel(path)
        if ext in (".yaml", ".yml"):
            layer, problems = read_yaml_layer(path, source)
            notes += problems
        else:
            try:
                layer = layer_from_text_caption(read_text_file(path))
            except (CaptionFileError, OSError) as e:
                layer = None
                notes.append(f"{source}: {e}; caption taken from the file name instead")
        if layer is None:
            continue
        if layer.main_prompt and merged.main_prompt and layer.main_prompt != merged.main_prompt:
            notes.append(f"{source} and {prompt_source} give different main prompts; {source} wins")
        if layer.main_prompt:
            prompt_source = source
        merged = merge_layers(merged, layer)
    return merged


def _make_item(path: Path, layer: Layer, mask_path: Path | None, size: tuple[int, int], notes: list[str],
               scan: _Scan) -> ImageItem:
    settings = scan.settings
    name_notes: list[str] = []
    parts = resolve_caption(layer, _caption_stem(path.name, name_notes))
    if parts.from_filename:
        notes += name_notes
    width, height = size
    base = settings.resolution[0]
    item = ImageItem(
        path=path, rel_path=scan.rel(path), width=width, height=height,
        main_prompt=parts.main_prompt, tags=parts.tags, tag_weights=parts.weights,
        caption=join_caption(parts.main_prompt, parts.tags),
        multiply=1.0 if layer.multiply is None else layer.multiply,
        batch_id=layer.batch_id or "",
        # train.json values apply wherever no folder/yaml value overrides them (EveryDream2 D5 dropped flip_p)
        flip_p=settings.flip_p if layer.flip_p is None else layer.flip_p,
        cond_dropout=settings.cond_dropout if layer.cond_dropout is None else layer.cond_dropout,
        loss_scale=1.0 if layer.loss_scale is None else layer.loss_scale,
        shuffle_tags=settings.shuffle_tags if layer.shuffle_tags is None else layer.shuffle_tags,
        keep_tags=settings.keep_tags if layer.keep_tags is None else layer.keep_tags,
        max_caption_length=layer.max_caption_length or DEFAULT_MAX_CAPTION_LENGTH,
        crop_jitter=settings.crop_jitter,
        mask_path=mask_path,
        bucket=nearest_bucket(width, height, base),
        undersized=any(is_undersized(width, height, nearest_bucket(width, height, r)) for r in settings.resolution),
        notes=notes,
    )
    if not item.caption:
        notes.append("empty caption: no caption file and nothing usable in the file name")
    return item


def _check_mask(mask_path: Path, image_size: tuple[int, int], notes: list[str]) -> Path | None:
    try:
        mask_size = read_image_size(mask_path)
    except BadImageError as e:
        notes.append(f"mask {printable(mask_path.name)}: {e}; the image trains without a mask")
        return None
    if mask_size != image_size:
        notes.append(f"mask {printable(mask_path.name)} is {mask_size[0]}x{mask_size[1]}, the image "
                     f"{image_size[0]}x{image_size[1]}; the mask is stretched to fit")
    return mask_path


def _scan_folder(folder: Path, inherited: Layer, scan: _Scan) -> None:
    real = os.path.realpath(folder)
    if real in scan.visited:            # a symlink loop or a folder linked twice
        scan.warnings.append(f"{scan.rel(folder) or '.'}: folder already scanned (symlink loop?); skipped")
        return
    scan.visited.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        scan.warnings.append(f"{scan.rel(folder) or '.'}: cannot list folder ({e.strerror}); skipped")
        return
    entries = [e for e in entries if not e.name.startswith(".")]
    kinds = {e.name: _entry_kind(e) for e in entries}
    for e in entries:
        kind, problem = kinds[e.name]
        if kind == "bad" or (kind == "other" and is_image_name(e.name)):
            problem = problem or "not a regular file (a pipe, socket or device)"
            if is_image_name(e.name):
                scan.skipped.append((scan.rel(Path(e.path)), problem))
            else:
                scan.warnings.append(f"{scan.rel(Path(e.path))}: {problem}; ignored")
    subfolders = [Path(e.path) for e in entries if kinds[e.name][0] == "dir"]
    names = {e.name for e in entries if kinds[e.name][0] == "file"}
    global_layer, local_layer = _folder_layers(folder, names, scan)
    inherited = merge_layers(inherited, global_layer)
    folder_layer = merge_layers(inherited, local_layer)

    sidecars: dict[str, dict[str, str]] = {}
    masks: dict[str, str] = {}
    for name in sorted(names):
        stem, ext = os.path.splitext(name)
        if (owner := mask_owner_stem(name)) is not None:
            masks[owner] = name
        elif ext.lower() in SIDECAR_ORDER and stem not in RESERVED_STEMS:
            sidecars.setdefault(stem, {})[ext.lower()] = name
        elif ext.lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
            scan.skipped.append((scan.rel(folder / name), f"unsupported image format '{ext}'; convert it to "
                                                           f"{', '.join(IMAGE_EXTENSIONS)}"))
    image_stems = set()
    for name in sorted(n for n in names if is_image_name(n)):
        path = folder / name
        stem = os.path.splitext(name)[0]
        image_stems.add(stem)
        try:
            size = read_image_size(path)
        except BadImageError as e:
            scan.skipped.append((scan.rel(path), str(e)))
            continue
        notes: list[str] = []
        layer = merge_layers(folder_layer, _sidecar_layer(folder, stem, sidecars.get(stem, {}), scan, notes))
        mask_path = _check_mask(folder / masks[stem], size, notes) if stem in masks else None
        item = _make_item(path, layer, mask_path, size, notes, scan)
        scan.warnings += [f"{item.rel_path}: {n}" for n in notes]
        scan.items.append(item)
    for stem, name in sorted(masks.items()):
        if stem not in image_stems:
            scan.warnings.append(f"{scan.rel(folder / name)}: mask without an image named '{printable(stem)}.<ext>'; "
                                 f"ignored")
    for sub in subfolders:
        _scan_folder(sub, inherited, scan)


def decode_problems(items: list[ImageItem], indices, progress: bool = False) -> Problems:
    """Decode items[i] for i in indices in full (image, then mask), in threads, with the functions the training
    loader uses, and return what failed. The image is decoded at its base bucket, as the loader does (large JPEGs
    at a reduced scale: every byte of the file is still read and checked)."""
    from tqdm.auto import tqdm

    def decode(i: int) -> tuple[int, str | None, str | None]:
        item = items[i]
        try:
            transforms.load_rgb(item.path, cover=item.bucket)
        except BadImageError as e:
            return i, str(e), None
        if item.mask_path is not None:
            try:
                transforms.load_mask(item.mask_path)
            except BadImageError as e:
                return i, None, str(e)
        return i, None, None

    indices = list(indices)
    problems: Problems = {}
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
        for i, image_problem, mask_problem in tqdm(pool.map(decode, indices), total=len(indices), unit="image",
                                                   desc="decoding images", disable=not progress, leave=False):
            if image_problem or mask_problem:
                problems[i] = (image_problem, mask_problem)
    return problems


def drop_undecodable(scan: DataScan, problems: Problems) -> None:
    """Moves the items whose image failed to decode to scan.skipped; a mask that failed is dropped (the image
    trains without it, as the loader would do)."""
    kept = []
    for i, item in enumerate(scan.items):
        image_problem, mask_problem = problems.get(i, (None, None))
        if image_problem:
            scan.skipped.append((item.rel_path, image_problem))
            continue
        if mask_problem:
            note = f"mask {printable(item.mask_path.name)}: {mask_problem}; the image trains without a mask"
            item.notes.append(note)
            scan.warnings.append(f"{item.rel_path}: {note}")
            item.mask_path = None
        kept.append(item)
    scan.items = kept
    scan.undersized = [item.rel_path for item in kept if item.undersized]


def require_usable(scan: DataScan) -> None:
    """Raises ConfigError when the scan left nothing to train on, naming the first skipped files."""
    root = printable(str(scan.root))
    if not scan.items:
        detail = ""
        if scan.skipped:
            listed = "; ".join(f"{rel}: {reason}" for rel, reason in scan.skipped[:3])
            more = f" (and {len(scan.skipped) - 3} more)" if len(scan.skipped) > 3 else ""
            detail = f"; {len(scan.skipped)} file(s) skipped, e.g. {listed}{more}; fix or replace them"
        raise ConfigError(f"no usable images in data_root {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in it "
                          f"and its subfolders){detail}")
    if sum(item.multiply for item in scan.items) < 1:
        raise ConfigError(f"data_root {root}: the multipliers (multiply.txt / yaml 'multiply') add up to less than "
                          f"one image per epoch; raise them")


def scan_dataset(data_root: str | Path, settings: DataSettings, *, decode: bool | Callable = True,
                 progress: bool = False, check_usable: bool = True) -> DataScan:
    """Find every training image under data_root. Raises ConfigError for a missing folder or bad settings, and
    (check_usable) when no usable image is left; every other problem is reported in the result and the scan goes
    on. decode: decode every image in full (see decode_problems); a callable(items) -> Problems decodes them some
    other way (the trainer: each process a share); False reads headers only. progress: a progress bar for it."""
    require_valid_settings(settings)
    root = Path(data_root).expanduser()
    if not root.exists():
        raise ConfigError(f"data_root not found: {root} (set 'data_root' in train.json to your image folder)")
    if not root.is_dir():
        raise ConfigError(f"data_root is not a folder: {root} (set 'data_root' to the folder holding the images)")
    root = root.resolve()
    walk = _Scan(root=root, settings=settings)
    _scan_folder(root, Layer(), walk)
    scan = DataScan(root=root, settings=settings, items=walk.items, skipped=walk.skipped,
                    undersized=[item.rel_path for item in walk.items if item.undersized], warnings=walk.warnings)
    if decode:
        find = decode if callable(decode) else lambda items: decode_problems(items, range(len(items)), progress)
        drop_undecodable(scan, find(scan.items))
    weighted_unshuffled = sum(1 for i in scan.items if len(set(i.tag_weights)) > 1 and not i.shuffle_tags)
    if weighted_unshuffled:
        scan.warnings.append(f"{weighted_unshuffled} image(s) have tag weights but tag shuffling is off for them; "
                             f"weights only act when shuffle_tags is on")
    if check_usable:
        require_usable(scan)
    return scan
