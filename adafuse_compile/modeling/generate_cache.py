"""generate()'s static KV cache, kept from one call to the next.

Since transformers 5.15, generate() with cache_implementation="static" makes a new StaticCache on
every call (up to 5.14 `_prepare_static_cache` kept one on the model and reset it). Its tensors are marked
as static addresses, so a compiled decode step under CUDA graphs (Inductor's CUDA-graph trees)
meets them at new addresses whenever the caching allocator does not happen to hand back the old
ones: the step is recorded again, inside the timed first decode step, and the new recording is one
more root that every later step checks before it finds its own. Serving prompts one by one through
generate(), as users do, then costs a recording per prompt and more checks per step as prompts go
by. Keeping one cache and zeroing it in place between calls keeps the addresses, and the tokens:
`reset()` clears every entry the previous call wrote. Measured on the H200 (docs/benchmarks.md,
run4): a new cache per call recorded the decode step again for 44-50 of 50 prompts; the kept cache
recorded none and took 3-18% off ms/token (7B, all seven linears adapted).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import weakref

import torch

log = logging.getLogger("adafuse_compile")


class StaticCacheReuse:
    """Stands in for a model's `_prepare_static_cache` (transformers' hook that makes generate()'s
    static cache): hands back the cache of the previous call, reset, where it fits.

    It fits when the cache implementation is plain "static"; the batch size, the model's dtype and
    device, inference mode and autocast (they decide what the cache's tensors are) are the same; its
    length is at least the one asked; and neither prefill chunking (which initializes the cache
    early, on its own terms) nor an encoder-decoder cache is involved. It is never handed to two
    generate() calls at once (a second, concurrent call gets a cache of its own); it is forgotten
    once a call returns it to the caller (return_dict_in_generate: the caller's object is then
    theirs, never reset under them), once a call replaced its tensors (beam search reorders them
    into new ones), and when resetting it fails (transformers' own new cache is made instead).
    """

    def __init__(self, inner):
        self.inner = inner  # the model's bound `_prepare_static_cache`
        self.enabled = True
        self.asked = False  # set by reuse_static_cache: the user's choice, which inject() keeps
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._kept: tuple[tuple, int, object] | None = None  # (fit key, allocated length, cache)
        self._tensors: list | None = None  # weak references to the kept cache's tensors after its first call
        self._in_use = False
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: inside generate(); that call took the kept cache

    def __reduce__(self):
        # torch.save(model) / deepcopy: the model and the switch, never the cache's tensors or a lock.
        # Rebound through the class: getattr(model, name) would find this object, not the hook.
        return _rebuild_cache_reuse, (self.inner.__self__, self.enabled, self.asked)

    def forget(self) -> None:
        with self._lock:
            self._kept = self._tensors = None

    def _fit_key(self, args, kwargs) -> tuple | None:
        """What the cache must match, and the length asked; None where reuse is not safe."""
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
        device = model.device
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
                    if torch.is_autocast_enabled(device.type) else None)
        # inference mode makes inference tensors, which cannot be written outside it (reset, update)
        return (impl, batch, model.dtype, device, torch.is_inference_mode_enabled(), autocast), length

    def __call__(self, *args, **kwargs):
        # Only inside generate() (our wrapper's `generating`), which releases what it took.
        inside = getattr(self._local, "inside", False)
        fit = self._fit_key(args, kwargs) if inside else None
        with self._lock:
            if fit is not None and self.enabled and not self._in_use and self._kept is not None:
                key, length = fit
                kept_key, kept_length, cache = self._kept
                if kept_key == key and kept_length >= length:
                    try:
                        cache.reset()  # zeroed in place: same tensors, same addresses
                    except Exception as exc:  # never a failure transformers' own new cache would not have
                        log.info("adafuse: the kept static cache could not be reset (%s); a new one is made", exc)
                        self._kept = self._tensors = None
                    else:
                        self._in_use = self._local.took = True
                        return cache
        cache = self.inner(*args, **kwargs)
        if fit is None:
            return cache
        self._initialize(cache, fit[0])
        if not self.enabled:
            # transformers' way, a new cache per call, but made here all the same: left to a compiled
            # prompt (model.compile), the cache's length counter is made inside the CUDA graph, as one
            # of its outputs, which the next replay overwrites (on the H200 with transformers 5.17:
            # "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run")
            return cache
        with self._lock:
            if not self._in_use:  # a concurrent generate() holds the kept one: this cache stays its call's
                key, length = fit
                # what transformers allocated: max(asked, its previous length), recorded on the model
                allocated = max(length, getattr(self.inner.__self__, "_previous_max_cache_length", length))
                self._kept, self._tensors = (key, allocated, cache), None
                self._in_use = self._local.took = True
        return cache

    @contextlib.contextmanager
    def generating(self, generate_kwargs: dict | None = None):
        """Around one generate() call: releases the kept cache at the end, forgets it if returned or
        if its tensors were replaced. Nested calls on one thread each keep their own state. A beam
        search takes no part: it reorders the cache into new tensors every step."""
        outer = (getattr(self._local, "took", False), getattr(self._local, "inside", False))
        self._local.took, self._local.inside = False, not self._beam_search(generate_kwargs or {})
        returned = []
        try:
            yield returned.append
        finally:
            with self._lock:
                if self._local.took and self._kept is not None:
                    self._in_use = False
                    cache = self._kept[2]
                    if returned and not isinstance(returned[0], torch.Tensor):
                        # a ModelOutput (return_dict_in_generate): it may carry the cache to the caller
                        log.debug("adafuse: generate() returned its cache; the next call makes a new one")
                        self._kept = self._tensors = None
                    else:
                        self._check_tensors(cache)
                elif self._local.took:
                    self._in_use = False
            self._local.took, self._local.inside = outer

    def _initialize(self, cache, key: tuple) -> None:
        """Make the new cache's tensors now, outside any compiled region, as transformers does for a
        chunked prefill. Left lazy, they are made at the first forward; when that forward is compiled
        (`model.compile()` compiles the prefill too), transformers skips marking them static
        addresses under tracing, and the decode step then writes into inputs CUDA graphs do not
        know to be static. Not under autocast: there the tensors take the autocast dtype, known only
        at the first forward."""
        _, batch, dtype, device, _, (autocast, _) = key
        if not autocast:
            initialize_static_cache(self.inner.__self__, cache, batch, dtype, device)

    def _beam_search(self, kwargs: dict) -> bool:
        config = kwargs.get("generation_config") or getattr(self.inner.__self__, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1))
        return (beams or 1) > 1

    def _check_tensors(self, cache) -> None:
        """Forget the cache if a call put new tensors in it (their addresses are what reuse keeps)."""
        tensors = [t for layer in getattr(cache, "layers", ()) for t in (getattr(layer, "keys", None),
                                                                        getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor)]
        if self._tensors is None:
            self._tensors = [weakref.ref(t) for t in tensors]
        elif len(tensors) != len(self._tensors) or any(r() is not t for r, t in zip(self._tensors, tensors)):
            log.debug("adafuse: generate() replaced the static cache's tensors; the next call makes a new one")
            self._kept = self._tensors = None


def _static_cache_implementations() -> tuple:
    """transformers' names of the cache implementations that keep a fixed shape ("static", ...)."""
    try:
        from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS
        return tuple(ALL_STATIC_CACHE_IMPLEMENTATIONS)
    except ImportError:  # a transformers without the list: the one name every version has
        return ("static",)


def dynamic_cache_warning(model, generate_kwargs: dict) -> str | None:
    """Why a generate() call on a compiled model will not decode at compiled speed, if it will not:
    a KV cache that grows every step (transformers' default DynamicCache)."""
    if getattr(model, "_compiled_call_impl", None) is None:  # model.compile() was not called
        return None
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if not generate_kwargs.get("use_cache", getattr(config, "use_cache", True)):
        return None
    given = generate_kwargs.get("cache", generate_kwargs.get("past_key_values"))
    if given is not None:
        dynamic = not getattr(given, "is_compileable", False)
    else:
        implementation = generate_kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        dynamic = implementation is None or implementation not in _static_cache_implementations()
    if not dynamic:
        return None
    return (f"adafuse: {type(model).__name__}.generate() on a compiled model with a dynamic KV cache: the cache "
            f"grows every step, so the compiled decode step changes shape every step (recompiled, then run with "
            f"a symbolic length; under CUDA graphs recorded again for every new length). Pass "
            f"cache_implementation='static' (with max_cache_len), or a StaticCache, for one decode graph.")


def initialize_static_cache(model, cache, batch_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Make a StaticCache's tensors now (eagerly: marked as static addresses), where transformers can
    say their shape (`_get_static_cache_init_shape`); False where it is left to the first forward."""
    shape = getattr(model, "_get_static_cache_init_shape", lambda: None)()
    if shape is None or not hasattr(cache, "early_initialization"):
        return False
    try:
        cache.early_initialization(batch_size=batch_size, num_heads=shape[0], head_dim=shape[1], dtype=dtype,
                                   device=device)
    except Exception as exc:  # then lazily, as transformers would
        log.debug("adafuse: the static cache could not be made ahead of the prompt (%s)", exc)
        return False
    return True


def transformers_release(at_least: str) -> bool:
    """Whether the installed transformers is release `at_least` or later; pre-releases and dev
    builds (5.24.0.dev0, 5.24.0rc1) count as their release."""
    import transformers
    from packaging.version import Version

    return Version(Version(transformers.__version__).base_version) >= Version(at_least)


def makes_a_cache_per_call() -> bool:
    """Whether this transformers makes generate()'s static cache anew per call (5.15 and later; up to
    5.14 `_prepare_static_cache` kept one on the model, `self._cache`, and reset it itself)."""
    return transformers_release("5.15")


def _rebuild_cache_reuse(model, enabled: bool, asked: bool = False) -> StaticCacheReuse:
    reuse = StaticCacheReuse(type(model)._prepare_static_cache.__get__(model))
    reuse.enabled, reuse.asked = enabled, asked
    return reuse
