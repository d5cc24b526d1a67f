"""torch.compile over aspect-ratio buckets: one static graph per batch shape, and only for the shapes worth it.

Every bucket, and every batch size within it (a bucket's short last batch, a batch that lost an unreadable image),
is another input shape. Letting dynamo turn the sizes dynamic after the second shape made inductor fail on real
data (`cannot determine truth value of Relational`, issue 25), so each shape gets a static graph of its own
(`dynamic=False`), compiled once, when the shape is first met. A cold compile costs minutes a shape, so only the
`compile_max_shapes` shapes with the most batches are compiled; the others run eagerly under
`torch.compiler.set_stance("force_eager")`. A compile that fails makes its shape run eagerly: the run goes on.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch

BatchShape = tuple[int, int, int]  # (images in the batch, width, height in pixels)


def shape_of_plan(plan) -> BatchShape:
    return (len(plan.indices), *plan.size)


def shape_of_batch(batch: dict) -> BatchShape:
    return (len(batch["captions"]), *batch["size"])


def describe_shape(shape: BatchShape) -> str:
    n, w, h = shape
    return f"{w}x{h} batch {n}"


def choose_shapes(counts: Counter, max_shapes: int) -> tuple[set[BatchShape], str | None]:
    """The `max_shapes` shapes with the most batches (ties: the larger batch, then the size), and one line for the
    log when some shapes are left uncompiled (None when all are compiled)."""
    ranked = sorted(counts, key=lambda s: (-counts[s], -s[0], s))
    chosen = set(ranked[:max_shapes])
    if len(ranked) <= max_shapes:
        return chosen, None
    share = sum(counts[s] for s in chosen) / max(1, sum(counts.values()))
    rest = ", ".join(describe_shape(s) for s in ranked[max_shapes:max_shapes + 4])
    more = f" and {len(ranked) - max_shapes - 4} more" if len(ranked) > max_shapes + 4 else ""
    return chosen, (f"torch.compile: {len(ranked)} batch shapes in this data; compiling the {max_shapes} most common "
                    f"({share:.0%} of the batches), the other {len(ranked) - max_shapes} run uncompiled ({rest}{more})"
                    f". Raise compile_max_shapes to compile more (each shape compiles once, minutes on a cold cache)")


def is_compile_error(exc: BaseException) -> bool:
    """An error raised by dynamo or inductor while compiling (BackendCompilerFailed, InductorError, ...), as opposed
    to an error of the step itself, which the eager step would raise again."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


@dataclass
class CompiledShapes:
    """Which batch shapes run compiled, what each compile cost, which compiles failed."""
    allowed: set[BatchShape]
    seconds: dict[BatchShape, float] = field(default_factory=dict)   # compile time of each compiled shape
    failed: dict[BatchShape, str] = field(default_factory=dict)      # shape -> the compile error's first line

    def runs_compiled(self, shape: BatchShape) -> bool:
        return shape in self.allowed and shape not in self.failed

    def is_new(self, shape: BatchShape) -> bool:
        return self.runs_compiled(shape) and shape not in self.seconds

    def summary(self) -> str:
        parts = [f"{describe_shape(s)} {t:.1f} s" for s, t in sorted(self.seconds.items())]
        text = f"torch.compile: {len(self.seconds)} shape(s) compiled in {sum(self.seconds.values()):.1f} s"
        text += f" ({', '.join(parts)})" if parts else ""
        if self.failed:
            text += f"; {len(self.failed)} failed and ran uncompiled"
        return text


def eager_unless(compiled: bool):
    """The context a step of a shape runs in: as compiled, or with every torch.compile'd function run eagerly."""
    return contextlib.nullcontext() if compiled else torch.compiler.set_stance("force_eager")
