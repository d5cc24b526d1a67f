"""Validation config, split, schedule and the fixed-noise validation loss."""
import json
import math
from pathlib import Path

import pytest
import torch

from data.items import ImageItem
from utils.core.config_schema import ConfigError
from utils.eval.validation import (STABILIZE_TAG, ValidationConfig, ValidationHistory, evaluate_loss,
                              load_validation_config, split_for_validation, validation_due,
                              validation_loss_settings, validation_sets)


def item(name: str, **kw) -> ImageItem:
    args = dict(path=Path("/data") / name, rel_path=name, width=64, height=64, main_prompt=name, caption=name,
                multiply=2.0, flip_p=0.5, crop_jitter=0.02, cond_dropout=0.1, batch_id="g", loss_scale=0.5,
                shuffle_tags=True)
    args.update(kw)
    return ImageItem(**args)


ITEMS = [item(f"img{i:02d}.png") for i in range(20)]


def write_cfg(tmp_path, data, name="val.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def no_scan(path):
    raise AssertionError(f"scan_fn called for {path}")


# ------------------------------------------------------------------------------------------------ config
def test_every_key_and_everydream2_file_loads(tmp_path):
    v = load_validation_config(write_cfg(tmp_path, {
        "documentation": {"validate_training": "EveryDream2's file documents itself"},
        "validate_training": True, "val_split_mode": "manual", "auto_split_proportion": 0.2,
        "val_data_root": "/val", "extra_manual_datasets": {"faces": "/faces"}, "every_n_epochs": 0.5,
        "seed": 1, "batch_size": 3, "stabilize_training_loss": True, "stabilize_split_proportion": 0.1,
        "use_relative_loss": True}))
    assert v.manual_data_root == "/val" and v.val_data_root is None     # the legacy name is accepted
    assert (v.every_n_epochs, v.seed, v.batch_size, v.use_relative_loss) == (0.5, 1, 3, True)
    assert v.extra_manual_datasets == {"faces": "/faces"} and v.stabilize_training_loss
    assert load_validation_config(None) is None
    assert load_validation_config(write_cfg(tmp_path, {"validate_training": False})) is None
    assert load_validation_config(write_cfg(tmp_path, {})) == ValidationConfig()


@pytest.mark.parametrize("data,message", [
    ({"every_n_epoch": 1}, "unknown key 'every_n_epoch' (did you mean every_n_epochs?)"),
    ({"val_split_mode": "auto"}, "'val_split_mode' must be"),
    ({"val_split_mode": "manual"}, "needs manual_data_root"),
    ({"manual_data_root": "/v"}, "set val_split_mode to 'manual'"),
    ({"auto_split_proportion": 0}, "between 0 and 1"),
    ({"every_n_epochs": 0}, "'every_n_epochs' must be at least"),
    ({"extra_manual_datasets": {"val": "/x"}}, "taken by a built-in tag"),
    ({"extra_manual_datasets": {"a/b": "/x"}}, "becomes the TensorBoard tag"),
    ({"use_relative_loss": "yes"}, "'use_relative_loss' must be bool"),
])
def test_config_is_strict(tmp_path, data, message):
    with pytest.raises(ConfigError) as e:
        load_validation_config(write_cfg(tmp_path, data, "myval.json"))
    assert message in str(e.value) and "myval.json" in str(e.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="validation_config file not found"):
        load_validation_config(str(tmp_path / "nope.json"))


# ------------------------------------------------------------------------------------------------ split
@pytest.mark.parametrize("n,p,held", [(20, 0.15, 3), (7, 0.15, 2), (20, 0.01, 1), (10, 0.5, 5), (2, 0.15, 1)])
def test_automatic_split_sizes(n, p, held):
    items = ITEMS[:n]
    train, sets, stab = split_for_validation(items, ValidationConfig(auto_split_proportion=p), scan_fn=no_scan)
    assert len(sets["val"]) == held == max(1, math.ceil(p * n)) and len(train) == n - held and stab == []
    assert {str(i.path) for i in train}.isdisjoint(str(i.path) for i in sets["val"])
    assert [i.rel_path for i in train] == [i.rel_path for i in items if i.rel_path in {t.rel_path for t in train}]


def test_automatic_split_is_deterministic_and_seeded():
    v = ValidationConfig(seed=3)
    _, a, _ = split_for_validation(ITEMS, v, scan_fn=no_scan)
    _, b, _ = split_for_validation(list(reversed(ITEMS)), v, scan_fn=no_scan)     # scan order does not matter
    assert [i.path for i in a["val"]] == [i.path for i in b["val"]]
    others = [split_for_validation(ITEMS, ValidationConfig(seed=s), scan_fn=no_scan)[1]["val"] for s in range(4, 9)]
    assert any([i.path for i in o] != [i.path for i in a["val"]] for o in others)


def test_validation_items_do_not_augment_but_training_items_keep_their_settings():
    train, sets, _ = split_for_validation(ITEMS, ValidationConfig(), scan_fn=no_scan)
    for it in sets["val"]:
        assert (it.multiply, it.flip_p, it.crop_jitter, it.cond_dropout, it.batch_id, it.loss_scale,
                it.shuffle_tags) == (1.0, 0.0, 0.0, 0.0, "", 1.0, False)
    assert all(it.multiply == 2.0 and it.flip_p == 0.5 for it in train)
    assert ITEMS[0].multiply == 2.0                                  # the caller's items are not modified


def test_too_few_images_for_a_split():
    with pytest.raises(ConfigError, match="at least 2"):
        split_for_validation(ITEMS[:1], ValidationConfig(), scan_fn=no_scan)


def test_manual_and_extra_sets_use_scan_fn():
    scanned = {"/val": [item("v1.png", path=Path("/val/v1.png"))],
               "/faces": type("Scan", (), {"items": [item("f1.png", path=Path("/faces/f1.png")),
                                                      item("f2.png", path=Path("/faces/f2.png"))]})()}
    v = ValidationConfig(val_split_mode="manual", manual_data_root="/val", extra_manual_datasets={"faces": "/faces"})
    train, sets, _ = split_for_validation(ITEMS, v, scan_fn=scanned.__getitem__)
    assert train == ITEMS and list(sets) == ["val", "faces"]
    assert [len(s) for s in sets.values()] == [1, 2] and sets["faces"][0].multiply == 1.0
    # extra sets also run with val_split_mode none
    _, sets, _ = split_for_validation(ITEMS, ValidationConfig(val_split_mode="none",
                                                              extra_manual_datasets={"faces": "/faces"}),
                                      scan_fn=scanned.__getitem__)
    assert list(sets) == ["faces"]


def test_validation_folder_inside_the_training_data_is_refused():
    v = ValidationConfig(val_split_mode="manual", manual_data_root="/data")
    with pytest.raises(ConfigError, match="also training images"):
        split_for_validation(ITEMS, v, scan_fn=lambda p: ITEMS[:3])


def test_stabilize_subset_is_fixed_and_stays_in_training():
    v = ValidationConfig(stabilize_training_loss=True, stabilize_split_proportion=0.2)
    train, sets, stab = split_for_validation(ITEMS, v, scan_fn=no_scan)
    assert len(stab) == math.ceil(0.2 * len(train)) == 4
    assert {str(i.path) for i in stab} <= {str(i.path) for i in train}
    assert all(i.multiply == 1.0 for i in stab)
    assert stab == split_for_validation(ITEMS, v, scan_fn=no_scan)[2]


def test_off_means_unchanged():
    assert split_for_validation(ITEMS, None, scan_fn=no_scan) == (ITEMS, {}, [])


def test_validation_sets_cover_each_image_once():
    _, sets, stab = split_for_validation(ITEMS, ValidationConfig(auto_split_proportion=0.5,
                                                                 stabilize_training_loss=True), scan_fn=no_scan)
    built = validation_sets(sets, stab, batch_size=3, seed=1, resolution=64)
    assert [s.tag for s in built] == ["loss/val", STABILIZE_TAG]
    for s in built:
        assert sorted(i for p in s.plans for i in p.indices) == list(range(len(s.items)))
        assert all(len(p.indices) <= 3 for p in s.plans)


# ------------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("every,spe,expected", [
    (1, 10, [10, 20, 30]),
    (0.5, 10, [5, 10, 15, 20, 25, 30]),
    (0.25, 10, [3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30]),
    (2, 10, [20]),
    (1.5, 4, [6, 12, 18, 24, 30]),
    (0.1, 10, list(range(1, 31))),
    (0.5, 7, [4, 7, 11, 14, 18, 21, 25, 28]),
])
def test_validation_due(every, spe, expected):
    assert validation_due(0, spe, every)                     # before the first step
    assert [s for s in range(1, 31) if validation_due(s, spe, every)] == expected


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_loss_is_a_per_image_mean_with_fixed_generators():
    seen = []

    def loss_fn(batch, generator):
        seen.append(torch.rand(1, generator=generator).item())
        return torch.tensor(batch["value"])

    batches = [{"captions": ["a", "b", "c"], "value": 1.0}, None, {"captions": ["d"], "value": 5.0}]
    assert evaluate_loss(loss_fn, batches, seed=1) == pytest.approx((3 * 1.0 + 5.0) / 4)
    first = list(seen)
    evaluate_loss(loss_fn, batches, seed=1)
    assert seen[2:] == first and first[0] != first[1]        # the same draws every time, distinct per batch
    evaluate_loss(loss_fn, batches, seed=2)
    assert seen[4:] != first
    with pytest.raises(ValueError, match="no batch"):
        evaluate_loss(loss_fn, [None], seed=1)


