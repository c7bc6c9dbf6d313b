"""Packed copies of a model's expert factors for the gather path's dense prefill.

The dense prefill (gather_lora.dense_lora) contracts every expert's rank-r term over (expert,
rank). The model keeps lora_B as [N, out, r], a layout that cannot be viewed as the [out, N r]
matrix that contraction needs, so the unpacked form permutes a copy of every B on every prefill
step; the modules sharing an input (q,k,v; gate,up) also shrink in one small GEMM each. Packed,
per group of modules sharing an input:

    a_cat      [sum_m N r, in]   the group's A stacks one under the other (only for 2+ modules;
                                 a single module's A is viewed [N r, in] in place)
    b_packed_m [out_m, N r]      column n r + j = B_m[n, :, j]

Measured on the H200 at kernel level (benchmarks/bench_prefill_forms.py, one Llama-2-7B layer's
seven linears, 512 tokens): 0.460 ms against 0.506 ms unpacked (docs/paths.md, "Prefill forms").
The price is one more copy of the adapters' bytes in device memory, held by the model's gate
channel (never in its state_dict), and one host check per prefill call.

The copies must never go stale: a user may load new adapters into the same parameters
(load_state_dict copies in place) or assign new tensors, which a compiled graph cannot see.
So every call compares each source's data_ptr and version counter with those it was packed from
and re-packs what changed, into the same buffers (their addresses stay, so a recorded CUDA graph
stays valid). A source whose version cannot be read (an inference-mode tensor) is re-packed on
every call: correct, slower, and said once in a warning.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

Group = tuple[list[Tensor], list[Tensor]]  # one group's (lora_A list, lora_B list), module order


def _stamp(t: Tensor) -> tuple[int, int] | None:
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class DensePacks:
    """One model's packed factors for a set of groups; `buffers` in graph order (per group: its
    a_cat if it has two or more modules, then each module's b_packed)."""

    def __init__(self, groups: list[Group]) -> None:
        self.buffers: list[Tensor] = []
        self._sizes = [len(lora_a) for lora_a, _ in groups]  # modules per group: to split a flat list
        # (which sources a buffer packs: ("a", group) or ("b", group, module)), per buffer
        self._layout: list[tuple] = []
        for g, (lora_a, lora_b) in enumerate(groups):
            if len(lora_a) > 1:
                rows = sum(a.shape[0] * a.shape[1] for a in lora_a)
                self.buffers.append(torch.empty(rows, lora_a[0].shape[2], dtype=lora_a[0].dtype,
                                                device=lora_a[0].device))
                self._layout.append(("a", g))
            for m, b in enumerate(lora_b):
                n, out, r = b.shape
                self.buffers.append(torch.empty(out, n * r, dtype=b.dtype, device=b.device))
                self._layout.append(("b", g, m))
        self._stamps: list[list | None] = [None] * len(self.buffers)
        self._all_stamps: list | None = None  # every source's stamp at the last refresh, in order
        self._warned = False
        self.refresh(flatten(groups))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)

    def _groups(self, flat) -> list[Group]:
        groups, i = [], 0
        for m in self._sizes:
            groups.append((list(flat[i:i + m]), list(flat[i + m:i + 2 * m])))
            i += 2 * m
        return groups

    def refresh(self, flat) -> int:
        """Re-pack every buffer whose sources changed since it was packed; returns how many.
        `flat`: the sources group by group, each group's A then its B (flatten(groups)). The
        common case, nothing changed, is one list of stamps compared at once: about 60 us for the
        448 factors of a 32-layer model with all seven linears adapted (CPU, Python 3.11)."""
        try:
            stamps = [(t.data_ptr(), t._version) for t in flat]
        except RuntimeError:  # an inference tensor among them: stamped one by one below
            stamps = None
        if stamps is not None and stamps == self._all_stamps:
            return 0
        self._all_stamps = stamps
        groups = self._groups(flat)
        repacked = 0
        with torch.no_grad():
            for i, (buffer, entry) in enumerate(zip(self.buffers, self._layout)):
                sources = groups[entry[1]][0] if entry[0] == "a" else [groups[entry[1]][1][entry[2]]]
                src_stamps = [_stamp(t) for t in sources]
                if self._stamps[i] == src_stamps and None not in src_stamps:
                    continue
                if None in src_stamps and not self._warned:
                    self._warned = True
                    warnings.warn("adafuse: the expert factors are inference-mode tensors, which keep no version "
                                  "counter; the dense prefill re-packs them on every call (create the model outside "
                                  "torch.inference_mode(), or compile with options={'prefill_packed': False})",
                                  stacklevel=3)
                if entry[0] == "a":
                    torch.cat([a.reshape(-1, a.shape[-1]) for a in sources], 0, out=buffer)
                else:
                    b = sources[0]
                    buffer.view(b.shape[1], b.shape[0], b.shape[2]).copy_(b.permute(1, 0, 2))
                self._stamps[i] = src_stamps
                repacked += 1
        return repacked


def flatten(groups: list[Group]) -> list[Tensor]:
    return [t for lora_a, lora_b in groups for t in (*lora_a, *lora_b)]


def packs_for(channel, groups: list[Group]) -> DensePacks:
    """The channel's packs for these sources: made once, shared by every prefill graph (each
    prompt length compiles its own) that reads the same factors."""
    key = tuple(id(t) for lora_a, lora_b in groups for t in (*lora_a, *lora_b))
    packs = channel.dense_packs.get(key)
    if packs is None:
        packs = DensePacks(groups)
        channel.dense_packs[key] = packs
    return packs
