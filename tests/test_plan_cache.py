"""PlanCache: one build per key, LRU eviction; CUDA plans are built off the calling thread."""
import threading

import pytest
import torch

from adafuse_compile.cutlass_kernels.plan_cache import PlanCache, build_outside_graph_pool


def test_builds_once_per_key_and_evicts_least_recently_used():
    cache, built = PlanCache(size=2), []

    def builder(name):
        return lambda: built.append(name) or name

    cpu = torch.device("cpu")
    assert cache.get(("a",), builder("a"), cpu) == "a"
    assert cache.get(("a",), builder("a"), cpu) == "a"
    cache.get(("b",), builder("b"), cpu)
    cache.get(("a",), builder("a"), cpu)  # a is now the most recent
    cache.get(("c",), builder("c"), cpu)  # evicts b
    cache.get(("b",), builder("b"), cpu)
    assert built == ["a", "b", "c", "b"]
    assert len(cache) == 2


def test_a_failed_build_caches_nothing():
    cache = PlanCache()

    def broken():
        raise ValueError("bad shapes")
    with pytest.raises(ValueError, match="bad shapes"):
        cache.get(("x",), broken, torch.device("cpu"))
    assert len(cache) == 0


@pytest.mark.gpu
def test_cuda_plans_are_built_on_another_thread():
    """Inductor's CUDA-graph trees send the calling thread's allocations into the graph pool."""
    threads = []
    plan = build_outside_graph_pool(lambda: threads.append(threading.get_ident()) or torch.ones(3, device="cuda"),
                                    torch.device("cuda"))
    assert threads and threads[0] != threading.get_ident()
    assert plan.sum().item() == 3
