"""Export to ONNX / TensorRT (CPU): ONNX Runtime reproduces eager PyTorch with the switch between steps.

Exports TinyLlama and the tiny Hugging Face Llama, Mistral and Qwen2 models with adapters
(init_lora_b="normal", so the adapters change the output), then decodes 32 greedy tokens with
ONNX Runtime (prologue -> reference SGMM switch in exact mode -> step) and compares tokens and
logits with the eager model, which computes the adapter term unmerged.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
from collections import Counter

import onnx
import pytest
import torch

import adafuse_compile as af
from adafuse_compile.baselines import inject_layerwise
from adafuse_compile.export import ExportError, OnnxDecoder, check_tensorrt_facts, to_onnx
from adafuse_compile.export.cli_export import add_export_parser
from adafuse_compile.export.tensorrt import (
    INSTALL_HINT, TRT_SUPPORTED_OPS, TensorRTUnavailableError, check_graph_facts, to_tensorrt,
)
from adafuse_compile.presets import tiny_hf_model

NEW_TOKENS = 32
PROMPT = [3, 17, 99, 5]
CAPACITY = 40
FAMILIES = ("tiny_llama", "llama", "mistral", "qwen2")
ADAPTERS = dict(num_experts=4, rank=4, top_k=2, init_lora_b="normal")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _small_tiny_llama() -> af.TinyLlama:
    torch.manual_seed(0)
    cfg = af.TinyLlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_seq_len=64)
    model = af.TinyLlama(cfg).init_weights(std=0.08)
    af.inject(model, af.AdaFuseConfig(**ADAPTERS, target_modules=("q_proj", "v_proj")))
    return model.eval()


def _build(family: str) -> torch.nn.Module:
    if family == "tiny_llama":
        return _small_tiny_llama()
    model = tiny_hf_model(family)
    # All seven linears: k/o/mlp projections are switched too (and qwen2's q/k/v biases stay initializers).
    af.inject(model, af.AdaFuseConfig(**ADAPTERS, target_modules="all-linear"))
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@torch.no_grad()
def _eager_greedy(model, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits each was chosen from, from the eager model (adapters unmerged)."""
    prompt = torch.tensor([PROMPT])
    if family == "tiny_llama":
        model.setup_cache(1)
        tokens, logits = af.greedy_decode(model, prompt, NEW_TOKENS)
        return tokens[0], logits[0]
    from transformers import DynamicCache

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    logits = model(prompt, use_cache=True, **{cache_kw: cache}).logits[:, -1]
    toks, all_logits = [], []
    for i in range(NEW_TOKENS):
        nxt = logits.argmax(-1)
        toks.append(nxt)
        all_logits.append(logits[0])
        if i + 1 < NEW_TOKENS:
            logits = model(nxt[:, None], use_cache=True, **{cache_kw: cache}).logits[:, -1]
    return torch.cat(toks), torch.stack(all_logits)


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    family = request.param
    model = _build(family)
    out = tmp_path_factory.mktemp(f"export_{family}")
    result = to_onnx(model, out, capacity=CAPACITY)
    return family, model, result


def test_onnx_runtime_matches_eager_with_switch_between_steps(exported):
    family, model, result = exported
    ref_tokens, ref_logits = _eager_greedy(model, family)
    dec = OnnxDecoder(result.out_dir, intra_op_threads=1)
    routed = []
    switch = dec.switch

    def recording_switch():
        routed.append(tuple(dec.experts.tolist()))
        switch()

    dec.switch = recording_switch
    tokens, logits = dec.generate(PROMPT, NEW_TOKENS)
    assert tokens.tolist() == ref_tokens.tolist()
    errs = [_rel_err(logits[i], ref_logits[i]) for i in range(NEW_TOKENS)]
    assert max(errs) <= 1e-4, f"{family}: max relative logit error {max(errs):.2e}"
    # One switch per token (prompt fed token by token, then every decode step), and the experts changed.
    assert len(routed) == len(PROMPT) + NEW_TOKENS - 1
    assert len(set(routed)) > 1, "the routing never changed: the test would not catch a missing switch"
    # The adapters matter: without the switch (plain backbone weights) ONNX Runtime is far from eager.
    dec.switch = lambda: None
    for w, w0 in zip(dec.weights, dec.pristine):
        w.copy_(w0)
    _, unswitched = dec.generate(PROMPT, 4)
    assert _rel_err(unswitched[0], ref_logits[0]) > 1e-3


