"""Merged weights never leak: saving, eager calls, train(), errors and interrupts see the backbone."""
import threading

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import adafuse_compile as af
from safetensors.torch import load_file

from adafuse_compile.modeling.checkpoint import save_adapters
from adafuse_compile.modeling.inject import adapter_state_dict
from adafuse_compile.presets import tiny_hf_model

TINY = af.TinyLlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_seq_len=64)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapted(seed=0, model=None):
    torch.manual_seed(seed)
    model = model if model is not None else af.TinyLlama(TINY).init_weights(std=0.1, seed=seed)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, alpha=16, init_lora_b="normal"))
    return model.eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def merged_now(model, w0):
    names = [n + ".weight" for n in af.adapted_linears(model)]
    return any(not torch.equal(w, w0[n]) for w, n in zip(af.gate_channel(model).adapted_weights, names))


def two_models_sharing_a_backbone():
    """Two adapted models (different experts) whose linears hold the same backbone Parameters."""
    backbone = af.TinyLlama(TINY).init_weights(std=0.1, seed=7)
    other = af.TinyLlama(TINY)
    for p, q in zip(backbone.modules(), other.modules()):
        if isinstance(p, torch.nn.Linear):  # share the Parameters themselves
            q.weight = p.weight
    return adapted(1, backbone), adapted(2, other)


def in_place_merged_model():
    """A model mid-way through its own in-place decode loop (weights merged), and its backbone."""
    model = adapted()
    w0 = snapshot(model)
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
    decode_steps(compiled, 3)
    assert merged_now(model, w0)
    return model, w0


def decode_steps(compiled, n, start=0):
    """A user's own inference decode loop: compiled one-token steps, weights merged between them
    (under no_grad: a step traced with gradients enabled takes the differentiable dense form)."""
    with torch.no_grad():
        return [compiled(torch.tensor([[3 + i]]), torch.tensor([start + i])) for i in range(n)]


@pytest.mark.parametrize("exact", [True, False])
def test_state_dict_and_saves_after_decode_are_bit_exact(tmp_path, exact):
    model = adapted()
    w0 = snapshot(model)
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": exact})
    decode_steps(compiled, 4)
    assert merged_now(model, w0) == (not exact)  # exact mode switches its own buffers: W never changes
    sd = model.state_dict()  # in place: restores first
    assert all(torch.equal(sd[k], w0[k]) for k in w0)
    decode_steps(compiled, 2, start=4)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt")
    assert all(torch.equal(loaded[k], w0[k]) for k in w0)
    decode_steps(compiled, 2, start=6)
    assert merged_now(model, w0) == (not exact)
    save_adapters(model, tmp_path / "a.safetensors")  # router + experts only: merging never touches them
    saved = load_file(str(tmp_path / "a.safetensors"))
    assert set(saved) == set(adapter_state_dict(model)) and not any(k.endswith("proj.weight") for k in saved)
    assert all(torch.equal(saved[k], v) for k, v in adapter_state_dict(model).items())


def test_exact_mode_never_writes_the_models_weights(tmp_path):
    """Between a user's own compiled steps, every view of the model is the backbone: parameters,
    named_parameters(), pickling the whole module; and the steps still match eager."""
    model = adapted()
    w0 = snapshot(model)
    params = dict(model.named_parameters())
    versions = {n: p._version for n, p in params.items()}
    model.setup_cache(1)
    with torch.no_grad():
        ref = [model(torch.tensor([[3 + i]]), torch.tensor([i])) for i in range(4)]
        model.setup_cache(1)
        compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": True})
        for i in range(4):
            out = compiled(torch.tensor([[3 + i]]), torch.tensor([i]))
            torch.testing.assert_close(out, ref[i], rtol=1e-4, atol=1e-5)
            assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())
    assert af.gate_channel(model).switch_state.exact
    assert all(p._version == versions[n] for n, p in params.items())  # not even written with equal values
    torch.save(model, tmp_path / "whole.pt")  # no restore hook runs for pickling: nothing to restore
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert all(torch.equal(v, w0[k]) for k, v in again.state_dict().items())


