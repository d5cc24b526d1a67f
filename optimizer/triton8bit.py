"""Our Triton kernel for bitsandbytes' 8-bit blockwise AdamW update, over many tensors in one launch.

bitsandbytes' CUDA kernel needs one flat tensor per call, so Grouped8bit copies each chunk's gradients and weights
into flat buffers and back; its kernel then moves SD1.5's 922M parameters (about 16 bytes each) in 27 ms on an
H200, a ninth of the memory bandwidth. This kernel reads each gradient and weight where it lies (an address
table built per step), updates the weights in place and writes the chunk's 8-bit state in bitsandbytes' format:
the same 256-element blocks, absmax values and dynamic maps, so a run can resume with either kernel.

The math is bitsandbytes' CUDA kernel's (kOptimizerStatic8bit2StateBlockwise, ADAM): dequantize both moments,
update them with the gradient, step the weight with step_size = -lr * sqrt(1 - beta2^t) / (1 - beta1^t) and eps
scaled by sqrt(1 - beta2^t), then multiply it by 1 - lr * weight_decay. Where a gradient is not finite, the
weight and its moments stay unchanged (bitsandbytes' kernel keeps the weight but stores a meaningless moment).
New moments are quantized to the nearest code of their map after dividing by the block's new absmax. Results
are not bit-identical to the CUDA kernel (division and tie rounding differ); the GPU check
tests/gpu/test_triton8bit_cuda.py measures how far they are apart. The nearest code comes from a table keyed on the
value's sign, exponent and top mantissa bits (`code_table`): one lookup and one comparison with a midpoint
instead of a binary search's eight dependent loads, with the same result (tests check every bucket).

Work is cut into segments of SEGMENT elements (whole 256-element blocks) that never span two tensors. A chunk's
segment rows are fixed at its first step (`segment_rows`); per step only the addresses change (`address_table`).
With TRITON_INTERPRET=1 the kernel runs on CPU tensors through Triton's interpreter (the tests do this).
"""
from __future__ import annotations

import functools
import os

import torch

from utils.core.config_schema import ConfigError

try:   # torch's CUDA wheels bring Triton; the CPU wheel does not
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

BLOCK = 256          # bitsandbytes' blockwise quantization block
SEGMENT = 512        # elements per Triton program: 2 blocks (the fastest in run 16's sweep)
NUM_WARPS = 4
ROW_FIELDS = 6       # tensor slot, first element, elements, state elements, chunk slot, first state element
ADDRESS_FIELDS = 2   # per tensor: weight and gradient offsets from the launch's first weight and gradient
CHUNK_FIELDS = 4     # per chunk: state1, state2, absmax1, absmax2 offsets from the launch's first chunk's


