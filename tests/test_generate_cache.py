"""generate() keeps one static KV cache from call to call after inject (modeling/generate_cache.py):
the same tensors for every prompt that fits, the same tokens as a new cache per call, a new cache
where it does not fit, never a cache the caller holds or another call is using, nothing of it in
a saved or copied model."""
from __future__ import annotations

import copy
import io
import threading

import pytest
import torch

import adafuse_compile as af
from adafuse_compile.modeling.generate_cache import StaticCacheReuse
from adafuse_compile.presets import tiny_hf_model


def injected(family: str = "llama", static: bool = True, **overrides):
    model = tiny_hf_model(family, **overrides)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal"))
    gc_ = model.generation_config
    gc_.cache_implementation = "static" if static else None
    gc_.max_cache_len = 64  # sized for every call below (else the cache grows with the longest prompt so far)
    gc_.pad_token_id, gc_.eos_token_id, gc_.do_sample = 0, None, False
    return model


@pytest.fixture
def handed(monkeypatch):
    """Every cache StaticCacheReuse hands to generate(), in order."""
    caches = []
    call = StaticCacheReuse.__call__

    def spy(self, *args, **kwargs):
        cache = call(self, *args, **kwargs)
        caches.append(cache)
        return cache

    monkeypatch.setattr(StaticCacheReuse, "__call__", spy)
    return caches


def prompts(*lengths, batch=1):
    gen = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(3, 100, (batch, n), generator=gen) for n in lengths]


def generate_all(model, batch, new_tokens=5):
    with torch.no_grad():
        return [model.generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens) for p in batch]


def key_addresses(cache):
    return [layer.keys.data_ptr() for layer in cache.layers]


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {}), ("qwen2", {}),
                                               ("mistral", {"sliding_window": 8})])  # prompts longer than the window
def test_one_cache_for_every_prompt_and_the_same_tokens_as_a_new_cache_per_call(handed, family, overrides):
    model = injected(family, **overrides)
    batch = prompts(7, 3, 12, 5)  # longer after shorter and back: the reset must clear the longer prompt's entries
    reused = generate_all(model, batch)
    assert len(handed) == 4 and all(c is handed[0] for c in handed)
    assert len({tuple(key_addresses(c)) for c in handed}) == 1
    af.reuse_static_cache(model, False)
    handed.clear()
    fresh = generate_all(model, batch)
    assert len({id(c) for c in handed}) == 4  # transformers' own behaviour: a new cache per call
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)


def test_compiled_generate_decodes_into_the_same_cache_tensors(handed):
    model = injected()
    model.generation_config.compile_config = None
    model.compile(backend="adafuse", options={"codegen": "eager"})  # the prompt runs compiled too
    batch = prompts(6, 9, 4)
    out = generate_all(model, batch)
    assert all(c is handed[0] for c in handed) and len(handed) == 3
    # made before the compiled prompt, so marked as static addresses (under tracing transformers skips that)
    assert all(hasattr(t, "_dynamo_static_input_type") for layer in handed[0].layers for t in (layer.keys, layer.values))
    eager = injected()  # same seed, same weights; uncompiled, a new cache per call
    af.reuse_static_cache(eager, False)
    for a, b in zip(out, generate_all(eager, batch)):
        assert torch.equal(a, b)


def test_a_new_cache_per_call_is_still_made_before_the_compiled_prompt(handed):
    # Reuse off (transformers' way) under model.compile: each call's new cache is made before the
    # compiled prompt all the same. Left to the prompt, its length counter became a CUDA-graph output
    # that the next replay overwrote (H200, transformers 5.17: the GPU test's per-call run failed).
    model = injected()
    af.reuse_static_cache(model, False)
    model.generation_config.compile_config = None
    model.compile(backend="adafuse", options={"codegen": "eager"})
    generate_all(model, prompts(6, 9))
    assert len(handed) == 2 and handed[0] is not handed[1]
    assert all(hasattr(t, "_dynamo_static_input_type")
               for c in handed for layer in c.layers for t in (layer.keys, layer.values))


def test_a_cache_that_does_not_fit_is_replaced(handed):
    model = injected()
    generate_all(model, prompts(6), new_tokens=4)
    generate_all(model, prompts(6), new_tokens=3)  # shorter: fits
    assert handed[1] is handed[0]
    generate_all(model, prompts(6), new_tokens=80)  # longer than the cache: a new one, kept from then on
    assert handed[2] is not handed[0]
    generate_all(model, prompts(6), new_tokens=4)
    assert handed[3] is handed[2]
    generate_all(model, prompts(6, batch=2), new_tokens=4)  # another batch size
    assert handed[4] is not handed[2]


