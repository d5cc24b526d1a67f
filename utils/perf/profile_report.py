"""`python -m utils.benchmark --profile`: where a step's time goes, from a torch profiler trace.

Kernels by category (attention, convolution, optimizer, ...), the kernels with the most device time, and the
GPU's idle time attributed to the step's phases (the profiler ranges of utils/run/train_step.py).
"""
from __future__ import annotations

import re
import sys


# --profile: kernel categories, checked in this order (the first match wins). Attention first: flash and cuDNN
# attention kernels may contain "gemm" or "fprop"; the optimizer before "norm" (clip_grad_norm's LpNorm kernels
# belong to the optimizer step); inductor's fused kernels (triton_*) before conv/norm/copy, since inductor names
# them after every op fused in (triton_poi_fused_convolution_0 is the bias add after a conv); conv before gemm
# (cuDNN's implicit-GEMM convolutions); "norm" but not "normal" (randn's kernel).
KERNEL_CATEGORIES = [
    ("attention", r"flash|fmha|mha|sdpa|attention|attn"),
    ("optimizer", r"optimizer|bitsandbytes|adam|lion|lpnorm"),
    ("triton", r"^triton_"),
    ("conv", r"conv(?!er)|xmma_fprop|fprop_implicit|dgrad|wgrad|implicit_gemm"),
    ("gemm", r"gemm|gemv|cutlass|cublas|matmul|nvjet|^aten::(mm|addmm|bmm|baddbmm|linear)$"),
    ("norm", r"norm(?!al)|rowwisemoments|gammabeta|fusedparams|internalgradients|gradoutputcoef"),
    ("copy/cast", r"copy|memcpy|memset|(?<!broad)cast|nchwtonhwc|nhwctonchw"),
    ("elementwise", r"elementwise|vectorized|reduce"),
]
_KERNEL_PATTERNS = [(name, re.compile(pattern)) for name, pattern in KERNEL_CATEGORIES]


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel (or, without CUDA, an op) by its name; "other" when nothing matches."""
    lower = name.lower()
    return next((cat for cat, pattern in _KERNEL_PATTERNS if pattern.search(lower)), "other")


def summarize_profile(rows: list[tuple[str, float, int]], steps: int, top: int = 15) -> tuple[dict, list]:
    """rows: (kernel name, self device time in us, calls) over `steps` steps. Returns ({category: ms per step},
    largest first, rounded to 0.01) and the `top` kernels by time as (name[:90], ms per step, calls per step,
    category)."""
    totals: dict[str, float] = {}
    for name, us, _ in rows:
        totals[kernel_category(name)] = totals.get(kernel_category(name), 0.0) + us
    by_category = {cat: round(us / steps / 1e3, 2) for cat, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    ranked = sorted(rows, key=lambda r: -r[1])[:top]
    return by_category, [(name[:90], round(us / steps / 1e3, 3), round(calls / steps, 2), kernel_category(name))
                         for name, us, calls in ranked]


def profile_rows(prof, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, self time in us, calls) of the kernels (device events with device self time) or, without CUDA, of
    the CPU ops. A CPU op's own "self device time" is the time of the kernels it launched: leaving the CPU events
    out counts each kernel once. So are user annotations (record_function ranges such as "Optimizer.step#...")
    that the profiler also draws on the GPU timeline: their span covers kernels counted already."""
    from torch.autograd import DeviceType

    def first(event, *names):
        return next((getattr(event, n) for n in names if hasattr(event, n)), 0)
    rows = []
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False):
            continue
        on_device = e.device_type != DeviceType.CPU
        if cuda and on_device:
            us = first(e, "self_device_time_total", "self_cuda_time_total")
        elif not cuda and not on_device:
            us = e.self_cpu_time_total
        else:
            continue
        if us > 0:
            rows.append((e.key, us, e.count))
    return rows


