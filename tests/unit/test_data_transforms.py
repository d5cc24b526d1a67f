"""Loading and the load-time pipeline: modes, EXIF, crop geometry, resize, flip, normalisation, masks."""
import random

import numpy as np
import pytest
from PIL import Image

from data.transforms import (BadImageError, crop_box, load_mask, load_rgb, load_sample, read_image_size,
                             render_image, render_mask, to_rgb)


def rgb_at(img, xy):
    return img.getpixel(xy)


# --- mode conversion ------------------------------------------------------------------------------------

def test_rgba_and_la_composite_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))          # fully transparent red
    assert rgb_at(to_rgb(rgba), (0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert rgb_at(to_rgb(half), (0, 0)) == (127, 127, 127)
    la = Image.new("LA", (4, 4), (0, 0))
    assert rgb_at(to_rgb(la), (0, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 255, 0] + [0, 0, 255] * 255)
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)                   # index 0 (green) is transparent
    out = load_rgb(tmp_path / "p.png")
    assert out.mode == "RGB" and rgb_at(out, (0, 0)) == (255, 255, 255) and rgb_at(out, (1, 1)) == (0, 0, 255)
    plain = Image.new("P", (2, 2), 0)
    plain.putpalette([10, 20, 30] * 256)
    assert rgb_at(to_rgb(plain), (0, 0)) == (10, 20, 30)


def test_cmyk_converts_to_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", "JPEG", quality=100)
    out = load_rgb(tmp_path / "c.jpg")
    r, g, b = rgb_at(out, (4, 4))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    a = np.full((4, 4), 32896, dtype=np.uint16)                 # 50 % grey in 16 bits
    a[0, 0] = 65535
    Image.fromarray(a).save(tmp_path / "g16.png")
    out = load_rgb(tmp_path / "g16.png")
    assert rgb_at(out, (1, 1)) == (128, 128, 128) and rgb_at(out, (0, 0)) == (255, 255, 255)
    as_i = Image.fromarray(a.astype(np.int32), "I")
    assert rgb_at(to_rgb(as_i), (1, 1)) == (128, 128, 128)
    as_f = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F")
    assert rgb_at(to_rgb(as_f), (0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("mode, color, expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255)),
                                                   ("RGB", (1, 2, 3), (1, 2, 3))])
def test_other_modes(mode, color, expected):
    assert rgb_at(to_rgb(Image.new(mode, (2, 2), color)), (0, 0)) == expected


def test_exif_transpose_happens_first(tmp_path):
    im = Image.new("RGB", (128, 64), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 64, 64))                       # left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                            # displayed rotated 90 degrees clockwise
    im.save(tmp_path / "r.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    assert read_image_size(tmp_path / "r.jpg") == (64, 128)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.size == (64, 128)
    top, bottom = rgb_at(out, (32, 16)), rgb_at(out, (32, 112))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


# --- errors ---------------------------------------------------------------------------------------------------

def test_load_errors_become_bad_image_errors(tmp_path):
    Image.new("RGB", (256, 256), (9, 9, 9)).save(tmp_path / "cut.jpg", "JPEG")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        load_rgb(tmp_path / "cut.jpg")
    with pytest.raises(BadImageError, match="file not found"):
        load_rgb(tmp_path / "gone.png")
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty file"):
        read_image_size(tmp_path / "zero.png")


def test_pixel_bomb_is_refused_at_load_too(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(tmp_path / "b.png")


# --- crop geometry -------------------------------------------------------------------------------------------

def box_size(box):
    return box[2] - box[0], box[3] - box[1]


@pytest.mark.parametrize("size, bucket", [((1000, 600), (640, 384)), ((600, 1000), (384, 640)),
                                          ((700, 700), (512, 512)), ((300, 200), (512, 512)),
                                          ((2000, 500), (1024, 256))])
def test_crop_box_has_the_bucket_aspect_and_stays_inside(size, bucket):
    for seed in range(50):
        box = crop_box(*size, bucket, crop_jitter=0.02, rng=random.Random(seed))
        w, h = box_size(box)
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= size[0] + 1e-9 and box[3] <= size[1] + 1e-9
        assert w / h == pytest.approx(bucket[0] / bucket[1])


def test_crop_jitter_is_at_most_the_fraction_per_side_and_never_forces_upscaling():
    for seed in range(200):
        box = crop_box(1000, 1000, (512, 512), crop_jitter=0.02, rng=random.Random(seed))
        # each side loses at most 20 px to jitter; the aspect trim then only shortens the longer axis
        assert min(box_size(box)) >= 960 - 1e-9 and box[0] >= 0 and box[2] <= 1000
        # 520 px is barely larger than the bucket: jitter may only use the 8 spare pixels
        small = crop_box(520, 520, (512, 512), crop_jitter=0.02, rng=random.Random(seed))
        assert min(box_size(small)) >= 512 - 1e-9
    jittered = {crop_box(1000, 1000, (512, 512), crop_jitter=0.02, rng=random.Random(s))[0] for s in range(20)}
    assert len(jittered) == 20


def test_crop_offset_is_centre_biased():
    # 1000x500 into a square bucket: 500 px of excess width; triangular offsets put 75 % in the middle half
    offsets = [crop_box(1000, 500, (512, 512), crop_jitter=0.0, rng=random.Random(s))[0] for s in range(4000)]
    middle = sum(125 <= o <= 375 for o in offsets) / len(offsets)
    assert 0.72 < middle < 0.78 and abs(np.mean(offsets) - 250) < 10 and min(offsets) >= 0 and max(offsets) <= 500


def test_without_augment_the_crop_is_centred_and_unjittered():
    assert crop_box(1000, 500, (512, 512), crop_jitter=0.02, rng=random.Random(1), augment=False) == \
        (250.0, 0.0, 750.0, 500.0)


# --- render --------------------------------------------------------------------------------------------------

def test_render_image_shape_range_dtype_and_flip():
    im = Image.new("RGB", (200, 100), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 100, 100))                 # left half white
    box = (0, 0, 200, 100)
    out = render_image(im, box, (128, 64), flip=False)
    assert out.shape == (3, 64, 128) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out[:, :, 10].mean() == pytest.approx(1.0, abs=1e-3) and out[:, :, -10].mean() == pytest.approx(-1.0)
    flipped = render_image(im, box, (128, 64), flip=True)
    assert np.array_equal(flipped, out[:, :, ::-1])


def test_mask_follows_the_same_crop_flip_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    pattern = (rng.random((30, 45)) > 0.5).astype(np.uint8) * 255
    big = Image.fromarray(pattern).resize((450, 300), Image.Resampling.NEAREST)    # blocky, so edges are few
    big.convert("RGB").save(tmp_path / "x.png")
    big.save(tmp_path / "x-masklabel.png")
    big.resize((225, 150), Image.Resampling.NEAREST).save(tmp_path / "half-masklabel.png")   # other size
    for seed in range(6):
        for mask_name in ("x-masklabel.png", "half-masklabel.png"):
            pixels, mask, problem, _ = load_sample(tmp_path / "x.png", (192, 128), rng=random.Random(seed),
                                                   crop_jitter=0.02, flip_p=0.5, mask_path=tmp_path / mask_name)
            assert problem is None and mask.shape == (1, 128, 192) and mask.dtype == np.float32
            assert mask.min() >= 0.0 and mask.max() <= 1.0
            as_mask = (pixels[0] + 1) / 2
            assert np.abs(as_mask - mask[0]).mean() < 0.04


def test_flip_probability_and_determinism(tmp_path):
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 32, 64))
    im.save(tmp_path / "f.png")
    flips = 0
    for seed in range(200):
        pixels, _, _, _ = load_sample(tmp_path / "f.png", (64, 64), rng=random.Random(seed), crop_jitter=0.0,
                                      flip_p=0.3)
        flips += pixels[0, 32, 0] < 0                       # left edge black = flipped
    assert 40 < flips < 80
    a, _, _, _ = load_sample(tmp_path / "f.png", (64, 64), rng=random.Random("k"), crop_jitter=0.02, flip_p=0.5)
    b, _, _, _ = load_sample(tmp_path / "f.png", (64, 64), rng=random.Random("k"), crop_jitter=0.02, flip_p=0.5)
    assert np.array_equal(a, b)