def test_hf_save_pretrained_after_compiled_generate(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_hf_model("llama")
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal"))
    model.generation_config.cache_implementation = "static"
    w0 = snapshot(model)
    model.compile(backend="adafuse", options={"codegen": "eager"})
    with torch.no_grad():
        model.generate(torch.randint(0, 256, (1, 6)), max_new_tokens=6, do_sample=False)
    assert not merged_now(model, w0)  # leaving generate() restored
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    for k, v in again.state_dict().items():
        if k in w0:
            assert torch.equal(v, w0[k]), k


class _Raise(LogitsProcessor):
    def __init__(self, at, exc):
        self.at, self.exc, self.calls = at, exc, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return scores


@pytest.mark.parametrize("exc", [RuntimeError("boom inside a decode step"), KeyboardInterrupt()])
@pytest.mark.parametrize("exact", [True, False])
def test_error_or_interrupt_inside_generate_leaves_weights_pristine(exc, exact):
    model = tiny_hf_model("mistral")
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal"))
    model.generation_config.cache_implementation = "static"
    w0 = snapshot(model)
    model.compile(backend="adafuse", options={"codegen": "eager", "exact": exact})
    processor = _Raise(at=5, exc=exc)
    with pytest.raises(type(exc)), torch.no_grad():
        model.generate(torch.randint(0, 256, (1, 6)), max_new_tokens=10, do_sample=False,
                       logits_processor=LogitsProcessorList([processor]))
    assert processor.calls == 5  # it stopped mid-decode, after merged steps
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_decoding_context_and_train_restore():
    model = adapted()
    w0 = snapshot(model)
    model.setup_cache(1)
    # In place: the mode that writes W, so restoring has something to do.
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
    with pytest.raises(KeyboardInterrupt):
        with af.decoding(model):
            decode_steps(compiled, 3)
            assert merged_now(model, w0)
            raise KeyboardInterrupt
    assert not merged_now(model, w0)
    decode_steps(compiled, 2, start=3)
    model.train()
    assert not merged_now(model, w0)


@pytest.mark.parametrize("exact", [True, False])
def test_second_thread_on_a_merged_model_fails_clearly(exact):
    model = adapted()
    w0 = snapshot(model)
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": exact})
    decode_steps(compiled, 2)  # this thread holds a merged decode
    errors = []

    def other_thread():
        try:
            decode_steps(compiled, 1, start=2)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], af.ConcurrentUseError)
    assert "another thread" in str(errors[0]) and "one model per thread" in str(errors[0])
    af.restore(model)  # the owning thread finishes; then the other thread may decode
    t = threading.Thread(target=lambda: (decode_steps(compiled, 1, start=2), af.restore(model)))
    t.start()
    t.join()
    assert not merged_now(model, w0)


def test_two_models_sharing_one_backbone_interleave_correctly():
    first, second = two_models_sharing_a_backbone()
    assert first.layers[0].self_attn.q_proj.weight is second.layers[0].self_attn.q_proj.weight
    tokens = [torch.tensor([[5 + i]]) for i in range(6)]
    refs = {}
    for name, m in (("first", first), ("second", second)):
        m.setup_cache(1)
        refs[name] = [m(t, torch.tensor([i])) for i, t in enumerate(tokens)]
    compiled = {}
    for name, m in (("first", first), ("second", second)):
        m.setup_cache(1)
        compiled[name] = torch.compile(m, backend="adafuse", options={"codegen": "eager"})
    for i, t in enumerate(tokens):  # alternate steps: each merge must first undo the other model's
        for name in ("first", "second"):
            out = compiled[name](t, torch.tensor([i]))
            torch.testing.assert_close(out, refs[name][i], rtol=1e-4, atol=1e-5)


def test_an_eager_call_of_a_model_sharing_the_backbone_undoes_an_in_place_merge():
    # GateChannel.open walks its adapted weights for another model's in-place merge only while some
    # model is merged in place (switch_state.any_merged_in_place): the walk must still run when it is.
    from adafuse_compile.runtime import switch_state

    first, second = two_models_sharing_a_backbone()
    w0 = snapshot(first)
    assert not switch_state.any_merged_in_place()
    first.setup_cache(1)
    decode_steps(torch.compile(first, backend="adafuse", options={"codegen": "eager", "exact": False}), 2)
    assert merged_now(first, w0) and switch_state.any_merged_in_place()
    second.setup_cache(1)
    ref = second(torch.tensor([[5]]), torch.tensor([0]))  # eager: must read the backbone, not first's experts
    assert not merged_now(first, w0) and not switch_state.any_merged_in_place()
    second.setup_cache(1)
    torch.testing.assert_close(second(torch.tensor([[5]]), torch.tensor([0])), ref, rtol=0, atol=0)


