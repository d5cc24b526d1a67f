"""End to end on CPU: train.main on the tiny model writes loadable checkpoints, TensorBoard tags and samples."""
import json

import pytest
import torch

from tests.integration.conftest import base_args, only_run, read_metrics, run_train

EXPECTED_TAGS = {"loss/log_step", "loss/epoch", "hyperparameter/lr unet", "hyperparameter/lr text encoder",
                 "performance/images per second"}


def tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["images"])


def test_train_writes_run_folder_checkpoint_and_logs(tiny_sd_folder, dataset, tmp_path):
    logdir = tmp_path / "logs"
    rc = run_train(base_args(tiny_sd_folder, dataset, logdir, optimizer_config=None))
    assert rc == 0
    run = only_run(logdir)
    # resolved config and console log in the run folder
    saved = json.loads((run / "train.json").read_text())
    assert saved["seed"] == 7 and saved["resolution"] == 64
    assert (run / f"{run.name}.log").read_text().strip()
    assert (run / "dataset.jsonl").exists()
    # TensorBoard holds the tags, and the losses are finite
    scalars, images = tensorboard_tags(run)
    assert EXPECTED_TAGS <= scalars
    assert images, "final samples are logged to TensorBoard"
    losses = [m["loss/log_step"] for m in read_metrics(run) if "loss/log_step" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert list((run / "samples").glob("*.jpg"))
    # the final checkpoint is a diffusers folder the pipeline loads, plus a single file
    ckpts = sorted(p for p in (run / "ckpts").iterdir() if p.is_dir())
    assert [p.name for p in ckpts] == ["last-t-ep02-gs00008"]
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(ckpts[0], safety_checker=None, requires_safety_checker=False)
    assert pipe.unet is not None
    assert (run / "ckpts" / "last-t-ep02-gs00008.safetensors").exists()
    from safetensors import safe_open
    with safe_open(str(run / "ckpts" / "last-t-ep02-gs00008.safetensors"), "pt") as f:
        assert not {"v_pred", "ztsnr"} & set(f.keys())  # epsilon, no zero terminal SNR: no markers


def test_a_v_prediction_zero_terminal_snr_run_marks_its_single_files(dataset, tmp_path):
    """ComfyUI reads `v_pred` / `ztsnr` from the state dict, not the header or the sidecar (doc/CONVERSION.md)."""
    logdir = tmp_path / "logs"
    assert run_train(base_args("builtin:tiny-sd-v", dataset, logdir, max_epochs=1, enable_zero_terminal_snr=True,
                               ema_decay_rate=0.9)) == 0
    from safetensors import safe_open
    exports = sorted((only_run(logdir) / "ckpts").glob("*.safetensors"))
    assert [p.name for p in exports] == ["last-t-ep01-gs00004.safetensors", "last-t-ep01-gs00004_ema.safetensors"]
    for path in exports:
        with safe_open(str(path), "pt") as f:
            assert {"v_pred", "ztsnr"} <= set(f.keys()) and f.get_tensor("v_pred").numel() == 0
            assert f.metadata()["modelspec.prediction_type"] == "v"
        assert path.with_suffix(".yaml").is_file()


def test_weights_change_and_frozen_text_encoder_is_byte_identical(tiny_sd_folder, dataset, tmp_path):
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, disable_textenc_training=True, max_epochs=1)) == 0
    ckpt = next(p for p in (only_run(logdir) / "ckpts").iterdir() if p.is_dir())
    te_src = (tiny_sd_folder / "text_encoder" / "model.safetensors").read_bytes()
    assert (ckpt / "text_encoder" / "model.safetensors").read_bytes() == te_src
    from safetensors.torch import load_file
    before = load_file(tiny_sd_folder / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(ckpt / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("argv_extra,message", [
    (["--bach_size", "2"], "did you mean batch_size"),
    (["--data_root", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--resume_ckpt", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_input_is_one_line_error_exit_2_before_model_loads(tiny_sd_folder, dataset, tmp_path, capsys,
                                                              argv_extra, message):
    argv = base_args(tiny_sd_folder, dataset, tmp_path / "logs") + argv_extra
    assert run_train(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_data_folder_is_an_error(tiny_sd_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_train(base_args(tiny_sd_folder, empty, tmp_path / "logs")) == 2
    assert "empty" in capsys.readouterr().err


def test_help_lists_every_key(capsys):
    assert run_train(["--help"]) == 0
    out = capsys.readouterr().out
    from utils.run.config import TrainConfig
    from dataclasses import fields
    assert all(f"--{f.name}" in out for f in fields(TrainConfig))
