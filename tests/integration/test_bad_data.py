"""Bad input files through `train.py --check` and a whole run: truncated images, images failing only at load time,
names that are not UTF-8, symbolic link loops. Each ends in a clear line naming the file and never a traceback."""
import json
import logging
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.conftest import base_args, only_run, read_metrics, run_train
from utils.core.run_logging import get_logger


class CurrentStdout:
    """Writes to whatever sys.stdout is now: the run's logger keeps the stream it first saw, which pytest may
    have closed since."""
    def write(self, text):
        return sys.stdout.write(text)

    def flush(self):
        sys.stdout.flush()


@pytest.fixture()
def console(capsys):
    """Everything the run printed, stdout and stderr."""
    handler = next(h for h in get_logger().handlers if type(h) is logging.StreamHandler)
    old, handler.stream = handler.stream, CurrentStdout()  # not setStream(): it flushes the old, maybe closed, one
    yield lambda: "".join(capsys.readouterr())
    handler.stream = old


def jsonl(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def add_awkward_names(data: Path) -> None:
    """A name that is not UTF-8 (Latin-1 bytes), and links that cannot be followed."""
    Image.new("RGB", (64, 64), (200, 100, 0)).save(os.fsencode(data) + b"/caf\xe9 au lait_1.png")
    (data / "self").symlink_to("self")
    (data / "self.png").symlink_to("self.png")
    (data / "ping").symlink_to("pong")
    (data / "pong").symlink_to("ping")
    (data / "gone.jpg").symlink_to("nowhere.jpg")
    (data / "sub").mkdir()
    (data / "sub" / "up").symlink_to("..")                  # a loop through a real folder


def check_awkward_report(report: dict[str, dict]) -> None:
    cafe = report["caf\\xe9 au lait_1.png"]
    assert cafe["skipped"] is None and cafe["caption"] == "café au lait"
    assert report["self.png"]["skipped"].startswith("symbolic link loop")
    assert report["gone.jpg"]["skipped"].startswith("broken symbolic link")


def test_check_reports_non_utf8_names_and_symlink_loops(tiny_sd_folder, dataset, tmp_path, console):
    add_awkward_names(dataset)
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir) + ["--check"]) == 0
    check_awkward_report(jsonl(logdir / "t-check" / "dataset.jsonl"))
    out = console()
    assert "Traceback" not in out and "Logging error" not in out
    lines = out.splitlines()
    assert any("self.png: symbolic link loop" in line for line in lines)
    assert any(line.startswith("  ping: symbolic link loop") for line in lines)
    assert any("sub/up: folder already scanned (symlink loop?)" in line for line in lines)


def test_run_trains_non_utf8_names_and_skips_symlink_loops(tiny_sd_folder, dataset, tmp_path, console):
    add_awkward_names(dataset)
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=1, batch_size=3)) == 0
    run = only_run(logdir)
    check_awkward_report(jsonl(run / "dataset.jsonl"))
    out = console()
    assert "Traceback" not in out and "Logging error" not in out
    assert "images: 9 usable, 2 skipped" in out and "self.png: symbolic link loop" in out
    assert (run / "ckpts" / "last-t-ep01-gs00003").is_dir()


# --- images whose pixel data is broken: found by the scan's full decode, in --check and in the run -------------

def truncate(path: Path) -> Path:
    """Cut an image in half after re-saving it as noise, so the cut is in its pixel data (the header still reads)."""
    size = Image.open(path).size
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


def test_check_decodes_every_image_and_reports_truncated_ones(tiny_sd_folder, dataset, tmp_path, console):
    truncate(dataset / "img0_0.jpg")
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir) + ["--check"]) == 0
    report = jsonl(logdir / "t-check" / "dataset.jsonl")
    assert report["img0_0.jpg"]["skipped"].startswith("corrupt or truncated image data")
    assert sum(r["skipped"] is None for r in report.values()) == 7
    out = console()
    assert "images: 7 usable, 1 skipped" in out and "  img0_0.jpg: corrupt or truncated image data" in out
    assert "decoding images" in out                     # the progress bar
    assert "Traceback" not in out


