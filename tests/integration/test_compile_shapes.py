"""torch.compile over several aspect-ratio buckets (issue 25): each batch shape compiles once and never again, a
compile that fails leaves its shape uncompiled and the run goes on, and compile_max_shapes bounds the compiles.
A recording backend stands in for inductor (CI has minutes, not the hours inductor's C++ builds would take), so
dynamo, its guards and its recompiles run as in production."""
import functools

import pytest
import torch

from tests.integration.conftest import base_args, make_dataset, only_run, read_metrics, run_train


def losses(logdir):
    return [row["loss/log_step"] for row in read_metrics(only_run(logdir)) if "loss/log_step" in row]


def run_log(logdir) -> str:
    return next(only_run(logdir).glob("*.log")).read_text()


def spatial_shapes(example_inputs) -> set:
    return {tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4}


@pytest.fixture()
def buckets(tmp_path):
    """8 images in three buckets at resolution 128 (3, 3 and 2 images): with batch 2, five batch shapes."""
    return make_dataset(tmp_path / "data", sizes=((128, 128), (192, 64), (64, 192)))


def args(model, data, logdir, **overrides):
    return base_args(model, data, logdir, **{"resolution": 128, "torch_compile": True, **overrides})


@pytest.fixture()
def compile_with(monkeypatch):
    """Route the trainer's torch.compile through `backend`; the UNet's graphs are the ones with 4-D inputs."""
    def use(backend):
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    return use


def recorded_compiles(compile_with) -> list:
    """The 4-D input shapes of every UNet graph dynamo hands to the backend, as the run goes."""
    compiled = []

    def recording(gm, example_inputs):
        if shapes := spatial_shapes(example_inputs):
            compiled.append(frozenset(shapes))
        return gm.forward
    compile_with(recording)
    return compiled


def test_each_batch_shape_compiles_once_over_two_epochs(tiny_sd_folder, buckets, tmp_path, compile_with):
    compiled = recorded_compiles(compile_with)
    logdir = tmp_path / "run"
    assert run_train(args(tiny_sd_folder, buckets, logdir, max_epochs=2, compile_max_shapes=8)) == 0
    assert len(compiled) == 5                      # three buckets, two of them with a short batch
    assert len(set(compiled)) == len(compiled)     # no shape compiled twice, in either epoch
    text = run_log(logdir)
    assert text.count("compiled in") == len(compiled) + 1   # one line per shape, and the summary
    assert "dynamic" not in text.lower()
    rows = [r for r in read_metrics(only_run(logdir)) if "performance/compile seconds" in r]
    assert len(rows) == len(compiled) and rows[-1]["performance/compile seconds"] > 0


def test_compile_max_shapes_leaves_the_rare_shapes_uncompiled(tiny_sd_folder, buckets, tmp_path, compile_with):
    compiled = recorded_compiles(compile_with)
    logdir = tmp_path / "run"
    assert run_train(args(tiny_sd_folder, buckets, logdir, compile_max_shapes=1)) == 0
    assert len(compiled) == 1
    text = run_log(logdir)
    assert "compiling the 1 most common" in text and "run uncompiled" in text


def test_a_failing_compile_runs_that_shape_uncompiled_and_training_goes_on(tiny_sd_folder, buckets, tmp_path,
                                                                           compile_with):
    """Inductor's failure of issue 25 (at the second bucket) forced in the backend: the run ends normally, with the
    same losses as an eager run, one line names the shape, and no traceback is printed."""
    first = []

    def fails_after_the_first_shape(gm, example_inputs):
        shapes = spatial_shapes(example_inputs)
        if shapes and first and shapes != first[0]:
            raise TypeError("cannot determine truth value of Relational: 320*s69*s87 < 8")
        if shapes and not first:
            first.append(shapes)
        return gm.forward
    eager = tmp_path / "eager"
    assert run_train(args(tiny_sd_folder, buckets, eager, max_epochs=1, torch_compile=False)) == 0
    compile_with(fails_after_the_first_shape)
    logdir = tmp_path / "compiled"
    assert run_train(args(tiny_sd_folder, buckets, logdir, max_epochs=1)) == 0
    assert losses(logdir) == pytest.approx(losses(eager), rel=1e-4)
    text = run_log(logdir)
    failures = [line for line in text.splitlines() if "torch.compile failed for" in line]
    assert failures and all("runs uncompiled from now on" in line for line in failures)
    assert "Traceback" not in text
    assert "failed and ran uncompiled" in text
    assert list((only_run(logdir) / "ckpts").glob("last-*"))
