"""fused_backward_pass with overlap_optimizer_step (the 8-bit step on a second CUDA stream, alongside the backward
pass) trains exactly like the step on the main stream: the same weights, bit for bit, after a few steps of a stack
of MLP blocks in bf16 autocast, grouped AdamW8bit stepped inside the backward pass either way. Measured in
doc/PERFORMANCE.md run 12; the times printed are for this toy model, not the UNet."""
import time

import pytest
import torch

pytest.importorskip("bitsandbytes")
from optimizer.grouped8bit import Grouped8bit  # noqa: E402

STEPS = 5


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


@pytest.mark.gpu
def test_overlapped_step_trains_bit_for_bit_like_the_main_stream():
    main_stream, t_main = train(False, STEPS)
    overlapped, t_overlap = train(True, STEPS)
    print(f"\nms per step (toy model): main stream {t_main:.3f}, overlapped {t_overlap:.3f}")
    diff = max((a - b).abs().max().item() for a, b in zip(main_stream, overlapped))
    assert all(torch.equal(a, b) for a, b in zip(main_stream, overlapped)), f"max abs difference {diff}"
