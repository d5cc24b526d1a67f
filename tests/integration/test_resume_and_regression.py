"""Exact resume (N straight == stop + resume) and pinned losses of the tiny model on CPU."""
import json
import os
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import base_args, only_run, read_metrics, run_train, checkpoint_weights as weights

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_sd_losses.json"


def final_ckpt(logdir: Path) -> Path:
    ckpts = sorted((p for p in (only_run(logdir) / "ckpts").iterdir() if p.is_dir() and not p.name.endswith("_ema")),
                   key=lambda p: p.stat().st_mtime)
    return ckpts[-1]




@pytest.mark.parametrize("extra", [
    {},                                                         # plain, stop mid-epoch
    {"grad_accum": 2, "flip_p": 0.5, "cond_dropout": 0.3, "zero_frequency_noise_ratio": 0.05},
    {"ema_decay_rate": 0.9, "ema_update_interval": 1, "lr": 3e-3},      # EMA state resumes too
    {"fused_backward_pass": True},              # the 8-bit state loads into an optimizer that steps in backward
])
def test_resume_mid_epoch_equals_straight_run(tiny_sd_folder, dataset, tmp_path, extra):
    straight = tmp_path / "straight"
    assert run_train(base_args(tiny_sd_folder, dataset, straight, max_epochs=2, **extra)) == 0
    first = tmp_path / "first"
    assert run_train(base_args(tiny_sd_folder, dataset, first, max_epochs=2, max_steps=3, **extra)) == 0
    stopped = final_ckpt(first)
    assert "gs00003" in stopped.name
    state = torch.load(stopped / "trainer_state.pt", weights_only=True)
    assert state["train_state"]["global_step"] == 3
    second = tmp_path / "second"
    assert run_train(base_args(tiny_sd_folder, dataset, second, max_epochs=2, resume_ckpt=str(stopped), **extra)) == 0
    a, b = weights(final_ckpt(straight)), weights(final_ckpt(second))
    if "ema_decay_rate" in extra:  # the EMA twins too: loadable folders with equal weights
        a_ema = weights(final_ckpt(straight).with_name(final_ckpt(straight).name + "_ema"))
        b_ema = weights(final_ckpt(second).with_name(final_ckpt(second).name + "_ema"))
        assert max((a_ema[k] - b_ema[k]).abs().max().item() for k in a_ema) <= 1e-6
        assert any(not torch.equal(a_ema[k], a[k]) for k in a)  # EMA weights differ from the trained ones
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs from the straight run by {worst}"
    # the losses logged after the resume are the straight run's losses for the same steps
    la = {m["step"]: m["loss/log_step"] for m in read_metrics(only_run(straight)) if "loss/log_step" in m}
    lb = {m["step"]: m["loss/log_step"] for m in read_metrics(only_run(second)) if "loss/log_step" in m}
    assert lb and all(abs(la[s] - lb[s]) <= 1e-6 for s in lb)


def test_findlast_takes_newest_complete_checkpoint(tiny_sd_folder, dataset, tmp_path):
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=1, max_steps=2)) == 0
    done = final_ckpt(logdir)
    # a half-written save (a kill during the rename window) must never be taken
    (done.parent / "t-ep09-gs09999.tmp").mkdir()
    from utils.run.checkpoint import find_last
    assert find_last(logdir) == done


def test_pinned_losses(tiny_sd_folder, dataset, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        logdir = tmp_path / "logs"
        assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=2, zero_frequency_noise_ratio=0.02,
                                   cond_dropout=0.04)) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    losses = [m["loss/log_step"] for m in read_metrics(only_run(logdir)) if "loss/log_step" in m]
    if os.environ.get("UPDATE_GOLDEN") or not GOLDEN.exists():
        import diffusers
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__,
                                      "losses": losses}, indent=1) + "\n")
        if not os.environ.get("UPDATE_GOLDEN"):
            pytest.fail(f"{GOLDEN} was missing and has been written; commit it")
    golden = json.loads(GOLDEN.read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(golden), rtol=1e-4, atol=1e-5)


def test_resume_with_another_seed_continues_with_the_checkpoints_seed(tiny_sd_folder, dataset, tmp_path):
    straight = tmp_path / "straight"
    assert run_train(base_args(tiny_sd_folder, dataset, straight, max_epochs=1)) == 0
    first = tmp_path / "first"
    assert run_train(base_args(tiny_sd_folder, dataset, first, max_epochs=1, max_steps=2)) == 0
    second = tmp_path / "second"
    assert run_train(base_args(tiny_sd_folder, dataset, second, max_epochs=1, seed=99,
                               resume_ckpt=str(final_ckpt(first)))) == 0
    a, b = weights(final_ckpt(straight)), weights(final_ckpt(second))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert json.loads((only_run(second) / "train.json").read_text())["seed"] == 7
