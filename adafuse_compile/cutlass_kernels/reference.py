"""Plain PyTorch SGMM: the CPU implementation and the test oracle.

For every adapted weight W_l [out, in] with stacked experts A_l [N, r, in], B_l [N, out, r]:

    inplace:  W_l += sum_j s*g_j B_l[e_j] A_l[e_j] - sum_j s*pg_j B_l[pe_j] A_l[pe_j]
              (one product with K = 2*k*r: [-s*pg B(pe), s*g B(e)] @ [A(pe); A(e)])
    pristine: W_l  = W0_l + sum_j s*g_j B_l[e_j] A_l[e_j]              (K = k*r, exact)

then prev_experts / prev_gates take the current experts / gates. Every step uses device
tensor ops only (index_select, matmul, copy_), so it also captures in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gather_factors(
    lora_A: Tensor, lora_B: Tensor, experts: Tensor, coefs: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """L [out, k*r] = coef-scaled B of the selected experts side by side, R [k*r, in] = their A."""
    n_sel = experts.numel()
    r = lora_A.shape[1]
    b = lora_B.index_select(0, experts).to(dtype) * coefs.to(dtype).view(n_sel, 1, 1)
    lhs = b.permute(1, 0, 2).reshape(lora_B.shape[1], n_sel * r)
    rhs = lora_A.index_select(0, experts).to(dtype).reshape(n_sel * r, lora_A.shape[2])
    return lhs, rhs


def switch_coefficients(
    experts: Tensor, gates: Tensor, prev_experts: Tensor, prev_gates: Tensor, scaling: float,
    inplace: bool,
) -> tuple[Tensor, Tensor]:
    """The K-slot expert indices and their fp32 coefficients (previous negated, then current)."""
    cur = gates.float() * scaling
    if not inplace:
        return experts, cur
    return torch.cat([prev_experts, experts]), torch.cat([-prev_gates.float() * scaling, cur])


def reference_switch_(
    weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
    gates: Tensor, prev_experts: Tensor, prev_gates: Tensor, scaling: float,
    pristine: list[Tensor] | None = None,
) -> None:
    """SGMM in plain PyTorch: fp32 math, one product per weight, rounded once to W's dtype.

    The product is summed on its own and then added to the base, as the GPU kernels do (their
    accumulator starts at 0, the epilogue adds C): addmm on the CPU may start the sum from the
    base, which rounds each partial sum at the base's scale."""
    idx, coef = switch_coefficients(
        experts, gates, prev_experts, prev_gates, scaling, inplace=pristine is None
    )
    for i, w in enumerate(weights):
        lhs, rhs = gather_factors(lora_A[i], lora_B[i], idx, coef, torch.float32)
        base = w if pristine is None else pristine[i]
        w.copy_(base.float() + lhs @ rhs)
    prev_experts.copy_(experts)
    prev_gates.copy_(gates)


def simple_merge_switch_(
    weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
    gates: Tensor, prev_experts: Tensor, prev_gates: Tensor, scaling: float,
    pristine: list[Tensor] | None = None, impl: str = "auto",
) -> None:
    """The "simple merge" baseline: one addmm per weight, layer by layer, in W's dtype.

    `impl` is accepted for signature parity with sgmm_switch_ and ignored.
    """
    del impl
    idx, coef = switch_coefficients(
        experts, gates, prev_experts, prev_gates, scaling, inplace=pristine is None
    )
    for i, w in enumerate(weights):
        lhs, rhs = gather_factors(lora_A[i], lora_B[i], idx, coef, w.dtype)
        if pristine is None:
            w.addmm_(lhs, rhs)
        else:
            torch.addmm(pristine[i], lhs, rhs, out=w)
    prev_experts.copy_(experts)
    prev_gates.copy_(gates)


