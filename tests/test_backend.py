"""The adafuse torch.compile backend on CPU: registration, options, passes, parity with eager."""
import warnings

import pytest
import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.baselines import inject_layerwise
from adafuse_compile.presets import HF_FAMILIES, tiny_hf_model
from adafuse_compile.settings import AdaFuseOptionsError, BackendSettings
from handwritten_layers import STYLES, PreGatedHandModel

TINY = af.TinyLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_seq_len=128)
SWITCH = "sgmm_switch"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def adapted_tiny(targets=("q_proj", "v_proj"), **kw):
    model = af.TinyLlama(TINY).init_weights(std=0.08, seed=3)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, alpha=16, init_lora_b="normal",
                                      target_modules=targets, **kw))
    return model.eval()


def targets_of(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def switch_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and SWITCH in str(n.target)]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# Registration and options ------------------------------------------------------------------------

def test_found_by_name_and_by_import_without_duplicate_registration():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    from adafuse_compile.backend import adafuse_backend

    assert "adafuse" in list_backends()
    assert lookup_backend("adafuse") is adafuse_backend
    assert lookup_backend("adafuse") is adafuse_backend  # a second lookup registers nothing again
    model = adapted_tiny()
    model.setup_cache(1)
    with torch.no_grad():
        for be in ("adafuse", adafuse_backend):
            torch._dynamo.reset()
            torch.compile(model, backend=be, options={"codegen": "eager"})(torch.tensor([[1]]), torch.tensor([0]))
    af.restore(model)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(AdaFuseOptionsError, match=r"unknown adafuse option\(s\) \['pth'\]; valid options: \['path'"):
        BackendSettings.from_compile_args({"pth": "merge"})
    with pytest.raises(AdaFuseOptionsError, match=r"path='fastest' is not one of \('merge', 'factor', 'gather', 'auto'\)"):
        BackendSettings.from_compile_args({"path": "fastest"})
    with pytest.raises(AdaFuseOptionsError, match="codegen"):
        BackendSettings.from_compile_args({"codegen": "tvm"})
    with pytest.raises(AdaFuseOptionsError, match=r"prefill_expand='tuples' is not one of \('auto', 'dense', 'sets', 'slots'\)"):
        BackendSettings.from_compile_args({"prefill_expand": "tuples"})
    with pytest.raises(AdaFuseOptionsError, match="side_stream must be True, False or None"):
        BackendSettings.from_compile_args({"side_stream": "on"})
    assert BackendSettings.from_compile_args(None, "reduce-overhead").cudagraphs is True
    model = adapted_tiny()
    with pytest.raises(Exception, match="valid options"):
        torch.compile(model, backend="adafuse", options={"bogus": 1})(torch.tensor([[1, 2]]))


# Decode parity and the rewritten graph ------------------------------------------------------------

@pytest.mark.parametrize("codegen", ["eager", "inductor"])
@pytest.mark.parametrize("exact", [True, False])
def test_tiny_llama_decode_parity_64_tokens(codegen, exact):
    model = adapted_tiny(targets="all-linear")
    prompt = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    model.setup_cache(1)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 64)
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": codegen, "exact": exact})
    tokens, logits = af.greedy_decode(compiled, prompt, 64)
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) <= 1e-4
    decode = [r for r in backend.last_compilations if r["rewritten"]]
    assert len(decode) == 1, "exactly one decode graph, rewritten"
    gm = decode[0]["graph"]
    assert len(switch_calls(gm)) == 1
    assert len(decode[0]["regions"]) == 3 * 7
    # No adapter branch is left: the expert factors feed the switch and nothing else.
    lora = [n for n in gm.graph.nodes if n.op == "placeholder" and "lora_" in n.name]
    assert lora and all(set(u.target for u in n.users) == {switch_calls(gm)[0].target} for n in lora)
    assert torch.einsum not in targets_of(gm) and torch.topk in targets_of(gm)
    af.restore(model)
    for k, v in model.state_dict().items():  # restored exactly in both modes
        assert torch.equal(v, w0[k]), k


