"""generate()'s deferred stop check (modeling/generate_stop.py): transformers' own DeferredStopCheck,
turned on for CUDA only inside adafuse's scopes (an injected model's generate(), or
`deferred_stop_check()`), never for an assistant model or a returned cache that cannot drop the
extra step; with it, generate() returns the same tokens, EOS or not, kept cache or not."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import adafuse_compile as af
from adafuse_compile.modeling import generate_stop
from adafuse_compile.presets import tiny_hf_model

pytestmark = pytest.mark.skipif(not generate_stop.available(),
                                reason="this transformers has no DeferredStopCheck (before 5.18)")
CUDA = torch.device("cuda")


def is_supported(device=CUDA, cache=None, returned=False, assistant=False) -> bool:
    from transformers.generation.utils import DeferredStopCheck

    return DeferredStopCheck.is_supported(device, cache, returned, is_assistant=assistant)


class _Cache:
    def __init__(self, croppable: bool):
        self.is_croppable = croppable
        self.layers = []


def test_turned_on_for_cuda_only_inside_a_scope_and_only_where_transformers_would_allow_it():
    with af.deferred_stop_check():
        pass  # installs the wrapper: from here on, outside any scope, transformers' own answers
    assert not is_supported()
    assert is_supported(torch.device("mps"))  # transformers' own choice, left alone
    with af.deferred_stop_check():
        assert generate_stop.active()
        assert is_supported()
        assert is_supported(cache=_Cache(croppable=False), returned=False)  # dropped with generate(): no rollback
        assert is_supported(cache=_Cache(croppable=True), returned=True)
        assert not is_supported(cache=_Cache(croppable=False), returned=True)  # the caller's, cannot drop a step
        assert not is_supported(assistant=True)
        assert not is_supported(torch.device("cpu"))
        # a returned cache without per-layer entries (encoder-decoder): 5.18-5.24 would fail undoing the step
        assert not is_supported(cache=object(), returned=True)
        with af.deferred_stop_check(enabled=False):  # the innermost scope decides, for its duration only
            assert not is_supported() and not generate_stop.active()
        assert is_supported()
        seen = []
        other = threading.Thread(target=lambda: seen.append(is_supported()))
        other.start()
        other.join()
        assert seen == [False]  # per thread: another thread's generate() is not deferred
    assert not generate_stop.active() and not is_supported()


def model_and_spy(inject: bool = True):
    from transformers import LogitsProcessor, LogitsProcessorList

    model = tiny_hf_model("llama")
    if inject:
        af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal"))
    gc_ = model.generation_config
    gc_.cache_implementation, gc_.max_cache_len = "static", 64
    gc_.pad_token_id, gc_.do_sample = 0, False
    seen = []

    class Spy(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(generate_stop.active())
            return scores

    return model, LogitsProcessorList([Spy()]), seen


def test_an_injected_generate_defers_by_default_and_can_be_told_not_to():
    model, spy, seen = model_and_spy()
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=3, logits_processor=spy)
        assert seen and all(seen)
        seen.clear()
        af.defer_stop_check(model, False)
        model.generate(prompt, max_new_tokens=3, logits_processor=spy)
        assert seen and not any(seen)
        # the switch travels with the model
        assert copy.deepcopy(model).generate.defer_stop is False
        af.defer_stop_check(model, True)
        assert copy.deepcopy(model).generate.defer_stop is True
    plain, spy, seen = model_and_spy(inject=False)  # the backbone alone: transformers' way until asked
    with torch.no_grad():
        plain.generate(prompt, max_new_tokens=3, logits_processor=spy)
        assert seen and not any(seen)
        seen.clear()
        with af.deferred_stop_check():
            plain.generate(prompt, max_new_tokens=3, logits_processor=spy)
        assert seen and all(seen)
        seen.clear()
        af.defer_stop_check(plain)
        plain.generate(prompt, max_new_tokens=3, logits_processor=spy)
        assert seen and all(seen)
        seen.clear()
        af.defer_stop_check(plain, False)  # off, even inside a scope that turns it on
        with af.deferred_stop_check():
            plain.generate(prompt, max_new_tokens=3, logits_processor=spy)
        assert seen and not any(seen)


def test_sampling_keeps_the_sync_per_step():
    # The extra step after an EOS would draw from the random generator: the next call would sample
    # other tokens than with a sync per step. An injected generate() does not defer when it samples.
    model, spy, seen = model_and_spy()
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=3, do_sample=True, logits_processor=spy)
        assert seen and not any(seen)
        seen.clear()
        model.generation_config.do_sample = True
        model.generate(prompt, max_new_tokens=3, logits_processor=spy)
        assert seen and not any(seen)
        seen.clear()
        model.generate(prompt, max_new_tokens=3, do_sample=False, logits_processor=spy)
        assert seen and all(seen)


def test_switches_set_before_inject_are_taken_over_not_wrapped_again():
    import io

    from adafuse_compile.modeling.generate_cache import StaticCacheReuse

    model = tiny_hf_model("llama")
    af.defer_stop_check(model, False)  # set by hand before inject: kept
    wrapper = model.generate
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal"))
    assert model.generate is wrapper and wrapper.channel is af.gate_channel(model)
    assert wrapper.defer_stop is False
    reuse = model._prepare_static_cache
    assert isinstance(reuse, StaticCacheReuse) and not isinstance(reuse.inner, StaticCacheReuse)
    assert reuse.enabled  # not set by hand: inject's default, on
    buf = io.BytesIO()
    torch.save(model, buf)  # the wrappers pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.generate.channel is af.gate_channel(loaded) and loaded.generate.defer_stop is False


@pytest.mark.parametrize("kept_cache", [True, False])
def test_deferred_generate_returns_the_same_tokens_eos_or_not(monkeypatch, kept_cache):
    """The deferred path itself, run on the CPU (DEVICE_TYPES widened): an EOS mid-sequence costs one
    extra forward that generate() must undo, and the kept cache must not carry it into the next call."""
    from transformers.generation import utils as hf_utils

    made = []
    init = hf_utils.DeferredStopCheck.__init__

    class HostEvent:  # the CPU has no torch.Event; its work is done by the time the host reads anything
        def record(self):
            pass

        def synchronize(self):
            pass

    def count(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)
        self.slots = type(self.slots)((flag, tokens, HostEvent()) for flag, tokens, _ in self.slots)

    monkeypatch.setattr(hf_utils.DeferredStopCheck, "__init__", count)
    model, _, _ = model_and_spy()
    af.reuse_static_cache(model, kept_cache)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 100, (1, n), generator=gen) for n in (7, 4, 9)]
    with torch.no_grad():
        af.defer_stop_check(model, False)
        free = [model.generate(p, max_new_tokens=8, min_new_tokens=8) for p in prompts]
        # an EOS the model actually emits mid-way: the first new token of the first prompt that differs
        # from its first new token (so at least one decode step runs before the stop)
        new = free[0][0, prompts[0].shape[1]:].tolist()
        stop_at = next(i for i, t in enumerate(new) if t != new[0])
        eos = new[stop_at]
        model.generation_config.eos_token_id = eos
        per_step = [model.generate(p, max_new_tokens=8) for p in prompts]
        assert not made
        monkeypatch.setattr(generate_stop, "DEVICE_TYPES", ("cuda", "cpu"))
        af.defer_stop_check(model, True)
        deferred = [model.generate(p, max_new_tokens=8) for p in prompts]
        assert len(made) == len(prompts)  # transformers' deferred check ran, once per call
    assert per_step[0].shape[1] == prompts[0].shape[1] + stop_at + 1 < prompts[0].shape[1] + 8  # stopped at the EOS
    for a, b in zip(per_step, deferred):
        assert torch.equal(a, b)
