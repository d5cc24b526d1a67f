"""Image files: header reads for the scan, and the load-time pipeline (EXIF transpose, conversion to RGB, crop
jitter, centre-biased crop to the bucket's aspect, resize, flip, normalisation; masks follow the same geometry),
and SDXL's size and crop conditioning of the crop an image got (sdxl_time_ids).
The only module of the data layer that imports PIL. Returns numpy arrays so callers choose their tensor library.

Every failure to read an image becomes BadImageError with a readable reason: callers skip the file and report it
(EveryDream2 D9 let decode errors escape from DataLoader workers and abort the run).
"""
from __future__ import annotations

import math
import os
import random
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Images above this many pixels are refused as possible decompression bombs (PIL's default, 89 MP, would refuse
# some real 100-200 MP camera files; EveryDream2 raised it to 2.8 G pixels, enough to exhaust RAM in a worker).
MAX_IMAGE_PIXELS = 2 ** 28          # 268 MP, e.g. 16384 x 16384; about 0.8 GB once decoded to RGB
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

ORIENTATION_TAG = 0x0112
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)    # EXIF orientations that rotate by 90 degrees


class BadImageError(Exception):
    """An image (or mask) that cannot be used; str(error) is the reason shown to the user."""


_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)   # what filterwarnings() inserts
_bomb_filter_lock = threading.Lock()
_bomb_filter_users = 0


@contextmanager
def _bomb_warnings_are_errors():
    """PIL only warns between MAX_IMAGE_PIXELS and twice that; here it is an error. Not warnings.catch_warnings():
    the scan decodes in threads, and each catch_warnings exit restores the filter list its own entry saw, so
    overlapping ones leave the process's filters changed. The filter goes in with the first reader, out with the
    last."""
    global _bomb_filter_users
    with _bomb_filter_lock:
        if _bomb_filter_users == 0:
            warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        _bomb_filter_users += 1
    try:
        yield
    finally:
        with _bomb_filter_lock:
            _bomb_filter_users -= 1
            if _bomb_filter_users == 0 and _BOMB_FILTER in warnings.filters:
                warnings.filters.remove(_BOMB_FILTER)
                getattr(warnings, "_filters_mutated", lambda: None)()   # drops the cached "already warned" marks


