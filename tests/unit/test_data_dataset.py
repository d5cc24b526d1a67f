"""BatchDataset: batch contents, masks, per-item randomness (worker count, resume), and load-time failures."""
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from data.dataset import BatchDataset, BatchPlan, DataSettings, epoch_batches, scan_dataset


def make_image(path: Path, size, seed: int) -> None:
    """A picture with an off-centre shape, so crops and flips change the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (30 + seed * 20 % 200, 60, 90))
    ImageDraw.Draw(im).ellipse((size[0] // 8, size[1] // 6, size[0] // 2, size[1] // 2), fill=(250, 250, 20))
    im.save(path)


@pytest.fixture
def dataset_dir(tmp_path):
    sizes = [(160, 128), (128, 160), (140, 140), (256, 128), (150, 150), (170, 120)]
    for k in range(12):
        make_image(tmp_path / f"img {k}, tag a, tag b, tag c_{k}.png", sizes[k % len(sizes)], k)
    return tmp_path


def settings(**kw):
    args = dict(resolution=[128], flip_p=0.5, cond_dropout=0.0, shuffle_tags=True)
    args.update(kw)
    return DataSettings(**args)


def same_batch(a, b):
    return (torch.equal(a["pixel_values"], b["pixel_values"]) and a["captions"] == b["captions"]
            and a["paths"] == b["paths"])


def test_batches_have_the_documented_shape(dataset_dir):
    scan = scan_dataset(dataset_dir, settings())
    plans = epoch_batches(scan.items, batch_size=3, seed=1, epoch=0, resolutions=[128])
    ds = BatchDataset(scan.items, plans, seed=1, epoch=0)
    assert len(ds) == len(plans)
    for i, plan in enumerate(plans):
        batch = ds[i]
        n, (w, h) = len(plan.indices), plan.size
        assert batch["pixel_values"].shape == (n, 3, h, w) and batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        assert len(batch["captions"]) == n and all(c.startswith("img ") for c in batch["captions"])
        assert batch["loss_scale"].shape == (n,) and batch["loss_scale"].dtype == torch.float32
        assert batch["time_ids"].shape == (n, 6) and batch["time_ids"].dtype == torch.float32
        assert batch["mask"] is None and batch["skipped"] == []
        assert batch["paths"] == [str(scan.items[k].path) for k in plan.indices]


def test_mask_batch_has_ones_for_items_without_a_mask(tmp_path):
    make_image(tmp_path / "a.png", (128, 128), 1)
    make_image(tmp_path / "b.png", (128, 128), 2)
    Image.new("L", (128, 128), 0).save(tmp_path / "a-masklabel.png")
    scan = scan_dataset(tmp_path, settings(flip_p=0.0))
    batch = BatchDataset(scan.items, [BatchPlan([0, 1], (128, 128), 0)], seed=0, epoch=0)[0]
    assert batch["mask"].shape == (2, 1, 128, 128)
    assert batch["mask"][0].max() == 0 and batch["mask"][1].min() == 1


def test_augmentation_does_not_depend_on_access_order_or_dataset_instance(dataset_dir):
    scan = scan_dataset(dataset_dir, settings())
    plans = epoch_batches(scan.items, batch_size=2, seed=7, epoch=3, resolutions=[128])
    forward = [BatchDataset(scan.items, plans, seed=7, epoch=3)[i] for i in range(len(plans))]
    ds = BatchDataset(scan.items, plans, seed=7, epoch=3)
    backward = [ds[i] for i in reversed(range(len(plans)))][::-1]
    assert all(same_batch(a, b) for a, b in zip(forward, backward))


def test_worker_count_does_not_change_the_batches(dataset_dir):
    scan = scan_dataset(dataset_dir, settings())
    plans = epoch_batches(scan.items, batch_size=3, seed=2, epoch=0, resolutions=[128])

    def run(workers):
        loader = torch.utils.data.DataLoader(BatchDataset(scan.items, plans, seed=2, epoch=0), batch_size=None,
                                             num_workers=workers)
        return list(loader)
    assert all(same_batch(a, b) for a, b in zip(run(0), run(2)))


def test_resume_mid_epoch_replays_the_same_augmentation(dataset_dir):
    scan = scan_dataset(dataset_dir, settings())
    plans = epoch_batches(scan.items, batch_size=2, seed=3, epoch=1, resolutions=[128])
    whole = BatchDataset(scan.items, plans, seed=3, epoch=1)
    k = 2
    resumed = BatchDataset(scan.items, plans[k:], seed=3, epoch=1, first_position=k)
    assert all(same_batch(whole[k + j], resumed[j]) for j in range(len(plans) - k))
    # plans without a stored position (built by hand) use first_position
    bare = [dataclasses.replace(p, position=-1) for p in plans[k:]]
    assert same_batch(whole[k], BatchDataset(scan.items, bare, seed=3, epoch=1, first_position=k)[0])


def test_ddp_ranks_get_their_global_positions(dataset_dir):
    scan = scan_dataset(dataset_dir, settings())
    whole_plans = epoch_batches(scan.items, batch_size=2, seed=3, epoch=0, resolutions=[128])
    whole = BatchDataset(scan.items, whole_plans, seed=3, epoch=0)
    rank1 = epoch_batches(scan.items, batch_size=2, seed=3, epoch=0, resolutions=[128], rank=1, world_size=2)
    assert same_batch(BatchDataset(scan.items, rank1, seed=3, epoch=0)[0], whole[1])


def test_each_epoch_augments_differently(dataset_dir):
    scan = scan_dataset(dataset_dir, settings())
    plan = [BatchPlan(list(range(6)), (128, 128), 0)]
    a = BatchDataset(scan.items, plan, seed=0, epoch=0)[0]
    b = BatchDataset(scan.items, plan, seed=0, epoch=1)[0]
    assert a["captions"] != b["captions"] and not torch.equal(a["pixel_values"], b["pixel_values"])


def test_cond_dropout_and_no_augment(dataset_dir):
    scan = scan_dataset(dataset_dir, settings(cond_dropout=1.0, flip_p=1.0))
    plan = [BatchPlan([0, 1], (128, 128), 0)]
    assert BatchDataset(scan.items, plan, seed=0, epoch=0)[0]["captions"] == ["", ""]
    plain = BatchDataset(scan.items, plan, seed=0, epoch=0, augment=False)[0]
    assert plain["captions"] == [scan.items[0].caption, scan.items[1].caption]
    again = BatchDataset(scan.items, plan, seed=5, epoch=9, augment=False)[0]
    assert torch.equal(plain["pixel_values"], again["pixel_values"])      # centre crop, no flip: no randomness


def test_file_deleted_after_scan_gives_a_smaller_batch_and_a_warning(dataset_dir, caplog):
    scan = scan_dataset(dataset_dir, settings())
    scan.items[1].path.unlink()
    plan = [BatchPlan([0, 1, 2], (128, 128), 0)]
    with caplog.at_level(logging.WARNING):
        batch = BatchDataset(scan.items, plan, seed=0, epoch=0)[0]
    assert batch["pixel_values"].shape[0] == 2 and len(batch["captions"]) == 2
    assert batch["skipped"] == [(scan.items[1].rel_path, "file not found (deleted or moved after the scan?)")]
    assert scan.items[1].rel_path in caplog.text


def test_file_damaged_after_scan_is_skipped(dataset_dir):
    scan = scan_dataset(dataset_dir, settings())
    data = scan.items[0].path.read_bytes()
    scan.items[0].path.write_bytes(data[: len(data) // 2])
    batch = BatchDataset(scan.items, [BatchPlan([0, 1], (128, 128), 0)], seed=0, epoch=0)[0]
    assert len(batch["paths"]) == 1 and "corrupt or truncated" in batch["skipped"][0][1]


def test_whole_batch_failing_returns_none(dataset_dir, caplog):
    scan = scan_dataset(dataset_dir, settings())
    for k in (0, 1):
        scan.items[k].path.unlink()
    ds = BatchDataset(scan.items, [BatchPlan([0, 1], (128, 128), 0)], seed=0, epoch=0)
    with caplog.at_level(logging.WARNING):
        assert ds[0] is None
    assert "every image failed to load" in caplog.text
    assert list(torch.utils.data.DataLoader(ds, batch_size=None)) == [None]


def test_mask_deleted_after_scan_trains_without_it(tmp_path, caplog):
    make_image(tmp_path / "a.png", (128, 128), 1)
    Image.new("L", (128, 128), 0).save(tmp_path / "a-masklabel.png")
    scan = scan_dataset(tmp_path, settings())
    (tmp_path / "a-masklabel.png").unlink()
    with caplog.at_level(logging.WARNING):
        batch = BatchDataset(scan.items, [BatchPlan([0], (128, 128), 0)], seed=0, epoch=0)[0]
    assert batch["mask"] is None and "without a mask" in caplog.text
