"""The chunk layout of optimizer/grouped8bit.py: which parameters are stepped together, where each starts in its
chunk's flat buffers, and which chunks keep 8-bit state. Pure torch (no bitsandbytes), planned from the parameters
alone, so a saved optimizer state maps back onto the same parameters.

    chunks = plan_chunks(params, chunk_elements=2 ** 24, direct_elements=2 ** 22)

The rules are in grouped8bit.py's docstring ("Layout").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK_SIZE = 256            # bitsandbytes' blockwise quantization block (Optimizer2State / Optimizer1State)
MIN_8BIT_SIZE = 4096        # bitsandbytes' min_8bit_size: smaller tensors keep fp32 state


@dataclass
class Chunk:
    indices: list[int]                  # positions in param_groups[0]["params"]
    offsets: list[int]                  # where each tensor starts in the chunk's flat buffers
    length: int                         # elements of the flat buffers this chunk uses
    eight_bit: bool
    device: torch.device
    dtype: torch.dtype
    direct: bool = False                # one large tensor, stepped in place (no copies) when it can be
    grad_views: list[torch.Tensor] = field(default_factory=list)    # views of the shared temporary buffers,
    param_views: list[torch.Tensor] = field(default_factory=list)   # shaped like each parameter
    gap_views: list[torch.Tensor] = field(default_factory=list)     # the gradient buffer between tensors


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _pack(indices: list[int], numels: list[int], limit: int, align: int) -> list[tuple[list[int], list[int], int]]:
    """Greedy packing in parameter order: (indices, offsets, length) per chunk; offsets are multiples of align."""
    chunks, cur_idx, cur_off, end = [], [], [], 0
    for i, n in zip(indices, numels):
        start = _round_up(end, align)
        if cur_idx and start + n > limit:
            chunks.append((cur_idx, cur_off, end))
            cur_idx, cur_off, start = [], [], 0
        cur_idx.append(i)
        cur_off.append(start)
        end = start + n
    if cur_idx:
        chunks.append((cur_idx, cur_off, end))
    return chunks


def plan_chunks(params: list[torch.Tensor], *, chunk_elements: int, direct_elements: int,
                owner: str = "Grouped8bit") -> list[Chunk]:
    """The chunk layout for these parameters (no allocation): a pure function of their order, sizes, devices and
    dtypes, and of chunk_elements / direct_elements, so a saved state maps back onto the same parameters. `owner`
    names the optimizer in the error for a sparse parameter."""
    by_key: dict[tuple, tuple[list[int], list[int]]] = {}
    for i, p in enumerate(params):
        if p.is_sparse:
            raise ValueError(f"{owner} does not support sparse parameters")
        big, small = by_key.setdefault((p.device, p.dtype), ([], []))
        (big if p.numel() >= MIN_8BIT_SIZE else small).append(i)
    chunks = []
    for (device, dtype), (big, small) in by_key.items():
        direct = [i for i in big if params[i].numel() >= direct_elements]
        packed = [i for i in big if params[i].numel() < direct_elements]
        chunks += [Chunk([i], [0], params[i].numel(), True, device, dtype, direct=True) for i in direct]
        for indices, eight_bit, align in ((packed, True, BLOCK_SIZE), (small, False, 1)):
            numels = [params[i].numel() for i in indices]
            for idx, offs, length in _pack(indices, numels, chunk_elements, align):
                chunks.append(Chunk(idx, offs, length, eight_bit, device, dtype))
    return chunks