def test_prefill_then_decode_and_back_stays_exact():
    """A 17-token prefill after merged decode steps must see the backbone weights again."""
    model = adapted_tiny()
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager"})
    prompt = torch.randint(0, TINY.vocab_size, (1, 17), generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # the second prefill runs while the weights are merged from the first decode
        model.setup_cache(1)
        tokens, logits = af.greedy_decode(compiled, prompt, 8)
    af.restore(model)
    model.setup_cache(1)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 8)
    assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
    notes = " ".join(n for r in backend.last_compilations for n in r["notes"])
    assert "this step has 17 tokens" in notes


def test_batch2_decode_is_not_merged_and_matches():
    model = adapted_tiny()
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    model.setup_cache(2)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 6)
    model.setup_cache(2)
    tokens, logits = af.greedy_decode(torch.compile(model, backend="adafuse"), prompt, 6)
    assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
    assert not any(r["rewritten"] for r in backend.last_compilations)


@pytest.mark.parametrize("routing", ["first_adapted", "every_adapted"])
@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_generate_parity_and_one_switch(family, routing):
    """Pre-gated: one switch in the decode graph. Layer-wise (a router in every adapted linear):
    every graph gathers, nothing merged, the weights never written."""
    model = tiny_hf_model(family)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, alpha=16, init_lora_b="normal",
                                      router_placement=routing))
    model.generation_config.cache_implementation = "static"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        model.compile(backend="adafuse", options={"codegen": "eager"})
        out = model.generate(prompt, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert rel_err(torch.stack(out.logits), torch.stack(ref.logits)) <= 1e-4
    if routing == "every_adapted":
        assert {r["path"] for r in backend.last_compilations} == {"gather"}
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    rewritten = [r for r in backend.last_compilations if r["rewritten"]]
    assert len(rewritten) == 1 and len(switch_calls(rewritten[0]["graph"])) == 1
    assert {r["module"] for r in rewritten[0]["regions"]} == {
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    af.restore(model)


# Detection of other styles, and what is not pre-gated ---------------------------------------------

@pytest.mark.parametrize("style", sorted(STYLES))
def test_handwritten_styles_are_detected_and_stay_correct(style):
    torch.manual_seed(0)
    model = PreGatedHandModel(STYLES[style]).eval()
    tokens = torch.tensor([5])
    ref = model(tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="adafuse", options={"codegen": "eager"})(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (record,) = backend.last_compilations
    assert len(record["regions"]) == 3, record["notes"]
    assert any("share one gate" in n for n in record["notes"])  # pre-gated, proven
    assert any("factor layout" in str(w.message) for w in caught)  # and said why it is not rewritten


def test_layerwise_routed_model_is_reported_not_pregated_and_matches():
    model = inject_layerwise(af.TinyLlama(TINY).init_weights(std=0.08), af.AdaFuseConfig(
        num_experts=4, rank=4, init_lora_b="normal")).eval()
    tokens = torch.randint(0, TINY.vocab_size, (1, 5))
    ref = model(tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        try:
            out = torch.compile(model, backend="adafuse")(tokens)
        finally:
            torch._dynamo.config.capture_dynamic_output_shape_ops = False
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    messages = [str(w.message) for w in caught if "adafuse" in str(w.message)]
    assert any("not pre-gated" in m and "layer-wise" in m for m in messages), messages


class _FullSizeExperts(torch.nn.Module):
    """An MoE layer added to a linear: top-2 of 4 full-size [D, D] experts, routed on the layer's input."""

    def __init__(self, d=32, n=4):
        super().__init__()
        self.base = torch.nn.Linear(d, d)
        self.router = torch.nn.Linear(d, n, bias=False)
        self.experts = torch.nn.Parameter(torch.randn(n, d, d) * 0.1)

    def forward(self, x):
        top, experts = torch.topk(self.router(x), 2, dim=-1)
        y = torch.einsum("td,tkod->tko", x, self.experts[experts])
        return self.base(x) + (y * torch.softmax(top, -1)[..., None]).sum(1)


def test_full_size_gated_experts_are_not_called_adapters(caplog):
    """Full-size experts (an MoE layer, each router on its own layer) are not LoRA-MoE regions: the
    notes say so, not "not pre-gated"; the graph is compiled unchanged and exact."""
    model = torch.nn.Sequential(_FullSizeExperts(), torch.nn.Tanh(), _FullSizeExperts()).eval()
    x = torch.randn(3, 32)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger="adafuse_compile"):
        warnings.simplefilter("always")
        out = torch.compile(model, backend="adafuse")(x)
    torch.testing.assert_close(out, model(x))
    assert not [w for w in caught if "adafuse" in str(w.message)]
    notes = " ".join(backend.last_compilations[-1]["notes"])
    assert "full-size experts on" in notes and "0.base (" in notes and "2.base (" in notes
    assert "not low-rank adapters" in notes
    assert "not pre-gated" not in notes and "no LoRA-MoE adapters" in notes


def test_two_pregated_models_in_one_graph_are_named_as_such():
    """Two models, each pre-gated by its own router, called in one graph: the message says that each
    router gates several regions and to compile each model on its own (not "layer-wise routing")."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = PreGatedHandModel(STYLES["einsum"]), PreGatedHandModel(STYLES["einsum"])

        def forward(self, tokens):
            return self.a(tokens) + self.b(tokens)
    torch.manual_seed(0)
    model = Two().eval()
    tokens = torch.tensor([5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="adafuse", options={"codegen": "eager"})(tokens)
    torch.testing.assert_close(out, model(tokens), rtol=1e-5, atol=1e-6)
    (message,) = [str(w.message) for w in caught if "not pre-gated" in str(w.message)]
    assert "each router gates several regions, [3, 3]" in message and "compile each model on its own" in message
    assert "layer-wise" not in message


def test_model_without_adapters_compiles_plainly(caplog):
    model = af.TinyLlama(TINY).init_weights().eval()
    tokens = torch.randint(0, TINY.vocab_size, (1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of ours for a plain model
        # torch's own, raised the first time a process compiles (when this test runs alone)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        with caplog.at_level("INFO", logger="adafuse_compile"):
            out = torch.compile(model, backend="adafuse")(tokens)
    torch.testing.assert_close(out, model(tokens))
    assert "no LoRA-MoE adapters" in caplog.text


def test_compile_failure_falls_back_to_the_original_graph(monkeypatch):
    def broken(gm, settings):
        raise RuntimeError("boom")

    monkeypatch.setattr(backend, "PASSES", [("detect_adapters", broken)])
    model = adapted_tiny()
    model.setup_cache(1)
    ref = model(torch.tensor([[3]]), torch.tensor([0]))
    model.setup_cache(1)
    with pytest.warns(UserWarning, match="compilation failed .*boom.*original graph"):
        out = torch.compile(model, backend="adafuse")(torch.tensor([[3]]), torch.tensor([0]))
    torch.testing.assert_close(out, ref)
    record = backend.last_compilations[-1]  # what `adafuse diff` reads: the failure, not "no graph"
    assert record["failed"].startswith("compilation failed (RuntimeError: boom)")
    assert record["path"] is None and not record["rewritten"] and record["failed"] in record["notes"]


@pytest.mark.parametrize("options", [{"pristine_memory_fraction": "0.5"}, {"pristine_memory_fraction": None},
                                     {"pristine_memory_fraction": True}, {"resync_every": True},
                                     {"exact": 1}, {"side_stream": 0}, {"prefill_fused": 1}, {"cudagraphs": "yes"}])
def test_option_values_of_the_wrong_type_name_the_option(options):
    with pytest.raises(AdaFuseOptionsError, match=next(iter(options))):
        BackendSettings.from_compile_args(options)


def test_dynamic_shapes_compile_instead_of_falling_back():
    """torch.compile(dynamic=True) makes Dynamo restart its analysis once (RestartAnalysis) from inside
    the backend call: a signal to pass on, not a compile failure to fall back from."""
    model = adapted_tiny()
    tokens = torch.randint(0, TINY.vocab_size, (1, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="adafuse: compilation failed")
        out = torch.compile(model, backend="adafuse", dynamic=True)(tokens)
    torch.testing.assert_close(out, model(tokens), rtol=1e-5, atol=1e-6)
    assert backend.last_compilations and not any(r.get("failed") for r in backend.last_compilations)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_factors_of_another_dtype_than_the_backbone_are_left_alone_with_the_fix(codegen):
    """AdaFuseConfig(dtype="bfloat16") on an fp32 model: the eager layer casts, the fused ops take one
    dtype. The graph is left to Inductor with a warning that names both dtypes and the fix, and every
    step (decode, prefill) runs and equals eager; nothing fails at call time."""
    model = af.TinyLlama(TINY).init_weights(std=0.08, seed=3)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, init_lora_b="normal", dtype=torch.bfloat16))
    model.eval()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="adafuse", options={"codegen": codegen})
    with torch.no_grad():
        for tokens, pos in ((torch.tensor([[3, 5, 7, 9]]), torch.arange(4)), (torch.tensor([[11]]), torch.tensor([4]))):
            model.setup_cache(1)
            if pos[0] > 0:
                model(torch.tensor([[3, 5, 7, 9]]), torch.arange(4))
            want = model(tokens, pos)
            model.setup_cache(1)
            if pos[0] > 0:
                compiled(torch.tensor([[3, 5, 7, 9]]), torch.arange(4))
            with pytest.warns(UserWarning, match=r"differ in dtype \(.*factors bfloat16, weight float32\).*"
                                                 r"AdaFuseConfig\(dtype=None\)"):
                got = compiled(tokens, pos)
            # Inductor keeps the bf16 adapter term's intermediates in fp32 where eager rounds them
            tol = dict(rtol=1e-5, atol=1e-6) if codegen == "eager" else dict(rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(got, want, **tol)
    for r in backend.last_compilations:  # no path took the graph, no adafuse op in it
        assert r["path"] is None and not any("adafuse" in str(n.target) for n in r["graph"].graph.nodes), r["notes"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_training_step_keeps_every_gradient():
    """Grad mode on and the adapters requiring grad: a one-token step takes the differentiable dense
    form (the switch and slot kernels have no autograd formula), says that this is slower than the
    kernels, and gives the router and both factors the eager model's gradients; path="merge" is
    refused with the reason. The weights are never written."""
    model = adapted_tiny()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}

    def grads(step):
        model.zero_grad(set_to_none=True)
        model.setup_cache(1)
        step(torch.tensor([[3]]), torch.tensor([0])).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(model)
    assert {"router", "lora_A", "lora_B"} <= {k for n in want for k in ("router", "lora_A", "lora_B") if k in n}
    with pytest.warns(UserWarning, match="decode-sized step traced with gradients enabled.*torch.no_grad"):
        got = grads(torch.compile(model, backend="adafuse", options={"codegen": "eager"}))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    record = backend.last_compilations[-1]
    assert record["path"] == "gather" and not switch_calls(record["graph"])
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="not rewritten: gradients are enabled.*torch.no_grad"):
        merged = grads(torch.compile(model, backend="adafuse", options={"codegen": "eager", "path": "merge"}))
    for name in want:
        torch.testing.assert_close(merged[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_a_kernel_plan_that_cannot_be_built_falls_back_while_compiling():
    """sgmm_impl="cutlass" on the CPU: the switch's plan is built while compiling, so the failure
    is a compile-time fallback that names the reason and the fix, not a failed first step; with
    path="auto" the step takes another path instead."""
    model = adapted_tiny()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    model.setup_cache(1)
    ref = model(torch.tensor([[3]]), torch.tensor([0]))
    with torch.no_grad():
        model.setup_cache(1)
        options = {"codegen": "eager", "path": "merge", "sgmm_impl": "cutlass"}
        with pytest.warns(UserWarning, match="switching kernel cannot be planned.*needs a CUDA device.*impl='auto'"):
            out = torch.compile(model, backend="adafuse", options=options)(torch.tensor([[3]]), torch.tensor([0]))
        torch.testing.assert_close(out, ref)
        assert not switch_calls(backend.last_compilations[-1]["graph"])
        torch._dynamo.reset()
        model.setup_cache(1)
        options = {"codegen": "eager", "path": "auto", "sgmm_impl": "cutlass", "calibrate": False,
                   "auto_costs": {"launch_s": 1.0}}  # launches priced so that merge (one launch) wins
        # the sgmm_impl the user named cannot run: a warning, also when auto takes another path
        with pytest.warns(UserWarning, match="switching kernel cannot be planned.*sgmm_impl='cutlass' applies to "
                                             "the merge path only"):
            out = torch.compile(model, backend="adafuse", options=options)(torch.tensor([[3]]), torch.tensor([0]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    record = backend.last_compilations[-1]
    assert record["path"] in ("factor", "gather"), record["path"]
    assert any("switching kernel cannot be planned" in n for n in record["notes"]), record["notes"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_a_failed_in_place_step_puts_the_weights_back(monkeypatch):
    """A decode step that fails after its switch wrote the weights (a kernel launch error,
    simulated after the real switch) restores W and forgets the previous experts, so a retry
    switches from the pristine weights and matches the eager model."""
    from adafuse_compile.cutlass_kernels import ops

    model = adapted_tiny()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    model.setup_cache(1)
    ref = [model(torch.tensor([[t]]), torch.tensor([i])) for i, t in enumerate((3, 5))]
    real, calls = ops._switch_impl, []

    def flaky(*args):
        real(*args)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("SGMM grouped GEMM launch failed (simulated)")

    monkeypatch.setattr(ops, "_switch_impl", flaky)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
    with torch.no_grad():
        model.setup_cache(1)
        compiled(torch.tensor([[3]]), torch.tensor([0]))
        with pytest.raises(RuntimeError, match="simulated"):
            compiled(torch.tensor([[5]]), torch.tensor([1]))
        for k, v in model.state_dict().items():
            assert torch.equal(v, w0[k]), k
        out = compiled(torch.tensor([[5]]), torch.tensor([1]))
    torch.testing.assert_close(out, ref[1], rtol=1e-4, atol=1e-5)
    af.restore(model)


def test_inductor_does_not_copy_backbone_weights():
    """The mutating switch op must not make Inductor clone the weights it updates (DESIGN.md 6)."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = adapted_tiny()
    model.setup_cache(1)
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(model, backend="adafuse"), torch.tensor([[3]]), torch.tensor([0]))
    af.restore(model)
    code = codes[-1]
    calls = re.findall(r"torch\.ops\.adafuse\.sgmm_switch\.default\(\[([^\]]*)\]", code)
    assert len(calls) == 1, "exactly one switching call in the generated code"
    weights = [w.strip() for w in calls[0].split(",")]
    assert len(weights) == 2 * TINY.num_hidden_layers and all(re.fullmatch(r"arg\d+_1", w) for w in weights), \
        f"the op must get the graph's weight inputs themselves, got {weights}"
    for w in weights:
        copies = re.findall(rf"(?:clone|copy_)\([^)]*\b{w}\b", code)
        assert not copies, f"weight {w} is copied: {copies}"


def test_eager_call_after_compiled_decode_sees_backbone_weights():
    model = adapted_tiny()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    model.setup_cache(1)
    ref = model(torch.tensor([[4]]), torch.tensor([0]))
    model.setup_cache(1)
    # In place: the mode that merges into the model's weights (exact mode never writes them).
    compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "exact": False})
    with torch.no_grad():  # inference: with gradients on, a decode step takes the differentiable dense form
        for i in range(3):  # a decode loop of the user's own: weights stay merged between steps
            compiled(torch.tensor([[1 + i]]), torch.tensor([i]))
    assert any(not torch.equal(v, w0[k]) for v, k in zip(af.gate_channel(model).adapted_weights, [
        n for n, m in af.adapted_linears(model).items() for n in [n + ".weight"]])), "decode merged nothing"
    model.setup_cache(1)
    out = model(torch.tensor([[4]]), torch.tensor([0]))  # the eager model: restores first
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# The gather path: steps that cannot merge ---------------------------------------------------------

