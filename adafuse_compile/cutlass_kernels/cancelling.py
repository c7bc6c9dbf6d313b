"""Switch inputs on which SGMM adds exactly 0 while doing a real switch's work.

The CUTLASS plans time their candidate GEMMs and the pack and gather forms once per weight-set
shape, on the user's weights themselves (a second copy of every weight would double the memory).
The timing must leave the weights exactly as they were, so it needs inputs whose update is 0.
Zero gates give that, but not a real switch's work: in place with r = 64 and top-2 the gather GEMM
takes its four-slot loop only for non-zero coefficients, so zero gates time its slower generic
loop (1.2-1.3x on the H200, docs/kernels.md), and tensor cores multiplying zeros draw less power
than on real operands (the H100 power probe, session 21).

Here every slot but one case's has a non-zero coefficient and non-zero factors, and the products
still cancel exactly:

- factors: stacked B [k, out, r] and A [k, r, in], one pair per weight shape, of values
  +-m 2^-b with m in [2^b, 2^(b+1)), i.e. |x| in [1, 2) on a grid of 2^-b. A product of two is a
  multiple of 2^-2b below 4, so any sum of them with integer coefficients summing to S in
  magnitude, r products a slot, is a multiple of 2^-2b below 4 S r; with 4 S r 2^2b <= 2^23 every
  such sum is exact in fp32 with a bit to spare, in whatever order the kernel accumulates
  (tensor-core chunks, split K, the four-slot rescale by c0 / c2 = +-1);
- the step (`step`): in place, the previous experts are this token's and every gate is 1, so each
  expert appears once with coefficient -1 and once with +1; pristine, slots pair one expert with
  gates +1 and -1, and an odd k ends in a triple (+1, +1, -2) on one expert. Pristine k = 1 alone
  cannot cancel with a non-zero gate: its gate is 0 (the same loop as any k = 1 gate). scaling = 1,
  so the pack's c B is exact too.

The sum is therefore exactly 0 and the GEMM writes W + 0 (in place) or W0 + 0 (pristine). Weights
of the same shape share one pair of factors: the timing reads them from L2 where a real switch
reads each weight's own once from memory, a few per cent of the bytes, alike for both forms.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# fp32's 24-bit significand less one bit of margin (the tensor cores' alignment of addends)
EXACT_SUM_BITS = 23
MAX_BITS = 7  # bf16 holds 8 significant bits: m < 2^(b+1) must fit


def mantissa_bits(k_total: int) -> int:
    """The largest b with 4 K 2^2b <= 2^23 (every sum of K products, each below 4, exact in fp32
    with a bit to spare), at most 7. -1 if even b = 0 does not fit (K > 2^21): zero factors."""
    if k_total <= 0:
        raise ValueError(f"cancelling: K must be positive, got {k_total}")
    b = (EXACT_SUM_BITS - math.ceil(math.log2(4 * k_total))) // 2
    return min(MAX_BITS, b) if b >= 0 else -1


def coefficient_weight(k: int, inplace: bool) -> int:
    """Sum of |coefficient| over the slots of `step` (in units of one product per rank row)."""
    if inplace:
        return 2 * k
    return k + 1 if k % 2 and k > 1 else k


def exact_values(shape: tuple[int, ...], bits: int, dtype: torch.dtype, device,
                 generator: torch.Generator) -> Tensor:
    """Random +-m 2^-bits, m in [2^bits, 2^(bits+1)): |x| in [1, 2), exactly representable in
    bf16, fp16 and fp32. bits = -1: zeros."""
    if bits < 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    mant = torch.randint(2 ** bits, 2 ** (bits + 1), shape, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (sign * mant).to(torch.float32).mul_(2.0 ** -bits).to(dtype=dtype, device=device)


def factors(weights: list[Tensor], k: int, rank: int, inplace: bool,
            seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Stacked (lora_A [k, r, in], lora_B [k, out, r]) for each weight, one pair per shape,
    on the weights' device and dtype, with values whose products sum exactly in fp32 for this
    switch's K (2 k r in place, k r pristine)."""
    bits = mantissa_bits(coefficient_weight(k, inplace) * rank)
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: same values on any device
    by_shape: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    lora_A, lora_B = [], []
    for w in weights:
        out, inn = w.shape
        if (out, inn) not in by_shape:
            by_shape[(out, inn)] = (
                exact_values((k, rank, inn), bits, w.dtype, w.device, generator),
                exact_values((k, out, rank), bits, w.dtype, w.device, generator),
            )
        a, b = by_shape[(out, inn)]
        lora_A.append(a)
        lora_B.append(b)
    return lora_A, lora_B


def step(k: int, inplace: bool, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(experts, gates, prev_experts, prev_gates) of a switch (scaling 1) over `factors` whose
    coefficients cancel on each expert. In place the call publishes this token's experts and
    gates as the previous ones, which are the same values, so repeated calls keep cancelling."""
    if inplace:
        experts = torch.arange(k, dtype=torch.int64, device=device)
        gates = torch.ones(k, dtype=torch.float32, device=device)
        return experts, gates, experts.clone(), gates.clone()
    if k == 1:
        experts, gates = [0], [0.0]
    else:  # pairs (+1, -1) per expert; an odd k ends in a triple (+1, +1, -2)
        pairs = (k - 3) // 2 if k % 2 else k // 2
        experts = [j // 2 for j in range(2 * pairs)] + [pairs] * (k - 2 * pairs)
        gates = [1.0, -1.0] * pairs + ([1.0, 1.0, -2.0] if k % 2 else [])
    experts = torch.tensor(experts, dtype=torch.int64, device=device)
    gates = torch.tensor(gates, dtype=torch.float32, device=device)
    return experts, gates, torch.zeros_like(experts), torch.zeros_like(gates)