def test_bad_mask_at_load_time_is_reported_not_fatal(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    pixels, mask, problem, _ = load_sample(tmp_path / "a.png", (64, 64), rng=random.Random(0), crop_jitter=0.0,
                                           flip_p=0.0, mask_path=tmp_path / "a-masklabel.png")
    assert mask is None and "file not found" in problem and pixels.shape == (3, 64, 64)


def test_mask_modes(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "m16.png")
    assert load_mask(tmp_path / "m16.png").getpixel((0, 0)) == 255         # 16-bit scaled, not clipped
    Image.new("RGBA", (4, 4), (255, 255, 255, 0)).save(tmp_path / "rgba.png")
    assert load_mask(tmp_path / "rgba.png").getpixel((0, 0)) == 255        # alpha ignored: white = learn
    Image.new("RGB", (4, 4), (128, 128, 128)).save(tmp_path / "rgb.png")
    mask = load_mask(tmp_path / "rgb.png")
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 128
    out = render_mask(mask, (0, 0, 4, 4), (4, 4), (64, 64), flip=False)
    assert out.shape == (1, 64, 64) and out.max() == pytest.approx(128 / 255)


def test_upscaling_undersized_images(tmp_path):
    Image.new("RGB", (96, 48), (10, 200, 10)).save(tmp_path / "s.png")
    pixels, _, _, _ = load_sample(tmp_path / "s.png", (64, 64), rng=random.Random(0), crop_jitter=0.02, flip_p=0.0)
    assert pixels.shape == (3, 64, 64)
    assert pixels[1].mean() == pytest.approx(200 / 127.5 - 1, abs=0.01)


def test_big_jpegs_are_decoded_at_a_reduced_scale_that_still_covers_the_bucket(tmp_path):
    im = Image.new("RGB", (1024, 768), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 512, 768))                     # left half red
    im.save(tmp_path / "big.jpg", "JPEG", quality=95)
    assert load_rgb(tmp_path / "big.jpg", cover=(128, 96)).size == (256, 192)     # 1/4 scale, still >= 1.1x
    assert load_rgb(tmp_path / "big.jpg", cover=(640, 480)).size == (1024, 768)   # no reduction possible
    full, _, _, _ = load_sample(tmp_path / "big.jpg", (128, 96), rng=random.Random(0), crop_jitter=0.0, flip_p=0.0,
                                augment=False)
    reference = render_image(load_rgb(tmp_path / "big.jpg"), (0, 0, 1024, 768), (128, 96), flip=False)
    assert np.abs(full - reference).mean() < 0.02
    # EXIF-rotated: the request is made in the stored orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (1024, 512)).save(tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rot.jpg", cover=(64, 128)).size == (128, 256)
