"""Factor slots (the `factor` path): write the selected experts' factors into fixed slots.

    write_factor_slots_(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots, impl="auto")

For one decode token with experts e [k] and gates g [k], for every adapted linear m:

    a_slots[m] [k*r, in]   = concat_j A_m[e_j]
    b_slots[m] [out, k*r]  = concat_j scaling * g_j * B_m[e_j]

so that the adapter term is b_slots[m] @ (a_slots[m] @ x): two small products over FIXED
buffers, and the backbone weights are never written (exact by construction, nothing to restore).
The slots are static buffers, so the step replays in a CUDA graph with new experts each token.
The B scaling is done in fp32 (coefficient fp32(g_j) * fp32(scaling)) and stored in the slot
dtype.

Implementations: `reference` (PyTorch, one gather and copy per slot: 2 x M small launches and
more on a GPU) and `triton` (triton_factor_slots.py: every slot of every linear in ONE launch,
which DESIGN.md section 4 measured the write must be to pay off). `auto` = triton on CUDA when
Triton imports and the tensors suit it (one dtype per list, contiguous), else reference. The
Triton tables are built once per set of factors and slot buffers and cached on their
data_ptrs (make one warm-up call before CUDA-graph capture); after that a call is one launch,
no host sync, no host-to-device copy. Out-of-range expert ids raise in the reference; the
kernel, which cannot check without a sync, writes zero slots for them.

Importable on a CPU-only machine without Triton: it loads lazily.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from adafuse_compile.cutlass_kernels.plan_cache import PlanCache

__all__ = ["write_factor_slots_", "reference_write_factor_slots", "make_slots", "validate",
           "clear_plan_cache", "IMPLS"]

IMPLS = ("auto", "reference", "triton")

_SCHEMA = ("(Tensor[] lora_A, Tensor[] lora_B, Tensor experts, Tensor gates, float scaling, "
           "Tensor(a!)[] a_slots, Tensor(b!)[] b_slots, str impl=\"auto\") -> ()")


def validate(lora_A, lora_B, experts, gates, a_slots, b_slots) -> None:
    if not (len(lora_A) == len(lora_B) == len(a_slots) == len(b_slots)):
        raise ValueError(f"write_factor_slots_: list lengths differ: lora_A {len(lora_A)}, lora_B {len(lora_B)}, "
                         f"a_slots {len(a_slots)}, b_slots {len(b_slots)}")
    k = experts.numel()
    if gates.numel() != k:
        raise ValueError(f"write_factor_slots_: experts has {k} entries but gates has {gates.numel()}")
    if experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
        raise ValueError(f"write_factor_slots_: experts must be integer, got {experts.dtype}")
    if not gates.is_floating_point():
        raise ValueError(f"write_factor_slots_: gates must be floating point, got {gates.dtype}")
    for i, (a, b, sa, sb) in enumerate(zip(lora_A, lora_B, a_slots, b_slots)):
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            raise ValueError(f"write_factor_slots_: lora_A[{i}] {tuple(a.shape)} / lora_B[{i}] {tuple(b.shape)} "
                             "must be [N, r, in] / [N, out, r]")
        n, r, in_f = a.shape
        out_f = b.shape[1]
        if tuple(sa.shape) != (k * r, in_f) or tuple(sb.shape) != (out_f, k * r):
            raise ValueError(f"write_factor_slots_: slot {i} has shapes {tuple(sa.shape)}, {tuple(sb.shape)}; "
                             f"expected {(k * r, in_f)}, {(out_f, k * r)} for lora_A {tuple(a.shape)}")


def reference_write_factor_slots(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots) -> None:
    """Plain PyTorch: one gather and copy per slot."""
    experts = experts.reshape(-1)
    coeff = gates.reshape(-1).float() * scaling
    for a, b, sa, sb in zip(lora_A, lora_B, a_slots, b_slots):
        sa.copy_(a[experts].reshape(sa.shape))
        scaled = b[experts].float() * coeff[:, None, None]  # [k, out, r]
        sb.copy_(scaled.permute(1, 0, 2).reshape(sb.shape))


# ------------------------------------------------------------------------------------------
# Triton plans: built once per set of factors and slot buffers, cached on data_ptrs.
# ------------------------------------------------------------------------------------------
_plans = PlanCache()  # built off the CUDA-graph pool: see plan_cache.py


def clear_plan_cache() -> None:
    _plans.clear()


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _plan_key(impl, lora_A, lora_B, experts, a_slots, b_slots) -> tuple:
    return (
        impl, experts.numel(), lora_A[0].device,
        tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in lora_A),
        tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in lora_B),
        tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in a_slots),
        tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in b_slots),
    )


def _get_plan(impl, lora_A, lora_B, experts, gates, a_slots, b_slots):
    """A SlotPlan, or "reference" where `auto` cannot take the Triton kernel."""
    key = _plan_key(impl, lora_A, lora_B, experts, a_slots, b_slots)

    def build():
        validate(lora_A, lora_B, experts, gates, a_slots, b_slots)
        from adafuse_compile.cutlass_kernels import triton_factor_slots

        why = triton_factor_slots.unsupported_reason(lora_A, lora_B, experts, gates, a_slots, b_slots)
        if why is None:
            return triton_factor_slots.SlotPlan(lora_A, lora_B, a_slots, b_slots, experts.numel())
        if impl == "triton":
            raise ValueError(f"write_factor_slots_: impl 'triton' cannot take these tensors: {why}")
        warnings.warn(f"write_factor_slots_: Triton kernel not taken ({why}); using the reference", stacklevel=4)
        return "reference"
    return _plans.get(key, build, lora_A[0].device)


def _use_triton(impl: str, lora_A: list[Tensor]) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"write_factor_slots_: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference" or not lora_A:
        return False
    if impl == "triton":
        return True  # off CUDA only under TRITON_INTERPRET=1 (tests)
    return lora_A[0].device.type == "cuda" and _triton_importable()


@torch.library.custom_op("adafuse::write_factor_slots", mutates_args=("a_slots", "b_slots"), schema=_SCHEMA)
def write_factor_slots(lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor, gates: Tensor, scaling: float,
                       a_slots: list[Tensor], b_slots: list[Tensor], impl: str = "auto") -> None:
    if _use_triton(impl, lora_A):
        plan = _get_plan(impl, lora_A, lora_B, experts, gates, a_slots, b_slots)
        if plan != "reference":
            plan.run(experts.reshape(-1), gates.reshape(-1), scaling)
            return
    reference_write_factor_slots(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots)


@write_factor_slots.register_fake
def _write_factor_slots_fake(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots, impl="auto") -> None:
    validate(lora_A, lora_B, experts, gates, a_slots, b_slots)
    return None


def prepare_plan(lora_A, lora_B, top_k: int, a_slots, b_slots, impl: str = "auto") -> None:
    """Build (and cache) the plan a later call with these tensors will use, outside any CUDA-graph
    capture (the experts and gates of a call only set k)."""
    if _use_triton(impl, lora_A):
        device = lora_A[0].device
        experts = torch.zeros(top_k, dtype=torch.int64, device=device)
        _get_plan(impl, lora_A, lora_B, experts, torch.zeros(top_k, device=device), a_slots, b_slots)


def write_factor_slots_(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots, impl: str = "auto") -> None:
    """Validated entry point (the compiled graph calls the op directly, validated at compile time)."""
    validate(lora_A, lora_B, experts, gates, a_slots, b_slots)
    torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, float(scaling), a_slots, b_slots, impl)


def make_slots(lora_A: list[Tensor], lora_B: list[Tensor], top_k: int) -> tuple[list[Tensor], list[Tensor]]:
    """Zeroed slot buffers for each adapted linear (zero slots = no adapter term)."""
    a_slots = [torch.zeros(top_k * a.shape[1], a.shape[2], dtype=a.dtype, device=a.device) for a in lora_A]
    b_slots = [torch.zeros(b.shape[1], top_k * b.shape[2], dtype=b.dtype, device=b.device) for b in lora_B]
    return a_slots, b_slots
