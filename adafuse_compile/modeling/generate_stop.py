"""generate() without a host sync per token on CUDA: transformers' deferred stop check, turned on.

After every decode step, transformers' generate() decides whether to stop by reading a flag the step
computed on the device (`unfinished_sequences.max() == 0`). The host waits there until the step has
run, and only then prepares the next one, so all of its per-step work (prepare_inputs_for_generation
and the attention mask, the compiled call's guards, the CUDA-graph replay's checks) adds to the GPU
time of every token instead of overlapping it: on the H200 machine it left the GPU idle 1.8-4.4 ms
per token (docs/benchmarks.md, "without a sync per step"). The package's own decode loop, which
does not wait, ran the same compiled step about 1 ms/token faster than generate() did.

From 5.18, transformers has the remedy, `DeferredStopCheck`: the flag is copied to pinned host
memory asynchronously and read one step late, so the host queues step k+1 while step k runs. When a
sequence ends on an EOS token, this costs one extra forward, which generate() undoes (its token is
dropped, and a cache handed back to the caller is cropped), so the tokens returned are the same.
transformers enables it only on Apple's MPS devices so far ("we should enable it for cuda if we
observe perf gains"). This module enables it on CUDA (measured there, all seven linears of a 7B
model adapted, 50 prompts x 200 tokens: auto 5.46 ms/token deferred (transformers 5.18), 6.375 with
a sync per step (5.17), in two runs):

- inside generate() of every model `af.inject` adapted (on by default; `defer_stop_check(model,
  False)` turns it off for one model);
- around any code in `with deferred_stop_check():` (a plain model, one compiled with
  backend="adafuse" without injection, a benchmark).

It does so by wrapping `DeferredStopCheck.is_supported`, transformers' own test, once per process:
outside those scopes, and for assistant models and caches that cannot be rolled back, the answer is
transformers' own. With a transformers before 5.18 there is nothing to enable: generate() keeps its
sync per token (`available()` says so, and the benchmark records it).
"""
from __future__ import annotations

import contextlib
import threading

# Where deferring is turned on; transformers itself defers on "mps". (Tests add "cpu" to run the
# deferred path on a machine without a GPU.)
DEVICE_TYPES = ("cuda",)
_local = threading.local()  # per thread: the open deferred_stop_check scopes' switches, innermost last
_install_lock = threading.Lock()
_original_is_supported = None  # transformers' own test, once wrapped


def _deferred_stop_check_class():
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:  # transformers < 5.18, or none
        return None
    return DeferredStopCheck if callable(getattr(DeferredStopCheck, "is_supported", None)) else None


def available() -> bool:
    """Whether this transformers has a deferred stop check to turn on (5.18 and later)."""
    return _deferred_stop_check_class() is not None


def _scopes() -> list[bool]:
    if not hasattr(_local, "scopes"):
        _local.scopes = []
    return _local.scopes


def _on() -> bool:
    scopes = _scopes()
    return bool(scopes) and scopes[-1]


def active() -> bool:
    """Whether generate() on this thread, now, would defer its stop check on CUDA."""
    return _on() and available()


def _decide(device, cache, cache_is_returned, is_assistant, *args, **kwargs) -> bool:
    if _original_is_supported(device, cache, cache_is_returned, *args, is_assistant=is_assistant, **kwargs):
        return True
    if not _on() or getattr(device, "type", None) not in DEVICE_TYPES or is_assistant:
        return False
    if cache_is_returned and not hasattr(cache, "layers"):
        # transformers 5.18-5.24's DeferredStopCheck.finish walks `cache.layers`, which an
        # encoder-decoder cache lacks (5.25 fixed it): keep the sync rather than fail at the end
        return False
    # transformers' own condition for MPS: a cache handed back to the caller (returned, or passed in
    # by the caller) must be able to drop the extra step's entry. transformers' static cache can from
    # 5.25; in 5.18-5.24 it cannot, so a static cache passed in keeps the sync per step.
    return cache is None or not cache_is_returned or bool(getattr(cache, "is_croppable", False))


def _is_supported_here(device, cache, cache_is_returned, is_assistant=False, *args, **kwargs) -> bool:
    deferred = _decide(device, cache, cache_is_returned, is_assistant, *args, **kwargs)
    _local.decisions = getattr(_local, "decisions", 0) + 1
    _local.deferred = getattr(_local, "deferred", 0) + deferred
    return deferred


def decisions() -> tuple[int, int]:
    """(generate() calls that decided how to stop, those that deferred) on this thread, since the
    wrapper was installed: what a benchmark records, since a scope alone does not guarantee deferral."""
    return getattr(_local, "decisions", 0), getattr(_local, "deferred", 0)


def _install() -> bool:
    global _original_is_supported
    if _original_is_supported is not None:  # installed already: every generate() call passes here
        return True
    cls = _deferred_stop_check_class()
    if cls is None:
        return False
    with _install_lock:
        if _original_is_supported is None:
            _original_is_supported = cls.is_supported
            cls.is_supported = staticmethod(_is_supported_here)
    return True


@contextlib.contextmanager
def deferred_stop_check(enabled: bool = True):
    """Inside this scope (this thread), generate() on CUDA reads its stop flag one step late instead
    of waiting for every step; same greedy tokens (with sampling, the extra step after an EOS draws
    from the random generator, so later calls sample differently: adafuse's own generate() wrapper
    keeps the sync when sampling). `enabled=False` turns it off inside, whatever encloses it: the
    innermost scope decides. A no-op where transformers has no deferred stop check (before 5.18)."""
    if not _install():
        yield
        return
    scopes = _scopes()
    scopes.append(bool(enabled))
    try:
        yield
    finally:
        scopes.pop()


def stop_check_mode(device, deferred: bool) -> str:
    """How generate() decides to stop on `device` when asked to defer (`deferred`) or not, in words,
    for benchmark records."""
    import transformers

    if not available():
        return f"per step (transformers {transformers.__version__} has no deferred stop check)"
    kind = getattr(device, "type", device)
    if kind == "mps" or (deferred and kind in DEVICE_TYPES):
        return "deferred (one step late)"
    return "per step"