@contextmanager
def _reading(path: Path):
    """Translate everything that can go wrong while reading an image into BadImageError."""
    try:
        with _bomb_warnings_are_errors():
            yield
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("file not found (deleted or moved after the scan?)") from None
    except PermissionError:
        raise BadImageError("cannot read the file: permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError(f"more than {Image.MAX_IMAGE_PIXELS:,} pixels: refused as a possible decompression "
                            f"bomb; downscale the file") from None
    except UnidentifiedImageError:
        reason = "empty file (0 bytes)" if _is_empty(path) else \
            "not an image PIL can read (corrupt header, or not an image despite its extension)"
        raise BadImageError(reason) from None
    except MemoryError:
        raise BadImageError("out of memory while decoding") from None
    except Exception as e:      # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken data
        raise BadImageError(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None


def _is_empty(path: Path) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def _orientation(img: Image.Image) -> int:
    # PNG's getexif() decodes the whole image when the EXIF chunk is not in the header, so only use what the
    # header gave; other formats read EXIF from the header.
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            exif = Image.Exif()
            if raw:
                exif.load(raw)
        else:
            exif = img.getexif()
        return int(exif.get(ORIENTATION_TAG, 1) or 1)
    except Exception:           # a broken EXIF block is no reason to drop the image; it just is not rotated
        return 1


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, from the header only (fast). Raises BadImageError."""
    with _reading(path):
        with Image.open(path) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise BadImageError(f"image has no pixels ({width}x{height})")
            if _orientation(img) in SWAPPING_ORIENTATIONS:
                width, height = height, width
            return width, height


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """I;16*, I and F images to 8-bit L by scaling, not clipping (PIL's convert('L') clips 16-bit to white)."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
    elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0               # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency is composited on white, 16-bit and float are scaled, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _sixteen_bit_to_8(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")           # L, 1, P, CMYK, YCbCr, LAB, HSV


DRAFT_MARGIN = 1.1     # decode big JPEGs at a reduced scale that still covers the bucket with 10 % to spare


def draft_request(stored_size: tuple[int, int], cover: tuple[int, int], swapped: bool) -> tuple[int, int] | None:
    """The size (in stored orientation) a JPEG must keep to cover `cover` (displayed orientation) after crop
    jitter; None when no reduction is possible."""
    width, height = (stored_size[1], stored_size[0]) if swapped else stored_size
    scale = max(cover[0] / width, cover[1] / height) * DRAFT_MARGIN
    if scale >= 0.5:                # JPEG can only reduce by 2, 4 or 8
        return None
    request = (math.ceil(width * scale), math.ceil(height * scale))
    return (request[1], request[0]) if swapped else request


def load_rgb(path: Path, cover: tuple[int, int] | None = None) -> Image.Image:
    """The fully decoded image, upright (EXIF transpose first) and in RGB. Raises BadImageError.

    cover: the (width, height) the caller will resize to; a large JPEG is then decoded at 1/2, 1/4 or 1/8 scale
    when that still covers it (several times faster for camera photos, and the result is downscaled anyway)."""
    with _reading(path):
        with Image.open(path) as img:
            if cover is not None and img.format == "JPEG":
                request = draft_request(img.size, cover, _orientation(img) in SWAPPING_ORIENTATIONS)
                if request:
                    img.draft(None, request)
            img.load()                  # decode now, so truncated data fails here and not later
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright)


def load_mask(path: Path) -> Image.Image:
    """A mask as 8-bit greyscale (white = learn this area, black = ignore); alpha is ignored."""
    with _reading(path):
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            if upright.mode.startswith("I") or upright.mode == "F":
                return _sixteen_bit_to_8(upright)
            return upright.convert("L")


# ---------------------------------------------------------------------------------------------- geometry (pure)

def crop_box(width: int, height: int, bucket: tuple[int, int], *, crop_jitter: float, rng: random.Random,
             augment: bool = True) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of a width x height image that is resized to the bucket.

    1. Crop jitter: each side loses a random 0..crop_jitter of that side's length, but never so much that the
       image would have to be upscaled to cover the bucket (EveryDream2: up to 2 % per side).
    2. Trim the long axis to the bucket's aspect ratio; the offset is drawn from a triangular distribution with its
       mode in the middle (a centre-biased random crop).
    Without augment: no jitter and an exact centre crop. Always draws the same number of random numbers.
    """
    bw, bh = bucket
    draws = [rng.random() for _ in range(5)]
    jitter = crop_jitter if augment else 0.0
    max_x = max(0.0, min(jitter * width, (width - bw) / 2))
    max_y = max(0.0, min(jitter * height, (height - bh) / 2))
    left, right = draws[0] * max_x, width - draws[1] * max_x
    top, bottom = draws[2] * max_y, height - draws[3] * max_y
    w, h = right - left, bottom - top
    target = bw / bh
    if w / h > target:                  # too wide: trim width
        excess = w - h * target
        offset = _triangular(draws[4], excess) if augment else excess / 2
        left, right = left + offset, left + offset + h * target
    else:                               # too tall (or exact): trim height
        excess = h - w / target
        offset = _triangular(draws[4], excess) if augment else excess / 2
        top, bottom = top + offset, top + offset + w / target
    return left, top, right, bottom


class Crop(NamedTuple):
    """The geometry one image went through: `box` (left, top, right, bottom) of an `image_size` (width, height)
    image was resized to the bucket, then mirrored left-right when `flip`."""
    image_size: tuple[int, int]
    box: tuple[float, float, float, float]
    flip: bool

    def scaled_to(self, size: tuple[int, int]) -> Crop:
        """The same crop in the image at another size: a JPEG decoded at reduced scale (load_rgb's `cover`)
        has its box in the small image's pixels, and the time ids speak of the image as displayed."""
        sx, sy = size[0] / self.image_size[0], size[1] / self.image_size[1]
        left, top, right, bottom = self.box
        return Crop((size[0], size[1]), (left * sx, top * sy, right * sx, bottom * sy), self.flip)


def _round(x: float) -> int:
    return math.floor(x + 0.5)          # half up, not Python's half to even


def sdxl_time_ids(image_size: tuple[int, int], box, bucket: tuple[int, int], flip: bool) -> tuple[int, ...]:
    """SDXL's size and crop conditioning for one image: (original_height, original_width, crop_top, crop_left,
    target_height, target_width), as diffusers' `add_time_ids = original_size + crops_coords_top_left +
    target_size`.

    image_size: (width, height) of the image as displayed (EXIF orientation applied), the coordinates of `box`.
    box: the (left, top, right, bottom) region that was resized to `bucket` (width, height), as crop_box gives.
    The crop's top-left corner is given in the pixels of the image scaled so that the box maps onto the bucket
    (scale = bucket width / box width): (top * scale, left * scale), each rounded half up to an integer. The flip
    mirrors the image after the crop, so a flipped image's crop_left is measured from the flipped image's left
    edge: scaled width - target width - crop_left = (width - right) * scale, rounded once (kohya's sd-scripts do
    the same for flipped images). crop_top never changes. Original and target sizes are returned as given.
    """
    width, height = image_size
    left, top, right, _ = box
    scale = bucket[0] / (right - left)
    # flipped: scaled width - target width - crop_left, i.e. the box's right margin, scaled; rounded once, here
    crop_left = (width - right) * scale if flip else left * scale
    return height, width, _round(top * scale), _round(crop_left), bucket[1], bucket[0]


def _triangular(u: float, span: float) -> float:
    """Inverse CDF of the symmetric triangular distribution on [0, span], for a uniform u."""
    return span * (math.sqrt(u / 2) if u < 0.5 else 1 - math.sqrt((1 - u) / 2))


def _to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def render_image(img: Image.Image, box, bucket: tuple[int, int], flip: bool) -> np.ndarray:
    """Crop `box`, resize to the bucket (Lanczos), flip; float32 [3, H, W] in [-1, 1]."""
    out = img.resize(bucket, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    a = _to_array(out) / 127.5 - 1.0
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def render_mask(mask: Image.Image, box, image_size: tuple[int, int], bucket: tuple[int, int],
                flip: bool) -> np.ndarray:
    """The same crop / resize / flip for a mask (bilinear, so edges stay soft); float32 [1, H, W] in [0, 1].
    A mask of another size than its image is stretched to the image first (the box is scaled)."""
    sx, sy = mask.size[0] / image_size[0], mask.size[1] / image_size[1]
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    out = mask.resize(bucket, Image.Resampling.BILINEAR, box=scaled)
    a = _to_array(out) / 255.0
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(a[None])


class Sample(NamedTuple):
    """What load_sample returns. pixels: [3, H, W] (or a cached entry's latent moments); mask: [1, H, W] or None;
    mask_problem: why a mask failed to load, or None; crop: the geometry applied (for sdxl_time_ids)."""
    pixels: object
    mask: np.ndarray | None
    mask_problem: str | None
    crop: Crop


def load_sample(path: Path, bucket: tuple[int, int], *, rng: random.Random, crop_jitter: float, flip_p: float,
                mask_path: Path | None = None, augment: bool = True) -> Sample:
    """The image rendered to the bucket, its mask, and the crop and flip used (draws nothing more for them).
    Raises BadImageError for the image itself; a mask that fails to load is returned as None with the reason, so
    the image still trains. crop.image_size is the decoded image's (smaller than displayed for a big JPEG)."""
    img = load_rgb(path, cover=bucket)
    box = crop_box(img.width, img.height, bucket, crop_jitter=crop_jitter, rng=rng, augment=augment)
    flip = rng.random() < flip_p and augment
    crop = Crop(img.size, box, flip)
    pixels = render_image(img, box, bucket, flip)
    if mask_path is None:
        return Sample(pixels, None, None, crop)
    try:
        mask = load_mask(mask_path)
    except BadImageError as e:
        return Sample(pixels, None, f"mask {Path(mask_path).name}: {e}", crop)
    return Sample(pixels, render_mask(mask, box, img.size, bucket, flip), None, crop)