def interpreting() -> bool:
    """Triton's own switch for running kernels on the CPU (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_available(device: torch.device, *, allow_interpreter: bool = False) -> None:
    """The errors a run with optimizer.json triton_8bit_step true stops with, before any model loads.
    allow_interpreter: CPU tensors are fine under TRITON_INTERPRET=1 (the optimizer's tests; never a run)."""
    if device.type != "cuda" and not (allow_interpreter and interpreting()):
        raise ConfigError(f"optimizer.json triton_8bit_step true needs a CUDA GPU (this device is {device}); "
                          f"set it to false")
    if triton is None:
        raise ConfigError("optimizer.json triton_8bit_step true: Triton is not installed here (it comes with "
                          "torch's CUDA wheels on Linux); install triton or set it to false")


def midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints between neighbouring codes of a sorted 256-entry map, padded to 256 with +inf: the code
    of x is then the number of midpoints below it (nearest code, a tie to the lower one)."""
    if qmap.numel() != 256 or not bool((qmap[1:] >= qmap[:-1]).all()):
        raise ValueError("the 8-bit map must hold 256 sorted values (bitsandbytes' create_dynamic_map)")
    mids = (qmap[:-1] + qmap[1:]) * 0.5
    return torch.cat([mids, mids.new_full((1,), float("inf"))])


# code_table: values in [-1, 1] fall into buckets by sign, exponent and the top TABLE_MANTISSA_BITS mantissa bits;
# |x| < 2^TABLE_MIN_EXPONENT is one bucket (the maps' smallest midpoints lie near 2^-22.5). With 7 bits no bucket
# holds two midpoints of bitsandbytes' maps, so a bucket's first code plus one comparison gives the nearest code.
TABLE_MANTISSA_BITS = 7
TABLE_MIN_EXPONENT = -24
_TABLE_SHIFT = 23 - TABLE_MANTISSA_BITS
_TABLE_LOW_BITS = (127 + TABLE_MIN_EXPONENT) << 23                  # float32 bits of 2^TABLE_MIN_EXPONENT
_TABLE_SIDE = ((0x3F800000 - _TABLE_LOW_BITS) >> _TABLE_SHIFT) + 1   # buckets a sign, the one holding 1.0 last


def _bucket_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest float32 of each bucket, bucket index order (negative, zero, positive)."""
    t = torch.arange(1, _TABLE_SIDE + 1, dtype=torch.int64)
    first = (_TABLE_LOW_BITS + ((t - 1) << _TABLE_SHIFT)).to(torch.int32).view(torch.float32)
    last = (_TABLE_LOW_BITS + (t << _TABLE_SHIFT) - 1).to(torch.int32).view(torch.float32)
    below_tiny = torch.tensor([_TABLE_LOW_BITS - 1], dtype=torch.int32).view(torch.float32)
    lows = torch.cat([-last.flip(0), -below_tiny, first])
    highs = torch.cat([-first.flip(0), below_tiny, last])
    return lows, highs


def code_table(mids: torch.Tensor) -> torch.Tensor:
    """For each bucket (see `table_index`), the number of midpoints below its smallest value: the nearest code
    of x is then table[bucket] + (x > mids[table[bucket]]), as long as no bucket holds two midpoints (checked).
    mids: `midpoints` of a map (255 and the +inf pad). uint8, 2 * _TABLE_SIDE + 1 entries."""
    lows, highs = _bucket_bounds()
    inner = mids[:255].float().cpu()
    first, last = torch.searchsorted(inner, lows), torch.searchsorted(inner, highs)
    if bool((last - first > 1).any()):
        raise ValueError("the 8-bit map has two midpoints in one bucket of the code table; raise "
                         "TABLE_MANTISSA_BITS")
    return first.to(torch.uint8).to(mids.device)


def kernel_maps(qmap1: torch.Tensor, qmap2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the kernel reads for quantizing: both maps, their midpoints and their code tables."""
    mids1, mids2 = midpoints(qmap1), midpoints(qmap2)
    return qmap1, qmap2, mids1, mids2, code_table(mids1), code_table(mids2)


def table_index(x: torch.Tensor) -> torch.Tensor:
    """The code-table bucket of each float32 x in [-1, 1] (the kernel's arithmetic, in torch; for tests)."""
    a = x.abs()
    t = torch.where(a < 2.0 ** TABLE_MIN_EXPONENT, 0, ((a.view(torch.int32) - _TABLE_LOW_BITS) >> _TABLE_SHIFT) + 1)
    return torch.where(x < 0, _TABLE_SIDE - t, _TABLE_SIDE + t).clamp(0, 2 * _TABLE_SIDE)


def segment_rows(numels: list[int], offsets: list[int], length: int, tensor_slot: int = 0,
                 chunk_slot: int = 0, segment: int = SEGMENT) -> torch.Tensor:
    """The rows (int32, ROW_FIELDS each) of one chunk: its tensors, at their offsets in the chunk's state, cut
    into segments of `segment` elements (a multiple of BLOCK). 'State elements' is how much of the state a
    segment writes: its whole blocks, so that the gap between a tensor's end and the next block boundary holds
    the code of 0 (as when bitsandbytes quantizes the zero-padded flat buffer), but never past the chunk's state
    (length)."""
    if segment <= 0 or segment % BLOCK:
        raise ValueError(f"segment {segment} is not a positive multiple of {BLOCK}")
    parts = []
    for k, (numel, offset) in enumerate(zip(numels, offsets)):
        if offset % BLOCK:
            raise ValueError(f"tensor {k} starts at {offset}, not at a multiple of {BLOCK}")
        start = torch.arange(0, numel, segment, dtype=torch.int64)
        n = (numel - start).clamp(max=segment)
        state_end = (offset + start + (n + BLOCK - 1) // BLOCK * BLOCK).clamp(max=length)
        parts.append(torch.stack([torch.full_like(start, tensor_slot + k), start, n, state_end - offset - start,
                                  torch.full_like(start, chunk_slot), offset + start], dim=1))
    return torch.cat(parts).to(torch.int32) if parts else torch.zeros(0, ROW_FIELDS, dtype=torch.int32)


def _offsets(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's address as an element offset from the first's (the kernel indexes from that one pointer)."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    out = []
    for t in tensors:
        delta = t.data_ptr() - base
        if delta % size:
            raise ValueError("tensors of one dtype at addresses that are not a whole number of elements apart")
        out.append(delta // size)
    return out


def address_table(params: list[torch.Tensor], grads: list[torch.Tensor],
                  states: list[tuple[torch.Tensor, ...]]) -> tuple[list[int], bool]:
    """The per-step table: (weight, gradient) offsets per tensor, then (state1, state2, absmax1, absmax2)
    offsets per chunk; and whether every address is 16-byte aligned (then the kernel may use vector loads)."""
    p_off, g_off = _offsets(params), _offsets(grads)
    columns = [_offsets([s[i] for s in states]) for i in range(CHUNK_FIELDS)]
    table = [v for pair in zip(p_off, g_off) for v in pair] + [v for row in zip(*columns) for v in row]
    aligned = all(t.data_ptr() % 16 == 0 for t in params + grads + [s for chunk in states for s in chunk])
    return table, aligned


@functools.cache
def _kernel(interpret: bool):
    """The @triton.jit function, built on first use: whether it runs in Triton's interpreter is decided when it
    is built, and `interpret` keys the cache so the interpreter's and the GPU's versions never mix. (The kernel
    must reach `tl` as a module global: the interpreter patches the module the function was defined in.)"""
    @triton.jit
    def adamw8bit_kernel(rows_ptr, table_ptr, n_tensors, p_base, g_base, s1_base, s2_base, a1_base, a2_base,
                         qmap1_ptr, qmap2_ptr, mids1_ptr, mids2_ptr, table1_ptr, table2_ptr, beta1, beta2,
                         step_size, eps, decay, seed, SEG: tl.constexpr, BLK: tl.constexpr, ALIGNED: tl.constexpr,
                         LOOKUP: tl.constexpr, TINY: tl.constexpr, LOW_BITS: tl.constexpr, SHIFT: tl.constexpr,
                         SIDE: tl.constexpr, ROUND: tl.constexpr):
        row = rows_ptr + tl.program_id(0).to(tl.int64) * 6   # ROW_FIELDS
        tensor = tl.load(row).to(tl.int64)
        start = tl.load(row + 1).to(tl.int64)
        n = tl.load(row + 2)
        n_state = tl.load(row + 3)
        chunk = tl.load(row + 4).to(tl.int64)
        s_start = tl.load(row + 5).to(tl.int64)
        p_off = tl.load(table_ptr + tensor * 2) + start
        g_off = tl.load(table_ptr + tensor * 2 + 1) + start
        states = table_ptr + n_tensors * 2 + chunk * 4   # ADDRESS_FIELDS, CHUNK_FIELDS
        s1_off = tl.load(states) + s_start
        s2_off = tl.load(states + 1) + s_start
        a1_off = tl.load(states + 2) + s_start // BLK
        a2_off = tl.load(states + 3) + s_start // BLK
        if ALIGNED:
            p_off = tl.multiple_of(p_off, 4)
            g_off = tl.multiple_of(g_off, 4)
            s1_off = tl.multiple_of(s1_off, 16)
            s2_off = tl.multiple_of(s2_off, 16)

        idx = tl.arange(0, SEG)
        valid = idx < n
        in_state = idx < n_state
        block = idx // BLK
        g = tl.load(g_base + g_off + idx, mask=valid, other=0.0).to(tl.float32)
        p_raw = tl.load(p_base + p_off + idx, mask=valid, other=0.0)
        p = p_raw.to(tl.float32)
        c1 = tl.load(s1_base + s1_off + idx, mask=valid, other=0).to(tl.int32)
        c2 = tl.load(s2_base + s2_off + idx, mask=valid, other=0).to(tl.int32)
        m1 = tl.load(a1_base + a1_off + block, mask=valid, other=0.0)
        m2 = tl.load(a2_base + a2_off + block, mask=valid, other=0.0)
        s1 = tl.where(valid, tl.load(qmap1_ptr + c1) * m1, 0.0)
        s2 = tl.where(valid, tl.load(qmap2_ptr + c2) * m2, 0.0)

        finite = (g == g) & (tl.abs(g) != float("inf"))
        s1 = tl.where(finite, s1 * beta1 + (1.0 - beta1) * g, s1)
        s2 = tl.where(finite, s2 * beta2 + (1.0 - beta2) * g * g, s2)
        new_p = (p + step_size * (s1 / (tl.sqrt(s2) + eps))) * decay
        if ROUND:   # bf16 weights: stochastic rounding (optimizer/stochastic_rounding.py), exact in the store below
            noise = (tl.randint(seed, (p_off + idx).to(tl.uint32)) & 0xFFFF).to(tl.int32)
            # inf keeps its zero mantissa and a NaN stays a NaN, as in round_to_bf16_
            new_p = ((new_p.to(tl.int32, bitcast=True) + noise) & -65536).to(tl.float32, bitcast=True)
        tl.store(p_base + p_off + idx, tl.where(finite, new_p, p).to(p_raw.dtype), mask=valid)

        blocks1 = tl.reshape(s1, (SEG // BLK, BLK))
        blocks2 = tl.reshape(s2, (SEG // BLK, BLK))
        max1 = tl.max(tl.abs(blocks1), axis=1)
        max2 = tl.max(blocks2, axis=1)
        x1 = blocks1 / tl.where(max1 > 0.0, max1, 1.0)[:, None]
        x2 = blocks2 / tl.where(max2 > 0.0, max2, 1.0)[:, None]
        if LOOKUP:   # the code table's bucket (table_index), then one comparison with the midpoint above its start
            a1 = tl.abs(x1)
            t1 = tl.where(a1 < TINY, 0, ((a1.to(tl.int32, bitcast=True) - LOW_BITS) >> SHIFT) + 1)
            k1 = tl.minimum(tl.maximum(tl.where(x1 < 0.0, SIDE - t1, SIDE + t1), 0), 2 * SIDE)
            q1 = tl.load(table1_ptr + k1).to(tl.int32)
            q1 = tl.where(x1 > tl.load(mids1_ptr + q1), q1 + 1, q1)
            t2 = tl.where(x2 < TINY, 0, ((x2.to(tl.int32, bitcast=True) - LOW_BITS) >> SHIFT) + 1)   # x2 >= 0
            k2 = tl.minimum(tl.maximum(SIDE + t2, 0), 2 * SIDE)
            q2 = tl.load(table2_ptr + k2).to(tl.int32)
            q2 = tl.where(x2 > tl.load(mids2_ptr + q2), q2 + 1, q2)
        else:        # binary search over the midpoints: the nearest code in 8 steps (the table's reference)
            q1 = tl.zeros(x1.shape, dtype=tl.int32)
            q2 = tl.zeros(x2.shape, dtype=tl.int32)
            for bit in tl.static_range(7, -1, -1):
                q1 = tl.where(x1 > tl.load(mids1_ptr + q1 + ((1 << bit) - 1)), q1 + (1 << bit), q1)
                q2 = tl.where(x2 > tl.load(mids2_ptr + q2 + ((1 << bit) - 1)), q2 + (1 << bit), q2)
        q1 = q1.to(tl.uint8)
        q2 = q2.to(tl.uint8)
        tl.store(s1_base + s1_off + idx, tl.reshape(q1, (SEG,)), mask=in_state)
        tl.store(s2_base + s2_off + idx, tl.reshape(q2, (SEG,)), mask=in_state)
        first = tl.arange(0, SEG // BLK) * BLK < n_state   # the blocks this segment owns
        tl.store(a1_base + a1_off + tl.arange(0, SEG // BLK), max1, mask=first)
        tl.store(a2_base + a2_off + tl.arange(0, SEG // BLK), max2, mask=first)

    return adamw8bit_kernel


def adamw8bit_step(rows: torch.Tensor, params: list[torch.Tensor], grads: list[torch.Tensor],
                   states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                   maps: tuple[torch.Tensor, ...], *, step: int, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float, segment: int = SEGMENT, num_warps: int = NUM_WARPS,
                   lookup: bool = True, rounding_seed: int | None = None) -> None:
    """One AdamW8bit step over `params` (contiguous, one dtype, their gradients of the same dtype) whose state
    lies in the chunks `states` ((state1, state2, absmax1, absmax2) each); rows: the launch's segment rows
    (`segment_rows` of each chunk, tensor and chunk slots numbered in the order of params and states), an int32
    tensor on the parameters' device, cut with the same `segment`; maps: `kernel_maps` on that device. All chunks
    take the same step count. lookup false finds codes by binary search (same codes, slower; for checks).
    rounding_seed: bf16 weights are rounded stochastically with this seed (None: to nearest)."""
    table, aligned = address_table(params, grads, states)
    device = params[0].device
    table = torch.tensor(table, dtype=torch.int64, pin_memory=device.type == "cuda").to(device, non_blocking=True)
    correction1 = 1.0 - beta1 ** step
    correction2 = (1.0 - beta2 ** step) ** 0.5
    s1, s2, a1, a2 = states[0]
    _kernel(interpreting())[(rows.shape[0],)](
        rows, table, len(params), params[0], grads[0], s1, s2, a1, a2, *maps, beta1, beta2,
        -lr * correction2 / correction1, correction2 * eps, 1.0 - lr * weight_decay if weight_decay > 0 else 1.0,
        (rounding_seed or 0) % 2 ** 31,
        SEG=segment, BLK=BLOCK, ALIGNED=aligned, LOOKUP=lookup, TINY=2.0 ** TABLE_MIN_EXPONENT,
        LOW_BITS=_TABLE_LOW_BITS, SHIFT=_TABLE_SHIFT, SIDE=_TABLE_SIDE, ROUND=rounding_seed is not None,
        num_warps=num_warps)