@pytest.fixture(scope="module")
def tiny_model(tiny_sd_folder):
    from utils.sd.models import load_sd_model
    from utils.sd.noise import make_noise_scheduler
    sd = load_sd_model(tiny_sd_folder)
    for m in (sd.unet, sd.text_encoder, sd.vae):
        m.eval()
    return sd, make_noise_scheduler(sd.scheduler_config, zero_terminal_snr=False)


def make_loss_fn(sd, noise_scheduler):
    """What the trainer's _val_loss does (see doc/LOGGING.md and the report to the lead)."""
    from utils.sd.step import LossSettings, compute_loss
    from utils.sd.text_conditioning import encode_prompts
    settings = validation_loss_settings(LossSettings(loss_type="huber", min_snr_gamma=5.0,
                                                     zero_frequency_noise_ratio=0.1))

    def loss_fn(batch, generator):
        latents = sd.vae.encode(batch["pixel_values"]).latent_dist.sample(generator) * sd.vae.config.scaling_factor
        tok = sd.tokenizer
        ids = tok(batch["captions"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        hidden = encode_prompts(sd.text_encoder, ids, clip_skip=0)
        loss, _ = compute_loss(sd.unet, noise_scheduler, latents.float(), hidden, generator, settings)
        return loss
    return loss_fn


def test_evaluate_loss_is_identical_on_unchanged_weights(tiny_model, tmp_path):
    from PIL import Image
    from data.dataset import BatchDataset, DataSettings, scan_dataset
    for i, colour in enumerate(["red", "green", "blue", "white", "black"]):
        Image.new("RGB", (64 + 32 * (i % 2), 64), colour).save(tmp_path / f"a {colour} thing.png")
    items = scan_dataset(tmp_path, DataSettings(resolution=[64])).items
    sd, noise_scheduler = tiny_model
    loss_fn = make_loss_fn(sd, noise_scheduler)
    (s,) = validation_sets({"val": items}, [], batch_size=2, seed=5, resolution=64)

    def batches():
        return BatchDataset(s.items, s.plans, seed=5, epoch=0, augment=False)
    torch.manual_seed(0)
    expected_next = torch.rand(2)
    torch.manual_seed(0)
    a = evaluate_loss(loss_fn, batches(), seed=5)
    assert torch.equal(torch.rand(2), expected_next)           # the global RNG is untouched
    b = evaluate_loss(loss_fn, batches(), seed=5)
    assert a == b and math.isfinite(a)
    assert evaluate_loss(loss_fn, batches(), seed=6) != a      # the seed is what fixes it
    with torch.no_grad():
        next(sd.unet.parameters()).add_(0.05)                  # changed weights, changed loss
    try:
        assert evaluate_loss(loss_fn, batches(), seed=5) != a
    finally:
        with torch.no_grad():
            next(sd.unet.parameters()).sub_(0.05)


def test_validation_loss_is_plain_mse_with_the_training_noise():
    from utils.sd.step import LossSettings
    s = validation_loss_settings(LossSettings(loss_type="huber", min_snr_gamma=5.0, debiased_estimation=True,
                                              zero_frequency_noise_ratio=0.1, pyramid_noise_discount=0.3,
                                              timestep_start=100))
    assert (s.loss_type, s.min_snr_gamma, s.debiased_estimation) == ("mse", None, False)
    assert (s.zero_frequency_noise_ratio, s.pyramid_noise_discount, s.timestep_start) == (0.1, 0.3, 100)


# ------------------------------------------------------------------------------------------------ history
def test_relative_loss_and_divergence_warning():
    h = ValidationHistory(relative=True)
    extra, warnings = h.record(0, {"loss/val": 0.2, "loss/faces": 0.4})
    assert extra == {"loss_relative/val": 1.0, "loss_relative/faces": 1.0} and warnings == []
    extra, _ = h.record(10, {"loss/val": 0.1, "loss/faces": 0.5})
    assert extra == {"loss_relative/val": 0.5, "loss_relative/faces": 1.25}
    assert ValidationHistory(relative=False).record(0, {"loss/val": 0.2}) == ({}, [])
    losses = [0.1 - 0.005 * i for i in range(8)] + [0.07, 0.08, 0.09, 0.1, 0.11, 0.12]
    all_warnings = []
    for step, value in enumerate(losses):
        all_warnings += h.record(step, {"loss/val": value})[1]
    assert len(all_warnings) == 1 and "overfitting" in all_warnings[0]      # once when the trend turns
    restored = ValidationHistory(relative=True)
    restored.load_state_dict(h.state_dict())
    assert restored.baseline == h.baseline and restored.val_losses == h.val_losses
