"""generate()'s static KV cache, kept from one call to the next.

Since about transformers 5.17, generate() with cache_implementation="static" makes a new StaticCache
on every call (5.10's `_prepare_static_cache` still kept one on the model). Its tensors are marked
as static addresses, so a compiled decode step under CUDA graphs (Inductor's CUDA-graph trees)
meets them at new addresses whenever the caching allocator does not happen to hand back the old
ones: the step is recorded again, inside the timed first decode step, and the new recording is one
more root that every later step checks before it finds its own. Serving prompts one by one through
generate(), as users do, then costs a recording per prompt and more checks per step as prompts go
by. Keeping one cache and zeroing it in place between calls keeps the addresses, and the tokens:
`reset()` clears every entry the previous call wrote.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading

import torch

log = logging.getLogger("adafuse_compile")


class StaticCacheReuse:
    """Stands in for a model's `_prepare_static_cache` (transformers' hook that makes generate()'s
    static cache): hands back the cache of the previous call, reset, where it fits.

    It fits when the cache implementation is plain "static", the batch size, the model's dtype and
    device are the same, its length is at least the one asked, and neither prefill chunking (which
    initializes the cache early, on its own terms) nor an encoder-decoder cache is involved. It is
    never handed to two generate() calls at once (a second, concurrent call gets a cache of its own),
    and it is forgotten once a call returns it to the caller (return_dict_in_generate): the caller's
    object is then theirs, never reset under them.
    """

    def __init__(self, inner):
        self.inner = inner  # the model's bound `_prepare_static_cache`
        self.enabled = True
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._kept: tuple[tuple, object] | None = None  # (fit key, cache)
        self._in_use = False
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: the generate() call now running took the kept cache

    def __reduce__(self):
        # torch.save(model) / deepcopy: the model and the switch, never the cache's tensors or a lock.
        # Rebound through the class: getattr(model, name) would find this object, not the hook.
        return _rebuild_cache_reuse, (self.inner.__self__, self.enabled)

    def _fit_key(self, args, kwargs) -> tuple | None:
        """(implementation, batch size, dtype, device) and the length asked; None where reuse is not safe."""
        try:
            bound = inspect.signature(self.inner).bind(*args, **kwargs).arguments
            impl, batch, length = bound["cache_implementation"], bound["batch_size"], bound["max_cache_len"]
        except (TypeError, KeyError):  # another transformers signature: leave generate() as it is
            return None
        model = self.inner.__self__
        if impl != "static" or bound.get("prefill_chunk_size") is not None:
            return None
        if getattr(model.config, "is_encoder_decoder", False):
            return None
        return (impl, batch, model.dtype, model.device), length

    def __call__(self, *args, **kwargs):
        # Only inside generate() (our wrapper's `generating`), which releases what it took.
        inside = getattr(self._local, "inside", False)
        fit = self._fit_key(args, kwargs) if self.enabled and inside else None
        with self._lock:
            if fit is not None and not self._in_use:
                key, length = fit
                if self._kept is not None and self._kept[0][0] == key and self._kept[0][1] >= length:
                    cache = self._kept[1]
                    cache.reset()  # zeroed in place: same tensors, same addresses
                    self._in_use = self._local.took = True
                    return cache
        cache = self.inner(*args, **kwargs)
        if fit is None:
            return cache
        with self._lock:
            if not self._in_use:  # a concurrent generate() holds the kept one: this cache stays its call's
                key, length = fit
                self._kept = ((key, max(length, getattr(cache, "max_cache_len", length) or length)), cache)
                self._in_use = self._local.took = True
        return cache

    @contextlib.contextmanager
    def generating(self):
        """Around one generate() call: releases the kept cache at the end, forgets it if returned."""
        self._local.took, self._local.inside = False, True
        returned = []
        try:
            yield returned.append
        finally:
            self._local.inside = False
            with self._lock:
                if getattr(self._local, "took", False):
                    self._in_use = self._local.took = False
                    if returned and not isinstance(returned[0], torch.Tensor):
                        # a ModelOutput (return_dict_in_generate): it may carry the cache to the caller
                        log.debug("adafuse: generate() returned its cache; the next call makes a new one")
                        self._kept = None


def _rebuild_cache_reuse(model, enabled: bool) -> StaticCacheReuse:
    reuse = StaticCacheReuse(type(model)._prepare_static_cache.__get__(model))
    reuse.enabled = enabled
    return reuse
