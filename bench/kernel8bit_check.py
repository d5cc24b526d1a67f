"""GPU: bitsandbytes' CUDA 8-bit blockwise AdamW/Lion kernel against its Triton kernel (written for Intel XPUs,
device-agnostic) on one flat tensor the size of SD1.5's UNet + text encoder: time per step, and how far the
Triton result drifts from the CUDA one (same state format: 256-element blocks, the same dynamic maps).

    python bench/kernel8bit_check.py [--elements 983000000] [--steps 10]

Prints one JSON line per optimizer and a table. Decides whether optimizer/grouped8bit.py may use the Triton kernel.
"""
import argparse
import json
import time

import bitsandbytes.functional as F
import torch
from bitsandbytes.backends.triton import kernels_optim

HYPER = {"adam": dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01),
         "lion": dict(lr=1e-5, beta1=0.9, beta2=0.99, eps=0.0, wd=0.1)}


def make_state(n: int, adam: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = torch.randn(n, device="cuda", generator=g) * 0.02
    blocks = (n + 255) // 256
    s1, a1 = torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(blocks, device="cuda")
    s2, a2 = ((torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(blocks, device="cuda")) if adam
              else (None, None))
    return [p, s1, s2, a1, a2]


def stepper(fn, kind, state, qmaps):
    p, s1, s2, a1, a2 = state
    h, adam = HYPER[kind], kind == "adam"

    def step(g, t):
        fn(kind, g, p, s1, s2, h["beta1"], h["beta2"], 0.0, 0.0, h["eps"], t, h["lr"], qmaps[0],
           qmaps[1] if adam else None, a1, a2, h["wd"], 1.0, False)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=983_000_000 // 256 * 256)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    qmaps = (F.create_dynamic_map(signed=True).cuda(), F.create_dynamic_map(signed=False).cuda())
    kernels = {"cuda": F.optimizer_update_8bit_blockwise, "triton": kernels_optim.optimizer_update_8bit_blockwise_impl}
    rows = []
    for kind in ("adam", "lion"):
        n = args.elements
        grads = [torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(100 + i)) * 1e-3
                 for i in range(2)]
        states, ms = {}, {}
        for name, fn in kernels.items():
            states[name] = make_state(n, kind == "adam")
            step = stepper(fn, kind, states[name], qmaps)
            for t in range(1, 4):    # warm-up (Triton compiles here); the same 3 steps for both kernels
                step(grads[t % 2], t)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for t in range(4, 4 + args.steps):
                step(grads[t % 2], t)
            torch.cuda.synchronize()
            ms[name] = (time.perf_counter() - t0) / args.steps * 1e3
        (pc, s1c, s2c, a1c, _), (pt, s1t, s2t, a1t, _) = states["cuda"], states["triton"]
        codes = (s1c != s1t).float().mean().item()
        codes2 = (s2c != s2t).float().mean().item() if s2c is not None else None
        row = {"kind": kind, "elements": n, "cuda_ms": round(ms["cuda"], 2), "triton_ms": round(ms["triton"], 2),
               "param_max_abs_diff": (pc - pt).abs().max().item(),
               "param_rel_diff": ((pc - pt).norm() / pc.norm()).item(),
               "state1_codes_differing": codes, "state2_codes_differing": codes2,
               "absmax1_max_rel_diff": ((a1c - a1t).abs() / a1c.abs().clamp_min(1e-30)).max().item()}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del states, grads
        torch.cuda.empty_cache()
    print(f"\n{'kind':<6}{'cuda ms':>9}{'triton ms':>10}{'param rel diff':>16}{'codes differ':>14}")
    for r in rows:
        print(f"{r['kind']:<6}{r['cuda_ms']:>9}{r['triton_ms']:>10}{r['param_rel_diff']:>16.2e}"
              f"{r['state1_codes_differing']:>14.2e}")


if __name__ == "__main__":
    main()
