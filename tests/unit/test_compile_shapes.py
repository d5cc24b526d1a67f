"""Which batch shapes torch.compile compiles, and what counts as a compile error (pure logic)."""
from collections import Counter

import torch

from utils.run.compile_shapes import CompiledShapes, choose_shapes, eager_unless, is_compile_error, shape_of_plan


def test_all_shapes_compiled_when_within_the_limit():
    counts = Counter({(16, 512, 512): 10, (16, 640, 384): 5, (3, 512, 512): 1})
    chosen, note = choose_shapes(counts, 4)
    assert chosen == set(counts) and note is None


def test_the_most_common_shapes_are_compiled_and_one_line_names_the_rest():
    counts = Counter({(16, 512, 512): 10, (16, 640, 384): 5, (16, 384, 640): 7, (3, 512, 512): 1,
                      (5, 640, 384): 1})
    chosen, note = choose_shapes(counts, 2)
    assert chosen == {(16, 512, 512), (16, 384, 640)}
    assert "5 batch shapes" in note and "compiling the 2 most common (71% of the batches)" in note
    assert "640x384 batch 16" in note and "compile_max_shapes" in note and "\n" not in note


def test_ties_prefer_full_batches_then_a_fixed_order():
    counts = Counter({(2, 64, 64): 3, (4, 96, 64): 3, (4, 64, 96): 3})
    chosen, _ = choose_shapes(counts, 2)
    assert chosen == {(4, 96, 64), (4, 64, 96)}


def test_plan_shape_is_batch_length_and_size():
    from data.sampler import BatchPlan
    assert shape_of_plan(BatchPlan([1, 2, 3], (640, 384))) == (3, 640, 384)


def test_failed_shapes_run_eagerly_and_count_in_the_summary():
    shapes = CompiledShapes({(2, 64, 64), (2, 96, 64)})
    assert shapes.is_new((2, 64, 64)) and not shapes.is_new((1, 64, 64))
    shapes.seconds[(2, 64, 64)] = 1.5
    shapes.failed[(2, 96, 64)] = "InductorError: boom"
    assert not shapes.is_new((2, 64, 64)) and not shapes.runs_compiled((2, 96, 64))
    assert shapes.summary() == ("torch.compile: 1 shape(s) compiled in 1.5 s (64x64 batch 2 1.5 s); 1 failed and ran "
                                "uncompiled")


def test_compile_errors_are_told_from_errors_of_the_step():
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError
    assert is_compile_error(BackendCompilerFailed(lambda *a: None, RuntimeError("x"), None))
    assert is_compile_error(InductorError(TypeError("cannot determine truth value of Relational"), None))
    assert not is_compile_error(RuntimeError("shape mismatch"))
    assert not is_compile_error(torch.OutOfMemoryError("oom"))


def test_force_eager_runs_a_compiled_function_without_compiling():
    calls = []

    def backend(gm, example_inputs):
        calls.append(example_inputs[0].shape)
        return gm.forward
    f = torch.compile(lambda x: x * 2, backend=backend, dynamic=False)
    with eager_unless(False):
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
    assert calls == []
    with eager_unless(True):
        f(torch.ones(3))
    assert calls == [torch.Size([3])]
