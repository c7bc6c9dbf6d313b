"""Kernel plans (device pointer and tile tables) live as long as the model: build them outside
any CUDA-graph memory pool.

Inductor's CUDA-graph trees route every allocation the calling thread makes during warm-up and
recording into the graph's private pool, and then refuse a tensor from that pool that outlives the
call without being an output ("Detected N tensor(s) in the cudagraph pool not tracked as
outputs", seen on the H200 with the SGMM and gather plans). A plan built on the first call,
inside that warm-up, is exactly such a tensor. So plans are built on a helper thread, whose
allocations go to the ordinary caching allocator, and synchronized before use.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


def triton_interpreted() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1: the CPU tests run the kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_runs_on(device: torch.device, what: str) -> None:
    """Raise a ValueError naming the fix where an explicit impl='triton' cannot run: off CUDA only
    Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) runs its kernels."""
    if device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"{what}: impl 'triton' needs a CUDA device, the tensors are on {device} (off CUDA only "
                         "Triton's interpreter runs it: TRITON_INTERPRET=1, for tests); use impl='auto' (the "
                         "PyTorch reference off CUDA)")


def resolve_triton_or_reference(impl: str, device: torch.device, what: str) -> str:
    """impl "auto": Triton on CUDA, the PyTorch reference elsewhere; an explicit "triton" is checked
    (check_triton_runs_on); any other value is returned as is."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if impl == "triton":
        check_triton_runs_on(device, what)
    return impl


# Plenty for every adapted linear group of a 70B model; an evicted plan is rebuilt, never wrong.
PLAN_CACHE_SIZE = 4096


def build_outside_graph_pool(build: Callable[[], T], device: torch.device) -> T:
    if device.type != "cuda":
        return build()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "adafuse: a kernel plan (device pointer tables) would have to be built during CUDA-graph capture; "
            "run the compiled step (or the op) once before capturing it, so the plan exists"
        )

    def on_helper_thread() -> T:
        with torch.cuda.device(device):
            plan = build()
            torch.cuda.synchronize(device)  # the tables' host-to-device copies are done before first use
            return plan

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(on_helper_thread).result()


class PlanCache:
    """LRU cache of plans keyed by the tensors' data pointers and shapes."""

    def __init__(self, size: int = PLAN_CACHE_SIZE):
        self.size = size
        self._plans: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple, build: Callable[[], T], device: torch.device) -> T:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = build_outside_graph_pool(build, device)
        self._plans[key] = plan
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def values(self):
        return self._plans.values()

    def __len__(self) -> int:
        return len(self._plans)
