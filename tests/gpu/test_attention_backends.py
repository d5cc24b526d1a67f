"""Which SDPA backend for the UNet's attention: forward + backward time of every attention call of one UNet step,
and each backend's error against fp32 math (was bench/attention_check.py; doc/PERFORMANCE.md run 11 records it).

SD1.5's UNet has 8 heads (its attention_head_dim=8 is the head count), so its head dims are 40, 80 and 160 at
320, 640 and 1280 channels; flash attention pads 40 to 64 and 80 to 128, so the fastest backend is not obvious.
SD2.1 uses head dim 64 everywhere (channels / 64 heads). For each model this times
torch.nn.functional.scaled_dot_product_attention in bf16, forward and backward, for the self- and
cross-attention shapes of one training step (SD1.5: 512 px, batch 16; SD2.1: 768 px, batch 6), with each backend
forced through torch.nn.attention.sdpa_kernel and with the default choice, weights each shape by how often one
UNet forward runs it, and prints the total per backend (`-s` shows it). Layout as diffusers' AttnProcessor2_0
calls it: (batch, seq, heads, head_dim) tensors seen as (batch, heads, seq, head_dim) through transpose(1, 2).
The CPU test runs the same code on tiny shapes (math backend and default only).
"""
from __future__ import annotations

import contextlib
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MAX_BF16_ERROR = 0.05   # worst relative error of a bf16 backend against fp32 math (run 11: at most 1.05e-2)

