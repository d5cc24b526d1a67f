"""SDXL size and crop conditioning: data.transforms.sdxl_time_ids on hand-computed cases, the crop load_sample
reports, and BatchDataset's "time_ids" (the crop actually used, skipped images, EXIF, reduced-scale JPEGs)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import BatchDataset, BatchPlan, DataSettings, item_rng, scan_dataset
from data.transforms import Crop, crop_box, load_sample, sdxl_time_ids


# --- the pure function -----------------------------------------------------------------------------------------
# (original_height, original_width, crop_top, crop_left, target_height, target_width)

@pytest.mark.parametrize("image_size, box, bucket, flip, expected", [
    # no crop, same size; a flip changes nothing when the box is the whole width
    ((512, 512), (0, 0, 512, 512), (512, 512), False, (512, 512, 0, 0, 512, 512)),
    ((512, 512), (0, 0, 512, 512), (512, 512), True, (512, 512, 0, 0, 512, 512)),
    # no crop, downscaled by 2: the original size is the source's, the target the bucket's
    ((1024, 768), (0, 0, 1024, 768), (512, 384), False, (768, 1024, 0, 0, 384, 512)),
    # crop on x, centred: scale 512 / 500 = 1.024, left 250 * 1.024 = 256; mirrored: (1000 - 750) * 1.024 = 256
    ((1000, 500), (250, 0, 750, 500), (512, 512), False, (500, 1000, 0, 256, 512, 512)),
    ((1000, 500), (250, 0, 750, 500), (512, 512), True, (500, 1000, 0, 256, 512, 512)),
    # crop on x, off centre: 100 * 1.024 = 102.4 -> 102; flipped: 1024 - 512 - 102.4 = 409.6 -> 410
    ((1000, 500), (100, 0, 600, 500), (512, 512), False, (500, 1000, 0, 102, 512, 512)),
    ((1000, 500), (100, 0, 600, 500), (512, 512), True, (500, 1000, 0, 410, 512, 512)),
    # crop on y: 300 * 1.024 = 307.2 -> 307; the flip leaves crop_top alone
    ((500, 1000), (0, 300, 500, 800), (512, 512), False, (1000, 500, 307, 0, 512, 512)),
    ((500, 1000), (0, 300, 500, 800), (512, 512), True, (1000, 500, 307, 0, 512, 512)),
    # jitter on every side (left 10, top 5, right 985, bottom 980): scale 512 / 975 = 0.52513;
    # top 5 * s = 2.63 -> 3, left 10 * s = 5.25 -> 5, flipped (1000 - 985) * s = 7.88 -> 8
    ((1000, 1000), (10, 5, 985, 980), (512, 512), False, (1000, 1000, 3, 5, 512, 512)),
    ((1000, 1000), (10, 5, 985, 980), (512, 512), True, (1000, 1000, 3, 8, 512, 512)),
    # upscaled: 96x48 to 64x64, scale 4 / 3, left 24 * 4 / 3 = 32
    ((96, 48), (24, 0, 72, 48), (64, 64), False, (48, 96, 0, 32, 64, 64)),
    # halves round up: 2.5 -> 3 on both sides (Python's round would give 2)
    ((517, 512), (2.5, 0, 514.5, 512), (512, 512), False, (512, 517, 0, 3, 512, 512)),
    ((517, 512), (2.5, 0, 514.5, 512), (512, 512), True, (512, 517, 0, 3, 512, 512)),
    # a non-square bucket: 1600x1000 to 640x384 (aspect 5:3), box 1600 x 960 at top 20: scale 0.4, top 8
    ((1600, 1000), (0, 20, 1600, 980), (640, 384), False, (1000, 1600, 8, 0, 384, 640)),
])
def test_hand_computed_time_ids(image_size, box, bucket, flip, expected):
    ids = sdxl_time_ids(image_size, box, bucket, flip)
    assert ids == expected and all(isinstance(v, int) for v in ids)


def test_the_flip_rule_is_scaled_width_minus_target_width_minus_crop_left():
    for seed in range(300):
        rng = random.Random(seed)
        size = (rng.randint(200, 3000), rng.randint(200, 3000))
        bucket = rng.choice([(512, 512), (640, 384), (384, 640), (1024, 256)])
        box = crop_box(*size, bucket, crop_jitter=0.05, rng=rng)
        plain, flipped = sdxl_time_ids(size, box, bucket, False), sdxl_time_ids(size, box, bucket, True)
        scale = bucket[0] / (box[2] - box[0])
        assert abs(flipped[3] - (size[0] * scale - bucket[0] - box[0] * scale)) <= 0.5 + 1e-9
        assert abs(plain[3] - box[0] * scale) <= 0.5 + 1e-9 and abs(plain[2] - box[1] * scale) <= 0.5 + 1e-9
        assert flipped[:3] == plain[:3] and flipped[4:] == plain[4:] == (bucket[1], bucket[0])
        assert 0 <= plain[3] <= round(size[0] * scale) - bucket[0] + 1 and 0 <= flipped[3]


def test_centre_crop_time_ids_are_symmetric():
    box = crop_box(1000, 500, (512, 512), crop_jitter=0.02, rng=random.Random(1), augment=False)
    assert sdxl_time_ids((1000, 500), box, (512, 512), False) == sdxl_time_ids((1000, 500), box, (512, 512), True)


def test_crop_scaled_to_another_size_keeps_the_time_ids():
    crop = Crop((250, 200), (25.0, 0.0, 225.0, 200.0), True)
    full = crop.scaled_to((1000, 800))
    assert full == Crop((1000, 800), (100.0, 0.0, 900.0, 800.0), True)
    assert sdxl_time_ids(*full[:2], (128, 128), True)[2:] == sdxl_time_ids(*crop[:2], (128, 128), True)[2:]


# --- load_sample reports the crop it used, drawing nothing more ---------------------------------------------------

def bar_image(path, size, bar_x):
    """Black, with a 2-pixel white vertical bar at columns bar_x, bar_x + 1."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, bar_x:bar_x + 2] = 255
    Image.fromarray(a).save(path)


