"""Hardware and torch settings of a run: attention kernel priority, compiler switches, and torch.compile itself.

The switches are process-wide and read when a kernel is picked (SDPA, at each call or when compiling) or when a
compiled graph's backward is partitioned (at its first step), so they hold for the whole run in an ExitStack that
cleanup closes (tests run many trainers in one process).
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.sampler import epoch_batches
from utils.core.run_logging import get_logger
from utils.run.compile_shapes import CompiledShapes, choose_shapes, shape_of_plan
from utils.run.config import TrainConfig
from utils.run.run_state import Run

log = get_logger()


def sdp_priority(first: str) -> list[SDPBackend]:
    """SDPA backends in the order torch tries them: `first`, then flash, memory-efficient, math, cuDNN. Every
    backend stays enabled, so a shape the first refuses (e.g. a head dim beyond its limit) falls back instead of
    failing."""
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]
    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}[first]
    return [chosen] + [b for b in order if b != chosen]


def enter_torch_settings(cfg: TrainConfig, stack: contextlib.ExitStack) -> None:
    """The global torch switches this run asks for, entered into `stack` (closed by cleanup)."""
    if cfg.attn_type == "sdp" and cfg.sdp_backend != "auto":
        stack.enter_context(sdpa_kernel(sdp_priority(cfg.sdp_backend), set_priority=True))
    if not cfg.torch_compile:
        return
    if cfg.compile_memory_budget < 1.0:
        stack.enter_context(torch._functorch.config.patch(activation_memory_budget=cfg.compile_memory_budget))
    import torch._inductor.config as inductor
    # size asserts re-check every input of every compiled graph call on the host (the step waits on the host);
    # dynamo's guards check them already. The layout optimization: see compile_layout_optimization.
    stack.enter_context(inductor.patch(size_asserts=False, force_layout_optimization=cfg.compile_layout_optimization))
    # One graph per batch shape (utils/run/compile_shapes.py): each shape is a recompile of the same frames.
    stack.enter_context(torch._dynamo.config.patch(
        cache_size_limit=max(torch._dynamo.config.cache_size_limit, cfg.compile_max_shapes + 8)))
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        # the backward graph compiles with the forward: a failing compile then fails in the forward, before any
        # gradient is touched, and the step can run again uncompiled
        stack.enter_context(torch._functorch.config.patch(force_non_lazy_backward_lowering=True))


def compiled_when_grad_enabled(forward, mode: str | None):
    """forward compiled for training steps; with gradients off (sampling, validation) the original forward runs,
    so inference shapes compile nothing."""
    compiled = torch.compile(forward, mode=mode, dynamic=False)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else forward)(*args, **kwargs)
    return run


def compile_step_modules(run: Run) -> None:
    """torch.compile wraps only the step's modules: sampling and saving use the plain ones (sd.unet), so a sample
    at another size or batch compiles nothing (compile_blocks: the blocks inside sd.unet, compiled only while
    gradients are on). Static shapes: each batch shape the plan allows gets its own graph
    (utils/run/compile_shapes.py)."""
    cfg, models = run.cfg, run.models
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    counts = Counter(shape_of_plan(plan) for epoch in range(min(cfg.max_epochs, 3))
                     for plan in epoch_batches(run.scan.items, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                               resolutions=run.resolutions))
    allowed, note = choose_shapes(counts, cfg.compile_max_shapes)
    run.compiled_shapes = CompiledShapes(allowed)
    if note:
        log.info(note)
    if cfg.compile_blocks:
        # each block is one graph: its backward hands over its own gradients as soon as it is done, so the fused
        # step can free them block by block; sampling (no grad) keeps running the blocks as they were
        unet = models.sd.unet
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            if block is not None:
                block.forward = compiled_when_grad_enabled(block.forward, mode)
    else:
        models.unet = torch.compile(models.unet, mode=mode, dynamic=False)
    models.text_encoders = tuple(torch.compile(te, mode=mode, dynamic=False) if trained else te
                                 for te, trained in zip(models.text_encoders, models.train_text_encoders))
    log.info(f"torch.compile ({cfg.compile_mode}): each batch shape compiles at its first step; the time is logged "
             f"per shape")
