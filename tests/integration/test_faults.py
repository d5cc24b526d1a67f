"""No lost work on faults (signals, a kill during a save, a full disk, NaN losses), and faults that end in one line
naming the file: unusable trainer state, unwritable logdir, a second Ctrl-C, unsupported models; no hang on a crash
with loader workers; files readable by other users."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import utils.run.saving as saving_module
import utils.run.train_step as step_module
from tests.integration.conftest import base_args, only_run, run_train
from utils.core.file_writes import TMP_SUFFIX
from utils.run.checkpoint import find_last, load_trainer_state

ROOT = Path(__file__).resolve().parents[2]


def child_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def first_metrics_line(logdir: Path) -> bool:
    return any(p.stat().st_size > 0 for p in logdir.glob("*/metrics.jsonl"))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_an_interrupted_checkpoint_that_resumes(tiny_sd_folder, dataset, tmp_path, sig, code):
    logdir = tmp_path / "logs"
    argv = base_args(tiny_sd_folder, dataset, logdir, max_epochs=200, ckpt_every_n_minutes=1000)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: first_metrics_line(logdir)), "training never logged a step"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, out[-2000:]
    ckpts = [p for p in (only_run(logdir) / "ckpts").iterdir() if p.is_dir()]
    assert len(ckpts) == 1 and ckpts[0].name.startswith("interrupted-"), ckpts
    state = load_trainer_state(ckpts[0])
    assert state["train_state"]["global_step"] > 0
    assert find_last(logdir) == ckpts[0]


def test_kill_during_save_leaves_earlier_checkpoints_and_findlast_skips_the_partial(tiny_sd_folder, dataset,
                                                                                  tmp_path):
    logdir = tmp_path / "logs"
    marker = tmp_path / "in_second_save"
    runner = tmp_path / "runner.py"
    runner.write_text(f"""
import sys, time, pathlib
sys.path.insert(0, {str(ROOT)!r})
import utils.run.saving as S
original, calls = S.save_trainer_state, []
def slow_second_save(folder, state):
    calls.append(folder)
    original(folder, state)
    if len(calls) == 2:               # the second save: stop here, half written, until killed
        pathlib.Path({str(marker)!r}).write_text(str(folder))
        time.sleep(600)
