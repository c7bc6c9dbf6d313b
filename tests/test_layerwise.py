"""Layer-wise routing (MoLA style, router_placement="every_adapted"): the model, and the backend's
gather rewrite with each region's own router."""
import warnings

import pytest
import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.baselines import MoLALinear, SimpleMerge
from adafuse_compile.config import AdaFuseConfigError
from adafuse_compile.cutlass_kernels import gather_lora as gl
from adafuse_compile.inspect import capture_step, diff_report, render_text
from adafuse_compile.modeling.inject import adafuse_config
from adafuse_compile.modeling.layers import load_balancing_loss
from adafuse_compile.presets import tiny_hf_model

TINY = af.TinyLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_seq_len=160)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def layerwise_tiny(targets=("q_proj", "v_proj"), seed=3, **kw):
    model = af.TinyLlama(TINY).init_weights(std=0.08, seed=seed)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, alpha=16, init_lora_b="normal", target_modules=targets,
                                      router_placement="every_adapted", **kw))
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def gather_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "gather_lora" in str(n.target)
            and "join" not in str(n.target)]


def topk_of(node):
    """The top-k node an experts argument comes from, through getitem / reshape."""
    while node.target is not torch.topk:
        node = node.args[0]
    return node


def topk_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.topk]


# The model ----------------------------------------------------------------------------------------