def idle_by_phase(kernels: list[tuple[float, float]], phases: list[tuple[str, float, float]], start: float,
                  steps: int) -> dict:
    """Where the GPU waits for the host. kernels: (start, end) of every GPU activity; phases: (name, start, end)
    of the trainer's profiler ranges on the host (utils.run.train_step.PHASES, not nested); times in us on one clock,
    from `start` (the profiler's) to the end of the last kernel (without kernels: of the last phase). Returns
    ms per step: GPU busy, GPU idle, the idle time split by what the host was doing meanwhile ("loop": outside
    every phase), and each phase's host time (a phase whose host time exceeds its GPU work leaves the GPU
    waiting)."""
    merged: list[list[float]] = []
    for a, b in sorted(kernels):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    end = merged[-1][1] if merged else max([start] + [b for _, _, b in phases])
    gaps, cursor = [], start
    for a, b in merged:
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    per_step = 1e3 * steps
    idle = {}
    for g0, g1 in gaps:
        rest = g1 - g0
        for name, a, b in phases:
            overlap = min(b, g1) - max(a, g0)
            if overlap > 0:
                idle[name] = idle.get(name, 0.0) + overlap
                rest -= overlap
        idle["loop"] = idle.get("loop", 0.0) + max(rest, 0.0)
    host = {}
    for name, a, b in phases:
        span = min(b, end) - max(a, start)
        if span > 0:
            host[name] = host.get(name, 0.0) + span
    busy = sum(b - a for a, b in merged)
    return {"window_ms": round((end - start) / per_step, 2), "gpu_busy_ms": round(busy / per_step, 2),
            "gpu_idle_ms": round(sum(b - a for a, b in gaps) / per_step, 2),
            "idle_while_ms": {k: round(v / per_step, 2) for k, v in sorted(idle.items(), key=lambda kv: -kv[1])},
            "host_ms": {k: round(v / per_step, 2) for k, v in host.items()}}


def timeline(prof) -> tuple | None:
    """(kernels, phases, start) for idle_by_phase from a finished profiler, or None without device events."""
    from torch.autograd import DeviceType
    from utils.run.train_step import PHASES
    kernels, phases, start = [], [], None
    for e in prof.events():
        if e.device_type == DeviceType.CPU:
            start = e.time_range.start if start is None else min(start, e.time_range.start)
            if e.name in PHASES:
                phases.append((e.name, e.time_range.start, e.time_range.end))
        elif not getattr(e, "is_user_annotation", False):
            kernels.append((e.time_range.start, e.time_range.end))
    return (kernels, phases, start) if phases else None


def print_idle(idle: dict | None, host: dict) -> None:
    if idle:
        print(f"GPU per step: window {idle['window_ms']} ms, busy {idle['gpu_busy_ms']} ms, idle "
              f"{idle['gpu_idle_ms']} ms")
    print(f"  {'host phase':<32} {'host ms/step':>12} {'GPU idle meanwhile':>19}")
    for name in dict.fromkeys([*host, *(idle or {}).get("idle_while_ms", {})]):
        waiting = f"{idle['idle_while_ms'].get(name, 0.0):19.2f}" if idle else f"{'':>19}"
        print(f"  {name:<32} {host.get(name, 0.0):12.2f} {waiting}")
    sys.stdout.flush()


def print_profile(by_category: dict, top: list, steps: int, device: str) -> None:
    total = sum(by_category.values()) or 1.0
    print(f"profile: {device} self time per step by category, over {steps} steps")
    for cat, ms in by_category.items():
        print(f"  {cat:<12} {ms:10.2f} ms  {100 * ms / total:5.1f}%")
    print(f"  {'total':<12} {sum(by_category.values()):10.2f} ms")
    print(f"top {len(top)} kernels by {device} self time:")
    print(f"  {'ms/step':>9} {'calls/step':>10}  {'category':<11} name")
    for name, ms, calls, cat in top:
        print(f"  {ms:9.3f} {calls:10.2f}  {cat:<11} {name}")
    sys.stdout.flush()
