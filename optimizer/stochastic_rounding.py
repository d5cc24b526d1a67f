"""Stochastic rounding of fp32 results to bf16 weights (train.json weight_dtype bf16).

bf16 keeps 8 bits of mantissa: near a weight of 0.05 its spacing is about 2.4e-4, while an AdamW step at lr 1e-6
moves a weight by about 1e-6. Rounded to nearest, such updates are lost every step and the weights never move.
Rounded stochastically (up with probability equal to the distance from the value below, in units of the spacing)
each weight moves by the update on average, so bf16 weights learn like fp32 ones at half the memory.

The rounding adds 16 random bits to the fp32 bit pattern and clears the low 16 bits: the value rounds up exactly
when the random number exceeds the part being dropped. Adding to the bit pattern works for both signs (sign and
magnitude) and carries into the exponent correctly. The random bits come from a generator seeded by (step, where):
the same run gives the same weights, and a resumed run continues exactly.
"""
from __future__ import annotations

import torch

LOW_BITS = 16                    # fp32 has 23 mantissa bits, bf16 7: the low 16 bits go
KEEP_MASK = -(1 << LOW_BITS)     # 0xFFFF0000 as an int32


def step_seed(step: int, where: int) -> int:
    """The random stream of one optimizer step at one place (a chunk's first parameter index): distinct for each
    (step, where) pair of a run, the same when the run resumes."""
    return (step * 1_000_003 + where * 7_919 + 0x5EED) % (2 ** 63 - 1)


def round_to_bf16_(values: torch.Tensor, seed: int) -> torch.Tensor:
    """Round fp32 `values` in place to bf16-representable fp32 values, stochastically (see the module doc); a
    following copy into a bf16 tensor is then exact. inf, -inf and NaN stay what they are. Returns values."""
    if values.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes fp32 values, got {values.dtype}")
    generator = torch.Generator(device=values.device).manual_seed(seed)
    noise = torch.randint(0, 1 << LOW_BITS, values.shape, dtype=torch.int32, device=values.device,
                          generator=generator)
    # in place, no other temporary (a 63M-element embedding's update must not need four copies of it): inf and
    # -inf have a zero mantissa and come back unchanged, a NaN stays a NaN
    values.view(torch.int32).add_(noise).bitwise_and_(KEEP_MASK)
    return values
