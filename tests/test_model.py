"""The pre-gated LoRA-MoE model layer: eq. 2, one router per token, shared gates, no graph breaks."""
import pytest
import torch

from adafuse_compile import AdaFuseConfig, TinyLlama, TinyLlamaConfig, adapted_linears, gate_channel, greedy_decode, inject
from adafuse_compile.modeling import Router, RouterPlacementError
from adafuse_compile.presets import HF_FAMILIES, tiny_hf_model

TINY = TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_seq_len=32)


def adapted_tiny(dtype=torch.float32, **cfg):
    model = TinyLlama(TINY).init_weights(std=0.1).to(dtype)
    inject(model, AdaFuseConfig(num_experts=4, rank=4, alpha=8, init_lora_b="normal", **cfg))
    return model.eval()


def hand_reference(x, W, b, A, B, router_w, x1, top_k, scaling):
    """Paper eq. 2 written out token by token, float64: y = W x + b + sum_i g_i * s * B_i A_i x."""
    out = []
    for t in range(x.shape[0]):
        logits = router_w @ x1[t]
        top = sorted(range(len(logits)), key=lambda i: -float(logits[i].detach()))[:top_k]
        z = torch.stack([logits[i] for i in top])
        g = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        y = W @ x[t] + (b if b is not None else 0)
        for gi, i in zip(g, top):
            y = y + gi * scaling * (B[i] @ (A[i] @ x[t]))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_eq2_against_hand_reference_float64(targets):
    model = adapted_tiny(torch.float64, target_modules=targets)
    linears = adapted_linears(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
             for n, m in linears.items()]
    tokens = torch.randint(0, TINY.vocab_size, (2, 5))
    model(tokens)
    for h in hooks:
        h.remove()
    first = next(iter(linears))
    x1 = seen[first][0].reshape(-1, TINY.hidden_size)
    router_w = linears[first].router.weight
    for name, lin in linears.items():
        x, y = seen[name]
        ref = hand_reference(x.reshape(-1, lin.in_features), lin.weight, lin.bias, lin.lora_A, lin.lora_B,
                             router_w, x1, 2, lin.scaling)
        torch.testing.assert_close(y.reshape(-1, lin.out_features), ref, rtol=1e-12, atol=1e-12)
        assert (y.reshape(-1, lin.out_features) - x.reshape(-1, lin.in_features) @ lin.weight.T).abs().max() > 1e-3, \
            f"{name}: adapter term is negligible, the test would not see a wrong one"


def test_decode_and_prefill_forms_agree():
    """Single-token steps gather the selected experts; multi-token steps use dense gates: same math."""
    model = adapted_tiny(torch.float64)
    lin = next(iter(adapted_linears(model).values()))
    x = torch.randn(3, TINY.hidden_size, dtype=torch.float64)
    routing = lin.router(x)
    dense = lin.adapter_delta(x, routing)  # 3 tokens * top-2 > 4 experts: dense form
    gathered = torch.cat([lin.adapter_delta(x[i:i + 1], type(routing)(routing.weights[i:i + 1],
                          routing.experts[i:i + 1], routing.logits[i:i + 1])) for i in range(3)])
    torch.testing.assert_close(dense, gathered, rtol=1e-12, atol=1e-12)


def test_router_runs_once_per_token_and_every_layer_gets_its_gates():
    model = adapted_tiny(target_modules="all-linear")
    linears = adapted_linears(model)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == 1 and next(iter(linears.values())).router is routers[0]
    calls, routed, received = [], [], []
    routers[0].register_forward_hook(lambda m, i, o: calls.append(1) or routed.append(o))
    for lin in linears.values():
        orig = lin.adapter_delta
        lin.adapter_delta = lambda x, r, orig=orig: (received.append(r), orig(x, r))[1]
    model.setup_cache(1)
    greedy_decode(model, torch.randint(0, TINY.vocab_size, (1, 4)), 6)
    forwards = 6  # prefill + 5 decode steps
    assert len(calls) == forwards
    assert len(received) == forwards * len(linears)
    for step in range(forwards):
        for r in received[step * len(linears):(step + 1) * len(linears)]:
            assert r is routed[step]  # the very tensors the router produced, not a recomputation


