"""Issue 24: EveryDream2's own shipped train.json (tests/assets/everydream2_train.json; its source is in
tests/assets/README.md), with its nulls for "not set", trains the tiny model. Only what makes the run tiny and
fast is overridden; every other key keeps its shipped value."""
import json
import math
import shutil
from pathlib import Path

import torch

from tests.integration.conftest import checkpoint_weights, only_run, read_metrics, run_train

ROOT = Path(__file__).resolve().parents[2]
EVERYDREAM2_TRAIN_JSON = ROOT / "tests" / "assets" / "everydream2_train.json"
# The values of EveryDream2's validation_default.json (its "documentation" block left out), which the shipped
# train.json names as validation_config
EVERYDREAM2_VALIDATION = {"validate_training": True, "val_split_mode": "automatic", "auto_split_proportion": 0.15,
                          "manual_data_root": None, "extra_manual_datasets": {}, "stabilize_training_loss": False,
                          "stabilize_split_proportion": 0.15, "every_n_epochs": 1, "seed": 555,
                          "use_relative_loss": False}


def test_everydream2_shipped_train_json_trains_the_tiny_model(tiny_sd_folder, dataset, tmp_path, monkeypatch,
                                                              capsys):
    shipped = json.loads(EVERYDREAM2_TRAIN_JSON.read_text(encoding="utf-8"))
    # its relative paths (optimizer.json, validation_default.json, sample_prompts.txt, logs) resolve in tmp_path
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "optimizer.json", tmp_path / "optimizer.json")   # this project's: EveryDream2's values
    (tmp_path / "validation_default.json").write_text(json.dumps(EVERYDREAM2_VALIDATION), encoding="utf-8")
    tiny = {"resume_ckpt": str(tiny_sd_folder), "data_root": str(dataset), "resolution": 64, "batch_size": 2,
            "max_steps": 2, "num_workers": 0, "sample_num_steps": 2}
    argv = ["--config", str(EVERYDREAM2_TRAIN_JSON)]
    for key, value in tiny.items():
        argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]

    assert run_train(argv) == 0
    err = capsys.readouterr().err
    assert "EveryDream2 keys not supported by this trainer, ignored: gpuid, notebook, run_name, wandb" in err

    run = only_run(tmp_path / "logs")
    assert run.name.startswith("project_abc-")
    saved = json.loads((run / "train.json").read_text())
    for key, value in shipped.items():
        if key in tiny or key not in saved or key == "seed":
            continue
        expected = {"ema_update_interval": 500, "ema_device": "cpu"}.get(key, value)  # null: the default
        assert saved[key] == expected, key
    assert saved["seed"] >= 0                                   # -1: chosen at random, saved
    # validation_default.json's automatic split ran (log_step 25 logs no training loss in 2 steps)
    val_losses = [m["loss/val"] for m in read_metrics(run) if "loss/val" in m]
    assert val_losses and all(math.isfinite(v) for v in val_losses)
    ckpts = [p for p in (run / "ckpts").iterdir() if p.is_dir()]
    assert [p.name for p in ckpts] == ["last-project_abc-ep00-gs00002"]
    before, after = checkpoint_weights(tiny_sd_folder), checkpoint_weights(ckpts[0])
    for part in ("unet.", "text_encoder."):                      # both trained (lr from optimizer.json)
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part