def gather_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "gather_lora" in str(n.target)]


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_batch2_decode_and_prefill_take_the_fused_gather_path(codegen):
    model = adapted_tiny(targets="all-linear")
    prompt = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    model.setup_cache(2)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 6)
    model.setup_cache(2)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": codegen})
    tokens, logits = af.greedy_decode(compiled, prompt, 6)
    assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
    gathered = [r for r in backend.last_compilations if r["path"] == "gather"]
    assert len(gathered) == 2, [r["notes"][-1] for r in backend.last_compilations]  # prefill and decode
    for record in gathered:
        gm = record["graph"]
        # q,k,v share one input, gate,up another, o and down their own: 4 fused calls per layer
        assert len(gather_calls(gm)) == 4 * TINY.num_hidden_layers
        assert torch.einsum not in targets_of(gm) and not switch_calls(gm)


def test_side_stream_split_keeps_the_backbone_linears_between_fork_and_join():
    """The CUDA default, forced on the CPU (the start runs in place there): each gather group is
    split into gather_lora_start ... gather_lora_join, and in the code Inductor generates the
    group's backbone matmuls sit between the two, where they overlap the adapter kernels on a GPU."""
    import re

    from torch._inductor.utils import run_and_get_code

    model = adapted_tiny(targets="all-linear")
    prompt = torch.randint(0, TINY.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    model.setup_cache(2)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 3)
    model.setup_cache(2)
    compiled = torch.compile(model, backend="adafuse", options={"path": "gather", "side_stream": True})
    (tokens, logits), codes = run_and_get_code(af.greedy_decode, compiled, prompt, 3)
    assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
    groups = 4 * TINY.num_hidden_layers
    for record in backend.last_compilations:
        names = [str(n.target) for n in gather_calls(record["graph"])]
        assert sum("gather_lora_start" in n for n in names) == groups, names
        assert sum("gather_lora_join" in n for n in names) == groups, names
    assert len(codes) == 2  # prefill and decode
    for code in codes:
        call = code[code.index("def call"):]
        calls = re.findall(r"adafuse\.(gather_lora_start|gather_lora_join)\.default\(|extern_kernels\.((?:add)?mm)\(", call)
        events = [a or b for a, b in calls]  # the calls only, not the "Source Nodes" comments
        opened, between = 0, 0
        for e in events:
            if e == "gather_lora_start":
                assert opened == 0, "a second fork before the join"
                opened, between = 1, 0
            elif e == "gather_lora_join":
                assert opened == 1 and between >= 1, "a join with no backbone matmul since its fork"
                opened = 0
            else:
                between += opened
        assert events.count("gather_lora_join") == groups
    off = torch.compile(model, backend="adafuse", options={"path": "gather", "side_stream": False})
    torch._dynamo.reset()
    backend.last_compilations.clear()
    model.setup_cache(2)
    af.greedy_decode(off, prompt, 2)
    names = [str(n.target) for r in backend.last_compilations for n in gather_calls(r["graph"])]
    assert names and not any("start" in n or "join" in n for n in names)


