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

The copies must not go stale: a user may load new adapters into the same parameters
(load_state_dict copies in place) or assign new tensors to `.data`, which a compiled graph cannot
see. So every call compares each source's data_ptr and version counter with those it was packed
from, and whether the storage it was packed from still exists, and re-packs what changed into the
same buffers (their addresses stay, so a recorded CUDA graph stays valid). A source whose version
cannot be read (an inference-mode tensor) is re-packed on every call: correct, slower, and said
once in a warning. What no check sees: writes through `.data` (`p.data.copy_(x)`), which bypass
the version counter; after such a write, compile again (torch._dynamo.reset(): a new graph re-packs
everything), or compile with prefill_packed=False. Graphs that compute gradients of the factors are never packed.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

Group = tuple[list[Tensor], list[Tensor]]  # one group's (lora_A list, lora_B list), module order


def _stamp(t: Tensor) -> tuple[int, int] | None:
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _meta(t: Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


_expired = torch.UntypedStorage._expired  # called on StorageWeakRef.cdata: one C call each


class DensePacks:
    """One model's packed factors for a set of groups; `buffers` in graph order (per group: its
    a_cat if it has two or more modules, then each module's b_packed).

    A buffer is re-packed when one of its sources has another address or version than when it was
    packed, or when the storage it was packed from has been freed: a `.data =` assignment keeps the
    version counter and may land on the freed address. Not seen: writes through `.data`
    (`p.data.copy_(x)`), which bypass the version counter (docs/gather.md)."""

    def __init__(self, groups: list[Group]) -> None:
        flat = flatten(groups)
        self.meta = [_meta(t) for t in flat]  # what the buffers were made for
        self.buffers: list[Tensor] = []
        self._sources: list[list[int]] = []  # per buffer: the flat indices of what it packs
        self._kinds: list[str] = []  # per buffer: "a" (stacked A) or "b" (one B, [out, N r])
        self._sizes = [len(lora_a) for lora_a, _ in groups]  # modules per group: to split a flat list
        offset = 0
        for lora_a, lora_b in groups:
            m = len(lora_a)
            if m > 1:
                rows = sum(a.shape[0] * a.shape[1] for a in lora_a)
                self.buffers.append(torch.empty(rows, lora_a[0].shape[2], dtype=lora_a[0].dtype,
                                                device=lora_a[0].device))
                self._sources.append(list(range(offset, offset + m)))
                self._kinds.append("a")
            for i, b in enumerate(lora_b):
                n, out, r = b.shape
                self.buffers.append(torch.empty(out, n * r, dtype=b.dtype, device=b.device))
                self._sources.append([offset + m + i])
                self._kinds.append("b")
            offset += 2 * m
        self._stamps: list[list | None] = [None] * len(self.buffers)  # per buffer, at its last pack
        self._all_stamps: list | None = None  # every source's stamp at the last refresh, in order
        self._refs: list[StorageWeakRef] = []  # every source's storage at the last refresh
        self._ref_ids: list[int] = []
        self._warned = False
        self.refresh(flat)

    def invalidate(self) -> None:
        """Re-pack everything on the next refresh (a new graph binds these packs: whatever happened
        to the factors since, including writes no check sees, is packed afresh)."""
        self._all_stamps = None
        self._stamps = [None] * len(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)

    def refresh(self, flat) -> int:
        """Re-pack every buffer whose sources changed since it was packed; returns how many.
        `flat`: the sources group by group, each group's A then its B (flatten(groups)). The
        common case, nothing changed, is one list of stamps compared at once and one pass over the
        storages' weak references: about 100 us for the 448 factors of a 32-layer model with all
        seven linears adapted (CPU machine, Python 3.11)."""
        try:
            stamps = [(t.data_ptr(), t._version) for t in flat]
        except RuntimeError:  # an inference tensor among them: stamped one by one below
            stamps = None
        if stamps is not None and stamps == self._all_stamps and not any(map(_expired, self._ref_ids)):
            return 0
        for t, want in zip(flat, self.meta):
            if _meta(t) != want:
                raise RuntimeError(f"adafuse: an expert factor is now {_meta(t)}, its packed copy was made for {want}; "
                                   "call torch._dynamo.reset() and compile the model again")
        replaced = [_expired(c) for c in self._ref_ids] or [False] * len(flat)
        repacked = 0
        with torch.no_grad():
            for i, (buffer, kind, idx) in enumerate(zip(self.buffers, self._kinds, self._sources)):
                sources = [flat[j] for j in idx]
                src_stamps = [_stamp(t) for t in sources]
                if self._stamps[i] == src_stamps and None not in src_stamps and not any(replaced[j] for j in idx):
                    continue
                if None in src_stamps and not self._warned:
                    self._warned = True
                    warnings.warn("adafuse: the expert factors are inference-mode tensors, which keep no version "
                                  "counter; the dense prefill re-packs them on every call (create the model outside "
                                  "torch.inference_mode(), or compile with options={'prefill_packed': False})",
                                  stacklevel=3)
                if kind == "a":
                    torch.cat([a.reshape(-1, a.shape[-1]) for a in sources], 0, out=buffer)
                else:
                    b = sources[0]
                    buffer.view(b.shape[1], b.shape[0], b.shape[2]).copy_(b.permute(1, 0, 2))
                self._stamps[i] = src_stamps
                repacked += 1
        # Recorded only now: a pack that raised is tried again on the next call.
        self._all_stamps = stamps
        self._refs = [StorageWeakRef(t.untyped_storage()) for t in flat]
        self._ref_ids = [r.cdata for r in self._refs]
        return repacked


def flatten(groups: list[Group]) -> list[Tensor]:
    return [t for lora_a, lora_b in groups for t in (*lora_a, *lora_b)]


def packs_for(channel, groups: list[Group]) -> DensePacks:
    """The channel's packs for these sources: made once, shared by every prefill graph (each
    prompt length compiles its own) that reads the same factors, and re-packed whole whenever a
    graph binds them. Made again, replacing the old, when the factors changed dtype, device or
    shape (model.to(...): Dynamo recompiles then)."""
    flat = flatten(groups)
    key = tuple(id(t) for t in flat)
    packs = channel.dense_packs.get(key)
    if packs is None or packs.meta != [_meta(t) for t in flat]:
        packs = DensePacks(groups)
        channel.dense_packs[key] = packs
    else:
        packs.invalidate()
        packs.refresh(flat)
    return packs
