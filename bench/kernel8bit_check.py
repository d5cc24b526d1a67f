"""GPU: the grouped AdamW8bit step with our Triton kernel (optimizer.json triton_8bit_step) against the same
optimizer with bitsandbytes' CUDA kernel, on the shapes of SD1.5's UNet + CLIP-L text encoder (fp32 weights and
gradients, random values): the optimizer step's time, and how far the weights and 8-bit states drift apart.

    python bench/kernel8bit_check.py [--steps 20] [--drift_steps 50] [--sweep]

Both optimizers start from the same weights and see the same gradients. Prints one JSON line and a table.
--sweep first times our kernel's launch shapes (elements per program, warps, code table or binary search).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.grouped8bit import GroupedAdamW8bit  # noqa: E402

HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
# (elements per program, warps, code table): the shipped shape first, then the binary search it replaced
SWEEP = [(512, 4, True), (1024, 4, True), (1024, 4, False), (256, 2, True), (512, 2, True), (1024, 8, True),
         (2048, 4, True), (2048, 8, True), (4096, 8, True)]


def sd15_shapes() -> list[torch.Size]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig())
    return [p.shape for m in (unet, text) for p in m.parameters()]


def time_steps(opt, params, grads, steps: int) -> float:
    """ms per optimizer step (gradients assigned before each step, as the backward pass leaves them)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(steps):
        for p, g in zip(params, grads[k % 2]):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def sweep(init: list[torch.Tensor], grads: list[list[torch.Tensor]], steps: int) -> None:
    """ms per step of the grouped optimizer with our kernel in each launch shape of SWEEP."""
    rows = []
    for segment, warps, lookup in SWEEP:
        params = [t.clone() for t in init]
        opt = GroupedAdamW8bit(params, **HYPER, triton=True)
        opt.triton_tuning = dict(segment=segment, num_warps=warps, lookup=lookup)
        time_steps(opt, params, grads, 3)
        rows.append({"segment": segment, "num_warps": warps, "lookup": lookup,
                     "step_ms": round(time_steps(opt, params, grads, steps), 2)})
        print(json.dumps({"sweep": rows[-1]}), flush=True)
        del opt, params
        torch.cuda.empty_cache()
    print(f"\n{'segment':>8}{'warps':>6}{'codes':>8}{'ms':>8}")
    for r in rows:
        print(f"{r['segment']:>8}{r['num_warps']:>6}{'table' if r['lookup'] else 'search':>8}{r['step_ms']:>8}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--drift_steps", type=int, default=50)
    ap.add_argument("--channels_last", type=int, default=1, help="convolution weights and gradients channels_last, "
                    "as train.json channels_last true makes them (1, the default) or contiguous (0)")
    ap.add_argument("--sweep", action="store_true", help="time our kernel's launch shapes first")
    args = ap.parse_args()
    shapes = sd15_shapes()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format

    def make(shape, scale):
        t = torch.randn(shape, device="cuda", generator=gen) * scale
        return t.contiguous(memory_format=layout) if t.dim() == 4 else t
    init = [make(s, 0.02) for s in shapes]
    grads = [[make(s, 1e-3) for s in shapes] for _ in range(2)]
    if args.sweep:
        sweep(init, grads, args.steps)
    params = {name: [t.clone() for t in init] for name in ("cuda", "triton")}
    opts = {name: GroupedAdamW8bit(params[name], **HYPER, triton=name == "triton") for name in params}
    ms = {}
    for name, opt in opts.items():
        time_steps(opt, params[name], grads, 3)   # warm-up: Triton compiles here
        ms[name] = time_steps(opt, params[name], grads, args.steps)
    for step in range(args.drift_steps):   # both have taken 3 + steps steps with the same gradients; more
        for name, opt in opts.items():
            for p, gr in zip(params[name], grads[step % 2]):
                p.grad = gr * (1 + step % 3)
            opt.step()
    a, b = params["cuda"], params["triton"]

    def norm(pairs):
        return sum(((x - y).norm() ** 2).item() for x, y in pairs) ** 0.5
    apart, moved = norm(zip(a, b)), norm(zip(a, init))   # the kernels' difference against the training's change
    codes = total = 0
    for (ia, sa), (ib, sb) in zip(opts["cuda"].state.items(), opts["triton"].state.items()):
        for key in ("state1", "state2"):
            if key in sa and sa[key].dtype == torch.uint8:
                codes += (sa[key] != sb[key]).sum().item()
                total += sa[key].numel()
    row = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
           "parameters": sum(s.numel() for s in shapes), "tensors": len(shapes), "channels_last": args.channels_last,
           "cuda_kernel_step_ms": round(ms["cuda"], 2), "triton_kernel_step_ms": round(ms["triton"], 2),
           "steps_compared": 3 + args.steps + args.drift_steps, "difference_over_change": apart / moved,
           "state_codes_differing": codes / max(total, 1)}
    print(json.dumps(row), flush=True)
    print(f"\n{'optimizer step (SD1.5, 8-bit AdamW)':<40}{'ms':>8}")
    print(f"{'grouped, bitsandbytes CUDA kernel':<40}{row['cuda_kernel_step_ms']:>8}")
    print(f"{'grouped, our Triton kernel':<40}{row['triton_kernel_step_ms']:>8}")
    print(f"after {row['steps_compared']} steps: |cuda - triton| / |cuda - start| = "
          f"{row['difference_over_change']:.2e}; state codes differing: {row['state_codes_differing']:.2e}")


if __name__ == "__main__":
    main()
