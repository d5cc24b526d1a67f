"""optimizer/triton8bit.py: our multi-tensor Triton kernel for the 8-bit AdamW update.

The layout helpers are pure and always tested. The kernel runs on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1) where the triton package is installed (torch's CUDA wheels bring it; the CPU wheel does
not, so CI skips those tests); the GPU check against bitsandbytes' CUDA kernel is tests/gpu/test_triton8bit_cuda.py.
The kernel is compared with `reference_update`: bitsandbytes' CUDA kernel's math written in torch, rounding to
the nearest code (bitsandbytes' CPU kernel rounds differently, so it is no reference here).
"""
import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from optimizer import grouped8bit, triton8bit  # noqa: E402
from optimizer.grouped8bit import BLOCK_SIZE, GroupedAdamW8bit  # noqa: E402
from utils.core.config_schema import ConfigError  # noqa: E402

Q1, Q2 = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def nearest_codes(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-1) - qmap).abs().argmin(-1).to(torch.uint8)


def reference_update(kind, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
                     absmax2, weight_decay, gnorm_scale=1.0, skip_zeros=False):
    """bitsandbytes' CUDA 8-bit blockwise Adam update on one flat tensor, in torch (fp32 like the kernels)."""
    assert kind == "adam" and gnorm_scale == 1.0 and not skip_zeros
    n, blocks = p.numel(), absmax1.numel()
    one = torch.tensor(1.0)
    b1, b2 = torch.tensor(beta1), torch.tensor(beta2)

    def padded(x):
        return torch.cat([x, x.new_zeros(blocks * BLOCK_SIZE - n)]).view(blocks, BLOCK_SIZE)
    gf = padded(g.float())
    finite = gf.isfinite()   # our kernel's rule: a non-finite gradient changes neither weight nor moments
    s1 = padded(qmap1[state1.long()]) * absmax1[:, None]
    s2 = padded(qmap2[state2.long()]) * absmax2[:, None]
    s1 = torch.where(finite, s1 * b1 + (one - b1) * gf, s1)
    s2 = torch.where(finite, s2 * b2 + (one - b2) * gf * gf, s2)
    c1, c2 = 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)
    old_p = padded(p.float())
    new_p = old_p + torch.tensor(-lr * c2 / c1) * (s1 / (s2.sqrt() + torch.tensor(c2 * eps)))
    if weight_decay > 0:
        new_p = new_p * torch.tensor(1.0 - lr * weight_decay)
    p.copy_(torch.where(finite, new_p, old_p).flatten()[:n].to(p.dtype))
    for s, q, codes, absmax in ((s1, qmap1, state1, absmax1), (s2, qmap2, state2, absmax2)):
        m = s.abs().amax(1)
        absmax.copy_(m)
        codes.copy_(nearest_codes(s / torch.where(m > 0, m, 1.0)[:, None], q).flatten()[:n])


def assert_near(a: torch.Tensor, b: torch.Tensor, lr: float, msg: str = "") -> None:
    """Weights equal up to float rounding, but for the few whose moments sit one code apart after a tie
    was rounded the other way: those differ by a small part of one step."""
    diff = (a - b).abs()
    assert diff.max() <= 0.05 * lr, f"{msg}: {diff.max()}"
    assert (diff > 1e-6 + 1e-5 * b.abs()).float().mean() <= 0.01, msg


