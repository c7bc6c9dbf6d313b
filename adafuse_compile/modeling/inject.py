"""inject(model, config): turn a causal LM's target linears into LoRA-MoE linears, pre-gated (one
router, at the first target the forward calls) or layer-wise (a router in each)."""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

from ..config import LLAMA_LINEARS, AdaFuseConfig, AdaFuseConfigError
from .generate_cache import StaticCacheReuse, dynamic_cache_warning, makes_a_cache_per_call
from .generate_stop import deferred_stop_check
from .layers import AdaFuseLinear, GateChannel

_CHANNEL_ATTR = "_adafuse_channel"
_CONFIG_ATTR = "adafuse_config"
_HOOKS_ATTR = "_adafuse_hooks"
# Never adapted, whatever target_modules says: the output head is not a block linear.
_EXCLUDED = ("lm_head",)


def target_linears(model: nn.Module, config: AdaFuseConfig) -> list[tuple[str, nn.Linear]]:
    """The linears to adapt, in registration order (execution order for the Llama family)."""
    targets = set(config.target_modules)
    found, available = [], set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, AdaFuseLinear):
            raise AdaFuseConfigError(f"model already has AdaFuse adapters (at {name}); inject once per model")
        if isinstance(module, nn.Linear) and leaf not in _EXCLUDED:
            available.add(leaf)
            if leaf in targets:
                found.append((name, module))
    missing = sorted(targets - available)
    if missing:
        named = ("'all-linear' names the seven linears of a Llama block, " + ", ".join(LLAMA_LINEARS) + " (not every "
                 "linear, as in PEFT), and " if tuple(config.target_modules) == LLAMA_LINEARS else "")
        raise AdaFuseConfigError(
            f"target_modules {missing} match no nn.Linear in {type(model).__name__}: {named}the linears of this "
            f"model are {sorted(available)}; name those to adapt, e.g. target_modules={tuple(sorted(available))}"
        )
    return found


class _FirstCalled(Exception):
    """Ends the probe forward of `first_called` at the first target linear it reaches."""


