"""Several processes (DDP through `accelerate launch`, on CPU with gloo): N processes train exactly like one process
with N-fold gradient accumulation, write one run folder, resume exactly mid-epoch, stop together when a signal
reaches only one of them, and run as one job across `--num_machines 2`. See doc/MULTI_GPU.md.

Each launch costs ~12 s here (two fresh interpreters import torch/diffusers on 2 cores); the runs are 4 steps.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import base_args, make_dataset, only_run, read_metrics, run_train, checkpoint_weights as weights
from utils.core.file_writes import TMP_SUFFIX
from utils.run.checkpoint import load_trainer_state

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 240

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(port: int, processes: int = 2, machines: int = 1, machine_rank: int = 0) -> list[str]:
    """accelerate launch on CPU. `--cpu` would start ONE process (accelerate's simple launcher does not spawn
    without mpirun); `--multi_gpu` + ACCELERATE_USE_CPU=true goes through torchrun and gives gloo processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port)]
    if machines > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return cmd + ["-m", "train"]


def launch_env(tmp: Path) -> dict:
    # HF_HOME: a user's ~/.cache/huggingface/accelerate/default_config.yaml must not change the launch
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp / "hf_home")}


def launch(tmp: Path, argv: list[str], **kw) -> subprocess.CompletedProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.run(launch_cmd(free_port(), **kw) + argv, cwd=tmp, env=launch_env(tmp), capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)


def output(proc) -> str:
    return (proc.stdout or "") + (proc.stderr or "")




def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def ckpt_names(logdir: Path) -> list[str]:
    return sorted(p.name for p in (only_run(logdir) / "ckpts").iterdir())


STEP_KEYS = ("loss/log_step", "optimizer/unet_grad_norm", "optimizer/te_grad_norm")


def step_metrics(logdir: Path) -> dict[int, tuple[float, ...]]:
    """step -> (loss, UNet grad norm, text encoder grad norm). The grad norms catch a wrongly scaled gradient,
    which Adam's updates (and so the weights) barely show: Adam divides the scale out."""
    rows = [m for m in read_metrics(only_run(logdir)) if "loss/log_step" in m]
    steps = [m["step"] for m in rows]
    assert len(steps) == len(set(steps)), f"metrics written more than once per step: {steps}"
    return {m["step"]: tuple(m[k] for k in STEP_KEYS) for m in rows}


def assert_same_steps(a: Path, b: Path, steps: set[int], rel: float = 1e-5) -> None:
    ma, mb = step_metrics(a), step_metrics(b)
    assert ma.keys() == mb.keys() == steps
    for s in steps:
        assert mb[s] == pytest.approx(ma[s], rel=rel), f"step {s}: {dict(zip(STEP_KEYS, ma[s]))} vs {mb[s]}"


@pytest.mark.parametrize("n_batches", range(1, 14))
def test_accumulation_divisor_makes_n_processes_one_process(n_batches):
    """The arithmetic the launches below check end to end, for many shapes, in microseconds: with N processes and
    grad_accum G, process r's batch i is epoch position i * N + r (epoch_batches' split, padded to a multiple of N);
    DDP averages over the N processes. Each real position must land in the optimizer step and with the weight it
    has in one process with grad_accum N * G (padding: weight 0)."""
    from utils.run.processes import accumulation_group_size, steps_per_epoch
    for n_proc in (1, 2, 3, 4):
        for accum in (1, 2, 3):
            local = math.ceil(n_batches / n_proc)
            assert steps_per_epoch(local, accum) == steps_per_epoch(n_batches, accum * n_proc)
            for r in range(n_proc):
                for i in range(local):
                    position = i * n_proc + r
                    if position >= n_batches:
                        continue  # padding: trained with weight 0
                    weight = 1 / (accumulation_group_size(i, n_batches, accum, n_proc) * n_proc)
                    assert i // accum == position // (accum * n_proc)
                    assert weight == pytest.approx(1 / accumulation_group_size(position, n_batches, accum * n_proc))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multi")