def test_run_skips_a_truncated_image_before_planning_epochs(tiny_sd_folder, dataset, tmp_path, console):
    truncate(dataset / "img0_0.jpg")
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=1, batch_size=1)) == 0
    run = only_run(logdir)
    assert jsonl(run / "dataset.jsonl")["img0_0.jpg"]["skipped"].startswith("corrupt or truncated image data")
    out = console()
    assert "at load time" not in out and "Traceback" not in out
    assert "steps/epoch: 7" in out
    assert (run / "ckpts" / "last-t-ep01-gs00007").is_dir()


@pytest.mark.parametrize("check", [False, True])
def test_every_image_broken_stops_before_a_model_loads(tiny_sd_folder, dataset, tmp_path, console, monkeypatch,
                                                       check):
    import utils.run.setup as setup_module

    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(setup_module, "load_sd_model", no_model)
    for path in dataset.iterdir():
        if path.suffix in (".jpg", ".png"):
            truncate(path)
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir) + (["--check"] if check else [])) == 2
    out = console()
    assert "Traceback" not in out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no usable images in data_root" in error[0] and "8 file(s) skipped" in error[0]
    assert "a blue square_1.png: corrupt or truncated image data" in error[0] and "(and 5 more)" in error[0]
    report = jsonl((logdir / "t-check" if check else only_run(logdir)) / "dataset.jsonl")
    assert len(report) == 8 and all(r["skipped"] for r in report.values())


# --- images that pass the scan and fail at load time (changed afterwards): no step without an image -----------

def failing_loader(monkeypatch, fails):
    """The loader raises for the images `fails(name, call_number)` picks, as for a file broken after the scan."""
    import data.dataset
    from data.transforms import BadImageError
    original, calls = data.dataset.load_sample, []

    def load_sample(path, *args, **kwargs):
        calls.append(path.name)
        if fails(path.name, len(calls)):
            raise BadImageError("corrupt or truncated image data (broken after the scan)")
        return original(path, *args, **kwargs)
    monkeypatch.setattr(data.dataset, "load_sample", load_sample)
    return calls


def test_a_batch_that_fails_to_load_is_not_a_step(tiny_sd_folder, dataset, tmp_path, console, monkeypatch):
    failing_loader(monkeypatch, lambda name, _call: name == "img0_0.jpg")
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=2, batch_size=1)) == 0
    run = only_run(logdir)
    steps = [m for m in read_metrics(run) if "loss/log_step" in m]
    assert [m["step"] for m in steps] == list(range(1, 15))     # 7 of 8 batches an epoch were steps
    assert all(m["loss/log_step"] > 0 for m in steps)
    assert sorted(p.name for p in (run / "ckpts").iterdir()) == ["last-t-ep02-gs00014",
                                                                  "last-t-ep02-gs00014.safetensors"]
    out = console()
    assert "every image of a batch failed to load (img0_0.jpg); not trained" in out
    assert "done: 14 steps, 2 epochs, 14 images" in out


def test_every_image_failing_at_load_time_is_exit_2_with_nothing_saved(tiny_sd_folder, dataset, tmp_path, console,
                                                                       monkeypatch):
    calls = failing_loader(monkeypatch, lambda _name, _call: True)
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=3)) == 2
    assert len(calls) == 8                                  # one epoch tried, not three
    run = only_run(logdir)
    assert not list((run / "ckpts").iterdir())
    metrics = read_metrics(run) if (run / "metrics.jsonl").exists() else []
    assert not [m for m in metrics if "loss/log_step" in m or "loss/epoch" in m]
    out = console()
    assert "Traceback" not in out and "done:" not in out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1, out[-3000:]
    assert "epoch 1: every image failed to load (8 file(s): " in error[0] and "and 5 more" in error[0]
    assert "--check" in error[0]


def test_images_vanishing_mid_run_stop_with_exit_2_and_keep_the_trained_steps(tiny_sd_folder, dataset, tmp_path,
                                                                             console, monkeypatch):
    failing_loader(monkeypatch, lambda _name, call: call > 8)   # the first epoch loads, then every image fails
    logdir = tmp_path / "logs"
    assert run_train(base_args(tiny_sd_folder, dataset, logdir, max_epochs=3)) == 2
    run = only_run(logdir)
    assert (run / "ckpts" / "interrupted-t-ep01-gs00004").is_dir()
    assert [m["step"] for m in read_metrics(run) if "loss/log_step" in m] == [1, 2, 3, 4]
    out = console()
    assert "Traceback" not in out and "error: epoch 2: every image failed to load (8 file(s)" in out
