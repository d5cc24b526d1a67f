"""Samples and validation inside real training runs on the tiny model (CPU)."""
import json
import math
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import base_args, make_dataset, read_metrics
from utils.eval.validation import validation_due
from utils.run.run_state import Run


def run(monkeypatch, argv: list[str], validation_config: str | None = None) -> Run:
    """train.main's steps, keeping the Run to look at."""
    from utils.run.config import load_config
    from utils.run.loop import cleanup, train
    from utils.run.preflight import preflight
    from utils.run.setup import setup
    argv = argv + (["--validation_config", validation_config] if validation_config else [])
    cfg, _ = load_config(argv)
    trainer = preflight(cfg)
    try:
        setup(trainer)
        assert train(trainer) == 0
    finally:
        cleanup(trainer)
    return trainer


def unet_weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.models.unet).state_dict().items()}


@pytest.fixture()
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def quick_prompts(folder: Path) -> str:
    """One small sample: the final sampling of a run costs little (attention at 64x64 is the slow part)."""
    path = folder / "quick.json"
    path.write_text(json.dumps({"size": [32, 32], "cfgs": [4], "samples": ["a red picture"]}))
    return str(path)


def test_validation_tags_at_step_zero_and_on_schedule(tiny_sd_folder, data, tmp_path, monkeypatch):
    extra = make_dataset(tmp_path / "faces", per_colour=1)
    vfile = tmp_path / "val.json"
    vfile.write_text(json.dumps({"val_split_mode": "automatic", "auto_split_proportion": 0.25, "seed": 3,
                                 "every_n_epochs": 0.5, "extra_manual_datasets": {"faces": str(extra)},
                                 "stabilize_training_loss": True, "use_relative_loss": True}))
    logdir = tmp_path / "logs"
    trainer = run(monkeypatch, base_args(tiny_sd_folder, data, logdir, max_epochs=2, log_step=100,
                                         sample_prompts=quick_prompts(tmp_path)), str(vfile))
    assert len(trainer.scan.items) == 8 - 2                               # ceil(0.25 x 8) held out
    metrics = read_metrics(trainer.run_dir)
    val_steps = [m["step"] for m in metrics if "loss/val" in m]
    spe = trainer.steps.per_epoch
    expected = [s for s in range(trainer.steps.total_steps + 1) if validation_due(s, spe, 0.5)]
    assert val_steps == expected and len(val_steps) >= 4
    for m in metrics:
        if "loss/val" in m:
            assert {"loss/faces", "loss/stabilize-train", "loss_relative/val"} <= set(m)
            assert all(math.isfinite(v) for v in m.values())
    first = next(m for m in metrics if "loss/val" in m)
    assert first["loss_relative/val"] == 1.0


def test_samples_and_validation_do_not_change_the_trained_weights(tiny_sd_folder, data, tmp_path, monkeypatch):
    args = dict(max_epochs=1, log_step=100)
    plain = run(monkeypatch, base_args(tiny_sd_folder, data, tmp_path / "a", sample_prompts=quick_prompts(tmp_path),
                                       **args))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"scheduler": "euler_a", "cfgs": [5, 1.01], "batch_size": 2,
                                   "generate_pretrain_samples": True,
                                   "samples": [{"prompt": "a red picture", "seed": -1, "negative_prompt": "blue",
                                                "size": [32, 32]},
                                               {"random_caption": True, "size": [48, 32]}]}))
    vfile = tmp_path / "val.json"
    vfile.write_text(json.dumps({"val_split_mode": "none", "stabilize_training_loss": True, "every_n_epochs": 0.5,
                                 "extra_manual_datasets": {"more": str(make_dataset(tmp_path / "more", per_colour=1))}}))
    busy = run(monkeypatch, base_args(tiny_sd_folder, data, tmp_path / "b", sample_prompts=str(prompts), sample_steps=2,
                                   **args),
               str(vfile))
    a, b = unet_weights(plain), unet_weights(busy)
    assert all(torch.equal(a[k], b[k]) for k in a)
    grids = sorted((busy.run_dir / "samples").glob("*.jpg"))
    # before training, every 2nd step and at the end: 2 prompts each
    assert len(grids) == 2 * (1 + busy.steps.total_steps // 2 + busy.steps.total_steps % 2)
    from PIL import Image
    assert {Image.open(g).size for g in grids} == {(2 * 32, 32), (2 * 48, 32)}     # a column per CFG
    assert (grids[0].with_suffix(".txt")).exists()


def test_sampling_out_of_memory_skips_the_samples_and_training_goes_on(tiny_sd_folder, data, tmp_path, monkeypatch):
    import utils.run.previews as previews_module
    real_generate, calls = previews_module.generate, []

    def generate_once_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(previews_module, "generate", generate_once_out_of_memory)
    trainer = run(monkeypatch, base_args(tiny_sd_folder, data, tmp_path / "logs", max_epochs=1, log_step=100,
                                         sample_steps=2, sample_prompts=quick_prompts(tmp_path)))
    run_log = (trainer.run_dir / f"{trainer.run_dir.name}.log").read_text()
    assert "sampling at step 2 ran out of GPU memory and was skipped" in run_log
    assert not trainer.out_of_memory
    steps = {int(g.stem.split("-")[0].lstrip("gs")) for g in (trainer.run_dir / "samples").glob("*.jpg")}
    assert 2 not in steps and trainer.steps.total_steps in steps and len(calls) >= 2