@pytest.fixture(scope="module")
def data6(work) -> Path:
    """6 images: 3 batches of 2 per epoch, so with 2 processes the epoch does not split evenly and one process gets
    a padding batch in each epoch's last step (the case where N processes and accumulation could differ)."""
    root = make_dataset(work / "data")
    for name in ("img0_0.jpg", "img0_0.txt", "a red square_1.png"):
        (root / name).unlink()
    return root


@pytest.fixture(scope="module")
def reference(tiny_sd_folder, data6, work) -> Path:
    """One process, batch 2, grad_accum 2: global batch 4, 2 steps per epoch (the last one a single batch)."""
    logdir = work / "one_process"
    assert run_train(base_args(tiny_sd_folder, data6, logdir, grad_accum=2)) == 0
    return logdir


@pytest.fixture(scope="module")
def two_processes(tiny_sd_folder, data6, work):
    """Two processes, batch 2, grad_accum 1: the same global batch of 4."""
    logdir = work / "two_processes"
    return logdir, launch(work / "cwd2", base_args(tiny_sd_folder, data6, logdir))


def test_two_processes_train_exactly_like_one_process_with_accumulation(reference, two_processes):
    logdir, proc = two_processes
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    # one run folder, one set of checkpoints, files written once (by the main process)
    run = only_run(logdir)
    assert ckpt_names(logdir) == ckpt_names(reference) == ["last-t-ep02-gs00004", "last-t-ep02-gs00004.safetensors"]
    assert (run / "dataset.jsonl").exists() and (run / "train.json").exists() and (run / f"{run.name}.log").exists()
    assert out.count("run folder:") == 1, "the console shows the main process's lines once"
    assert "effective batch: 2 x 2 GPU(s) x 1 accum = 4" in out
    # same batches in the same order with the same noise, same averaged gradient -> same weights
    a, b = only_run(reference) / "ckpts" / "last-t-ep02-gs00004", run / "ckpts" / "last-t-ep02-gs00004"
    worst = max_diff(a, b)
    assert worst <= 1e-5, f"2 processes differ from 1 process with grad_accum 2 by {worst}"
    # the logged loss is the mean over both processes' micro-batches, as one process logs it; same gradient norms
    assert_same_steps(reference, logdir, {1, 2, 3, 4})
    # images_seen counts every process's images (the padding batch not included)
    assert load_trainer_state(b)["train_state"]["images_seen"] == load_trainer_state(a)["train_state"]["images_seen"] \
        == 12


def test_resume_mid_epoch_on_two_processes_equals_the_straight_run(tiny_sd_folder, data6, work, two_processes):
    straight, proc = two_processes
    assert proc.returncode == 0, output(proc)[-4000:]
    first = work / "first"
    proc = launch(work / "cwd_first", base_args(tiny_sd_folder, data6, first, max_steps=3))
    assert proc.returncode == 0, output(proc)[-4000:]
    stopped = only_run(first) / "ckpts" / "last-t-ep01-gs00003"
    state = load_trainer_state(stopped)
    assert state["train_state"]["batches_done"] == 1 and state["processes"] == 2  # mid-epoch: 1 of 2 per process
    second = work / "second"
    proc = launch(work / "cwd_second", base_args(tiny_sd_folder, data6, second, resume_ckpt=str(stopped)))
    assert proc.returncode == 0, output(proc)[-4000:]
    worst = max_diff(only_run(straight) / "ckpts" / "last-t-ep02-gs00004",
                     only_run(second) / "ckpts" / "last-t-ep02-gs00004")
    assert worst <= 1e-6, f"resumed 2-process run differs from the straight one by {worst}"
    assert step_metrics(second)[4] == pytest.approx(step_metrics(straight)[4], rel=1e-6)


FAILS_AT_LOAD = "img1_0.jpg"
LOAD_FAILURE_RUNNER = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import data.dataset
from data.transforms import BadImageError
original = data.dataset.load_sample
failing = os.environ.get("FAIL_AT_LOAD", {FAILS_AT_LOAD!r})  # a file name, or * for every image
def load_sample(path, *args, **kwargs):  # as if the file broke after the scan (which decodes every image)
    if failing in (path.name, "*"):
        raise BadImageError("corrupt or truncated image data (broken after the scan)")
    return original(path, *args, **kwargs)