def test_step_graph_is_the_plain_backbone_over_switched_inputs(exported):
    family, model, result = exported
    step = onnx.load(str(result.step))
    g = step.graph
    switched = result.manifest["switched"]
    n_layers = result.manifest["spec"]["num_layers"]
    expect_switched = len(af.adapted_linears(model))
    assert len(switched) == expect_switched
    inputs = [i.name for i in g.input]
    assert inputs[:2] == ["tokens", "input_pos"]
    assert inputs[2:2 + 2 * n_layers] == [f"past_{kv}.{i}" for i in range(n_layers) for kv in ("key", "value")]
    assert inputs[2 + 2 * n_layers:] == switched
    inits = {i.name for i in g.initializer}
    assert not inits & set(switched), "a switched weight is also an initializer"
    assert not [n for n in inits if "lora" in n or "router" in n], "adapter tensors leaked into the step"
    # No adapter branch: no top-k / einsum / gathers of expert stacks; exactly one matmul per linear + attention.
    ops = Counter(n.op_type for n in g.node)
    assert not {"TopK", "Einsum", "ArgMax", "ScatterND", "ScatterElements"} & set(ops), ops
    assert ops["MatMul"] + ops["Gemm"] == 7 * n_layers + 2 * n_layers + 1
    # Each switched input feeds exactly one Gemm(x, W, transB=1): the backbone linear itself, W read as bound.
    consumers = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for name in switched:
        (node,) = consumers[name]
        trans_b = next(a.i for a in node.attribute if a.name == "transB")
        assert node.op_type == "Gemm" and node.input[1] == name and trans_b == 1, (name, node.op_type)
    # Static shapes on every input and output; the switched weights have the backbone's [out, in].
    for v in list(g.input) + list(g.output):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        assert all(isinstance(d, int) and d > 0 for d in dims), (v.name, dims)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.input}
    for name in switched:
        assert shapes[name] == result.manifest["switched_shapes"][name]
    assert shapes["past_key.0"][2] == CAPACITY
    if family == "qwen2":
        assert "layers.0.self_attn.q_proj.bias" in inits
    # The prologue: one top-k, outputs [k] int64 experts and float gates.
    pro = onnx.load(str(result.prologue)).graph
    assert Counter(n.op_type for n in pro.node)["TopK"] == 1
    outs = {o.name: o.type.tensor_type for o in pro.output}
    assert outs["experts"].elem_type == onnx.TensorProto.INT64 and outs["gates"].elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in outs["experts"].shape.dim] == [ADAPTERS["top_k"]]


def test_checker_full_check_and_tensorrt_facts(exported):
    _, _, result = exported
    for path in (result.prologue, result.step):
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    facts = check_tensorrt_facts(result.out_dir)
    assert facts.ok, facts.problems
    assert facts.opset == 18
    used = set(facts.ops["step"]) | set(facts.ops["prologue"])
    assert used <= TRT_SUPPORTED_OPS