def test_gates_sum_to_one_over_top_k_and_zero_elsewhere():
    router = Router(16, num_experts=6, top_k=2)
    routing = router(torch.randn(10, 16))
    dense = routing.dense()
    torch.testing.assert_close(dense.sum(-1), torch.ones(10))
    assert ((dense > 0).sum(-1) == 2).all()
    assert torch.equal(dense.gather(1, routing.experts), routing.weights)
    assert torch.equal(routing.experts, routing.logits.topk(2, dim=-1).indices)


def test_backbone_frozen_adapters_trainable_and_weights_shared():
    base = TinyLlama(TINY).init_weights()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    q_weight = base.layers[0].self_attn.q_proj.weight
    inject(base, AdaFuseConfig(num_experts=4, rank=4))
    assert base.layers[0].self_attn.q_proj.weight is q_weight  # not copied
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "router" in n) for n in trainable)
    after = base.state_dict()
    for k, v in before.items():  # backbone keys and values unchanged
        assert torch.equal(after[k], v)
    assert base.layers[0].self_attn.q_proj.lora_A.shape == (4, 4, TINY.hidden_size)
    assert base.layers[0].self_attn.q_proj.lora_B.shape == (4, TINY.hidden_size, 4)


def test_init_with_zero_b_equals_backbone():
    base = TinyLlama(TINY).init_weights()
    tokens = torch.randint(0, TINY.vocab_size, (1, 6))
    ref = base(tokens)
    inject(base, AdaFuseConfig(num_experts=4, rank=4))
    torch.testing.assert_close(base(tokens), ref, rtol=0, atol=0)


def test_adapted_linear_called_outside_the_model_fails_clearly():
    model = adapted_tiny()
    second = list(adapted_linears(model).values())[1]
    # names the linear that ran and where the router is, and the fixes
    with pytest.raises(RouterPlacementError, match=r"layers\.0\.self_attn\.v_proj ran before the router \(at "
                                                   r"layers\.0\.self_attn\.q_proj\).*router must sit at the first "
                                                   r"adapted linear.*router_at=.layers.0.self_attn.v_proj.*leave .v_proj. out of target_modules.*every_adapted"):
        second(torch.randn(1, TINY.hidden_size))


def test_router_sits_at_the_first_linear_called_not_the_first_registered():
    """Phi-3 registers o_proj before qkv_proj but calls qkv_proj first: the router goes to qkv_proj
    (a probe forward of the model's dummy inputs, stopped at the first target, RNG untouched), so
    every adapted linear finds the step's gates; compiled decode matches eager with one switch."""
    from adafuse_compile import backend
    from adafuse_compile.modeling.inject import first_called, router_linear, target_linears

    model = tiny_hf_model("phi3")
    config = AdaFuseConfig(num_experts=4, rank=4, alpha=16, init_lora_b="normal",
                           target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    targets = target_linears(model, config)
    assert targets[0][0] == "model.layers.0.self_attn.o_proj"  # registration order
    rng = torch.get_rng_state()
    assert first_called(model, targets) == ("model.layers.0.self_attn.qkv_proj", None)
    assert torch.equal(rng, torch.get_rng_state())
    inject(model, config)
    assert router_linear(model)[0] == "model.layers.0.self_attn.qkv_proj"
    assert sum(m.router is not None for m in adapted_linears(model).values()) == 1
    model.generation_config.cache_implementation = "static"
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    backend.last_compilations.clear()
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        model.compile(backend="adafuse", options={"codegen": "eager"})
        out = model.generate(prompt, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    assert [r["path"] for r in backend.last_compilations].count("merge") == 1
    torch._dynamo.reset()


def test_decode_step_has_zero_graph_breaks_and_one_router():
    model = adapted_tiny(target_modules="all-linear")
    model.setup_cache(1)
    model(torch.randint(0, TINY.vocab_size, (1, 3)), torch.arange(3))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.tensor([[5]]), torch.tensor([3]))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    graph = explained.graphs[0].graph
    topk = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.topk]
    assert len(topk) == 1, "routing must be computed once per step, in the traced graph"


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_generate_works_and_traces_without_breaks(family):
    from transformers import StaticCache

    model = tiny_hf_model(family)
    tokens = torch.randint(0, 256, (1, 7))
    backbone_out = model.generate(tokens, max_new_tokens=12, do_sample=False)
    inject(model, AdaFuseConfig(num_experts=4, rank=4, alpha=16, init_lora_b="normal"))
    channel = gate_channel(model)
    calls = []
    next(iter(adapted_linears(model).values())).router.register_forward_hook(lambda *_: calls.append(1))
    out = model.generate(tokens, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 19) and len(calls) == 12  # prefill + 11 decode steps
    assert channel.routing is None  # the gate did not outlive the step
    assert not torch.equal(out, backbone_out)  # the adapters act on the tokens
    # A cached decode step traces as one graph.
    cache = StaticCache(config=model.config, max_cache_len=32)
    model(input_ids=tokens, past_key_values=cache, use_cache=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=tokens[:, :1], past_key_values=cache,
                                             cache_position=torch.tensor([7]), use_cache=True)
    assert explained.graph_break_count == 0


