"""One GPU, several benchmark processes: a file lock so that no two of them time at once.

A 7B-shaped benchmark spends most of its wall time compiling (Dynamo and Inductor on the CPU, a
minute or two per graph) and little timing on the GPU. Several such processes can therefore share
one GPU: each holds this lock around its timed sections, so while one times, the others can only
compile. Without MPS, kernels of processes that both have work are time-sliced, so a timing that
overlapped another process's kernels would be wrong; the lock rules that out between lock holders.
A process's GPU work outside its timed sections (the first call of a compiled graph: CUDA-graph
recording, Triton autotuning) does not take the lock; callers keep that short by warming up first.

The lock is a path in $ADAFUSE_GPU_LOCK (runbooks set it when they start processes side by side);
unset, `timing()` is a no-op, and a lone benchmark behaves as before.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

ENV = "ADAFUSE_GPU_LOCK"
waited_s = 0.0  # total time this process waited for the lock: benchmarks record it with their results


@contextlib.contextmanager
def timing() -> Iterator[None]:
    """Hold the GPU alone (among processes sharing $ADAFUSE_GPU_LOCK) for the block."""
    global waited_s
    path = os.environ.get(ENV)
    if not path:
        yield
        return
    import fcntl  # POSIX only, and only needed here: a lock path is a Linux runbook's setting

    with open(path, "a") as f:
        t = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited_s += time.perf_counter() - t
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared() -> str | None:
    """The lock's path when this process shares its GPU with other benchmarks, else None."""
    return os.environ.get(ENV) or None