def test_segment_rows_cut_tensors_into_whole_blocks_within_the_chunk():
    S = triton8bit.SEGMENT
    # a tensor of 2.5 segments at 0, a 300-element tensor at the next block boundary, a last one ending the chunk
    first = 2 * S + S // 2
    second = triton8bit.BLOCK * math.ceil(first / triton8bit.BLOCK)
    third = second + 512
    rows = triton8bit.segment_rows([first, 300, 100], [0, second, third], third + 100, tensor_slot=5, chunk_slot=2)
    assert rows.dtype == torch.int32
    assert rows.tolist() == [
        [5, 0, S, S, 2, 0], [5, S, S, S, 2, S], [5, 2 * S, S // 2, S // 2, 2, 2 * S],
        [6, 0, 300, 512, 2, second],      # writes its gap up to the next block boundary
        [7, 0, 100, 100, 2, third],       # but never past the chunk's state
    ]
    with pytest.raises(ValueError, match="not at a multiple of 256"):
        triton8bit.segment_rows([10], [100], 110)


def test_midpoints_give_the_nearest_code():
    x = torch.cat([torch.linspace(-1, 1, 20001), Q1, torch.tensor([0.0, 1.0, -1.0])])
    for q in (Q1, Q2):
        codes = torch.bucketize(x, triton8bit.midpoints(q)[:255])   # the kernel's binary search, in torch
        best = (x - q[nearest_codes(x, q).long()]).abs()
        assert ((x - q[codes]).abs() <= best + 1e-7).all()   # as near (a tie may go either way)
    with pytest.raises(ValueError, match="256 sorted values"):
        triton8bit.midpoints(Q1.flip(0))


def test_segment_rows_take_other_segment_lengths():
    rows = triton8bit.segment_rows([600], [0], 600, segment=256)
    assert rows[:, 1:4].tolist() == [[0, 256, 256], [256, 256, 256], [512, 88, 88]]
    with pytest.raises(ValueError, match="multiple of 256"):
        triton8bit.segment_rows([600], [0], 600, segment=300)


def test_code_table_gives_the_binary_search_codes():
    """table[bucket] + (x > mids[table[bucket]]) equals the number of midpoints below x (the binary search's
    code) for every bucket's edges, every midpoint and its float neighbours, and values spread over all scales."""
    torch.manual_seed(0)
    lows, highs = triton8bit._bucket_bounds()
    for q, signed in ((Q1, True), (Q2, False)):
        mids = triton8bit.midpoints(q)
        inner = mids[:255]
        spread = torch.rand(200_000) * 10.0 ** -torch.randint(0, 9, (200_000,)).float()
        x = torch.cat([lows, highs, inner, inner.nextafter(torch.tensor(2.0)), inner.nextafter(torch.tensor(-2.0)),
                       q, spread, -spread, torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0 ** -30, -(2.0 ** -30)])])
        x = x[(x.abs() <= 1.0) & ((x >= 0) | signed)]
        table = triton8bit.code_table(mids)
        base = table[triton8bit.table_index(x)].long()
        codes = base + (x > mids[base]).long()
        assert torch.equal(codes, torch.searchsorted(inner, x)), q
    crowded = torch.cat([torch.linspace(-1, 0.4, 253), torch.tensor([0.5, 0.5001, 0.5002])])
    with pytest.raises(ValueError, match="two midpoints in one bucket"):
        triton8bit.code_table(triton8bit.midpoints(crowded))


def test_address_table_holds_offsets_from_the_first_tensor():
    buf = torch.zeros(4096)
    params = [buf[0:100], buf[1024:2048]]
    grads = [buf[3000:3100], buf[2048:3072]]
    states = [(torch.zeros(8, dtype=torch.uint8),) * 2 + (torch.zeros(1),) * 2]
    table, aligned = triton8bit.address_table(params, grads, states)
    assert table == [0, 0, 1024, 2048 - 3000, 0, 0, 0, 0]
    assert aligned == (buf.data_ptr() % 16 == 0 and states[0][0].data_ptr() % 16 == 0)
    assert not triton8bit.address_table([buf[1:5], buf[8:9]], grads, states)[1]   # 4 bytes past a 16-byte boundary


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    assert triton8bit.interpreting(), "tests/conftest.py sets TRITON_INTERPRET=1 before triton loads"


def chunk_layout(numels):
    offsets, end = [], 0
    for n in numels:
        offsets.append(end)
        end = math.ceil((end + n) / BLOCK_SIZE) * BLOCK_SIZE
    return offsets, offsets[-1] + numels[-1]


