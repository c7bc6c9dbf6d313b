"""Factor slots (the `factor` path): write the selected experts' factors into fixed slots.

    write_factor_slots_(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots)

For one decode token with experts e [k] and gates g [k], for every adapted linear m:

    a_slots[m] [k*r, in]   = concat_j A_m[e_j]
    b_slots[m] [out, k*r]  = concat_j scaling * g_j * B_m[e_j]

so that the adapter term is b_slots[m] @ (a_slots[m] @ x): two small products over FIXED
buffers, and the backbone weights are never written (exact by construction, nothing to restore).
The slots are static buffers, so the step replays in a CUDA graph with new experts each token.

Only the PyTorch implementation exists so far (one copy per slot: 2 x M small launches on a GPU);
DESIGN.md section 4 measured that the write must be ONE fused launch to pay off, which is the
Triton kernel still to write (issue 6).
"""
from __future__ import annotations

import torch
from torch import Tensor

_SCHEMA = ("(Tensor[] lora_A, Tensor[] lora_B, Tensor experts, Tensor gates, float scaling, "
           "Tensor(a!)[] a_slots, Tensor(b!)[] b_slots) -> ()")


def validate(lora_A, lora_B, experts, gates, a_slots, b_slots) -> None:
    if not (len(lora_A) == len(lora_B) == len(a_slots) == len(b_slots)):
        raise ValueError(f"write_factor_slots_: list lengths differ: lora_A {len(lora_A)}, lora_B {len(lora_B)}, "
                         f"a_slots {len(a_slots)}, b_slots {len(b_slots)}")
    k = experts.numel()
    if gates.numel() != k:
        raise ValueError(f"write_factor_slots_: experts has {k} entries but gates has {gates.numel()}")
    for i, (a, b, sa, sb) in enumerate(zip(lora_A, lora_B, a_slots, b_slots)):
        n, r, in_f = a.shape
        out_f = b.shape[1]
        if tuple(sa.shape) != (k * r, in_f) or tuple(sb.shape) != (out_f, k * r):
            raise ValueError(f"write_factor_slots_: slot {i} has shapes {tuple(sa.shape)}, {tuple(sb.shape)}; "
                             f"expected {(k * r, in_f)}, {(out_f, k * r)} for lora_A {tuple(a.shape)}")


@torch.library.custom_op("adafuse::write_factor_slots", mutates_args=("a_slots", "b_slots"), schema=_SCHEMA)
def write_factor_slots(lora_A: list[Tensor], lora_B: list[Tensor], experts: Tensor, gates: Tensor, scaling: float,
                       a_slots: list[Tensor], b_slots: list[Tensor]) -> None:
    experts = experts.reshape(-1)
    coeff = gates.reshape(-1).float() * scaling
    for a, b, sa, sb in zip(lora_A, lora_B, a_slots, b_slots):
        sa.copy_(a[experts].reshape(sa.shape))
        scaled = b[experts].float() * coeff[:, None, None]  # [k, out, r]
        sb.copy_(scaled.permute(1, 0, 2).reshape(sb.shape))


@write_factor_slots.register_fake
def _write_factor_slots_fake(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots) -> None:
    return None


def write_factor_slots_(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots) -> None:
    """Validated entry point (the compiled graph calls the op directly, validated at compile time)."""
    validate(lora_A, lora_B, experts, gates, a_slots, b_slots)
    torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, scaling, a_slots, b_slots)


def make_slots(lora_A: list[Tensor], lora_B: list[Tensor], top_k: int) -> tuple[list[Tensor], list[Tensor]]:
    """Zeroed slot buffers for each adapted linear (zero slots = no adapter term)."""
    a_slots = [torch.zeros(top_k * a.shape[1], a.shape[2], dtype=a.dtype, device=a.device) for a in lora_A]
    b_slots = [torch.zeros(b.shape[1], top_k * b.shape[2], dtype=b.dtype, device=b.device) for b in lora_B]
    return a_slots, b_slots
