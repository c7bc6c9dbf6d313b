"""One GPU, several benchmark processes: a file lock so that only one of them uses the GPU at a time.

A 7B-shaped benchmark spends most of its wall time compiling (Dynamo and Inductor on the CPU, a
minute or two per graph) and the rest on the GPU. Several such processes can share one GPU if
each holds this lock whenever it uses the GPU and lets go only while it compiles: then one
process's GPU work never overlaps another's, and their compiles overlap everything.

Holding it only around the timed sections is not enough. That was tried on the H200 (2026-11-29,
three 7B benchmarks side by side): the other processes' untimed GPU work (model builds, eager
warm-ups, fp32 reference runs) still ran during a timed section, and the same compiled backbone
measured 6.7 and 7.9 ms/step at batch 32 in two processes, and a 512-token prefill 28k and 43k
tokens/s. Without MPS, kernels of two processes are time-sliced, so each such overlap slows the
timed one.

- `held_except_compiles()`: hold the lock for the block, except while Dynamo compiles (a callback
  of `torch._dynamo.callback_handler` lets go at a compile's start and takes it back at its end).
  A benchmark process runs its whole body in it.
- `released()`: let go for a CPU-only stretch inside that (a CUTLASS build).
- `timing()`: hold the lock for a block; nested in a held block it changes nothing. Measurements
  (timed sections, the auto policy's calibration, which runs inside a compile) use it, so they
  are alone on the GPU also when the caller does not hold the lock throughout.

The lock is a path in $ADAFUSE_GPU_LOCK (runbooks set it when they start processes side by side);
unset, everything here is a no-op, and a lone benchmark behaves as before.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

ENV = "ADAFUSE_GPU_LOCK"
waited_s = 0.0  # total time this process waited for the lock: benchmarks record it with their results
_mutex = threading.RLock()  # one holder state per process; the flock itself is between processes
_file = None  # the open lock file while this process holds the lock
_depth = 0  # nesting of held blocks


def shared() -> str | None:
    """The lock's path when this process shares its GPU with other benchmarks, else None."""
    return os.environ.get(ENV) or None


def _acquire(path: str) -> None:
    global _file, waited_s
    import fcntl  # POSIX only, and only needed here: a lock path is a Linux runbook's setting

    f = open(path, "a")
    t = time.perf_counter()
    fcntl.flock(f, fcntl.LOCK_EX)
    waited_s += time.perf_counter() - t
    _file = f


def _release() -> None:
    global _file
    import fcntl

    f, _file = _file, None
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def held() -> bool:
    """Whether this process holds the lock now."""
    return _file is not None


@contextlib.contextmanager
def timing() -> Iterator[None]:
    """Hold the GPU alone (among processes sharing $ADAFUSE_GPU_LOCK) for the block."""
    global _depth
    path = shared()
    if not path:
        yield
        return
    with _mutex:
        if _file is None:
            _acquire(path)
        _depth += 1
    try:
        yield
    finally:
        with _mutex:
            _depth -= 1
            if _depth == 0 and _file is not None:
                _release()


@contextlib.contextmanager
def released() -> Iterator[None]:
    """Let the other processes use the GPU during a CPU-only stretch (a compile, a build)."""
    global _depth
    path = shared()
    with _mutex:
        depth = _depth
        if not path or _file is None:
            depth = None
        else:
            _release()
            _depth = 0
    try:
        yield
    finally:
        if depth is not None:
            with _mutex:
                if _file is None:
                    _acquire(path)
                _depth = depth


@contextlib.contextmanager
def held_except_compiles() -> Iterator[None]:
    """Hold the lock for the block, letting go while Dynamo compiles (see the module docstring)."""
    if not shared():
        yield
        return
    from torch._dynamo import callback as dynamo_callback

    open_releases: list = []

    def is_compile(args) -> bool:
        # torch >= 2.6 passes CallbackArgs; CUDA-graph recording also runs callbacks, and is GPU work.
        trigger = getattr(args[0], "callback_trigger", None) if args else None
        return trigger is None or trigger == dynamo_callback.CallbackTrigger.DYNAMO

    def on_start(*args) -> None:
        if is_compile(args):
            cm = released()
            cm.__enter__()
            open_releases.append(cm)

    def on_end(*args) -> None:
        if is_compile(args) and open_releases:
            open_releases.pop().__exit__(None, None, None)

    handler = dynamo_callback.callback_handler

    def register() -> None:
        handler.register_start_callback(on_start)
        handler.register_end_callback(on_end)

    def clear_keeping_ours() -> None:
        # torch._dynamo.reset() clears every callback, and benchmarks reset between compiles.
        type(handler).clear(handler)
        register()

    register()
    handler.clear = clear_keeping_ours  # on this instance only, for the block; removed below
    try:
        with timing():
            try:
                yield
            finally:  # a compile's end callback always runs; this is for one that never did
                while open_releases:
                    open_releases.pop().__exit__(None, None, None)
    finally:
        handler.__dict__.pop("clear", None)
        with contextlib.suppress(ValueError):
            handler.remove_start_callback(on_start)
            handler.remove_end_callback(on_end)