def test_kernel_equals_the_reference_over_a_chunk_with_gaps(interpreter):
    torch.manual_seed(0)
    numels = [2500, 768, 1045, 4096]
    offsets, length = chunk_layout(numels)
    blocks = math.ceil(length / BLOCK_SIZE)
    params = [torch.randn(n) for n in numels]
    flat = torch.zeros(length)
    state = (torch.zeros(length, dtype=torch.uint8), torch.zeros(length, dtype=torch.uint8), torch.zeros(blocks),
             torch.zeros(blocks))
    ref_state = tuple(t.clone() for t in state)
    maps = triton8bit.kernel_maps(Q1, Q2)
    rows = triton8bit.segment_rows(numels, offsets, length)
    for o, p in zip(offsets, params):
        flat[o:o + p.numel()] = p
    lr, (beta1, beta2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    for step in range(1, 5):
        grads = [torch.randn(n) * (1 + k) for k, n in enumerate(numels)]
        if step == 3:
            grads[1][7] = float("nan")   # a non-finite gradient leaves its weight unchanged
            before = params[1][7].item()
        triton8bit.adamw8bit_step(rows, params, grads, [state], maps, step=step, lr=lr, beta1=beta1, beta2=beta2,
                                  eps=eps, weight_decay=wd)
        flat_g = torch.zeros(length)
        for o, g in zip(offsets, grads):
            flat_g[o:o + g.numel()] = g
        reference_update("adam", flat_g, flat, *ref_state[:2], beta1, beta2, 0.0, 0.0, eps, step, lr, Q1, Q2,
                         *ref_state[2:], wd)
        if step == 3:
            assert params[1][7].item() == before
        for o, p in zip(offsets, params):
            assert_near(p, flat[o:o + p.numel()], lr, f"step {step}")
        torch.testing.assert_close(state[2:], ref_state[2:], rtol=1e-4, atol=0)   # (1 - beta2) in fp32 or not
        for a, b in zip(state[:2], ref_state[:2]):
            differ = (a.int() - b.int()).abs()
            assert differ.max() <= 1 and (differ > 0).float().mean() < 1e-3   # ties rounded the other way
    gaps = [range(o + n, min(math.ceil((o + n) / BLOCK_SIZE) * BLOCK_SIZE, length))
            for o, n in zip(offsets, numels)]
    zero1 = nearest_codes(torch.tensor([0.0]), Q1).item()
    assert all(state[0][i].item() == zero1 and state[1][i].item() == 0 for gap in gaps for i in gap)


def test_kernel_codes_by_table_equal_codes_by_search(interpreter):
    """The code table and the binary search give bit-equal weights, moments and absmax values, here with
    segments of 256 and 512 elements too (the launch shapes tests/gpu/test_triton8bit_cuda.py tries)."""
    torch.manual_seed(1)
    numels = [700, 1300]
    offsets, length = chunk_layout(numels)
    blocks = math.ceil(length / BLOCK_SIZE)
    start = [torch.randn(n) for n in numels]
    grads = [[torch.randn(n) * 10.0 ** -k for k, n in enumerate(numels)] for _ in range(3)]
    results = []
    for lookup, segment in ((False, 1024), (True, 1024), (True, 256), (True, 512)):
        params = [p.clone() for p in start]
        state = (torch.zeros(length, dtype=torch.uint8), torch.zeros(length, dtype=torch.uint8),
                 torch.zeros(blocks), torch.zeros(blocks))
        rows = triton8bit.segment_rows(numels, offsets, length, segment=segment)
        for step, g in enumerate(grads, start=1):
            triton8bit.adamw8bit_step(rows, params, g, [state], triton8bit.kernel_maps(Q1, Q2), step=step, lr=1e-2,
                                      beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, segment=segment,
                                      num_warps=2, lookup=lookup)
        results.append(params + list(state))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def small_model(conv: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(60, 90),      # 5,400 + 90 (fp32 state)
                                torch.nn.Linear(90, 70),      # 6,300 + 70
                                torch.nn.Linear(70, 120))     # 8,400 (in place) + 120
    if conv:   # 4,608 + 64, a chunk of its own, channels_last as train.json channels_last makes it
        model.append(torch.nn.Conv2d(8, 64, 3).to(memory_format=torch.channels_last))
    return model


def optimizer_pair(monkeypatch, a, b):
    """The same layout with bitsandbytes' kernel (patched to the reference) and with the Triton kernel."""
    monkeypatch.setattr(grouped8bit.F, "optimizer_update_8bit_blockwise", reference_update)
    kw = dict(chunk_elements=8192, direct_elements=8000)
    return (GroupedAdamW8bit(a.parameters(), **HYPER, **kw),
            GroupedAdamW8bit(b.parameters(), **HYPER, **kw, triton=True))


def set_grads(model, step, none=()):
    g = torch.Generator().manual_seed(100 + step)
    for name, p in model.named_parameters():
        grad = torch.randn(p.shape, generator=g).contiguous(memory_format=torch.preserve_format)
        if p.dim() == 4:
            grad = grad.contiguous(memory_format=torch.channels_last)   # as autograd gives for such a weight
        if step == 2 and grad.dim() == 2:
            grad = grad.t().contiguous().t()     # not contiguous: stepped through a contiguous copy
        p.grad = None if name in none else grad


def test_grouped_optimizer_with_the_triton_kernel(monkeypatch, interpreter):
    """Same weights and state as the copying path with the reference kernel, through packed and in-place
    chunks, an LR that changes every step, a channels_last weight, a step with non-contiguous gradients and
    one with a missing gradient; the state then loads into an optimizer without the kernel."""
    a, b = small_model(conv=True), small_model(conv=True)
    ref, opt = optimizer_pair(monkeypatch, a, b)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (ref, opt)]
    launches = []
    real = triton8bit.adamw8bit_step
    monkeypatch.setattr(triton8bit, "adamw8bit_step", lambda rows, params, *args, **kw: (
        launches.append(len(params)), real(rows, params, *args, **kw)))
    for step in range(5):
        for model in (a, b):
            set_grads(model, step, none=("1.weight",) if step == 3 else ())
        ref.step()
        opt.step()
        for s in scheds:
            s.step()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert_near(pb, pa, HYPER["lr"], f"step {step}: {name}")
    # one chunk per 8-bit weight; the channels_last one launches alone, the others together; at step 2
    # (non-contiguous gradients) one launch each; at step 3 the chunk of 1.weight (no gradient) is skipped, so
    # from then on its step count differs from the others': one more launch
    assert launches == [1, 3] * 2 + [1] * 4 + [1, 2] + [1, 2, 1]
    sa, sb = ref.state_dict()["state"], opt.state_dict()["state"]
    for index in sa:
        for key, value in sa[index].items():
            if key.startswith("state") and value.dtype == torch.uint8:
                assert (value.int() - sb[index][key].int()).abs().max() <= 1, (index, key)
            elif isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, sb[index][key], rtol=1e-4, atol=1e-9)
            else:
                assert value == sb[index][key]
    c = small_model(conv=True)
    again = GroupedAdamW8bit(c.parameters(), **HYPER, chunk_elements=8192, direct_elements=8000)
    again.load_state_dict(opt.state_dict())
    set_grads(c, 9)
    again.step()


def test_backward_steps_with_the_triton_kernel(monkeypatch, interpreter):
    """fused_backward_pass: each chunk is stepped by the kernel as its gradients arrive."""
    a, b = small_model(), small_model()
    ref, opt = optimizer_pair(monkeypatch, a, b)
    opt.step_in_backward()
    x = torch.randn(8, 60, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        a(x).square().mean().backward()
        ref.step()
        ref.zero_grad(set_to_none=True)
        b(x).square().mean().backward()
        assert all(p.grad is None for p in b.parameters())
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_near(pb, pa, HYPER["lr"])


def test_triton_kernel_needs_cuda_and_adam(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = small_model()
    opt = GroupedAdamW8bit(model.parameters(), **HYPER, triton=True)
    set_grads(model, 0)
    with pytest.raises(ConfigError, match="triton_8bit_step true needs a CUDA GPU"):
        opt.step()
    with pytest.raises(ValueError, match="AdamW only"):
        grouped8bit.Grouped8bit(model.parameters(), kind="lion", triton=True)


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton8bit, "triton", None)
    with pytest.raises(ConfigError, match="Triton is not installed here .* or set it to false"):
        triton8bit.check_available(torch.device("cuda"))