def test_a_returned_cache_stays_the_callers():
    model = injected()
    with torch.no_grad():
        out = model.generate(prompts(8)[0], max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        assert cache is not None
        held = [layer.keys.clone() for layer in cache.layers]
        generate_all(model, prompts(5))
    assert all(torch.equal(h, layer.keys) for h, layer in zip(held, cache.layers))  # not reset, not overwritten


def test_concurrent_calls_never_share_a_cache(handed):
    model = injected()
    generate_all(model, prompts(4))  # a cache is kept
    inside, release = threading.Event(), threading.Event()

    class Hold:  # a logits processor: holds thread A inside generate() until B is done
        def __call__(self, input_ids, scores):
            inside.set()
            release.wait(30)
            return scores

    def run_a():
        with torch.no_grad():
            model.generate(prompts(6)[0], max_new_tokens=2, min_new_tokens=2, logits_processor=[Hold()])

    a = threading.Thread(target=run_a)
    a.start()
    assert inside.wait(30)
    generate_all(model, prompts(5))  # B, while A decodes into the kept cache
    release.set()
    a.join(30)
    assert handed[1] is handed[0]  # A took the kept cache
    assert handed[2] is not handed[0]  # B got its own
    generate_all(model, prompts(5))
    assert handed[3] is handed[0]  # and the kept one is free again


def test_saved_and_copied_models_carry_no_cache_and_still_generate():
    model = injected()
    generate_all(model, prompts(6))
    assert model._prepare_static_cache._kept is not None
    twin = copy.deepcopy(model)
    assert twin._prepare_static_cache._kept is None
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ref = generate_all(model, prompts(6, 9))
    for other in (twin, loaded):
        assert other._prepare_static_cache.inner.__self__ is other  # its own model's hook, not the original's
        for a, b in zip(ref, generate_all(other, prompts(6, 9))):
            assert torch.equal(a, b)
        assert other._prepare_static_cache._kept is not None


def test_a_plain_model_keeps_its_cache_once_asked(handed):
    # The backbone alone (the bench's reference): off until asked, then one cache, same tokens.
    model = tiny_hf_model("llama")
    gc_ = model.generation_config
    gc_.cache_implementation, gc_.max_cache_len = "static", 64
    gc_.pad_token_id, gc_.eos_token_id, gc_.do_sample = 0, None, False
    fresh = generate_all(model, prompts(7, 3))
    assert not handed  # nothing of ours in its generate() yet
    af.reuse_static_cache(model)
    kept = generate_all(model, prompts(7, 3))
    assert len(handed) == 2 and handed[0] is handed[1]
    for a, b in zip(fresh, kept):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no generate\\(\\) to set up"):
        af.reuse_static_cache(torch.nn.Linear(2, 2))


def test_inference_mode_and_autocast_get_caches_of_their_own(handed, caplog):
    """A cache made under inference_mode holds inference tensors, which cannot be reset or written
    outside it; autocast decides the dtype of the tensors a cache is made with. Told apart by the
    fit, not by a failed reset."""
    caplog.set_level("INFO", logger="adafuse_compile")
    model = injected()
    batch = prompts(6, 9)
    with torch.inference_mode():
        first = [model.generate(p, max_new_tokens=4, min_new_tokens=4) for p in batch]
    second = generate_all(model, batch, new_tokens=4)  # no_grad only: must not write the inference tensors
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert handed[2] is not handed[0] and handed[3] is handed[2]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(batch[0], max_new_tokens=3, min_new_tokens=3)
    assert handed[4] is not handed[2]
    generate_all(model, batch[:2], new_tokens=3)  # autocast off again: a new float32 cache, then kept
    assert handed[5] is not handed[4] and handed[6] is handed[5]
    assert handed[5].layers[0].keys.dtype == torch.float32
    assert "could not be reset" not in caplog.text


def test_a_cache_that_cannot_be_reset_is_replaced(handed, monkeypatch):
    model = injected()
    generate_all(model, prompts(5))
    kept = handed[0]

    def broken():
        raise RuntimeError("cannot reset")

    monkeypatch.setattr(kept, "reset", broken)
    generate_all(model, prompts(5))
    assert handed[1] is not kept  # transformers' own new cache instead, and kept from then on
    generate_all(model, prompts(5))
    assert handed[2] is handed[1]


def test_nested_generate_on_one_thread_releases_the_kept_cache(handed):
    model = injected()
    generate_all(model, prompts(4))

    class Nested:  # a logits processor that calls generate() once, from inside generate()
        done = False

        def __call__(self, input_ids, scores):
            if not self.done:
                self.done = True
                model.generate(prompts(3)[0], max_new_tokens=2, min_new_tokens=2)
            return scores

    with torch.no_grad():
        model.generate(prompts(6)[0], max_new_tokens=3, min_new_tokens=3, logits_processor=[Nested()])
    assert handed[1] is handed[0] and handed[2] is not handed[0]  # outer: the kept one; inner: its own
    generate_all(model, prompts(5))
    assert handed[3] is handed[0]  # released by the outer call


def test_the_kept_length_is_what_transformers_allocated(handed):
    model = injected()
    model.generation_config.max_cache_len = None  # asked: prompt + new tokens - 1
    generate_all(model, prompts(30), new_tokens=10)  # allocates 39
    with torch.no_grad():  # takes the kept cache and returns it: forgotten
        model.generate(prompts(4)[0], max_new_tokens=2, min_new_tokens=2, return_dict_in_generate=True)
    generate_all(model, prompts(10), new_tokens=3)  # asks 12; transformers allocates max(12, 39)
    generate_all(model, prompts(20), new_tokens=5)  # asks 24: fits the 39 allocated
    assert handed[3] is handed[2]


def test_beam_search_takes_no_part(handed):
    model = injected()
    generate_all(model, prompts(6))
    with torch.no_grad():
        beams = [model.generate(prompts(6)[0], max_new_tokens=3, num_beams=2, do_sample=False) for _ in range(2)]
    assert all(c is not handed[0] for c in handed[1:]) and handed[1] is not handed[2]
    assert torch.equal(beams[0], beams[1])
    generate_all(model, prompts(6))
    assert handed[3] is handed[0]


def test_the_bench_leaves_transformers_that_keep_their_own_cache_alone(monkeypatch):
    import transformers

    from adafuse_compile import bench

    monkeypatch.setattr(transformers, "__version__", "5.14.0")
    model = tiny_hf_model("llama")
    for hf_cache in ("reused", "per-call"):
        assert bench.generate_cache(model, hf_cache, 32) is None
    assert not hasattr(model.generate, "cache_reuse")  # nothing wrapped


def test_transformers_that_keep_their_own_cache_are_left_alone(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.14.0")
    model = injected()
    assert model.generate.cache_reuse is None
    with pytest.raises(ValueError, match="before 5.15"):
        af.reuse_static_cache(model)


def test_a_compiled_model_generating_into_a_growing_cache_is_told_once():
    """transformers' default DynamicCache grows every step: the compiled decode step changes shape
    every step (under CUDA graphs a recording per length). Said once, with the fix."""
    import warnings

    from transformers import DynamicCache, StaticCache

    def warned(model, **kwargs):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model.generate(prompts(5)[0], max_new_tokens=2, min_new_tokens=2, **kwargs)
        return [str(w.message) for w in caught if "dynamic KV cache" in str(w.message)]

    model = injected(static=False)
    assert warned(model) == []  # not compiled: nothing to say
    model.compile(backend="adafuse", options={"codegen": "eager"})
    assert warned(model, cache_implementation="static") == []
    assert warned(model, past_key_values=StaticCache(config=model.config, max_cache_len=16)) == []
    assert warned(model, use_cache=False) == []
    said = warned(model)
    assert len(said) == 1 and "cache_implementation='static'" in said[0] and "StaticCache" in said[0]
    assert warned(model) == []  # once per model
    fresh = injected(static=False)
    fresh.compile(backend="adafuse", options={"codegen": "eager"})
    assert len(warned(fresh, past_key_values=DynamicCache(config=fresh.config))) == 1
    named = injected(static=False)  # the default's name given explicitly: the same growing cache
    named.compile(backend="adafuse", options={"codegen": "eager"})
    assert len(warned(named, cache_implementation="dynamic")) == 1
    torch._dynamo.reset()


def test_training_lets_the_kept_cache_go(handed):
    model = injected()
    generate_all(model, prompts(5))
    model.eval()  # train(False): kept
    assert model._prepare_static_cache._kept is not None
    model.train()
    assert model._prepare_static_cache._kept is None
    model.eval()
    generate_all(model, prompts(5))
    assert handed[1] is not handed[0]