def test_load_sample_crop_is_crop_box_and_the_flip_of_the_same_stream(tmp_path):
    bar_image(tmp_path / "x.png", (300, 200), 40)
    for seed in range(20):
        sample = load_sample(tmp_path / "x.png", (128, 128), rng=random.Random(seed), crop_jitter=0.05, flip_p=0.5)
        reference = random.Random(seed)
        box = crop_box(300, 200, (128, 128), crop_jitter=0.05, rng=reference)
        assert sample.crop == Crop((300, 200), box, reference.random() < 0.5)
        after = random.Random(seed)
        load_sample(tmp_path / "x.png", (128, 128), rng=after, crop_jitter=0.05, flip_p=0.5)
        assert after.getstate() == reference.getstate()           # 5 crop draws + 1 flip draw, no more


def test_time_ids_locate_a_bar_in_the_rendered_image(tmp_path):
    """The bar's column in the output is its column in the (mirrored, when flipped) scaled image minus crop_left."""
    width, bar_x, bucket = 300, 149, (128, 128)                  # every crop of 300x200 to a square holds x=150
    bar_image(tmp_path / "bar.png", (width, 200), bar_x)
    seen_flips = set()
    for seed in range(40):
        pixels, _, _, crop = load_sample(tmp_path / "bar.png", bucket, rng=random.Random(seed), crop_jitter=0.05,
                                         flip_p=0.5)
        _, _, _, crop_left, _, _ = sdxl_time_ids(crop.image_size, crop.box, bucket, crop.flip)
        scale = bucket[0] / (crop.box[2] - crop.box[0])
        centre = bar_x + 1                                        # the bar's middle, in source pixels
        expected = ((width - centre) if crop.flip else centre) * scale - crop_left
        weight = np.clip(pixels[0].mean(axis=0) + 1, 0, None)
        found = float((np.arange(bucket[0]) + 0.5) @ weight / weight.sum())    # pixel i spans [i, i + 1]
        assert abs(found - expected) < 1.5, (seed, found, expected)
        seen_flips.add(crop.flip)
    assert seen_flips == {False, True}


# --- BatchDataset's "time_ids" -------------------------------------------------------------------------------------

def make_image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def mixed_dir(tmp_path):
    for k, size in enumerate([(160, 128), (128, 160), (300, 140), (150, 150), (140, 290), (200, 200)]):
        make_image(tmp_path / f"img{k}.png", size, k)
    return tmp_path


def expected_time_ids(items, plan, seed, epoch, position, slots):
    rows = []
    for slot in slots:
        item = items[plan.indices[slot]]
        rng = item_rng(seed, epoch, position, slot, "image")
        box = crop_box(item.width, item.height, plan.size, crop_jitter=item.crop_jitter, rng=rng)
        flip = rng.random() < item.flip_p
        rows.append(sdxl_time_ids((item.width, item.height), box, plan.size, flip))
    return torch.tensor(rows, dtype=torch.float32)


