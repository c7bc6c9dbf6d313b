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

- factors: stacked B [E, out, r] and A [E, r, in] per weight, of values +-m 2^-b with m in
  [2^b, 2^(b+1)), i.e. |x| in [1, 2) on a grid of 2^-b. A product of two is a multiple of 2^-2b
  below 4, so any sum of them with integer coefficients summing to S in magnitude, r products a
  slot, is a multiple of 2^-2b below 4 S r; with 4 S r 2^2b <= 2^23 every such sum is exact in
  fp32 with a bit to spare, in whatever order the kernel accumulates (tensor-core chunks, split K,
  the four-slot rescale by c0 / c2 = +-1);
- the steps (`steps`): experts that cancel each other are copies (same values, memory of their
  own: `expert_values`), so every slot reads its own expert as a real switch does. In place the
  previous experts are copies of this token's and every gate is 1, so each value set appears once
  with coefficient -1 and once with +1; pristine, slots pair two copies with gates +1 and -1, and
  an odd k ends in a triple (+1, +1, -2). Pristine k = 1 alone cannot cancel with a non-zero gate:
  its gate is 0 (the same loop as any k = 1 gate). scaling = 1, so the pack's c B is exact too.

The sum is therefore exactly 0 and the GEMM writes W + 0 (in place) or W0 + 0 (pristine).

What the timing reads must cost what a real switch's reads cost, not only be as many: each weight
has factors in memory of its own (up to 4x the L2 in all, then weights of a shape take turns), and
no slot reads what another slot of the same call just read. The first version shared one pair of
factors per weight shape and put a pair's two slots on one expert; on an H100 (session 25) its
timing of gather variant 23 on q,v pristine said 1.61 ms where the switch on real factors took
1.97 ms, and the switch op kept the gather form (1.97 ms) over the pack form (1.68 ms). Reads
served from L2 are the likely cause (variant 14, the same GEMM packed, timed 1.97 on the twin as on
real factors). With factors of its own per weight (session 26, H100) the twins time the pack GEMMs
and the pristine gather GEMMs as the real switch runs them (v23 pristine: twin 1.97, real
1.85-1.99 ms; v24 all seven: 9.60 against 10.09-10.35); in place the gather form's twin timed
8-15% slow on q,v and 17 ms on all seven, where the real switch ran at 11-17 ms
(docs/kernels.md, session 26). Session 27 found the 17 ms to be the real switch's speed at the top
SM clock, which a decode runs it at (between the weight reads), and 11 ms the power-capped speed
of switches back to back. Since session 28 every timed launch runs alone after an idle gap
(`cutlass_sgmm.IDLE_CYCLES`), so the twin times at the clock a decode's switch gets.
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


def _pristine_pairs(k: int) -> int:
    """Pristine k > 1: the (+1, -1) pairs of the step; an odd k ends in a (+1, +1, -2) triple."""
    return (k - 3) // 2 if k % 2 else k // 2