S.save_trainer_state = slow_second_save
import train
sys.exit(train.main(sys.argv[1:]))
""")
    argv = base_args(tiny_sd_folder, dataset, logdir, max_epochs=4, save_every_n_epochs=1, no_save_ckpt=True)
    proc = subprocess.Popen([sys.executable, str(runner), *argv], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(marker.exists), "the second save never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    ckpt_dir = only_run(logdir) / "ckpts"
    partial = Path(marker.read_text())
    assert partial.name.endswith(TMP_SUFFIX) and partial.exists()
    complete = find_last(logdir)
    assert complete.name == "t-ep01-gs00004"
    assert load_trainer_state(complete)["train_state"]["epoch"] == 1
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(["t-ep01-gs00004", partial.name])


def test_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(tiny_sd_folder, dataset, tmp_path, monkeypatch,
                                                                 capsys):
    original, calls = saving_module.save_trainer_state, []

    def full_on_second(folder, state):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(folder, state)

    monkeypatch.setattr(saving_module, "save_trainer_state", full_on_second)
    logdir = tmp_path / "logs"
    rc = run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=3, save_every_n_epochs=1, no_save_ckpt=True))
    assert rc == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "Traceback" not in err
    names = sorted(p.name for p in (only_run(logdir) / "ckpts").iterdir())
    assert names == ["t-ep01-gs00004"]  # the earlier one intact, no half-written folder left behind


def nan_on(steps: set[int]):
    original = step_module.compute_loss
    calls = []

    def patched(*args, **kwargs):
        loss, per_sample = original(*args, **kwargs)
        calls.append(1)
        if len(calls) in steps:
            loss = loss * float("nan")
        return loss, per_sample
    return patched


def test_a_nan_step_is_skipped_and_training_goes_on(tiny_sd_folder, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(step_module, "compute_loss", nan_on({2}))
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=1)) == 0
    ckpt = find_last(logdir)
    from safetensors.torch import load_file
    weights = load_file(ckpt / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    log_text = next(only_run(logdir).glob("*.log")).read_text()
    assert "step 2: non-finite loss" in log_text


def test_a_run_of_nan_steps_stops_training_without_a_new_checkpoint(tiny_sd_folder, dataset, tmp_path, monkeypatch,
                                                                   recwarn):
    monkeypatch.setattr(step_module, "compute_loss", nan_on(set(range(1, 1000))))
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=6)) == 1
    # the skipped steps advance the LR schedule on purpose: torch's warning about it would only mislead
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    run = only_run(logdir)
    assert not [p for p in (run / "ckpts").iterdir()]
    assert "20 optimizer steps in a row had non-finite" in next(run.glob("*.log")).read_text()


def test_full_disk_in_the_single_file_export_is_a_clear_error(tiny_sd_folder, dataset, tmp_path, monkeypatch,
                                                             capsys):
    def no_space(folder, out_path, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_path))

    monkeypatch.setattr(saving_module, "save_single_file", no_space)
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=1)) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "Traceback" not in err
    assert find_last(logdir).name == "last-t-ep01-gs00004"  # the checkpoint folder itself was complete


# ---------------------------------------------------------------------------------------------------------------
# Bad input and faults end in one line naming the file (issue 21)
# ---------------------------------------------------------------------------------------------------------------

def assert_one_line_error(rc: int, err: str, *names: str, code: int = 2) -> None:
    assert rc == code, err
    # a progress bar (the scan's decode) redraws its line with carriage returns: what stays is after the last one
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n")]
    lines = [line for line in lines if line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in err, (name, err)


class _NeedsCode:  # what a state file from elsewhere could carry: unpickling it would import and call code
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("damage", ["truncated", "empty", "needs code"])
def test_an_unusable_trainer_state_is_a_one_line_error(tiny_sd_folder, dataset, tmp_path, capsys, damage):
    import shutil
    ckpt = shutil.copytree(tiny_sd_folder, tmp_path / "ckpts" / "t-ep01-gs00004")
    state = ckpt / "trainer_state.pt"
    fake = {"train_state": {"seed": 7, "epoch": 1}, "optimizers": {"unet": {"exp_avg": torch.zeros(1000)}}}
    if damage == "needs code":
        fake["callbacks"] = _NeedsCode()
    torch.save(fake, state)
    if damage == "truncated":  # a copy or a disk that stopped halfway
        state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    elif damage == "empty":
        state.write_bytes(b"")
    rc = run_train(base_args(ckpt, dataset, tmp_path / "logs"))
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, str(state), "resume from another checkpoint", "delete")
    assert "Traceback" not in out and "this must never run" not in out
    if damage == "needs code":
        assert "builtins.print" in err and "code execution" in err  # what it references


@pytest.mark.parametrize("where", ["below a file", "is a file", "read-only"])
def test_an_unwritable_logdir_is_a_one_line_error(tiny_sd_folder, dataset, tmp_path, capsys, monkeypatch, where):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a regular file")
    if where == "below a file":
        logdir = blocker / "logs"
    elif where == "is a file":
        logdir = blocker
    else:
        logdir = tmp_path / "readonly"
        logdir.mkdir(mode=0o555)
        if os.geteuid() == 0:  # root writes into read-only folders: the refusal a user would get, simulated
            mkdir = Path.mkdir

            def refused(self, *args, **kwargs):
                if logdir in self.parents:
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return mkdir(self, *args, **kwargs)
            monkeypatch.setattr(Path, "mkdir", refused)
    for extra in ([], ["--check"]):  # training and the data check both write there first
        rc = run_train(base_args(tiny_sd_folder, dataset, logdir) + extra)
        assert_one_line_error(rc, capsys.readouterr().err, str(logdir), "logdir")


@pytest.mark.parametrize("earlier", [True, False])
def test_a_second_signal_during_the_interrupted_save_ends_in_one_line(tiny_sd_folder, dataset, tmp_path, monkeypatch,
                                                                    capsys, earlier):
    """Ctrl-C, then Ctrl-C again while the interrupted checkpoint is written: exit 130 with one line naming the
    checkpoint that is intact (it printed a KeyboardInterrupt traceback). Writes are atomic: nothing partial stays."""
    first_signal_at = 6 if earlier else 2          # micro-steps; an epoch is 4 (8 images, batch 2)
    losses, saves = [], []
    original_loss, original_save = step_module.compute_loss, saving_module.save_trainer_state

    def loss_then_ctrl_c(*args, **kwargs):
        losses.append(1)
        if len(losses) == first_signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        return original_loss(*args, **kwargs)

    def save_with_second_ctrl_c(folder, state):
        saves.append(folder)
        if folder.name.lstrip(".").startswith("interrupted-"):  # the hidden temp folder of that save
            os.kill(os.getpid(), signal.SIGINT)
        original_save(folder, state)

    monkeypatch.setattr(step_module, "compute_loss", loss_then_ctrl_c)
    monkeypatch.setattr(saving_module, "save_trainer_state", save_with_second_ctrl_c)
    logdir = tmp_path / "logs"
    try:
        rc = run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=3, save_every_n_epochs=1))
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped as KeyboardInterrupt (a traceback on the console)")
    out, err = capsys.readouterr()
    assert rc == 130 and "Traceback" not in out + err
    assert saves[-1].name.lstrip(".").startswith("interrupted-")  # it was inside that save
    run = only_run(logdir)
    names = sorted(p.name for p in (run / "ckpts").iterdir())
    log_lines = [line for line in next(run.glob("*.log")).read_text().splitlines() if "SIGINT again" in line]
    assert len(log_lines) == 1, log_lines
    if earlier:
        assert names == ["t-ep01-gs00004", "t-ep01-gs00004.safetensors"]
        assert f"newest complete checkpoint {run / 'ckpts' / 't-ep01-gs00004'} is intact" in log_lines[0]
    else:
        assert names == []
        assert "this run wrote no checkpoint" in log_lines[0]


def test_an_error_in_the_step_ends_the_run_and_its_loader_workers(tiny_sd_folder, dataset, tmp_path):
    """An exception in the main process while DataLoader workers run: the process and its workers end within
    seconds. It hung forever: the exception's traceback kept the loader alive until exit, where torch skips its
    shutdown and multiprocessing waits for workers that ignore its SIGTERM (they must, for Ctrl-C to save)."""
    raised, pids = tmp_path / "raised", tmp_path / "worker_pids"
    runner = tmp_path / "runner.py"
    runner.write_text(f"""