def test_tensorrt_facts_catch_unsupported_ops_and_dynamic_shapes():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"])
    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"])], "g", [x], [y])
    report = check_graph_facts(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert not report.ok
    text = "\n".join(report.problems)
    assert "Unique" in text and "non-static shape" in text
    with pytest.raises(ExportError, match="not TensorRT-ready"):
        report.raise_if_failed()


def test_external_data_export_runs_the_same(tmp_path):
    model = _build("llama")
    inline = to_onnx(model, tmp_path / "inline", capacity=16)
    ext = to_onnx(model, tmp_path / "ext", capacity=16, external_data=True)
    assert ext.external_data and not inline.external_data
    data = [p for p in (tmp_path / "ext").iterdir() if p.name.startswith("step.onnx") and p.suffix != ".onnx"]
    assert data and data[0].stat().st_size > 100_000  # the weights live outside the graph file
    assert (tmp_path / "ext" / "step.onnx").stat().st_size < 100_000
    onnx.checker.check_model(str(ext.step), full_check=True)
    a = OnnxDecoder(inline.out_dir).generate(PROMPT, 6)
    b = OnnxDecoder(ext.out_dir).generate(PROMPT, 6)
    assert a[0].tolist() == b[0].tolist() and torch.equal(a[1], b[1])


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the missing-package error cannot be shown")
def test_to_tensorrt_without_tensorrt_says_how_to_install(tmp_path):
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        to_tensorrt(tmp_path)
    assert "NVIDIA GPU" in INSTALL_HINT


def test_tensorrt_engine_builds_and_decodes(tmp_path):
    pytest.importorskip(
        "tensorrt", reason="tensorrt does not import here (it needs an NVIDIA GPU, CUDA and `pip install tensorrt`)")
    model = _build("llama")
    result = to_onnx(model, tmp_path, capacity=CAPACITY)
    engines = to_tensorrt(result.out_dir)
    assert engines["step"].stat().st_size > 0 and engines["prologue"].stat().st_size > 0
    if not torch.cuda.is_available():
        pytest.skip("engines built; decoding needs a CUDA device")
    from adafuse_compile.export import TensorRTDecoder

    ref_tokens, ref_logits = _eager_greedy(model, "llama")
    tokens, logits = TensorRTDecoder(result.out_dir).generate(PROMPT, NEW_TOKENS)
    assert tokens.tolist() == ref_tokens.tolist()
    assert max(_rel_err(logits[i], ref_logits[i]) for i in range(NEW_TOKENS)) <= 1e-4


# -- refusals ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    return _small_tiny_llama()


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=2), "batch=2 cannot be exported.*gather path"),
    (dict(dynamic=True), "dynamic shapes are not supported"),
    (dict(path="gather"), "path='gather' cannot be exported"),
    (dict(capacity=10_000), "capacity=10000 must be in 1..64"),
    (dict(opset=13), "opset=13"),
])
def test_refuses_what_it_cannot_export_exactly(small_model, tmp_path, kwargs, match):
    with pytest.raises(ExportError, match=match):
        to_onnx(small_model, tmp_path, **kwargs)
    assert not (tmp_path / "step.onnx").exists()


def test_refuses_models_without_pregated_adapters(tmp_path):
    plain = af.TinyLlama(af.TinyLlamaConfig(max_seq_len=32)).eval()
    with pytest.raises(ExportError, match="has no AdaFuse adapters.*inject"):
        to_onnx(plain, tmp_path)
    layerwise = inject_layerwise(af.TinyLlama(af.TinyLlamaConfig(max_seq_len=32)),
                                 af.AdaFuseConfig(**ADAPTERS)).eval()
    with pytest.raises(ExportError, match="layer-wise routed"):
        to_onnx(layerwise, tmp_path)
    every_adapted = af.inject(af.TinyLlama(af.TinyLlamaConfig(max_seq_len=32)),
                              af.AdaFuseConfig(**ADAPTERS, router_placement="every_adapted")).eval()
    with pytest.raises(ExportError, match="layer-wise routed.*layers.0.self_attn.q_proj"):
        to_onnx(every_adapted, tmp_path)
    mlp_only = af.inject(af.TinyLlama(af.TinyLlamaConfig(max_seq_len=32)),
                         af.AdaFuseConfig(**ADAPTERS, target_modules=("gate_proj",))).eval()
    with pytest.raises(ExportError, match="router sits at layers.0.mlp.gate_proj"):
        to_onnx(mlp_only, tmp_path)
    with pytest.raises(ExportError, match="training mode"):
        to_onnx(_small_tiny_llama().train(), tmp_path)
    # Qwen2 with sliding attention on some layers only: one mask for all would window the others
    mixed = tiny_hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    af.inject(mixed, af.AdaFuseConfig(**ADAPTERS))
    with pytest.raises(ExportError, match="different attention kinds.*not supported"):
        to_onnx(mixed.eval(), tmp_path)
    assert not (tmp_path / "step.onnx").exists()