def expert_values(k: int, inplace: bool) -> list[int]:
    """For each expert of the timing factors, which value set it holds: experts that cancel each
    other hold the same values in memory of their own. In place 2 k experts, expert k + j a copy
    of expert j (the previous token's experts are the copies, `steps`); pristine k experts, the two
    of a (+1, -1) pair, or the three of an odd k's (+1, +1, -2) triple, copies of one another."""
    if inplace:
        return [e % k for e in range(2 * k)]
    if k == 1:
        return [0]
    pairs = _pristine_pairs(k)
    return [j // 2 for j in range(2 * pairs)] + [pairs] * (k - 2 * pairs)


def distinct_bytes_for(device) -> float:
    """How many bytes of timing factors get memory of their own before weights of one shape share:
    4x the GPU's L2, so that a shared pair is read again only after far more than L2 holds (a real
    switch reads every weight's own factors from memory); no limit off the GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return math.inf
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    return 4 * l2


def factors(weights: list[Tensor], k: int, rank: int, inplace: bool, seed: int = 0,
            distinct_bytes: float | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Stacked (lora_A [E, r, in], lora_B [E, out, r]) for each weight (E experts as in
    `expert_values`), on the weights' device and dtype, with values whose products sum exactly in
    fp32 for this switch's K (2 k r in place, k r pristine).

    Each weight gets factors in memory of its own, as a model's are, until `distinct_bytes`
    (default `distinct_bytes_for` the device) are allocated; later weights reuse the earlier ones
    of their shape in turn (why: the module's docstring)."""
    bits = mantissa_bits(coefficient_weight(k, inplace) * rank)
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: same values on any device
    copies = torch.tensor(expert_values(k, inplace))
    device = weights[0].device if weights else "cpu"
    budget = distinct_bytes_for(device) if distinct_bytes is None else distinct_bytes
    by_shape: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
    seen: dict[tuple[int, int], int] = {}  # weights of each shape so far
    allocated = 0
    lora_A, lora_B = [], []
    for w in weights:
        shape = tuple(w.shape)
        pairs = by_shape.setdefault(shape, [])
        if not pairs:  # the shape's values, drawn once; each expert that cancels another a copy
            values = int(copies.max()) + 1
            a = exact_values((values, rank, shape[1]), bits, w.dtype, "cpu", generator)
            b = exact_values((values, shape[0], rank), bits, w.dtype, "cpu", generator)
            pairs.append((a[copies].to(w.device), b[copies].to(w.device)))
            allocated += pairs[0][0].nbytes + pairs[0][1].nbytes
        elif allocated + pairs[0][0].nbytes + pairs[0][1].nbytes <= budget:
            pairs.append((pairs[0][0].clone(), pairs[0][1].clone()))
            allocated += pairs[0][0].nbytes + pairs[0][1].nbytes
        n = seen[shape] = seen.get(shape, -1) + 1
        a, b = pairs[n % len(pairs)]
        lora_A.append(a)
        lora_B.append(b)
    return lora_A, lora_B


def steps(k: int, inplace: bool, device) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The switch steps (experts, gates, prev_experts, prev_gates; scaling 1) that a timing plan
    runs over `factors`, in turn: each slot's expert holds its own memory, its coefficient is
    non-zero (but pristine k = 1's) and the coefficients of every value set sum to 0.

    In place the previous experts are copies of this token's (experts k..2k-1 of `expert_values`)
    and every gate is 1. A call publishes its experts as the previous ones, so the two steps swap
    the roles: the first runs on previous experts k..2k-1 and leaves 0..k-1 there, the second runs
    on 0..k-1 against those, and so on; both share the previous-expert tensors. Pristine: one step,
    slots pairing copies with gates +1 and -1, an odd k ending in a triple (+1, +1, -2); k = 1
    alone cannot cancel with a non-zero gate: its gate is 0 (the loop any k = 1 gate takes)."""
    def t(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    if inplace:
        ones = t([1.0] * k, torch.float32)
        prev_experts, prev_gates = t(list(range(k, 2 * k)), torch.int64), ones.clone()
        return [(t(list(range(k)), torch.int64), ones, prev_experts, prev_gates),
                (t(list(range(k, 2 * k)), torch.int64), ones, prev_experts, prev_gates)]
    if k == 1:
        gates = [0.0]
    else:
        pairs = _pristine_pairs(k)
        gates = [1.0, -1.0] * pairs + ([1.0, 1.0, -2.0] if k % 2 else [])
    experts = t(list(range(k)), torch.int64)
    gates = t(gates, torch.float32)
    return [(experts, gates, torch.zeros_like(experts), torch.zeros_like(gates))]


def step(k: int, inplace: bool, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first of `steps`: what a timing plan's pack or slot launch runs before its GEMMs are
    timed (called again, in place it still cancels, with the previous experts then this token's)."""
    return steps(k, inplace, device)[0]
