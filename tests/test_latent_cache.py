"""Cached VAE latents (data/latent_cache.py, BatchDataset(latents=...)): keys, which entries a run needs, the
encode-once cache and its invalidation, bad files, and equivalence with the uncached path."""
import copy
import os
import pickle
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import data.latent_cache as lc
from data.dataset import BatchDataset, DataSettings, epoch_batches, scan_dataset
from data.latent_cache import (LatentCacheIndex, cache_key, ensure_latents, image_key, needed_entries,
                               open_latent_cache, read_moments, vae_fingerprint)
from data.transforms import crop_box, sdxl_time_ids


@pytest.fixture(scope="module")
def vae(tiny_sd_folder):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae").eval()


def make_image(path: Path, size, seed: int) -> None:
    """An off-centre shape, so flips and crops change the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (30 + seed * 20 % 200, 60, 90))
    ImageDraw.Draw(im).ellipse((size[0] // 8, size[1] // 6, size[0] // 2, size[1] // 2), fill=(250, 250, 20))
    im.save(path)


def scan(folder, **kw):
    args = dict(resolution=[64], flip_p=0.5, cond_dropout=0.3, shuffle_tags=True, crop_jitter=0.0)
    args.update(kw)
    return scan_dataset(folder, DataSettings(**args))


@pytest.fixture
def square_dir(tmp_path):
    """Square images (aspect = the 64x64 bucket), one with a mask: the cached and uncached crops are the same."""
    for k in range(6):
        make_image(tmp_path / "data" / f"img {k}, tag a, tag b, tag c.png", (96, 96), k)
    Image.new("L", (96, 96), 0).save(tmp_path / "data" / "img 2, tag a, tag b, tag c-masklabel.png")
    return tmp_path / "data"


def ensure(items, vae, cache_dir, **kw):
    return ensure_latents(items, needed_entries(items, [64]), vae, cache_dir, progress=False, workers=2, **kw)


# ------------------------------------------------------------------------------------------------------------ keys

def test_cache_key_changes_with_each_input_and_is_stable_otherwise():
    base = dict(image_path="/data/a.png", file_size=100, mtime_ns=5, size=(64, 64), flip=False, vae_fp="f" * 64)
    key = cache_key(**base)
    assert key == cache_key(**base) and len(key) == 64
    for change in [dict(image_path="/data/b.png"), dict(file_size=101), dict(mtime_ns=6), dict(size=(128, 64)),
                   dict(size=(64, 128)), dict(flip=True), dict(vae_fp="e" * 64)]:
        assert cache_key(**{**base, **change}) != key, change


def test_image_key_follows_the_file(tmp_path):
    path = tmp_path / "a.png"
    make_image(path, (64, 64), 1)
    key = image_key(path, (64, 64), False, "fp")
    assert image_key(path, (64, 64), False, "fp") == key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    touched = image_key(path, (64, 64), False, "fp")
    assert touched != key
    make_image(path, (64, 80), 1)           # new content (and size)
    assert image_key(path, (64, 64), False, "fp") not in (key, touched)
    path.unlink()
    with pytest.raises(lc.BadImageError, match="file not found"):
        image_key(path, (64, 64), False, "fp")


def test_vae_fingerprint_follows_weights_and_dtype(vae, tiny_sd_folder):
    from diffusers import AutoencoderKL
    fp = vae_fingerprint(vae)
    assert fp == vae_fingerprint(AutoencoderKL.from_pretrained(tiny_sd_folder, subfolder="vae"))
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    assert vae_fingerprint(changed) != fp
    assert vae_fingerprint(copy.deepcopy(vae).to(torch.bfloat16)) != fp


# ---------------------------------------------------------------------------------------------- needed entries

def test_needed_entries_are_exactly_the_plan_sizes_over_epochs(tmp_path):
    sizes = [(160, 128), (128, 160), (140, 140), (256, 128), (300, 100), (100, 300), (170, 120), (64, 250)]
    for k, size in enumerate(sizes):
        make_image(tmp_path / f"img{k}.png", size, k)
    items = scan(tmp_path, flip_p=0.0).items
    items[1].flip_p = items[3].flip_p = 0.5
    items[5].multiply = 0.0                 # never trained
    items[6].multiply = items[7].multiply = 0.5             # one of the two each epoch
    resolutions = [64, 128, 192]
    entries = needed_entries(items, resolutions)
    planned = {(i, plan.size) for epoch in range(40)
               for plan in epoch_batches(items, batch_size=2, seed=3, epoch=epoch, resolutions=resolutions)
               for i in plan.indices}
    assert {(i, size) for i, size, _ in entries} == planned
    assert {(i, flip) for i, _, flip in entries} == {(i, False) for i in range(8) if i != 5} | {(1, True), (3, True)}
    assert len(entries) == len(set(entries)) and entries == sorted(entries)
    items[7].multiply = 1.0                 # no extra pick left for a fraction: item 6 is never trained
    assert 6 not in {i for i, _, _ in needed_entries(items, resolutions)}
    # one image per epoch: it only ever meets the first resolution
    assert needed_entries(items[:1], resolutions) == [(0, items[0].bucket, False)]


# ------------------------------------------------------------------------------------------------- the cache

def test_second_run_encodes_nothing_and_opens_no_image(square_dir, vae, tmp_path, monkeypatch):
    items = scan(square_dir).items
    entries = needed_entries(items, [64])
    assert len(entries) == 12               # 6 images x 2 flips
    first = ensure(items, vae, tmp_path / "cache", batch_size=5)
    assert (first.hits, first.encoded, first.skipped) == (0, 12, [])
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 12 and all(f.parent.parent.parent == tmp_path / "cache" for f in files)
    assert first.index.folder.name == vae_fingerprint(vae)[:16]
    assert read_moments(files[0]).shape == (8, 32, 32) and read_moments(files[0]).dtype == torch.float32
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    monkeypatch.setattr(lc, "load_rgb", lambda *a, **k: pytest.fail("a cached image was opened"))
    second = ensure(items, vae, tmp_path / "cache")
    assert (second.hits, second.encoded, second.skipped) == (12, 0, [])
    assert "12 cached, 0 encoded" in second.summary()


def test_touched_or_rewritten_image_is_the_only_one_reencoded(square_dir, vae, tmp_path):
    items = scan(square_dir).items
    ensure(items, vae, tmp_path / "cache")
    stat = items[1].path.stat()
    os.utime(items[1].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    again = ensure(items, vae, tmp_path / "cache")
    assert (again.hits, again.encoded) == (10, 2)           # its two flips
    make_image(items[4].path, (96, 96), 40)
    again = ensure(items, vae, tmp_path / "cache")
    assert (again.hits, again.encoded) == (10, 2)


def test_changed_vae_gets_a_new_folder(square_dir, vae, tmp_path):
    items = scan(square_dir).items
    old = ensure(items, vae, tmp_path / "cache")
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    new = ensure(items, changed, tmp_path / "cache")
    assert (new.hits, new.encoded) == (0, 12) and new.index.folder != old.index.folder
    assert new.index.folder.parent == old.index.folder.parent


def test_corrupt_cache_files_are_reencoded(square_dir, vae, tmp_path):
    items = scan(square_dir).items
    report = ensure(items, vae, tmp_path / "cache")
    truncated = report.index.entry_path(items[0].path, (64, 64), False)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    garbage = report.index.entry_path(items[3].path, (64, 64), True)
    garbage.write_bytes(b"not a safetensors file at all")
    assert read_moments(truncated) is None and read_moments(garbage) is None
    again = ensure(items, vae, tmp_path / "cache")
    assert (again.hits, again.encoded, again.skipped) == (10, 2, [])
    assert read_moments(truncated) is not None and read_moments(garbage) is not None


def test_bad_images_are_skipped_and_reported(square_dir, vae, tmp_path):
    items = scan(square_dir).items
    data = items[0].path.read_bytes()
    items[0].path.write_bytes(data[: len(data) // 2])          # damaged after the scan
    items[1].path.unlink()                                      # gone after the scan
    report = ensure(items, vae, tmp_path / "cache")
    assert report.encoded == 8 and dict(report.skipped).keys() == {items[0].rel_path, items[1].rel_path}
    assert "corrupt or truncated" in dict(report.skipped)[items[0].rel_path]
    assert "file not found" in dict(report.skipped)[items[1].rel_path]
    plans = epoch_batches(items, batch_size=6, seed=0, epoch=0, resolutions=[64])
    batch = BatchDataset(items, plans, seed=0, epoch=0, latents=report.index)[0]
    assert batch["latent_moments"].shape[0] == 4
    reasons = dict(batch["skipped"])
    assert "no cached latent" in reasons[items[0].rel_path] and "file not found" in reasons[items[1].rel_path]


def test_ranks_share_the_work(square_dir, vae, tmp_path):
    items = scan(square_dir).items
    shares = [ensure(items, vae, tmp_path / "cache", rank=r, world_size=2) for r in (0, 1)]
    assert [s.encoded for s in shares] == [6, 6]
    assert ensure(items, vae, tmp_path / "cache").hits == 12


# ------------------------------------------------------------------------------------- BatchDataset(latents=...)

def test_cached_batches_match_the_uncached_ones(square_dir, vae, tmp_path):
    items = scan(square_dir).items
    index = ensure(items, vae, tmp_path / "cache").index
    index = pickle.loads(pickle.dumps(index))               # what a DataLoader worker gets
    plans = epoch_batches(items, batch_size=3, seed=4, epoch=1, resolutions=[64])
    cached_ds = BatchDataset(items, plans, seed=4, epoch=1, latents=index)
    plain_ds = BatchDataset(items, plans, seed=4, epoch=1)
    flips = []
    for i in range(len(plans)):
        cached, plain = cached_ds[i], plain_ds[i]
        assert "pixel_values" not in cached and "latent_moments" not in plain
        assert cached["latent_moments"].shape == (len(plans[i].indices), 8, 32, 32)
        for key in ("captions", "paths", "skipped", "size", "position"):
            assert cached[key] == plain[key], key
        assert torch.equal(cached["loss_scale"], plain["loss_scale"])
        assert (cached["mask"] is None) == (plain["mask"] is None)
        if plain["mask"] is not None:
            assert cached["mask"].shape == plain["mask"].shape == (len(plans[i].indices), 1, 64, 64)
            torch.testing.assert_close(cached["mask"], plain["mask"], rtol=0, atol=1e-6)
        with torch.no_grad():
            posterior = vae.encode(plain["pixel_values"]).latent_dist
        assert torch.equal(cached["latent_moments"], posterior.parameters), (cached["latent_moments"] - posterior.parameters).abs().max()
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        sample = DiagonalGaussianDistribution(cached["latent_moments"]).sample(torch.Generator().manual_seed(i))
        expected = posterior.sample(torch.Generator().manual_seed(i))
        assert torch.equal(sample, expected)
        flips += [torch.equal(m, index.load(items[k].path, (64, 64), True))
                  for m, k in zip(cached["latent_moments"], plans[i].indices)]
    assert any(flips) and not all(flips)                    # the test sees both flip outcomes


def test_cached_validation_batches_never_flip(square_dir, vae, tmp_path):
    items = scan(square_dir, flip_p=1.0).items
    index = ensure(items, vae, tmp_path / "cache").index
    plans = epoch_batches(items, batch_size=6, seed=0, epoch=0, resolutions=[64])
    batch = BatchDataset(items, plans, seed=0, epoch=0, augment=False, latents=index)[0]
    unflipped = torch.stack([index.load(items[k].path, (64, 64), False) for k in plans[0].indices])
    assert torch.equal(batch["latent_moments"], unflipped)
    assert batch["captions"] == [items[k].caption for k in plans[0].indices]


def test_cached_time_ids_are_the_centre_crop_with_the_flip_of_the_entry(vae, tmp_path):
    """SDXL's time ids: with augment=False cached and uncached batches agree; in training the cached crop is the
    centre one (no jitter, whatever crop_jitter says) and the flip the one of the entry read."""
    for k, size in enumerate([(96, 64), (64, 96), (80, 64), (70, 64), (64, 64), (90, 70)]):
        make_image(tmp_path / "data" / f"img {k}.png", size, k)
    items = scan(tmp_path / "data", crop_jitter=0.1).items
    index = ensure(items, vae, tmp_path / "cache").index
    plans = epoch_batches(items, batch_size=3, seed=2, epoch=0, resolutions=[64])
    flips, crops = [], []
    for i, plan in enumerate(plans):
        cached = BatchDataset(items, plans, seed=2, epoch=0, augment=False, latents=index)[i]
        plain = BatchDataset(items, plans, seed=2, epoch=0, augment=False)[i]
        assert cached["time_ids"].shape == (len(plan.indices), 6) and cached["time_ids"].dtype == torch.float32
        assert torch.equal(cached["time_ids"], plain["time_ids"])
        trained = BatchDataset(items, plans, seed=2, epoch=0, latents=index)[i]
        for row, moments, k in zip(trained["time_ids"].tolist(), trained["latent_moments"], plan.indices):
            item = items[k]
            flip = torch.equal(moments, index.load(item.path, plan.size, True))
            box = crop_box(item.width, item.height, plan.size, crop_jitter=0.0, rng=random.Random(0), augment=False)
            assert row == list(sdxl_time_ids((item.width, item.height), box, plan.size, flip))
            flips.append(flip)
            crops.append(row[2:4])
    assert any(flips) and not all(flips)
    assert [16, 0] in crops and [0, 16] in crops                 # 96x64 and 64x96 lose 16 px on each side


def test_index_is_cheap_to_open_and_names_the_vae(vae, tmp_path):
    index = open_latent_cache(tmp_path, vae)
    assert isinstance(index, LatentCacheIndex) and index.folder == tmp_path / vae_fingerprint(vae)[:16]