def test_forced_paths():
    prompt = torch.randint(0, TINY.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))
    for path, expected in (("gather", {"gather"}), ("merge", {None, "merge"})):
        torch._dynamo.reset()
        backend.last_compilations.clear()
        model = adapted_tiny()
        model.setup_cache(1)
        ref_tokens, ref_logits = af.greedy_decode(model, prompt, 5)
        model.setup_cache(1)
        tokens, logits = af.greedy_decode(
            torch.compile(model, backend="adafuse", options={"path": path, "codegen": "eager"}), prompt, 5)
        assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
        assert {r["path"] for r in backend.last_compilations} == expected, path


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_factor_path_decode_parity_and_untouched_weights(codegen):
    model = adapted_tiny(targets="all-linear")
    prompt = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(8))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    model.setup_cache(1)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 32)
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"path": "factor", "codegen": codegen})
    tokens, logits = af.greedy_decode(compiled, prompt, 32)
    assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
    for step in range(3):  # more steps of a loop of the user's own: W is never written
        with torch.no_grad():
            compiled(torch.tensor([[7 + step]]), torch.tensor([40 + step]))
        for w, name in zip(af.gate_channel(model).adapted_weights, af.adapted_linears(model)):
            assert torch.equal(w, w0[name + ".weight"]), name
    factor = [r for r in backend.last_compilations if r["path"] == "factor"]
    assert len(factor) == 1
    gm = factor[0]["graph"]
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and "write_factor_slots" in str(n.target)]
    assert len(writes) == 1 and not switch_calls(gm) and torch.einsum not in targets_of(gm)
    assert {r["path"] for r in backend.last_compilations} == {"factor", "gather"}  # prefill gathers