def test_an_export_that_fails_half_way_leaves_no_loadable_directory(small_model, tmp_path, monkeypatch):
    """The manifest goes first and comes back last: a second export into the same directory that
    fails after writing some files leaves a directory the decoder refuses, not one mixing models."""
    from adafuse_compile.export import onnx as onnx_export

    to_onnx(small_model, tmp_path)
    OnnxDecoder(tmp_path)

    def broken(path):
        raise ExportError("checker says no (simulated)")

    monkeypatch.setattr(onnx_export, "check_exported", broken)
    with pytest.raises(ExportError, match="simulated"):
        to_onnx(small_model, tmp_path)
    with pytest.raises(ExportError, match="no manifest.json: not a finished export"):
        OnnxDecoder(tmp_path)


# -- CLI ------------------------------------------------------------------------------------------------

def _parser():
    parser = argparse.ArgumentParser(prog="adafuse")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_export_onnx_and_tensorrt(tmp_path, capsys):
    parser = _parser()
    defaults = parser.parse_args(["export", "onnx", "--out", str(tmp_path)])
    assert defaults.module is None and defaults.external_data is None  # None: the demo model
    args = parser.parse_args(["export", "onnx", "--module", "test_export:_small_tiny_llama", "--out",
                              str(tmp_path / "o"), "--capacity", "24"])
    assert args.func(args) == 0
    assert "switched weights are step inputs" in capsys.readouterr().out
    assert check_tensorrt_facts(tmp_path / "o").ok
    decoder = OnnxDecoder(tmp_path / "o")
    assert decoder.manifest["capacity"] == 24
    with pytest.raises(ExportError, match="exceed the exported KV capacity"):
        decoder.generate(PROMPT, 24)
    bad = parser.parse_args(["export", "onnx", "--module", "no_colon", "--out", str(tmp_path / "x")])
    assert bad.func(bad) == 2
    assert "pkg.mod:function" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "tflite", "--out", str(tmp_path)])
    trt = parser.parse_args(["export", "tensorrt", "--module", "test_export:_small_tiny_llama", "--out",
                             str(tmp_path / "t"), "--capacity", "24"])
    code = trt.func(trt)
    if not HAS_TENSORRT:
        assert code == 3 and "pip install tensorrt" in capsys.readouterr().err
        assert (tmp_path / "t" / "step.onnx").exists()  # the ONNX export is written regardless
    else:
        assert code == 0


def test_export_keeps_no_reference_to_the_model_weights(tmp_path):
    """onnxscript's rewrite rules hold their last matched node (and so the exported graph) after an export;
    to_onnx drops the graph's tensors, so deleting the model frees its weights (23 GB at 7B fp32)."""
    import gc
    import weakref

    model = _small_tiny_llama()
    fixed = weakref.ref(model.lm_head.weight)  # a step initializer
    switched = weakref.ref(model.layers[0].self_attn.q_proj.weight)  # a step input
    result = to_onnx(model, tmp_path, capacity=CAPACITY, check=False)
    assert set(result.timings) == {"prologue_trace", "prologue_save", "step_trace", "step_save", "adapters_save"}
    del model, result
    gc.collect()
    assert fixed() is None and switched() is None
