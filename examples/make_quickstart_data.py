"""Generate examples/quickstart_data: small procedural images (coloured shapes) that exercise the data conventions.

    python examples/make_quickstart_data.py            # rewrites examples/quickstart_data
    python examples/make_quickstart_data.py OUT_DIR

Deterministic: the same Pillow version writes the same bytes. Contents:
- captions in file names, some with `_(1)` de-duplication suffixes;
- some `.txt` sidecars (main prompt, then comma-separated tags);
- a subfolder `striped/` with `multiply.txt` (each image twice per epoch) and a `local.yaml` (a tag and flip_p);
- one image with a `-masklabel.png` mask (white = the shape, the part to learn);
- square, 3:2, 2:3, 2:1 and 1:2 images, longest side 64-96 px, PNG and JPEG.
"""
from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 210), "green": (40, 170, 70), "yellow": (240, 210, 40),
           "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SIZES = {"square": (64, 64), "big square": (96, 96), "3:2": (96, 64), "2:3": (64, 96), "2:1": (96, 48),
         "1:2": (48, 96)}
SHAPES = ("circle", "square", "triangle")


def shape_box(size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
    w, h = size
    side = int(min(w, h) * rng.uniform(0.45, 0.7))
    x = rng.randint(2, w - side - 2)
    y = rng.randint(2, h - side - 2)
    return x, y, x + side, y + side


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_image(shape: str, fg: str, bg: str, size: tuple[int, int], rng: random.Random, stripes: bool = False):
    """(image, mask) where the mask is white on the shape and black elsewhere."""
    img = Image.new("RGB", size, COLOURS[bg])
    draw = ImageDraw.Draw(img)
    if stripes:
        for x in range(0, size[0], 12):
            draw.rectangle((x, 0, x + 5, size[1]), fill=tuple(max(0, c - 50) for c in COLOURS[bg]))
    box = shape_box(size, rng)
    draw_shape(draw, shape, box, COLOURS[fg])
    mask = Image.new("L", size, 0)
    draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    return img, mask


def a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def pick_colours(rng: random.Random) -> tuple[str, str]:
    fg, bg = rng.sample(sorted(COLOURS), 2)
    return fg, bg


def save(img: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":
        img.save(path, "JPEG", quality=90)
    else:
        img.save(path, "PNG")


def generate(out: Path) -> list[Path]:
    """Write the example set into out (emptied first); returns the files written."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = random.Random(20240601)
    written: list[Path] = []
    size_names = sorted(SIZES)
    used: dict[tuple[Path, str], int] = {}

    def add(folder: Path, shape: str, fg: str, bg: str, size_name: str, ext: str, *, stripes=False,
            sidecar: str | None = None, with_mask=False, name_caption: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        img, mask = make_image(shape, fg, bg, SIZES[size_name], rng, stripes)
        caption = name_caption or f"{a(fg)} {shape} on {a(bg)} background"
        count = used.get((folder, caption), 0)
        used[(folder, caption)] = count + 1
        stem = caption if count == 0 else f"{caption}_({count})"   # EveryDream's de-duplication suffix
        path = folder / f"{stem}{ext}"
        save(img, path)
        written.append(path)
        if sidecar is not None:
            (folder / f"{stem}.txt").write_text(sidecar + "\n", encoding="utf-8")
            written.append(folder / f"{stem}.txt")
        if with_mask:
            mask.save(folder / f"{stem}-masklabel.png", "PNG")
            written.append(folder / f"{stem}-masklabel.png")

    # 24 images captioned by their file names; repeated captions get _(1), _(2) suffixes
    for k in range(24):
        shape = SHAPES[k % 3]
        fg, bg = pick_colours(rng) if k % 4 else ("red", "blue")
        add(out, shape, fg, bg, size_names[k % len(size_names)], ".png" if k % 2 else ".jpg")
    # 6 images whose caption is in a .txt sidecar (file name is only an id)
    for k in range(6):
        shape, (fg, bg) = SHAPES[k % 3], pick_colours(rng)
        add(out, shape, fg, bg, size_names[(k + 2) % len(size_names)], ".png",
            name_caption=f"shape_{k:02d}", sidecar=f"{a(fg)} {shape} on {a(bg)} background, flat colours, simple")
    # one image with a mask
    add(out, "triangle", "white", "black", "big square", ".png", with_mask=True)
    # a subfolder: multiply.txt and local.yaml apply to it only
    striped = out / "striped"
    for k in range(5):
        shape, (fg, bg) = SHAPES[k % 3], pick_colours(rng)
        add(striped, shape, fg, bg, size_names[(k + 1) % len(size_names)], ".jpg" if k % 2 else ".png",
            stripes=True, name_caption=f"{a(fg)} {shape} on a striped {bg} background")
    (striped / "multiply.txt").write_text("2\n", encoding="utf-8")
    (striped / "local.yaml").write_text("# applies to the images of this folder only\n"
                                        "tags:\n  - striped background\nflip_p: 0.5\n", encoding="utf-8")
    written += [striped / "multiply.txt", striped / "local.yaml"]
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "quickstart_data"
    files = generate(target)
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files ({total / 1024:.0f} KB) to {target}")