TEXT_TOKENS = 77
MODELS = {  # latent side (pixels / 8), batch, head dim from the channels
    "sd15": {"latent": 64, "batch": 16, "head_dim": lambda channels: channels // 8},
    "sd21": {"latent": 96, "batch": 6, "head_dim": lambda channels: 64},
}
# (channels, downsampling, transformer blocks per UNet forward): 2 down + 3 up blocks at each level, 1 mid block.
# Each transformer block has one self-attention and one cross-attention (keys and values: the 77 text tokens).
LEVELS = [(320, 1, 5), (640, 2, 5), (1280, 4, 5), (1280, 8, 1)]


def attention_shapes(model: str, smoke: bool = False) -> list[tuple[str, tuple[int, int, int, int, int], int]]:
    """(label, (batch, heads, query length, key length, head dim), calls per UNet forward)."""
    m = MODELS[model]
    shapes = []
    for channels, down, blocks in LEVELS:
        head_dim = m["head_dim"](channels)
        seq, batch = (m["latent"] // down) ** 2, m["batch"]
        if smoke:
            seq, batch = max(1, seq // 256), 1
        heads = channels // head_dim
        for kind, keys in (("self", seq), ("cross", TEXT_TOKENS)):
            shapes.append((f"{kind:<5} q{seq:<5} kv{keys:<5} {heads:>2}x{head_dim:<3}",
                           (batch, heads, seq, keys, head_dim), blocks))
    return shapes


def fwd_bwd(shape, device, dtype):
    batch, heads, q_len, kv_len, head_dim = shape
    q, k, v = (torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for n in (q_len, kv_len, kv_len))
    grad = torch.randn(batch, q_len, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)

    def step():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        torch.autograd.grad(out, (q, k, v), grad)
    return step


def max_error(shape, device, backend) -> float:
    """Worst relative difference (max |x - ref| / max |ref|) of the output and the q, k, v gradients of one bf16
    call through `backend` from the same call in fp32 through the math backend, at batch 1 (the error does not
    depend on the batch; the fp32 reference's attention matrix would be large at full batch)."""
    _, heads, q_len, kv_len, head_dim = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (torch.randn(1, n, heads, head_dim, device=device, generator=gen)
                     for n in (q_len, kv_len, kv_len, q_len))

    def run(dtype, kernel):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves))
        grads = torch.autograd.grad(out, leaves, grad.to(dtype).transpose(1, 2))
        return [out.float(), *(g.float() for g in grads)]
    ref = run(torch.float32, SDPBackend.MATH)
    # a reference that is exactly zero (the key gradient when there is a single key) has no scale to compare to
    return max(((x - r).abs().max() / r.abs().max()).item()
               for x, r in zip(run(torch.bfloat16, backend), ref) if r.abs().max() > 1e-6)


def time_ms(step, warmup: int, iters: int, cuda: bool) -> float:
    for _ in range(warmup):
        step()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check_model(model: str, backends: dict, smoke: bool) -> dict:
    """Prints the per-call table and returns {backend: total ms per UNet forward + backward, or None;
    <backend>_error: its worst relative error}. smoke: tiny shapes on the CPU."""
    device, cuda = ("cpu", False) if smoke else ("cuda", True)
    warmup, iters = (1, 2) if smoke else (3, 10)
    shapes = attention_shapes(model, smoke)
    totals, errors, refused = dict.fromkeys(backends, 0.0), dict.fromkeys(backends, 0.0), []
    print(f"\n{model}: ms per call (forward + backward), bf16, batch {shapes[0][1][0]}")
    print(f"  {'shape (heads x head dim)':<34} {'calls':>5} " + " ".join(f"{b:>10}" for b in backends))
    for label, shape, calls in shapes:
        cells = []
        for name, backend in backends.items():
            try:
                with warnings.catch_warnings():  # a refused backend warns why, then raises
                    warnings.simplefilter("ignore")
                    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                        ms = time_ms(fwd_bwd(shape, device, torch.bfloat16), warmup, iters, cuda)
                    error = max_error(shape, device, backend)
                cells.append(f"{ms:10.3f}")
                errors[name] = max(errors[name], error)
                if totals[name] is not None:
                    totals[name] += calls * ms
            except Exception as e:  # noqa: BLE001 - a backend that refuses the shape (or runs out of memory)
                cells.append(f"{'unsupported':>10}")
                totals[name] = None
                refused.append(f"  {name}, {label.strip()}: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
                               if str(e).strip() else f"  {name}, {label.strip()}: {type(e).__name__}")
        print(f"  {label:<34} {calls:>5} " + " ".join(cells))
    print(f"  {'total per UNet forward + backward':<39} " +
          " ".join(f"{t:10.2f}" if t is not None else f"{'-':>10}" for t in totals.values()))
    print(f"  {'worst relative error vs fp32 math':<39} " + " ".join(f"{e:10.2e}" for e in errors.values()))
    for line in refused:
        print(line)
    return {name: None if t is None else round(t, 3) for name, t in totals.items()} | {
        f"{name}_error": float(f"{e:.3g}") for name, e in errors.items()}


def test_attention_shapes_follow_the_unet_configs():
    sd15 = attention_shapes("sd15")
    assert sum(calls for _, _, calls in sd15) == 32          # 16 transformer blocks, self + cross each
    assert [s for _, s, _ in sd15[::2]] == [(16, 8, 4096, 4096, 40), (16, 8, 1024, 1024, 80),
                                           (16, 8, 256, 256, 160), (16, 8, 64, 64, 160)]
    assert sd15[1][1] == (16, 8, 4096, 77, 40)
    assert [s for _, s, _ in attention_shapes("sd21")[::2]] == [(6, 5, 9216, 9216, 64), (6, 10, 2304, 2304, 64),
                                                                (6, 20, 576, 576, 64), (6, 20, 144, 144, 64)]


@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_cpu_smoke_times_math_and_default(model):
    result = check_model(model, {"math": SDPBackend.MATH, "default": None}, smoke=True)
    assert set(result) == {"math", "default", "math_error", "default_error"}
    assert result["math"] > 0 and result["default"] > 0
    assert 0 < result["math_error"] < MAX_BF16_ERROR and 0 < result["default_error"] < MAX_BF16_ERROR


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_gpu_backends_agree_with_fp32_math(model):
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "default": None}
    result = check_model(model, backends, smoke=False)
    assert result["default"] is not None, "torch's own choice refused a shape of the UNet"
    assert result["flash"] is not None or result["cudnn"] is not None, "neither flash nor cuDNN attention ran"
    for name in backends:
        if result[name] is not None:
            assert result[f"{name}_error"] < MAX_BF16_ERROR, (name, result)
