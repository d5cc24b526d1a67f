"""optimizer/grouped8bit.py on CUDA: the chunked AdamW8bit / Lion8bit step is bit-identical to bitsandbytes'
per-tensor classes there too (tests/test_grouped8bit.py checks it on the CPU), on the small test model in fp32 and
bf16 and on SD1.5's parameter shapes, and it is faster than the per-tensor step (doc/OPTIMIZER.md records the
times this prints)."""
import time

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from optimizer.grouped8bit import BLOCK_SIZE, GroupedAdamW8bit, GroupedLion8bit  # noqa: E402
from tests.test_grouped8bit import HYPER, make_model  # noqa: E402

DEV = "cuda"
SD15_HYPER = {"adam": dict(lr=1e-3, weight_decay=0.01), "lion": dict(lr=1e-4, weight_decay=0.1)}


def reference(kind, params, **hyper):
    return (bnb.optim.AdamW8bit if kind == "adam" else bnb.optim.Lion8bit)(params, **hyper)


def grouped(kind, params, **kw):
    return (GroupedAdamW8bit if kind == "adam" else GroupedLion8bit)(params, **kw)


def state_mismatches(ref_opt, opt) -> int:
    """Elements of the per-chunk state (moments and absmax) that differ from bitsandbytes' per-tensor state."""
    params, ref_params = opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]
    bad = 0
    for c in opt._chunks:
        state = opt.state[params[c.indices[0]]]
        for i, off in zip(c.indices, c.offsets):
            ref, n = ref_opt.state[ref_params[i]], params[i].numel()
            for key in ("state1", "state2"):
                if key in ref:
                    bad += (state[key][off:off + n] != ref[key].flatten()).sum().item()
            for key in ("absmax1", "absmax2"):
                if key in ref:
                    first = off // BLOCK_SIZE
                    bad += (state[key][first:first + ref[key].numel()] != ref[key]).sum().item()
    return bad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_test_model_steps_bit_for_bit_like_bitsandbytes(kind, dtype):
    a, b = make_model().to(DEV, dtype), make_model().to(DEV, dtype)
    ref_opt = reference(kind, a.parameters(), **HYPER[kind])
    opt = grouped(kind, b.parameters(), **HYPER[kind], chunk_elements=32768)   # small chunks: many of them
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (ref_opt, opt)]
    for step in range(6):
        gen = torch.Generator(device=DEV).manual_seed(step)
        for i, (pa, pb) in enumerate(zip(a.parameters(), b.parameters())):
            grad = (torch.randn(pa.shape, device=DEV, generator=gen) * (1 + i % 5)).to(dtype)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        ref_opt.step()
        opt.step()
        for s in schedulers:
            s.step()
        # garbage in the shared buffers between steps: nothing may read a previous chunk's values
        for grad_buf, param_buf in opt._buffers.values():
            grad_buf.fill_(float("nan"))
            param_buf.fill_(1e30)
    diff = max((pa.float() - pb.float()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters())), f"max difference {diff}"
    assert state_mismatches(ref_opt, opt) == 0


def sd15_params(base: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(b.clone()) for b in base]
    for p, g in zip(params, grads):
        p.grad = g
    return params


@pytest.fixture(scope="module")
def sd15_tensors(sd15_shapes):
    gen = torch.Generator(device=DEV).manual_seed(0)
    base = [torch.randn(s, device=DEV, generator=gen) * 0.02 for s in sd15_shapes]
    grads = [torch.randn(s, device=DEV, generator=gen) * 1e-3 for s in sd15_shapes]
    yield base, grads
    del base, grads
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_sd15_shapes_step_bit_for_bit_like_bitsandbytes(kind, sd15_tensors):
    base, grads = sd15_tensors
    grads = [g.clone() for g in grads]
    pa, pb = sd15_params(base, grads), sd15_params(base, grads)
    ref_opt, opt = reference(kind, pa, **SD15_HYPER[kind]), grouped(kind, pb, **SD15_HYPER[kind])
    for _ in range(3):
        for g in grads:
            g.mul_(-1.1)
        ref_opt.step()
        opt.step()
    differing = sum(not torch.equal(x, y) for x, y in zip(pa, pb))
    assert differing == 0, f"{differing} of {len(pa)} tensors differ from bitsandbytes'"


def ms_per_step(opt, steps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_sd15_grouped_step_is_faster_than_per_tensor(kind, sd15_tensors):
    """bitsandbytes' per-tensor step launches a kernel per tensor from the host (69-87 ms on an H100 for adam);
    the grouped one a launch per chunk (31 ms). Only asks for faster: a real regression fails it, noise does not."""
    base, grads = sd15_tensors
    ms = {}
    for name, make in (("per-tensor", reference), ("grouped", grouped)):
        params = sd15_params(base, grads)
        opt = make(kind, params, **SD15_HYPER[kind])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ms[name] = ms_per_step(opt)
        memory = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
        print(f"\n{kind} {name}: {ms[name]:.2f} ms per step, optimizer memory {memory:.3f} GiB" +
              (f", {len(opt._chunks)} chunks" if name == "grouped" else ""))
        del opt, params
        torch.cuda.empty_cache()
    assert ms["grouped"] < ms["per-tensor"], ms