def test_every_adapted_linear_routes_on_its_own_like_mola():
    """Each adapted linear has a router of its own and computes exactly what a MoLA layer with the
    same router and experts computes (top-k of its own logits, softmax over the top-k, scaled)."""
    model = layerwise_tiny(targets="all-linear")
    linears = af.adapted_linears(model)
    assert len(linears) == 7 * TINY.num_hidden_layers
    routers = [lin.router for lin in linears.values()]
    assert all(r is not None for r in routers) and len({id(r.weight) for r in routers}) == len(routers)
    config = adafuse_config(model)
    x = torch.randn(2, 5, TINY.hidden_size, generator=torch.Generator().manual_seed(0))
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"):
        ours = linears[name]
        mola = MoLALinear(torch.nn.Linear(ours.in_features, ours.out_features, bias=False), config)
        with torch.no_grad():
            mola.weight = ours.weight
            mola.router.weight.copy_(ours.router.weight)
            for e in range(config.num_experts):
                mola.lora_A[e].weight.copy_(ours.lora_A[e])
                mola.lora_B[e].weight.copy_(ours.lora_B[e])
            if name.endswith("up_proj"):  # the MLP input's width
                x = torch.randn(2, 5, ours.in_features, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(ours(x), mola(x), rtol=1e-5, atol=1e-6)
            assert not torch.equal(ours(x), torch.nn.functional.linear(x, ours.weight))  # the adapters act
    # Two routers of one layer pick different experts for some token of the same input.
    x = torch.randn(16, TINY.hidden_size, generator=torch.Generator().manual_seed(2))
    q, k = linears["layers.0.self_attn.q_proj"].router(x), linears["layers.0.self_attn.k_proj"].router(x)
    assert not torch.equal(q.experts, k.experts)
    assert af.gate_channel(model).routing is None  # nothing published on the channel


def test_aux_loss_is_the_mean_of_every_routers_loss_of_the_forward():
    model = layerwise_tiny(targets=("q_proj", "v_proj")).train()
    seen = []
    for lin in af.adapted_linears(model).values():
        lin.router.register_forward_hook(lambda _m, _i, routing: seen.append(load_balancing_loss(routing)))
    model.setup_cache(1)
    model(torch.randint(0, TINY.vocab_size, (1, 6)), torch.arange(6))
    channel = af.gate_channel(model)
    assert len(seen) == 2 * TINY.num_hidden_layers
    torch.testing.assert_close(channel.aux_loss, torch.stack(seen).mean())
    seen.clear()
    model(torch.randint(0, TINY.vocab_size, (1, 3)), torch.arange(3))  # a second forward starts afresh
    torch.testing.assert_close(channel.aux_loss, torch.stack(seen).mean())


def test_config_and_checkpoint_keep_every_router(tmp_path):
    config = af.AdaFuseConfig(router_placement="every_adapted")
    assert af.AdaFuseConfig.from_json(config.to_json()) == config
    with pytest.raises(AdaFuseConfigError, match="every_adapted"):
        af.AdaFuseConfig(router_placement="every_layer")
    model = layerwise_tiny()
    path = af.save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = af.TinyLlama(TINY).init_weights(std=0.08, seed=3)
    af.load_adapters(fresh, path)
    assert adafuse_config(fresh).router_placement == "every_adapted"
    for (name, a), b in zip(af.adapted_linears(model).items(), af.adapted_linears(fresh).values()):
        assert b.router is not None and torch.equal(a.router.weight, b.router.weight), name
    tokens = torch.randint(0, TINY.vocab_size, (1, 5))
    model.setup_cache(1), fresh.eval().setup_cache(1)
    torch.testing.assert_close(fresh(tokens, torch.arange(5)), model(tokens, torch.arange(5)))


def test_simple_merge_refuses_a_layerwise_model():
    with pytest.raises(ValueError, match="routes in every adapted linear"):
        SimpleMerge(layerwise_tiny())


# The backend --------------------------------------------------------------------------------------

@pytest.mark.parametrize("codegen, side_stream", [("eager", False), ("inductor", False), ("inductor", True)])
def test_decode_batch_and_prefill_gather_with_each_regions_own_router(codegen, side_stream):
    """Batch 2 (each sequence its own experts), a 17-token prefill and 5 decode steps: every adapter
    branch becomes one gather call fed by its own router's top-k, which stays where it was (nothing
    hoisted, nothing merged); tokens and logits match eager; the weights are never written."""
    model = layerwise_tiny(targets="all-linear")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    model.setup_cache(2)
    ref_tokens, ref_logits = af.greedy_decode(model, prompt, 6)
    model.setup_cache(2)
    compiled = torch.compile(model, backend="adafuse", options={"codegen": codegen, "side_stream": side_stream})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no adafuse warning: nothing fell back
        warnings.filterwarnings("ignore", message=".*(deprecated|TF32).*")
        tokens, logits = af.greedy_decode(compiled, prompt, 6)
    assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
    records = backend.last_compilations
    assert [r["path"] for r in records] == ["gather", "gather"], [r["notes"][-1] for r in records]  # prefill, decode
    n_regions = 7 * TINY.num_hidden_layers
    for record in records:
        gm = record["graph"]
        assert len(record["regions"]) == n_regions and record["hoisted"] == []
        assert any("layer-wise routing" in n and f"{n_regions} routers" in n for n in record["notes"])
        calls = gather_calls(gm)
        assert len(calls) == n_regions  # one per region: no two regions share a router
        assert len(topk_nodes(gm)) == n_regions
        # each call's experts come from its own top-k (its indices, reshaped where not [T, k]), all different
        sources = {topk_of(n.args[3]) for n in calls}
        assert len(sources) == n_regions and sources <= set(topk_nodes(gm))
        if side_stream:
            assert all("gather_lora_start" in str(n.target) for n in calls)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_long_prefill_takes_the_dense_form_with_one_gate_matrix_per_router():
    model = layerwise_tiny(targets=("q_proj", "k_proj", "v_proj", "down_proj"))
    n = gl.DENSE_MIN_TOKENS + 3
    prompt = torch.randint(0, TINY.vocab_size, (1, n), generator=torch.Generator().manual_seed(6))
    model.setup_cache(1)
    with torch.no_grad():
        ref = model(prompt, torch.arange(n))
        model.setup_cache(1)
        got = torch.compile(model, backend="adafuse", options={"codegen": "eager"})(prompt, torch.arange(n))
    assert rel_err(got, ref) <= 1e-4
    (record,) = backend.last_compilations
    gm = record["graph"]
    assert record["path"] == "gather" and not gather_calls(gm)
    assert len([n for n in gm.graph.nodes if n.target is gl.dense_gates]) == 4 * TINY.num_hidden_layers
    assert any("one gate matrix per router (8)" in n for n in record["notes"]), record["notes"]


def test_merge_path_is_refused_with_the_reason_and_factor_falls_to_gather():
    prompt = torch.randint(0, TINY.vocab_size, (1, 7), generator=torch.Generator().manual_seed(7))
    for path, expected, says in (("merge", {None}, "path='merge' needs one router"),
                                 ("factor", {"gather"}, "path='factor' needs one router"),
                                 ("auto", {"gather"}, None)):
        torch._dynamo.reset()
        backend.last_compilations.clear()
        model = layerwise_tiny()
        model.setup_cache(1)
        ref_tokens, ref_logits = af.greedy_decode(model, prompt, 4)
        model.setup_cache(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens, logits = af.greedy_decode(
                torch.compile(model, backend="adafuse", options={"path": path, "codegen": "eager"}), prompt, 4)
        assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
        assert {r["path"] for r in backend.last_compilations} == expected, path
        messages = [str(w.message) for w in caught if "adafuse" in str(w.message)]
        if says:
            assert messages and all(says in m for m in messages), messages
        else:
            assert not messages, messages


def test_diff_shows_one_router_per_region_and_nothing_hoisted():
    model = layerwise_tiny()
    model.setup_cache(1)
    model(torch.tensor([[3, 4]]), torch.arange(2))
    report = diff_report(capture_step(model, (torch.tensor([[5]]), torch.tensor([2])), name="layerwise"))
    assert report["gate_source"]["shared"] is False and len(report["gate_source"]["nodes"]) == 4
    assert report["hoisted"] == []
    text = render_text(report)
    assert "layer-wise routing" in text


def test_gradient_checkpointing_works_layerwise_and_keeps_one_aux_loss():
    model = tiny_hf_model("llama").train()
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal", router_placement="every_adapted"))
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss + af.gate_channel(model).aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    channel = af.gate_channel(model)
    loss2 = model(input_ids=ids, labels=ids).loss + channel.aux_loss
    loss2.backward()  # the recompute routes again on the same inputs; adds no aux term
    assert channel.aux_terms == []
    torch.testing.assert_close(loss2, loss)
    assert grads and all(torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-7)
                         for n, p in model.named_parameters() if n in grads)


def test_a_block_compiled_on_its_own_is_not_merged():
    """Adapters on q_proj only and each block compiled on its own: every block's graph holds one
    region and its own router, which the routes_alone tag keeps off the merge (one graph serves every
    block); auto gathers, exact in place; path='merge' is refused."""
    prompt = torch.randint(0, TINY.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    for path, expected in (("auto", {"gather"}), ("merge", {None})):
        torch._dynamo.reset()
        backend.last_compilations.clear()
        model = layerwise_tiny(targets=("q_proj",))
        model.setup_cache(1)
        ref_tokens, ref_logits = af.greedy_decode(model, prompt, 6)
        for layer in model.layers:
            layer.compile(backend="adafuse", options={"codegen": "eager", "path": path, "exact": False})
        model.setup_cache(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokens, logits = af.greedy_decode(model, prompt, 6)
        assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-5, path
        assert {r["path"] for r in backend.last_compilations} == expected, path
        assert all(len(r["regions"]) == 1 for r in backend.last_compilations)


def _side_stream_lifetimes(code: str) -> list[str]:
    """Problems in Inductor's generated `call`: a buffer a gather_lora_start reads that its join does
    not take, or that is deleted or handed to another buffer between the two."""
    import re

    lines = code[code.index("def call"):].splitlines()
    problems, open_starts, deltas_of = [], {}, {}
    for i, line in enumerate(lines):
        if m := re.match(r"\s*(buf\d+) = torch\.ops\.adafuse\.gather_lora_start\.default\((.*)\)$", line):
            reads = set(re.findall(r"\bbuf\d+\b", m[2]))
            open_starts[m[1]] = (i, reads)
        elif (m := re.match(r"\s*(buf\d+) = (buf\d+)\[0\]$", line)) and m[2] in open_starts:
            deltas_of[m[1]] = m[2]
        elif m := re.match(r"\s*torch\.ops\.adafuse\.gather_lora_join\.default\(\[(buf\d+).*?\], \[(.*)\]\)$", line):
            start = deltas_of[m[1]]
            begin, reads = open_starts.pop(start)
            kept = set(re.findall(r"\bbuf\d+\b", m[2]))
            if reads - kept:
                problems.append(f"line {i}: the join of {start} does not take {sorted(reads - kept)}")
            for between in lines[begin + 1:i]:
                for name in reads:
                    if re.search(rf"del {name}\b|out={name}\b", between):  # freed (or reused), or written
                        problems.append(f"{name}, read by {start}'s side stream, is freed or reused before its join: "
                                        f"{between.strip()}")
    assert not open_starts, f"starts without a join: {sorted(open_starts)}"
    # every start of the code was read (a change in Inductor's line format must fail, not pass empty)
    assert len(deltas_of) == code.count("gather_lora_start.default(") > 0, (len(deltas_of), code.count("gather_lora_start.default("))
    return problems


def test_start_and_join_take_one_buffer_where_inductor_pads_its_rows():
    """On the GPU Inductor pads a buffer's rows to 128 bytes where they are longer than 1024 elements
    (the GPU tests' 1376-wide MLP input); by default a custom op then got a contiguous copy of its
    own, so the start and the join of a side stream held different copies and the join's guard
    raised (the H100, 2026-12-05). Padding forced on the CPU (fp32 rows of 1100: to 1120): the
    start, the join and the in-line op take the one padded buffer, with no copy, and match eager."""
    from torch._inductor.utils import run_and_get_code

    p = gl.make_gather_problem(8, 1100, [64], k=2, n_experts=4, rank=8, dtype=torch.float32)
    w = torch.randn(1100, 64, generator=torch.Generator().manual_seed(0)) / 32
    a, b = torch.randn(8, 1100), torch.randn(8, 1100)

    def step(a, b, experts, gates):
        x = torch.nn.functional.silu(a) * b  # a pointwise result feeding a matmul: its rows are padded
        y = x @ w
        deltas = torch.ops.adafuse.gather_lora_start(x, p["lora_A"], p["lora_B"], experts, gates, 0.5, "reference")
        torch.ops.adafuse.gather_lora_join(deltas, [x, experts, gates, y])
        (in_line,) = torch.ops.adafuse.gather_lora(x, p["lora_A"], p["lora_B"], experts, gates, 0.5, "reference")
        return y + deltas[0] + in_line

    torch._dynamo.reset()
    with torch._inductor.config.patch(disable_padding_cpu=False):
        got, (code,) = run_and_get_code(torch.compile(step), a, b, p["experts"], p["gates"])
    torch.testing.assert_close(got, step(a, b, p["experts"], p["gates"]), rtol=1e-5, atol=1e-5)
    assert "empty_strided_cpu((8, 1100), (1120, 1)" in code  # the padding this test is about happened
    assert "empty_strided_cpu((8, 1100), (1100, 1)" not in code  # and no op got a dense copy
    assert _side_stream_lifetimes(code) == []


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("placement", ["every_adapted", "first_adapted"])
def test_side_stream_start_and_join_share_every_buffer_the_side_stream_reads(placement, batch):
    """On CUDA the adapter kernels run on a side stream between gather_lora_start and gather_lora_join,
    reading their inputs after the start returned. In Inductor's code (side stream forced on the CPU)
    the join must take the very buffers the start read, and none may be freed or reused in between.
    Before adafuse::side_input, Inductor computed a layer-wise router's softmax twice (one buffer for
    the start, one for the join) and freed the start's at once: the 7B layer-wise decode on an H100
    read overwritten gates (logits off by 127%)."""
    from torch._inductor.utils import run_and_get_code

    model = af.TinyLlama(TINY).init_weights(std=0.08, seed=3)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, alpha=16, init_lora_b="normal",
                                      target_modules="all-linear", router_placement=placement))
    model.eval().setup_cache(batch)
    prompt = torch.randint(0, TINY.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_tokens, ref_logits = af.greedy_decode(model, prompt, 3)
        model.setup_cache(batch)
        compiled = torch.compile(model, backend="adafuse", options={"path": "gather", "side_stream": True})
        (tokens, logits), codes = run_and_get_code(af.greedy_decode, compiled, prompt, 3)
    assert torch.equal(tokens, ref_tokens) and rel_err(logits, ref_logits) <= 1e-4
    assert codes and all("gather_lora_start" in code for code in codes)
    for code in codes:
        assert _side_stream_lifetimes(code) == []


@pytest.mark.parametrize("placement", ["every_adapted", "first_adapted"])
def test_side_stream_buffers_of_a_hugging_face_llama(placement):
    """The same property for a Hugging Face Llama (its own RMSNorm, rotary and attention code around
    the adapted linears): a batch-2 forward, side stream forced on."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_hf_model("llama")
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, alpha=16, init_lora_b="normal",
                                      target_modules="all-linear", router_placement=placement))
    ids = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, backend="adafuse", options={"path": "gather", "side_stream": True})
        out, codes = run_and_get_code(lambda: compiled(ids).logits)
    assert rel_err(out, ref) <= 1e-4
    assert codes and any("gather_lora_start" in code for code in codes)
    for code in codes:
        if "gather_lora_start" in code:
            assert _side_stream_lifetimes(code) == []


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("placement", ["every_adapted", "first_adapted"])
def test_side_stream_keeps_the_sorted_rows_and_sets_of_a_prefill(placement):
    """The step's sort and sets (the Triton shrink's sorted rows, the sets expand's work list) are
    side-stream inputs too. On CUDA Inductor would lower a plain sort to kernels of its own and
    materialise it once per consumer, so they come from adafuse::expert_segments / tuple_blocks:
    in Inductor's code of a 40-token prefill (80 rows: the sorted shrink; Triton kernels under the
    interpreter, side stream forced on) every start's sort and sets are buffers its join takes, and
    the step matches eager."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs on CPU tensors; the GPU runs tests/test_gather_lora_gpu.py")
    from torch._inductor.utils import run_and_get_code

    cfg = af.TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_seq_len=48)
    model = af.TinyLlama(cfg).init_weights(std=0.1, seed=2)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, top_k=2, init_lora_b="normal",
                                      target_modules=("q_proj", "v_proj", "o_proj"), router_placement=placement))
    model.eval().setup_cache(1)
    tokens, pos = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(7)), torch.arange(40)
    gl.clear_plan_cache()
    with torch.no_grad():
        ref = model(tokens, pos)
        torch._dynamo.reset()
        model.setup_cache(1)
        compiled = torch.compile(model, backend="adafuse", options={
            "path": "gather", "side_stream": True, "sgmm_impl": "triton", "prefill_expand": "sets"})
        got, codes = run_and_get_code(compiled, tokens, pos)
    assert rel_err(got, ref) <= 1e-4
    (code,) = codes
    starts = code.count("gather_lora_start.default(")
    assert starts == (6 if placement == "every_adapted" else 4)  # q, v, o per layer; or q,v together and o
    # the sort and sets were computed by our ops (one per router), and their outputs reach the starts
    assert code.count("adafuse.expert_segments.default(") == code.count("adafuse.tuple_blocks.default(") == (
        6 if placement == "every_adapted" else 1)
    assert _side_stream_lifetimes(code) == []


def test_side_stream_default_is_on_for_cuda_graphs_whatever_their_routing():
    """The side stream's default: on for CUDA, off elsewhere; an explicit setting always wins.
    (Layer-wise graphs were in line by default until the 7B layer-wise decode with the side stream
    matched eager on an H100, 2026-12-05.)"""
    from adafuse_compile.passes.rewrite_gather import side_stream_choice

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert side_stream_choice(None, cuda) is True
    assert side_stream_choice(None, cpu) is False
    assert side_stream_choice(False, cuda) is False
    assert side_stream_choice(True, cpu) is True  # the split graph off CUDA: tests