data.dataset.load_sample = load_sample
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_two_machines_one_process_each_with_accumulation_train_as_one_job(tiny_sd_folder, data6, work, monkeypatch):
    """`--num_machines 2` on one host, one process per "machine", batch 1 x grad_accum 2 (DDP's no_sync on the
    first micro-batch of each step) == one process with batch 1 x grad_accum 4. 6 batches an epoch: steps of 4 and 2.
    One image fails at load time (it passed the scan; the loader is patched), so a batch fails: that process
    must still join DDP's collectives (a stand-in batch of weight 0), and the step must equal one process's."""
    runner = work / "load_failure_runner.py"
    runner.write_text(LOAD_FAILURE_RUNNER)
    import data.dataset
    from data.transforms import BadImageError
    original = data.dataset.load_sample

    def load_sample(path, *args, **kwargs):  # the runner's patch, for the in-process reference run
        if path.name == FAILS_AT_LOAD:
            raise BadImageError("corrupt or truncated image data (broken after the scan)")
        return original(path, *args, **kwargs)
    monkeypatch.setattr(data.dataset, "load_sample", load_sample)
    assert data6.joinpath(FAILS_AT_LOAD).exists()
    adamw = work / "adamw.json"  # fp32 AdamW: adamw8bit's quantized states would turn rounding into bigger jumps
    adamw.write_text(json.dumps({"base": {"optimizer": "adamw"}}))
    reference = work / "one_process_accum4"
    assert run_train(base_args(tiny_sd_folder, data6, reference, batch_size=1, grad_accum=4,
                               optimizer_config=str(adamw))) == 0
    logdir, port = work / "two_machines", free_port()
    argv = base_args(tiny_sd_folder, data6, logdir, batch_size=1, grad_accum=2, optimizer_config=str(adamw))
    procs = []
    for machine_rank in (0, 1):
        cwd = work / f"cwd_machine{machine_rank}"
        cwd.mkdir()
        procs.append(subprocess.Popen(
            launch_cmd(port, processes=2, machines=2, machine_rank=machine_rank)[:-2] + [str(runner)] + argv, cwd=cwd,
            env=launch_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert ckpt_names(logdir) == ["last-t-ep02-gs00004", "last-t-ep02-gs00004.safetensors"]
    assert "effective batch: 1 x 2 GPU(s) x 2 accum = 4" in outs[0]
    assert "every image failed to load" in outs[0] + outs[1]
    assert_same_steps(reference, logdir, {1, 2, 3, 4})
    # Summing 4 gradients as (g0 + g2) + (g1 + g3) instead of g0 + g1 + g2 + g3 changes only rounding, but Adam
    # turns the pure rounding noise of gradients that are exactly 0 in exact arithmetic (the attention key biases:
    # softmax ignores a shift shared by all keys) into +-lr steps: measured 3e-5 on such biases, < 1e-5 elsewhere.
    worst = max_diff(only_run(reference) / "ckpts" / "last-t-ep02-gs00004",
                     only_run(logdir) / "ckpts" / "last-t-ep02-gs00004")
    assert worst <= 1e-4, f"2 machines differ from 1 process with grad_accum 4 by {worst}"


def test_every_image_failing_at_load_time_stops_all_processes_with_exit_2(tiny_sd_folder, data6, work):
    """Steps whose images all fail on every process are not steps (the stand-in batches only meet DDP's
    collectives); an epoch without a step stops every process with exit 2, no checkpoint, no hang."""
    runner = work / "load_failure_runner.py"
    runner.write_text(LOAD_FAILURE_RUNNER)
    logdir, cwd = work / "all_fail", work / "cwd_all_fail"
    cwd.mkdir()
    proc = subprocess.run(launch_cmd(free_port())[:-2] + [str(runner)] + base_args(tiny_sd_folder, data6, logdir),
                          cwd=cwd, env={**launch_env(cwd), "FAIL_AT_LOAD": "*"}, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    out = output(proc)
    assert proc.returncode != 0 and "exitcode  : 2" in out, out[-4000:]
    assert "error: epoch 1: every image failed to load (" in out
    assert ckpt_names(logdir) == []
    assert not [m for m in read_metrics(only_run(logdir)) if "loss/log_step" in m]


def test_sigterm_to_one_process_stops_all_with_one_interrupted_checkpoint(tiny_sd_folder, data6, work):
    """A scheduler may signal some processes only: the stop is agreed at the next optimizer step, so the other
    process does not wait forever in a collective; one interrupted checkpoint is written, by the main process."""
    import psutil
    logdir, cwd = work / "sigterm", work / "cwd_sigterm"
    cwd.mkdir()
    argv = base_args(tiny_sd_folder, data6, logdir, max_epochs=200, ckpt_every_n_minutes=1000, num_workers=1)
    launcher = subprocess.Popen(launch_cmd(free_port()) + argv, cwd=cwd, env=launch_env(cwd), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + LAUNCH_TIMEOUT
        while not any(p.stat().st_size > 0 for p in logdir.glob("*/metrics.jsonl")):
            assert launcher.poll() is None and time.monotonic() < end, "training never logged a step"
            time.sleep(0.2)
        # accelerate launch runs torchrun's agent in-process: the ranks are its children (DataLoader workers theirs)
        ranks = {int(child.environ()["RANK"]): child.pid for child in psutil.Process(launcher.pid).children()}
        os.kill(ranks[1], signal.SIGTERM)
        out, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert "SIGTERM received by process 1" in out and "SIGTERM: saving an interrupted checkpoint" in out, out[-4000:]
    names = ckpt_names(logdir)
    assert len(names) == 2 and names[0].startswith("interrupted-t-") and not any(TMP_SUFFIX in n for n in names), names
    state = load_trainer_state(only_run(logdir) / "ckpts" / names[0])
    assert 0 < state["train_state"]["global_step"] < 400 and f"gs{state['train_state']['global_step']:05d}" in names[0]
    assert "exitcode  : 143" in out  # the main process's code: stopped by SIGTERM (not killed, not an error)


def test_cached_latents_on_two_processes_equal_one_process(tiny_sd_folder, data6, work):
    """Each process encodes its share of the latent cache, all read the whole of it after a barrier: the run
    equals one process with the same cache and grad_accum 2."""
    cache = work / "latents"
    one, two = work / "cached_one", work / "cached_two"
    assert run_train(base_args(tiny_sd_folder, data6, one, grad_accum=2, cache_latents=True,
                               latent_cache_dir=str(work / "latents_one"))) == 0
    proc = launch(work / "cwd_cached", base_args(tiny_sd_folder, data6, two, cache_latents=True,
                                                 latent_cache_dir=str(cache)))
    assert proc.returncode == 0, output(proc)[-4000:]
    assert len(list(cache.rglob("*.safetensors"))) == len(list((work / "latents_one").rglob("*.safetensors"))) == 6
    a, b = (only_run(d) / "ckpts" / "last-t-ep02-gs00004" for d in (one, two))
    assert max_diff(a, b) <= 1e-5


def test_sdxl_on_two_processes_trains_like_one_process_with_accumulation(tiny_sdxl_folder, data6, work):
    """Both SDXL text encoders wrapped in DDP, the pooled embedding and time ids: 2 processes x batch 2 equal one
    process with grad_accum 2 (same batches, noise and averaged gradients)."""
    one, two = work / "sdxl_one", work / "sdxl_two"
    assert run_train(base_args(tiny_sdxl_folder, data6, one, grad_accum=2)) == 0
    proc = launch(work / "cwd_sdxl", base_args(tiny_sdxl_folder, data6, two))
    assert proc.returncode == 0, output(proc)[-4000:]
    a, b = only_run(one) / "ckpts" / "last-t-ep02-gs00004", only_run(two) / "ckpts" / "last-t-ep02-gs00004"
    assert (b / "text_encoder_2").is_dir()
    worst = max_diff(a, b)
    assert worst <= 1e-5, f"2 processes differ from 1 process with grad_accum 2 by {worst}"