def test_batches_carry_the_time_ids_of_the_crop_actually_used(mixed_dir):
    scan = scan_dataset(mixed_dir, DataSettings(resolution=[128], flip_p=0.5, crop_jitter=0.1))
    plan = BatchPlan(list(range(len(scan.items))), (128, 128), 0)
    for epoch in range(4):
        batch = BatchDataset(scan.items, [plan], seed=3, epoch=epoch)[0]
        ids = batch["time_ids"]
        assert ids.dtype == torch.float32 and ids.shape == (len(plan.indices), 6)
        assert torch.equal(ids, expected_time_ids(scan.items, plan, 3, epoch, 0, range(len(plan.indices))))
        assert torch.equal(ids[:, 0], torch.tensor([float(scan.items[k].height) for k in plan.indices]))
        assert torch.equal(ids[:, 1], torch.tensor([float(scan.items[k].width) for k in plan.indices]))
        assert torch.equal(ids[:, 4:], torch.tensor([[128.0, 128.0]]).expand(len(plan.indices), 2))
    assert ids[:, 2:4].abs().sum() > 0                           # some crops are off the corner


def test_validation_batches_use_the_centre_crop_unflipped(mixed_dir):
    scan = scan_dataset(mixed_dir, DataSettings(resolution=[128], flip_p=1.0))
    plan = BatchPlan(list(range(len(scan.items))), (128, 128), 0)
    ids = BatchDataset(scan.items, [plan], seed=0, epoch=0, augment=False)[0]["time_ids"]
    for row, k in zip(ids.tolist(), plan.indices):
        item = scan.items[k]
        box = crop_box(item.width, item.height, (128, 128), crop_jitter=0.0, rng=random.Random(0), augment=False)
        assert row == list(sdxl_time_ids((item.width, item.height), box, (128, 128), False))
    assert ids[2].tolist() == [140, 300, 0, 73, 128, 128]         # 300x140 centre crop: 80 * 128 / 140 = 73.1


def test_a_skipped_image_does_not_shift_the_rows(mixed_dir):
    scan = scan_dataset(mixed_dir, DataSettings(resolution=[128], flip_p=0.5, crop_jitter=0.1))
    plan = BatchPlan([0, 1, 2, 3], (128, 128), 5)
    scan.items[1].path.unlink()
    batch = BatchDataset(scan.items, [plan], seed=9, epoch=2)[0]
    assert [p for p, _ in batch["skipped"]] == [scan.items[1].rel_path]
    assert batch["time_ids"].shape == (3, 6) and len(batch["paths"]) == 3
    assert torch.equal(batch["time_ids"], expected_time_ids(scan.items, plan, 9, 2, 5, [0, 2, 3]))


def test_original_size_is_the_displayed_one(tmp_path):
    """EXIF orientation 6 (rotated by 90 degrees): stored 200x100, displayed 100x200."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (200, 100), (90, 10, 10)).save(tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
    scan = scan_dataset(tmp_path, DataSettings(resolution=[64], crop_jitter=0.0))
    batch = BatchDataset(scan.items, [BatchPlan([0], (64, 64), 0)], seed=0, epoch=0, augment=False)[0]
    assert batch["time_ids"].tolist() == [[200, 100, 32, 0, 64, 64]]   # (200 - 100) / 2 * 64 / 100 = 32


def test_a_jpeg_decoded_at_reduced_scale_counts_at_full_size(tmp_path):
    Image.new("RGB", (1024, 640), (0, 0, 200)).save(tmp_path / "big.jpg", "JPEG", quality=90)
    scan = scan_dataset(tmp_path, DataSettings(resolution=[64], crop_jitter=0.0))
    plan = BatchPlan([0], (64, 64), 0)
    sample = load_sample(scan.items[0].path, (64, 64), rng=random.Random(0), crop_jitter=0.0, flip_p=0.0)
    assert sample.crop.image_size == (128, 80)                     # decoded at 1/8
    batch = BatchDataset(scan.items, [plan], seed=0, epoch=0, augment=False)[0]
    assert batch["time_ids"].tolist() == [[640, 1024, 0, 19, 64, 64]]    # (1024 - 640) / 2 * 64 / 640 = 19.2