def test_qwen2_bias_is_kept():
    model = tiny_hf_model("qwen2")
    q = model.model.layers[0].self_attn.q_proj
    bias = q.bias
    inject(model, AdaFuseConfig(num_experts=4, rank=4))
    assert model.model.layers[0].self_attn.q_proj.bias is bias and bias.abs().sum() > 0


def test_router_placement_on_a_compiled_model_on_meta_and_from_a_file(tmp_path):
    """The probe runs the plain forward even where the model was compiled first (its compiled
    decode is then still rewritten); where it cannot run (parameters on the meta device) a warning
    says where the router went and how to choose; `router_at` chooses; load_adapters puts the
    router where the file's model had it."""
    import warnings

    from adafuse_compile import backend, load_adapters, save_adapters
    from adafuse_compile.config import AdaFuseConfigError
    from adafuse_compile.modeling.inject import router_linear

    targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    config = AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal", target_modules=targets)
    qkv, o = "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj"
    torch._dynamo.reset()
    backend.last_compilations.clear()
    model = tiny_hf_model("phi3")
    model.compile(backend="adafuse", options={"codegen": "eager"})
    inject(model, config)  # after compile: the probe must not run (and break) the compiled forward
    assert router_linear(model)[0] == qkv
    model.generation_config.cache_implementation = "static"
    with torch.no_grad():
        model.generate(torch.randint(3, 256, (1, 7)), max_new_tokens=4, do_sample=False)
    assert sorted(r["path"] for r in backend.last_compilations) == ["gather", "merge"]
    torch._dynamo.reset()
    path = save_adapters(model, tmp_path / "phi3.safetensors")

    with torch.device("meta"):
        on_meta = tiny_hf_model("phi3")
    with pytest.warns(UserWarning, match=r"router goes to .*o_proj.*could not be checked: its parameters are on "
                                         r"the meta device.*router_at="):
        inject(on_meta, config)
    assert router_linear(on_meta)[0] == o
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: no probe, no warning
        inject(tiny_hf_model("phi3"), config, router_at=qkv)
    with pytest.raises(AdaFuseConfigError, match="router_at='q_proj' is not one of the adapted linears"):
        inject(tiny_hf_model("phi3"), config, router_at="q_proj")
    with pytest.raises(AdaFuseConfigError, match="every_adapted"):
        inject(tiny_hf_model("phi3"), AdaFuseConfig(target_modules=targets, router_placement="every_adapted"),
               router_at=qkv)
    fresh = load_adapters(tiny_hf_model("phi3"), path)  # the file's router: qkv_proj
    assert router_linear(fresh)[0] == qkv


def test_gradient_checkpointing_says_why_a_pregated_model_cannot_recompute():
    model = tiny_hf_model("llama").train()
    inject(model, AdaFuseConfig(num_experts=4, rank=4, init_lora_b="normal"))
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 256, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(RouterPlacementError, match="recomputed during backward.*gradient_checkpointing_disable.*"
                                                   "every_adapted"):
        loss.backward()
