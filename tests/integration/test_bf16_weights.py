"""train.json weight_dtype bf16: trained weights stored in bf16, each update rounded stochastically (CPU, tiny
models): SDXL's UNet and both encoders train and save, a resumed run continues exactly, the weights learn as fp32
weights do, and settings it cannot run with are refused in one line."""
import json

import pytest
import torch

from tests.integration.conftest import base_args, checkpoint_weights, only_run, read_metrics, run_train
from tests.integration.test_sdxl import final_ckpt

pytest.importorskip("bitsandbytes")


@pytest.fixture
def adamw8bit(tmp_path):
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({"base": {"optimizer": "adamw8bit", "lr": 1e-3}}))
    return str(path)


def test_sdxl_unet_and_both_text_encoders_train_in_bf16(tiny_sdxl_folder, dataset, tmp_path, adamw8bit):
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sdxl_folder, dataset, logdir, max_epochs=2, weight_dtype="bf16",
                               mixed_precision="auto", optimizer_config=adamw8bit, lr=None,
                               save_every_n_epochs=1)) == 0
    run = only_run(logdir)
    assert "precision: bf16 autocast" in (run / f"{run.name}.log").read_text()
    losses = [m["loss/log_step"] for m in read_metrics(run) if "loss/log_step" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    before, after = checkpoint_weights(tiny_sdxl_folder), checkpoint_weights(final_ckpt(logdir))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        trained = [k for k in after if k.startswith(part + ".")]
        assert all(after[k].dtype == torch.bfloat16 for k in trained if after[k].is_floating_point()), part
        assert any(not torch.equal(before[k].bfloat16(), after[k]) for k in trained), part
    assert json.loads((final_ckpt(logdir) / "train.json").read_text())["weight_dtype"] == "bf16"


def test_a_resumed_bf16_run_equals_the_straight_run(tiny_sd_folder, dataset, tmp_path, adamw8bit):
    common = dict(max_epochs=2, weight_dtype="bf16", mixed_precision="bf16", optimizer_config=adamw8bit, lr=None)
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    assert run_train(base_args(tiny_sd_folder, dataset, straight, **common)) == 0
    assert run_train(base_args(tiny_sd_folder, dataset, first, max_steps=3, **common)) == 0
    assert run_train(base_args(tiny_sd_folder, dataset, second, resume_ckpt=str(final_ckpt(first)), **common)) == 0
    a, b = checkpoint_weights(final_ckpt(straight)), checkpoint_weights(final_ckpt(second))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def _update(start: dict, end: dict, part: str = "unet.") -> torch.Tensor:
    keys = sorted(k for k in start if k.startswith(part) and start[k].is_floating_point())
    return torch.cat([(end[k].float() - start[k].float()).flatten() for k in keys])


def test_bf16_weights_learn_what_fp32_weights_learn(tiny_sd_folder, dataset, tmp_path, adamw8bit, monkeypatch):
    """At lr 1e-5 an update is far below bf16's spacing for most weights. Along the fp32 run's update, the bf16
    run with stochastic rounding goes about as far; with rounding to nearest (the rounding switched off) it
    loses most of it: the test can tell the two apart."""
    common = dict(max_epochs=3, mixed_precision="bf16", optimizer_config=adamw8bit, lr=1e-5)
    runs = {}
    for name, extra in (("fp32", {}), ("stochastic", {"weight_dtype": "bf16"}), ("nearest", {"weight_dtype": "bf16"})):
        if name == "nearest":
            import optimizer.grouped8bit as grouped8bit
            monkeypatch.setattr(grouped8bit, "round_to_bf16_", lambda values, seed: values)
        assert run_train(base_args(tiny_sd_folder, dataset, tmp_path / name, **common, **extra)) == 0
        runs[name] = checkpoint_weights(final_ckpt(tmp_path / name))
    start = checkpoint_weights(tiny_sd_folder)
    reference = _update(start, runs["fp32"])
    start_bf16 = {k: v.bfloat16() for k, v in start.items()}

    def share(name):   # how much of the fp32 run's update the bf16 run made
        return (torch.dot(_update(start_bf16, runs[name]), reference) / torch.dot(reference, reference)).item()
    shares = {name: share(name) for name in ("stochastic", "nearest")}
    assert shares["stochastic"] == pytest.approx(1.0, abs=0.15), shares
    assert shares["nearest"] < 0.6, shares


@pytest.mark.parametrize("extra, message", [
    ({"optimizer_config": None}, "weight_dtype 'bf16' cannot run with this optimizer.json"),
    ({"mixed_precision": "fp16"}, "weight_dtype 'bf16' trains under bf16 autocast"),
    ({"mixed_precision": "no"}, "weight_dtype 'bf16' trains under bf16 autocast"),
])
def test_settings_bf16_weights_cannot_run_with_are_refused(tiny_sd_folder, dataset, tmp_path, adamw8bit, capsys,
                                                           extra, message):
    args = dict(weight_dtype="bf16", mixed_precision="bf16", optimizer_config=adamw8bit, lr=None)
    if extra.get("optimizer_config", "") is None:
        (tmp_path / "adamw.json").write_text(json.dumps({"base": {"optimizer": "adamw"}}))
        extra = {"optimizer_config": str(tmp_path / "adamw.json")}
    args.update(extra)
    assert run_train(base_args(tiny_sd_folder, dataset, tmp_path / "logs", **args)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