import os, pathlib, sys
sys.path.insert(0, {str(ROOT)!r})
import utils.run.loader as L, utils.run.loop as LP
ignore_signals, micro_step, calls = L.workers_ignore_stop_signals, LP.micro_step, []
def recording_worker_init(worker_id):
    with open({str(pids)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    ignore_signals(worker_id)
def failing_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:                 # the workers are running and prefetching by now
        pathlib.Path({str(raised)!r}).write_text("")
        raise RuntimeError("injected failure in the step")
    return micro_step(*args, **kwargs)
L.workers_ignore_stop_signals, LP.micro_step = recording_worker_init, failing_step
import train
sys.exit(train.main(sys.argv[1:]))
""")
    argv = base_args(tiny_sd_folder, dataset, tmp_path / "logs", num_workers=2, max_epochs=3)
    proc = subprocess.Popen([sys.executable, str(runner), *argv], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False
    workers = []
    try:
        assert wait_for(raised.exists, timeout=180), "training never reached its second step"
        try:
            out, _ = proc.communicate(timeout=30)  # also waits for the workers: they hold the output pipe too
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not end within 30 s of the error")
        workers = [int(p) for p in pids.read_text().split()]
    finally:
        proc.kill()
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)  # the broken behaviour's orphans must not outlive the test
    assert proc.returncode not in (0, None) and "injected failure in the step" in out
    assert len(workers) == 2 and not any(alive(pid) for pid in workers)


def _write_config(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))


def test_an_sdxl_refiner_is_refused_before_training(dataset, tmp_path, capsys):
    """A model of an architecture the trainer does not train (here the SDXL refiner: its own pipeline class,
    OpenCLIP-G alone) loaded as a supported one and failed at the first step. Its configs alone (no weights here)
    must refuse it, naming it."""
    folder = tmp_path / "refiner"
    _write_config(folder / "model_index.json", {
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
    _write_config(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", "in_channels": 4,
                                                    "addition_embed_type": "text_time", "cross_attention_dim": 1280})
    _write_config(folder / "text_encoder_2" / "config.json", {"hidden_size": 1280})
    _write_config(folder / "text_encoder" / "config.json", {"hidden_size": 768})  # what preflight looks for
    rc = run_train(base_args(folder, dataset, tmp_path / "logs"))
    err = capsys.readouterr().err
    assert_one_line_error(rc, err)
    assert err.rsplit("\r", 1)[-1] == (f"error: {folder} is a StableDiffusionXLImg2ImgPipeline model; this trainer "
                                       f"supports SD1.x, SD2.x and SDXL text-to-image models (StableDiffusionPipeline, "
                                       f"StableDiffusionXLPipeline)\n")
    # a single file, by its key names
    from safetensors.torch import save_file
    single = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(single))
    rc = run_train(base_args(single, dataset, tmp_path / "logs2"))
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, f"{single} is an SDXL refiner", "this trainer supports SD1.x, SD2.x and SDXL")


def test_every_file_of_a_run_gets_the_permissions_the_umask_gives(dataset, tmp_path):
    """Another user (a web UI's) must be able to read what the trainer writes: safetensors' save_file creates
    0600 files, so exported models, checkpoint weights and the latent cache were readable by their owner only."""
    logdir = tmp_path / "logs"
    old = os.umask(0o022)
    try:
        rc = run_train(base_args("builtin:tiny-sd", dataset, logdir, max_epochs=1, cache_latents=True,
                                 ema_decay_rate=0.9))
    finally:
        os.umask(old)
    assert rc == 0
    files, wrong = 0, []
    for root, dirs, names in os.walk(logdir):
        for d in dirs:
            if os.stat(os.path.join(root, d)).st_mode & 0o777 != 0o755:
                wrong.append((os.path.join(root, d), oct(os.stat(os.path.join(root, d)).st_mode & 0o777)))
        for n in names:
            files += 1
            mode = os.stat(os.path.join(root, n)).st_mode & 0o777
            if mode != 0o644:
                wrong.append((os.path.join(root, n), oct(mode)))
    assert not wrong, wrong[:10]
    run = only_run(logdir)
    # what was checked: the exports, checkpoint weights and state, the built-in model, the latent cache, samples
    for pattern in ("ckpts/*.safetensors", "ckpts/last-*/unet/*.safetensors", "ckpts/last-*/trainer_state.pt",
                    "ckpts/*_ema/unet/*.safetensors", "samples/*.jpg", "dataset.jsonl", "*.log", "events.out.*"):
        assert list(run.glob(pattern)), pattern
    assert list((logdir / ".models").rglob("*.safetensors")) and list((logdir / ".latent_cache").rglob("*.safetensors"))
    assert files > 30