def first_called(model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> tuple[str | None, str | None]:
    """(the name of the target linear a forward of `model` calls first, or None; why not, or None
    where nothing was tried: a model without `dummy_inputs`, like TinyLlama, whose forward calls its
    linears in the order it registers them). Registration order is not always execution order: Phi-3's attention registers
    o_proj before qkv_proj. A Hugging Face model's `dummy_inputs` run through its plain forward
    (no module hooks of the model itself, no compiled code: force_eager) until the first target is
    reached, where a pre-hook stops it; the RNG state is kept, and nothing else is left behind."""
    dummy = getattr(model, "dummy_inputs", None)
    if not isinstance(dummy, dict) or not isinstance(dummy.get("input_ids"), torch.Tensor):
        return None, None
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    if device is None:
        return None, "its parameters are on the meta device (not loaded)"

    def stop_at(name, *_):
        raise _FirstCalled(name)
    hooks = [linear.register_forward_pre_hook(functools.partial(stop_at, name)) for name, linear in targets]
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
            model.forward(input_ids=dummy["input_ids"][:1, :2].to(device), use_cache=False)
    except _FirstCalled as found:
        return found.args[0], None
    except Exception as exc:  # a forward that needs more than input_ids, or parameters on several devices
        return None, f"its forward on dummy inputs failed ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        for h in hooks:
            h.remove()
    return None, "its forward called no target linear"


def _router_place(model: nn.Module, config: AdaFuseConfig, targets: list, router_at: str | None) -> str | None:
    """Where the pre-gated router goes: `router_at` if given (checked), else the first target the
    forward calls, else the first registered one, with a warning when that could not be checked."""
    names = [name for name, _ in targets]
    if config.router_placement == "every_adapted":
        if router_at is not None:
            raise AdaFuseConfigError("router_at names the one router of a pre-gated model; with "
                                     "router_placement='every_adapted' every adapted linear has its own")
        return None
    if router_at is not None:
        if router_at not in names:
            raise AdaFuseConfigError(f"router_at={router_at!r} is not one of the adapted linears: {names[:4]}"
                                     f"{'...' if len(names) > 4 else ''}")
        return router_at
    if len(targets) == 1:
        return names[0]
    found, how = first_called(model, targets)
    if found is None and how is not None:
        warnings.warn(
            f"adafuse: the router goes to {names[0]}, the first target linear registered, because which one the "
            f"forward calls first could not be checked: {how}. If the forward calls another target first, the model "
            "raises RouterPlacementError; then pass inject(model, config, router_at='<that linear>')", stacklevel=3)
    return found or names[0]


def inject(model: nn.Module, config: AdaFuseConfig, *, router_at: str | None = None) -> nn.Module:
    """Freeze the backbone, wrap the target linears, and add ONE router at the first adapted linear
    the forward calls (`router_at`: the qualified name of another; config.router_placement=
    "every_adapted": a router in every adapted linear, layer-wise).

    Works in place and returns `model`. The backbone weights are not copied: each AdaFuseLinear
    holds the original Parameters, so the backbone state_dict is unchanged.
    """
    if not isinstance(config, AdaFuseConfig):
        raise TypeError(f"config must be an AdaFuseConfig, got {type(config).__name__}")
    targets = target_linears(model, config)
    router_at = _router_place(model, config, targets, router_at)
    for p in model.parameters():
        p.requires_grad_(False)
    channel = GateChannel()
    channel.router_at = router_at
    modules = dict(model.named_modules())
    restore = functools.partial(_call_channel, channel, "restore")
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        # in the mode of the linear it replaces (a from_pretrained model is in eval mode: no
        # adapter dropout, no load-balancing loss in generate())
        adapted = AdaFuseLinear(linear, config, channel, is_router=(name == router_at)).train(linear.training)
        object.__setattr__(adapted, "_adafuse_name", name)  # for error messages
        # Saving or loading any part of the model (model.layers.state_dict(), load_state_dict of new
        # adapters or a new backbone mid-decode) first puts the backbone weights back: a save sees
        # W0, and a load is not undone by a later restore nor unmerged with the new factors.
        adapted.register_state_dict_pre_hook(restore)
        adapted.register_load_state_dict_pre_hook(restore)
        setattr(parent, leaf, adapted)
    object.__setattr__(model, _CHANNEL_ATTR, channel)
    object.__setattr__(model, _CONFIG_ATTR, config)
    # The channel is open for exactly one top-level forward: a gate never outlives its step.
    # (partials of a module-level function, not lambdas: torch.save(model) pickles the hooks)
    hooks = (
        model.register_forward_pre_hook(functools.partial(_call_channel, channel, "open")),
        model.register_forward_hook(functools.partial(_call_channel, channel, "close"), always_call=True),
        # Saving (state_dict, save_pretrained, torch.save(model.state_dict())) sees backbone weights.
        model.register_state_dict_pre_hook(functools.partial(_call_channel, channel, "restore")),
    )
    object.__setattr__(model, _HOOKS_ATTR, hooks)
    _restore_around(model, "train", channel)
    if callable(getattr(model, "generate", None)):
        _restore_around(model, "generate", channel)
    return model


def _call_channel(channel: GateChannel, method: str, *_hook_args, **_hook_kwargs) -> None:
    getattr(channel, method)()


class _RestoreAfter:
    """model.<method> (on this instance), restoring the backbone weights when it ends, however it
    ends (return, exception, KeyboardInterrupt): leaving generate() or switching to training never
    leaves merged weights behind (`channel`; None for a model without adapters, whose generate() is
    wrapped only for the two below). A class rather than a closure, so torch.save(model) pickles it.
    For generate(), `cache_reuse` (a StaticCacheReuse) sees the call begin, end and return, and
    `defer_stop` turns transformers' deferred stop check on CUDA on (True) or off (False), or leaves
    it to an enclosing `deferred_stop_check` scope (None); generate_stop.py says why."""

    def __init__(self, inner, channel: GateChannel | None, cache_reuse: StaticCacheReuse | None = None,
                 defer_stop: bool | None = True):
        self.inner, self.channel, self.cache_reuse = inner, channel, cache_reuse
        self.defer_stop = defer_stop if inner.__name__ == "generate" else False
        self.warned_dynamic_cache = False  # generate(): the dynamic-cache warning, once per model
        # name and docstring only: copying the inner's __dict__ would copy another wrapper's state
        functools.update_wrapper(self, inner, updated=())

    def __reduce__(self):
        # The bound method does not pickle (HF's generate carries code objects); the model, the
        # method's name and the rest do. Rebound through the class: getattr(model, name) is this.
        return _rebuild_restore_after, (self.inner.__self__, self.inner.__name__, self.channel, self.cache_reuse,
                                        self.defer_stop)

    def __call__(self, *args, **kwargs):
        if self.inner.__name__ == "generate" and not self.warned_dynamic_cache:
            message = dynamic_cache_warning(self.inner.__self__, kwargs)
            if message:  # once per model: a serving loop would repeat it every prompt
                self.warned_dynamic_cache = True
                warnings.warn(message, stacklevel=2)
        if self.inner.__name__ == "train" and (args[0] if args else kwargs.get("mode", True)):
            kept = getattr(self.inner.__self__, "_prepare_static_cache", None)
            if isinstance(kept, StaticCacheReuse):
                kept.forget()  # training needs no KV cache: give its memory back
        defer = self.defer_stop
        if defer and _samples(self.inner.__self__, kwargs):
            # Sampling: the extra step after an EOS draws from the random generator too, so the next
            # call's samples would differ from a sync per step's. Keep the sync, and the stream.
            defer = False
        try:
            with deferred_stop_check(defer) if defer is not None else contextlib.nullcontext():
                if self.cache_reuse is None:
                    return self.inner(*args, **kwargs)
                with self.cache_reuse.generating(kwargs) as returned:
                    out = self.inner(*args, **kwargs)
                    returned(out)
                    return out
        finally:
            if self.channel is not None:
                self.channel.restore()


def _samples(model: nn.Module, generate_kwargs: dict) -> bool:
    """Whether a generate() call with these arguments samples (do_sample), as transformers decides it."""
    if "do_sample" in generate_kwargs:
        return bool(generate_kwargs["do_sample"])
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return bool(getattr(config, "do_sample", False))


def _rebuild_restore_after(model: nn.Module, method: str, channel: GateChannel | None,
                           cache_reuse: StaticCacheReuse | None, defer_stop: bool | None = True) -> _RestoreAfter:
    return _RestoreAfter(getattr(type(model), method).__get__(model), channel, cache_reuse, defer_stop)


def _restore_around(model: nn.Module, method: str, channel: GateChannel | None) -> None:
    existing = getattr(model, method)
    if isinstance(existing, _RestoreAfter):
        # A plain model's wrapper (reuse_static_cache / defer_stop_check before inject): it takes the
        # channel and inject's defaults, where they were not set by hand. Never a wrapper in a wrapper.
        existing.channel = channel
        if existing.defer_stop is None:
            existing.defer_stop = True
        if existing.cache_reuse is not None and not existing.cache_reuse.asked:
            existing.cache_reuse.enabled = True
        return
    cache_reuse = None
    if (method == "generate" and callable(getattr(model, "_prepare_static_cache", None))
            and makes_a_cache_per_call()):
        # transformers' hook that makes generate()'s static cache: keep one from call to call
        cache_reuse = StaticCacheReuse(model._prepare_static_cache)
        object.__setattr__(model, "_prepare_static_cache", cache_reuse)
    object.__setattr__(model, method, _RestoreAfter(getattr(model, method), channel, cache_reuse))


def _generate_wrapper(model: nn.Module) -> _RestoreAfter:
    """The model's generate() as adafuse wraps it: inject() does it for adapted models; a plain model
    (the backbone alone, compiled with backend="adafuse" or not) gets the wrapper on first use of the
    switches below: cache reuse off and the stop check left to any enclosing scope until asked."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) returns a wrapper module
    wrapper = getattr(model, "generate", None)
    if isinstance(wrapper, _RestoreAfter):
        return wrapper
    if not callable(wrapper) or not callable(getattr(type(model), "generate", None)):
        raise ValueError(f"{type(model).__name__} has no generate() to set up")
    _restore_around(model, "generate", None)
    wrapper = model.generate
    wrapper.defer_stop = None
    if wrapper.cache_reuse is not None:
        wrapper.cache_reuse.enabled = False
    return wrapper


def reuse_static_cache(model: nn.Module, enabled: bool = True) -> None:
    """Whether generate() keeps its static KV cache from one call to the next (on by default after
    inject; for any other model, from this call on; modeling/generate_cache.py says why). Off:
    transformers' own behaviour, a new cache per call."""
    reuse = _generate_wrapper(model).cache_reuse
    if reuse is None:
        raise ValueError(f"{type(model).__name__}: no generate() static cache to reuse (a transformers version "
                         f"before 5.15, whose generate() keeps its static cache itself, or a model without "
                         f"transformers' _prepare_static_cache)")
    reuse.enabled, reuse.asked = bool(enabled), True
    if not enabled:
        reuse.forget()  # let the kept cache's memory go


def defer_stop_check(model: nn.Module, enabled: bool = True) -> None:
    """Whether generate() on CUDA reads its stop flag one step late instead of waiting for every
    step (on by default after inject; for any other model, from this call on; it needs the deferred
    stop check of transformers 5.18 and later; modeling/generate_stop.py says why). Off:
    transformers' own behaviour, a sync per token."""
    _generate_wrapper(model).defer_stop = bool(enabled)


def is_injected(model: nn.Module) -> bool:
    return hasattr(model, _CHANNEL_ATTR)


def gate_channel(model: nn.Module) -> GateChannel:
    if not is_injected(model):
        raise ValueError(f"{type(model).__name__} has no AdaFuse adapters: call adafuse_compile.inject(model, config)")
    return getattr(model, _CHANNEL_ATTR)


def adafuse_config(model: nn.Module) -> AdaFuseConfig:
    gate_channel(model)
    return getattr(model, _CONFIG_ATTR)


def adapted_linears(model: nn.Module) -> dict[str, AdaFuseLinear]:
    """Every AdaFuseLinear by qualified name, in registration order (execution order for most
    families; `router_linear` finds the one holding a pre-gated model's router)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaFuseLinear)}


def router_linear(model: nn.Module) -> tuple[str, AdaFuseLinear]:
    """(name, module) of the adapted linear holding a pre-gated model's router: the first one a
    forward calls. A layer-wise model (a router in each) has none: ValueError."""
    linears = adapted_linears(model)
    if any(m.routes_alone for m in linears.values()):
        raise ValueError("this model routes in every adapted linear (router_placement='every_adapted'): "
                         "there is no single router")
    return next((name, m) for name, m in linears.items() if m.router is not None)


def adapter_state_dict(model: nn.Module) -> dict:
    """Router and expert tensors only (no backbone), keyed as in model.state_dict()."""
    out = {}
    for name, m in adapted_linears(model).items():
        out[f"{name}.lora_A"] = m.lora_A
        out[f"{name}.lora_B"] = m.lora_B
        if m.router is not None:
            out[f"{name}.router.weight"] = m.router.weight
    return out