def test_two_exact_models_sharing_a_backbone_decode_on_two_threads_at_once():
    """Exact mode never writes the shared weights, so two such models can decode concurrently."""
    models = dict(zip(("first", "second"), two_models_sharing_a_backbone()))
    tokens = [torch.tensor([[5 + i]]) for i in range(5)]
    refs, compiled = {}, {}
    with torch.no_grad():
        for name, m in models.items():
            m.setup_cache(1)
            refs[name] = [m(t, torch.tensor([i])) for i, t in enumerate(tokens)]
            m.setup_cache(1)
            compiled[name] = torch.compile(m, backend="adafuse", options={"codegen": "eager", "exact": True})
            compiled[name](tokens[0], torch.tensor([0]))  # compile here, not inside the race
            af.restore(m)  # this thread's decode ends here
            m.setup_cache(1)
    barrier, outs, errors = threading.Barrier(2), {"first": [], "second": []}, []

    def run(name):
        try:
            with torch.no_grad():
                for i, t in enumerate(tokens):
                    barrier.wait()  # both threads inside a decode at every step
                    outs[name].append(compiled[name](t, torch.tensor([i])))
            af.restore(models[name])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(n,)) for n in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in models:
        for got, want in zip(outs[name], refs[name]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_recompiling_with_another_exact_mode_keeps_weights_right():
    """A second compile with exact=False gets its own switch state; both compiled models stay
    right against eager, and restore() puts back W0 whichever of them merged last."""
    model = adapted()
    w0 = snapshot(model)
    tok, pos = torch.tensor([[3]]), torch.tensor([0])
    with torch.no_grad():
        model.setup_cache(1)
        ref = model(tok, pos)
        exact = torch.compile(model, backend="adafuse", options={"exact": True, "codegen": "eager"})
        model.setup_cache(1)
        a = exact(tok, pos)
        torch._dynamo.reset()
        inplace = torch.compile(model, backend="adafuse", options={"exact": False, "codegen": "eager"})
        model.setup_cache(1)
        b = inplace(tok, pos)
        assert af.gate_channel(model).switch_state.exact is False
        model.setup_cache(1)
        c = exact(tok, pos)  # the first compiled model merges again, after the second one
        assert not merged_now(model, w0)  # the exact step restored the in-place merge and wrote only its buffers
        model.setup_cache(1)
        d = inplace(tok, pos)
        assert merged_now(model, w0)
    for got in (a, b, c, d):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    af.restore(model)
    assert not merged_now(model, w0)


@pytest.mark.parametrize("options", [{"exact": True}, {"exact": False}, {"path": "factor"}],
                         ids=["exact", "inplace", "factor"])
def test_two_instances_of_one_model_class_each_get_their_own_state(options):
    """Dynamo reuses the first instance's graph for a second instance of the same class; the second
    must still switch its own weights with its own state, buffers and slots."""
    models = [adapted(seed) for seed in (3, 4)]  # different backbones and adapters, same class
    tokens = [torch.tensor([[5 + i]]) for i in range(5)]
    refs, compiled = [], []
    with torch.no_grad():
        for m in models:
            m.setup_cache(1)
            refs.append([m(t, torch.tensor([i])) for i, t in enumerate(tokens)])
        for m in models:
            m.setup_cache(1)
            compiled.append(torch.compile(m, backend="adafuse", options={"codegen": "eager", **options}))
        for i, t in enumerate(tokens):  # interleaved steps
            for m, c, ref in zip(models, compiled, refs):
                torch.testing.assert_close(c(t, torch.tensor([i])), ref[i], rtol=1e-4, atol=1e-5)
    channels = [af.gate_channel(m) for m in models]
    if "exact" in options:
        assert channels[0].switch_state is not channels[1].switch_state
        assert all(c.switch_state.exact == options["exact"] for c in channels)
    else:
        assert channels[0].factor_slots[1][0] is not channels[1].factor_slots[1][0]
    for m in models:
        af.restore(m)


def test_in_place_model_cannot_write_a_backbone_an_exact_model_reads_on_another_thread():
    reader, writer = two_models_sharing_a_backbone()
    w0 = snapshot(reader)
    tok, pos = torch.tensor([[3]]), torch.tensor([0])
    with torch.no_grad():
        reader.setup_cache(1)
        exact = torch.compile(reader, backend="adafuse", options={"codegen": "eager", "exact": True})
        exact(tok, pos)
        af.restore(reader)
        writer.setup_cache(1)
        inplace = torch.compile(writer, backend="adafuse", options={"codegen": "eager", "exact": False})
        inplace(tok, pos)
        af.restore(writer)
    errors = []
    inside, release = threading.Event(), threading.Event()

    def run(fn, hold=False):
        try:
            with torch.no_grad():
                fn(tok, pos)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)
        if hold:  # stay alive: an ended thread's id can be given to the next thread
            inside.set()
            release.wait(30)

    t1 = threading.Thread(target=run, args=(exact, True))  # thread 1 is inside an exact decode, reading W
    t1.start()
    assert inside.wait(30)
    t2 = threading.Thread(target=run, args=(inplace,))  # thread 2 would merge into that W
    t2.start()
    t2.join()
    release.set()
    t1.join()
    assert len(errors) == 1 and isinstance(errors[0], af.ConcurrentUseError), errors
    assert "in-place switching would change the weights it reads" in str(errors[0])
    # named_parameters, not state_dict: the reader is still inside thread 1's decode (its hook would refuse)
    assert all(torch.equal(v, w0[k]) for k, v in reader.named_parameters() if k in w0)