def oracle_switch(
    weights: list[Tensor], lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor,
    gates: Tensor, prev_experts: Tensor, prev_gates: Tensor, scaling: float,
    pristine: list[Tensor] | None = None,
) -> list[Tensor]:
    """float64 expected weights after the switch (nothing is mutated). For tests."""
    out = []
    for i, w in enumerate(weights):
        a = lora_A[i].double()
        b = lora_B[i].double()
        delta = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
        for e, g in zip(experts.tolist(), gates.double().tolist()):
            delta += scaling * g * (b[e] @ a[e])
        if pristine is None:
            for e, g in zip(prev_experts.tolist(), prev_gates.double().tolist()):
                delta -= scaling * g * (b[e] @ a[e])
            out.append(w.double() + delta)
        else:
            out.append(pristine[i].double() + delta)
    return out


def make_problem(
    shapes: list[tuple[int, int]], *, n_experts: int = 8, rank: int = 16, k: int = 2,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    pristine: bool = False, weight_std: float = 1.0, factor_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict:
    """Random SGMM inputs for tests and benchmarks (never zeros).

    With the defaults the update s * B A is about 0.3 x |W| per expert, so an error in the
    update is not hidden by the rounding of W. experts/prev_experts are distinct draws.
    """
    # Drawn on the target device unless a (CPU) generator is given: fast for GPU-sized tests.
    draw_on = "cpu" if generator is not None else device

    def rnd(*shape, std=1.0):
        t = torch.randn(*shape, generator=generator, dtype=torch.float32, device=draw_on) * std
        return t.to(dtype=dtype, device=device)

    weights = [rnd(o, i, std=weight_std) for o, i in shapes]
    lora_A = [rnd(n_experts, rank, i, std=factor_std / rank**0.5) for _, i in shapes]
    lora_B = [rnd(n_experts, o, rank, std=factor_std) for o, _ in shapes]

    def pick():
        e = torch.randperm(n_experts, generator=generator, device=draw_on)[:k]
        g = torch.softmax(torch.randn(k, generator=generator, device=draw_on), 0)
        return e.to(device), g.to(device)

    experts, gates = pick()
    prev_experts, prev_gates = pick()
    return dict(
        weights=weights, lora_A=lora_A, lora_B=lora_B, experts=experts, gates=gates,
        prev_experts=prev_experts, prev_gates=prev_gates, scaling=0.5,
        pristine=[rnd(o, i, std=weight_std) for o, i in shapes] if pristine else None,
    )


def oracle_then_poison(p: dict) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """For a `make_problem` dict: the weights before, the float64 oracle's result, this step's
    experts and gates; then, with pristine copies, every target set to NaN (so a switch that
    leaves an element unwritten fails the check)."""
    before = [w.clone() for w in p["weights"]]
    expected = oracle_switch(p["weights"], p["lora_A"], p["lora_B"], p["experts"], p["gates"],
                             p["prev_experts"], p["prev_gates"], p["scaling"], pristine=p["pristine"])
    e, g = p["experts"].clone(), p["gates"].clone()
    if p["pristine"] is not None:
        for w in p["weights"]:
            w.fill_(float("nan"))
    return before, expected, e, g


def delta_error(after: Tensor, before: Tensor, expected64: Tensor) -> float:
    """||(after - before) - (expected - before)|| / ||expected - before||, in float64."""
    b = before.double()
    num = (after.double() - expected64).norm()
    den = (expected64 - b).norm()
    return float(num / den)


def assert_matches_oracle(weights: list[Tensor], expected64: list[Tensor], bases: list[Tensor],
                          tol: float, what: str = "") -> None:
    """For tests: every weight written (no NaN left by `oracle_then_poison`) and its update within
    `tol` of the float64 oracle's (`delta_error` against its base: W before, or W0 in pristine)."""
    for i, (w, exp, b) in enumerate(zip(weights, expected64, bases)):
        assert torch.isfinite(w).all(), f"{what}weight {i}: unwritten elements"
        err = delta_error(w, b, exp)
        assert err < tol, f"{what}weight {i} {tuple(w.shape)}: relative error {err:.2e}"