def test_inject_keeps_the_models_mode_and_active_adapter_dropout_is_never_rewritten_away():
    """inject() on an eval-mode model (as from_pretrained returns it) leaves the adapters in eval
    mode (no dropout in generate()); a model in training mode with adapter dropout compiles
    unchanged, with the reason (every rewrite replaces the branch the dropout is in), and matches
    the eager model drawing the same dropout masks."""
    model = af.TinyLlama(TINY).init_weights(std=0.08, seed=3).eval()
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, alpha=16, init_lora_b="normal", dropout=0.5))
    adapted = list(af.adapted_linears(model).values())
    assert adapted and not any(m.training for m in adapted)
    model.train()
    assert all(m.training for m in adapted)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.setup_cache(2)
        torch.manual_seed(0)
        ref = model(tokens, torch.arange(9))
        compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager"})
        model.setup_cache(2)
        with pytest.warns(UserWarning, match="adapter dropout is active .*model.eval"):
            torch.manual_seed(0)
            out = compiled(tokens, torch.arange(9))
    torch.testing.assert_close(out, ref)
    assert backend.last_compilations[-1]["path"] is None


@pytest.mark.parametrize("targets,path", [(("o_proj",), "merge"), (("down_proj",), "gather"), (("o_proj",), "factor")])
def test_adapters_after_the_kv_cache_write_are_still_rewritten(targets, path):
    """With adapters on o_proj or down_proj only, the router reads an input computed after the
    KV-cache write, so the routing cannot be hoisted to the front; it already runs before every
    adapted linear, so the step is rewritten without moving it (before: compiled unchanged)."""
    model = adapted_tiny(targets=targets)
    with torch.no_grad():
        model.setup_cache(1)
        ref = [model(torch.tensor([[3 + i]]), torch.tensor([i])) for i in range(3)]
        compiled = torch.compile(model, backend="adafuse", options={"codegen": "eager", "path": path})
        model.setup_cache(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "graph not rewritten"
            out = [compiled(torch.tensor([[3 + i]]), torch.tensor([i])) for i in range(3)]
    af.restore(model)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < 1e-5
    record = backend.last_compilations[-1]
    assert record["path"] == path
    assert any("nothing moved" in n for n in record["notes"]), record["notes"]