def test_a_deep_copy_of_a_compiled_model_runs_the_same_graph_with_its_own_state():
    import copy

    model = adapted(5)
    tokens = [torch.tensor([[5 + i]]) for i in range(3)]
    with torch.no_grad():
        model.setup_cache(1)
        ref = [model(t, torch.tensor([i])) for i, t in enumerate(tokens)]
        model.setup_cache(1)
        compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
        compiled(tokens[0], torch.tensor([0]))
        twin = copy.deepcopy(model)  # restores the original first; the copy is unmerged and tagged
        assert all(getattr(p, "_adafuse_tag", None) is not None for n, p in twin.named_parameters()
                   if n.endswith(("lora_A", "lora_B")))
        twin.setup_cache(1)
        twin_compiled = torch.compile(twin, backend="adafuse", options={"codegen": "eager", "exact": False})
        for i, t in enumerate(tokens):
            torch.testing.assert_close(twin_compiled(t, torch.tensor([i])), ref[i], rtol=1e-4, atol=1e-5)
    assert af.gate_channel(twin).switch_state is not af.gate_channel(model).switch_state
    af.restore(twin)


def test_torch_save_in_the_middle_of_an_in_place_decode_saves_the_backbone(tmp_path):
    model, w0 = in_place_merged_model()
    torch.save(model, tmp_path / "whole.pt")
    again = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert all(torch.equal(v, w0[k]) for k, v in again.state_dict().items())


def test_a_second_instance_leaves_nothing_behind_and_refuses_a_different_mode(monkeypatch):
    """What a graph binds for another instance lives on that instance (collected with it); an
    instance whose memory would pick the other mode gets a clear error, not a wrong step."""
    import gc
    import weakref

    from adafuse_compile.runtime import switch_state

    first = adapted(3)
    tok, pos = torch.tensor([[3]]), torch.tensor([0])
    with torch.no_grad():
        first.setup_cache(1)
        compiled = torch.compile(first, backend="adafuse", options={"codegen": "eager"})
        compiled(tok, pos)
        af.restore(first)
        second = adapted(4)
        second.setup_cache(1)
        torch.compile(second, backend="adafuse", options={"codegen": "eager"})(tok, pos)  # the same graph
        af.restore(second)
        channel = weakref.ref(af.gate_channel(second))
        assert channel().switch_state is not None and channel().switch_state.exact
        del second
        gc.collect()
        assert channel() is None
        monkeypatch.setattr(switch_state, "choose_exact", lambda *a: (False, "in place (memory short, test)"))
        third = adapted(5)
        third.setup_cache(1)
        with pytest.raises(RuntimeError, match="switches exactly, but another instance"):
            torch.compile(third, backend="adafuse", options={"codegen": "eager"})(tok, pos)


def test_copies_after_a_decode_on_a_finished_worker_thread(tmp_path):
    """Exact mode: pickling or copying a model another thread decoded with never touches the
    weights, so it works; in place the merge is undone first, or the copy fails loudly."""
    import copy

    for exact in (True, False):
        model = adapted()
        w0 = snapshot(model)
        model.setup_cache(1)
        compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": exact})
        worker = threading.Thread(target=lambda: decode_steps(compiled, 2))  # ends without restoring
        worker.start()
        worker.join()
        if exact:
            torch.save(model, tmp_path / "m.pt")
            saved = torch.load(tmp_path / "m.pt", weights_only=False).state_dict()
            assert all(torch.equal(v, w0[k]) for k, v in saved.items())
            assert all(torch.equal(v, w0[k]) for k, v in copy.deepcopy(model).state_dict().items())
        else:
            with pytest.raises(af.ConcurrentUseError):
                copy.deepcopy(model)
        torch._dynamo.reset()


