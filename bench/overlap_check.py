"""fused_backward_pass with overlap_optimizer_step (the 8-bit step on a second CUDA stream, alongside the backward
pass) must train exactly like the step on the main stream: same weights, bit for bit, after a few steps of a
stack of MLP blocks in bf16 autocast, grouped AdamW8bit stepped inside the backward pass either way. Needs CUDA.

    python bench/overlap_check.py [--steps 5]

The last line printed is JSON: {"equal": bool, "max_abs_diff": float, "ms_per_step": {"main": ..., "overlap": ...}}
(the times are for this toy model, not the UNet).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from optimizer.grouped8bit import Grouped8bit


def train(overlap: bool, steps: int) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(),
                                                      torch.nn.Linear(4096, 1024)) for _ in range(8)]).cuda()
    opt = Grouped8bit(model.parameters(), lr=1e-3)
    opt.step_in_backward(overlap=overlap)
    gen = torch.Generator(device="cuda").manual_seed(1)
    times = []
    for _ in range(steps):
        x = torch.randn(512, 1024, device="cuda", generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return [p.detach().clone() for p in model.parameters()], 1e3 * min(times[1:] or times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    main_stream, t_main = train(False, args.steps)
    overlapped, t_overlap = train(True, args.steps)
    result = {"equal": all(torch.equal(a, b) for a, b in zip(main_stream, overlapped)),
              "max_abs_diff": max((a - b).abs().max().item() for a, b in zip(main_stream, overlapped)),
              "ms_per_step": {"main": round(t_main, 3), "overlap": round(t_overlap, 3)}}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