def test_deep_copy_of_a_part_of_an_in_place_merged_model_copies_the_backbone():
    import copy

    model, w0 = in_place_merged_model()
    layers = copy.deepcopy(model.layers)  # reaches the adapted weights before the model's channel
    for k, v in layers.state_dict().items():
        assert torch.equal(v, w0["layers." + k]), k


# The user changes the model after compiling ---------------------------------------------------------

def _backbone_of(seed):
    """Backbone tensors (no adapters, no router) of another model: a new base model to load."""
    other = adapted(seed)
    return {k: v.clone() for k, v in other.state_dict().items() if "lora_" not in k and "router" not in k}


def _eager_steps(model, n):
    af.restore(model)
    model.setup_cache(1)
    with torch.no_grad():
        return [model(torch.tensor([[3 + i]]), torch.tensor([i])) for i in range(n)]


@pytest.mark.parametrize("when", ["between decodes", "mid-decode"])
def test_in_place_decode_after_loading_a_new_backbone_uses_it(when):
    """In place, a backbone loaded with load_state_dict (in place into the same Parameters) is the
    one later decodes merge into and every restore puts back: the host copy of W0 is taken again
    (between decodes), and a load in the middle of a decode restores first (so the merged experts
    are not loaded over, nor later unmerged from the new weights)."""
    model, _ = in_place_merged_model()
    if when == "between decodes":
        af.restore(model)
    new = _backbone_of(5)
    model.load_state_dict(new, strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
    model.setup_cache(1)
    got = decode_steps(compiled, 3)
    with torch.no_grad():  # a prefill graph restores the weights first: the new ones
        prefill = compiled(torch.tensor([[3, 4, 5]]), torch.arange(3))
    ref = _eager_steps(model, 3)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    model.setup_cache(1)
    with torch.no_grad():
        torch.testing.assert_close(prefill, model(torch.tensor([[3, 4, 5]]), torch.arange(3)), rtol=1e-4, atol=1e-5)
    af.restore(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in new.items())


def test_new_adapters_loaded_mid_in_place_decode_are_merged_from_the_backbone():
    """Adapters (and router) loaded while the old experts sit in the weights: the load restores the
    backbone first, so the next step merges the new experts into W0, not W0 + old - new."""
    model, w0 = in_place_merged_model()
    other = adapted(9)
    new = {k: v.clone() for k, v in other.state_dict().items() if "lora_" in k or "router" in k}
    model.load_state_dict(new, strict=False)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
    model.setup_cache(1)
    got = decode_steps(compiled, 3)
    for g, r in zip(got, _eager_steps(model, 3)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], w0[k]) for k in w0 if k not in new)


def test_in_place_decode_over_replaced_backbone_parameters_fails_clearly():
    """load_state_dict(assign=True) puts new Parameters in: the in-place state would restore the old
    ones, so the step refuses with the reason and the fixes, and the new weights stay as loaded."""
    from adafuse_compile.runtime.switch_state import ReplacedWeightsError

    model, _ = in_place_merged_model()
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
    new = _backbone_of(5)
    model.load_state_dict(new, strict=False, assign=True)
    model.setup_cache(1)
    with pytest.raises(ReplacedWeightsError, match="assign=True.*load new weights in place.*exact"):
        decode_steps(compiled, 1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())


@pytest.mark.parametrize("path", ["factor", "merge"])
def test_decode_after_model_to_another_dtype(path):
    """model.to(dtype) keeps the Parameters (same ids) and converts them: the factor slots and the
    merge path's buffers follow (a recompile with new ones, not stale fp32 slots or a switch that
    cannot be planned)."""
    from adafuse_compile import backend

    model = adapted()
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "path": path})
    model.setup_cache(1)
    decode_steps(compiled, 2)
    af.restore(model)
    model.to(torch.bfloat16)
    model.setup_cache(1)
    got = decode_steps(compiled, 3)
    assert got[0].dtype == torch.bfloat16
    for g, r in zip(got, _eager_steps(model, 3)):  # bf16: the merged weight rounds W0 + delta once more
        assert ((g.float() - r.float()).abs().max() / r.float().abs().max()).item() < 3e-2
    assert backend.last_compilations[-1]["path"] == path


def test_a_submodule_state_dict_mid_in_place_decode_holds_the_backbone():
    model, w0 = in_place_merged_model()
    part = model.layers.state_dict()
    for k, v in part.items():
        assert torch.equal(v, w0["layers." + k]), k
