"""The dense prefill's packed factors (runtime/dense_packs.py, setting prefill_packed) on the CPU:
same numbers as the unpacked form and the eager model, never stale, never in the state_dict."""
import warnings

import pytest
import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.cutlass_kernels import gather_lora as gl
from adafuse_compile.modeling.inject import gate_channel
from adafuse_compile.runtime.dense_packs import DensePacks, flatten

CFG = af.TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_seq_len=48)
N_TOKENS = 40
GROUPS_PER_LAYER = 4  # q,k,v / o / gate,up / down


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def adapted(seed=1):
    model = af.TinyLlama(CFG).init_weights(std=0.1, seed=seed)
    af.inject(model, af.AdaFuseConfig(num_experts=4, rank=8, top_k=2, init_lora_b="normal",
                                      target_modules="all-linear"))
    return model.eval()


def prefill(step, model, tokens):
    model.setup_cache(1)
    with torch.no_grad():
        return step(tokens, torch.arange(tokens.shape[1]))


def dense_nodes(gm):
    return [n for n in gm.graph.nodes if n.target in (gl.dense_lora, gl.dense_lora_packed)]


def _problem(dtype, outs=(24, 16, 40), n_in=20, n=5, r=8, t=11):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(n, r, n_in, generator=g).to(dtype) for _ in outs]
    b = [(0.3 * torch.randn(n, o, r, generator=g)).to(dtype) for o in outs]
    x = torch.randn(t, n_in, generator=g).to(dtype)
    experts = torch.randint(0, n, (t, 2), generator=g)
    gates = torch.rand(t, 2, generator=g)
    return a, b, x, gl.dense_gates(experts, gates, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_layout_and_dense_lora_packed_equal_dense_lora(dtype):
    """B packed [out, N r] with column n r + j = B[n, :, j]; the group's A stacked; the packed
    contraction gives dense_lora's deltas (fp32: to rounding; fp16: within its tolerance)."""
    a, b, x, gate_matrix = _problem(dtype)
    packs = DensePacks([(a, b)])
    a_cat, *b_packed = packs.buffers
    assert torch.equal(a_cat, torch.cat([t.reshape(-1, t.shape[-1]) for t in a]))
    n, out, r = b[1].shape
    assert b_packed[1].shape == (out, n * r) and torch.equal(b_packed[1][:, 3 * r + 5], b[1][3, :, 5])
    assert packs.nbytes == sum(t.numel() * t.element_size() for t in (*a, *b))
    want = gl.dense_lora(x, a, b, gate_matrix, 0.5)
    got = gl.dense_lora_packed(x, a_cat, b_packed, n, gate_matrix, 0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_a_single_module_group_packs_only_its_b():
    a, b, _, _ = _problem(torch.float32, outs=(24,))
    packs = DensePacks([(a, b)])
    assert len(packs.buffers) == 1 and packs.buffers[0].shape == (24, 5 * 8)


def test_refresh_repacks_only_what_changed():
    a, b, _, _ = _problem(torch.float32)
    groups = [(a, b)]
    packs = DensePacks(groups)
    assert packs.refresh(flatten(groups)) == 0
    with torch.no_grad():
        b[2].mul_(2.0)  # in place: the version counter moves
    assert packs.refresh(flatten(groups)) == 1
    assert torch.equal(packs.buffers[3].view(40, 5, 8), b[2].permute(1, 0, 2))
    groups = [([a[0], a[1].clone(), a[2]], b)]  # another tensor in A's place: the stacked A only
    assert packs.refresh(flatten(groups)) == 1 and packs.refresh(flatten(groups)) == 0


def test_a_new_storage_at_the_freed_address_is_repacked():
    """The case the version counter cannot tell (a `.data =` assignment whose new tensor lands where
    the old one's memory was, version unchanged), made deterministic: two storages over one buffer.
    Only the check that the packed-from storage still exists sees it."""
    a, b, _, _ = _problem(torch.float32, outs=(24,))
    memory = bytearray(b[0].numel() * 4)
    torch.frombuffer(memory, dtype=torch.float32).copy_(b[0].flatten())  # through a tensor of its own
    first = torch.frombuffer(memory, dtype=torch.float32).view(b[0].shape)  # version 0
    packs = DensePacks([(a, [first])])
    ptr, version = first.data_ptr(), first._version
    del first  # its storage is freed; the memory (the bytearray) stays
    new_values = torch.randn(b[0].shape)
    torch.frombuffer(memory, dtype=torch.float32).copy_(new_values.flatten())
    second = torch.frombuffer(memory, dtype=torch.float32).view(b[0].shape)
    assert (second.data_ptr(), second._version) == (ptr, version)  # what the stamps alone compare
    assert packs.refresh(flatten([(a, [second])])) == 1
    assert torch.equal(packs.buffers[0].view(24, 5, 8), new_values.permute(1, 0, 2))


def test_inference_tensors_are_repacked_every_call_with_one_warning():
    with torch.inference_mode():
        a, b, _, _ = _problem(torch.float32)
    with pytest.warns(UserWarning, match="inference-mode tensors.*prefill_packed"):
        packs = DensePacks([(a, b)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert packs.refresh(flatten([(a, b)])) == len(packs.buffers)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_packed_and_unpacked_prefill_match_eager_and_leave_the_model_alone(codegen):
    """A dense prefill, packed (the default) and unpacked: both equal the eager model. Packed, the
    graph reads one static buffer per stacked A and per B, held by the model's gate channel, never
    in its state_dict; the user's parameters are untouched."""
    model = adapted()
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(2))
    ref = prefill(model, model, tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for packed in (True, False):
        torch._dynamo.reset()
        backend.last_compilations.clear()
        step = torch.compile(model, backend="adafuse", options={
            "codegen": codegen, "prefill_expand": "dense", "prefill_packed": packed})
        torch.testing.assert_close(prefill(step, model, tokens), ref, rtol=1e-4, atol=1e-4)
        gm = backend.last_compilations[0]["graph"]
        nodes = dense_nodes(gm)
        assert len(nodes) == GROUPS_PER_LAYER * CFG.num_hidden_layers
        assert {n.target for n in nodes} == {gl.dense_lora_packed if packed else gl.dense_lora}
        pack_inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("adafuse_dense_pack")]
        # per layer: q,k,v and gate,up stack their A (2 buffers); 7 B buffers
        assert len(pack_inputs) == (2 + 7) * CFG.num_hidden_layers if packed else not pack_inputs
    assert before.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    channel = gate_channel(model)
    assert len(channel.dense_packs) == 1  # made once for the packed compile


def test_packed_prefill_follows_adapters_loaded_in_place_without_recompiling():
    """New adapters loaded into the same parameters (load_state_dict copies in place): the next
    compiled prefill re-packs them and equals the eager model with the new adapters."""
    model, other = adapted(seed=1), adapted(seed=7)
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(3))
    step = torch.compile(model, backend="adafuse", options={"codegen": "eager", "prefill_expand": "dense"})
    first = prefill(step, model, tokens)
    torch.testing.assert_close(first, prefill(model, model, tokens), rtol=1e-4, atol=1e-4)
    adapters = {k: v for k, v in other.state_dict().items() if "lora_" in k}
    assert adapters
    model.load_state_dict(adapters, strict=False)
    ref = prefill(model, model, tokens)
    assert (ref - first).abs().max() > 1e-2  # the test can tell the two adapter sets apart
    got = prefill(step, model, tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert len(backend.last_compilations) == 1  # no recompile: the same graph, re-packed buffers


def test_a_second_instance_through_the_same_graph_gets_its_own_packs():
    """Dynamo runs a second model of the same class through the first one's graph: it binds its own
    packs (from its own factors) and matches its own eager output."""
    models = [adapted(seed=1), adapted(seed=5)]
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(4))
    refs = [prefill(m, m, tokens) for m in models]
    for m, ref in zip(models + models[:1], refs + refs[:1]):
        step = torch.compile(m, backend="adafuse", options={"codegen": "eager", "prefill_expand": "dense"})
        torch.testing.assert_close(prefill(step, m, tokens), ref, rtol=1e-4, atol=1e-4)
    assert len(backend.last_compilations) == 1
    packs = [next(iter(gate_channel(m).dense_packs.values())) for m in models]
    assert packs[0] is not packs[1]
    assert not torch.equal(packs[0].buffers[0], packs[1].buffers[0])


def test_data_reassigned_twice_between_calls_is_seen():
    """`.data =` between calls, twice per parameter (the first assignment frees the storage the packs
    were made from): the next prefill reads the new factors. Whether the allocator reuses the freed
    address varies; that case is made deterministic in test_a_new_storage_at_the_freed_address_is_repacked."""
    model = adapted(seed=1)
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(6))
    step = torch.compile(model, backend="adafuse", options={"codegen": "eager", "prefill_expand": "dense"})
    prefill(step, model, tokens)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        for lin in af.adapted_linears(model).values():
            shape = lin.lora_B.shape
            lin.lora_B.data = torch.randn(shape, generator=gen) * 0.1
            lin.lora_B.data = torch.randn(shape, generator=gen) * 0.1
        torch.testing.assert_close(prefill(step, model, tokens), prefill(model, model, tokens), rtol=1e-4, atol=1e-4)


def test_writes_through_data_are_packed_again_by_a_new_compile():
    """Writes through `.data` bypass the version counter (documented): a new compile binds the packs
    again and re-packs them whole."""
    model = adapted(seed=1)
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(7))
    options = {"codegen": "eager", "prefill_expand": "dense"}
    prefill(torch.compile(model, backend="adafuse", options=options), model, tokens)
    for lin in af.adapted_linears(model).values():
        lin.lora_B.data.mul_(3.0)
    torch._dynamo.reset()
    got = prefill(torch.compile(model, backend="adafuse", options=options), model, tokens)
    torch.testing.assert_close(got, prefill(model, model, tokens), rtol=1e-4, atol=1e-4)


def test_a_dtype_change_after_compiling_gets_packs_of_its_own():
    """model.double() after a compile: Dynamo recompiles, and the new graph gets float64 packs in
    place of the old (same parameters, so the same key)."""
    model = adapted(seed=1)
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(9))
    step = torch.compile(model, backend="adafuse", options={"codegen": "eager", "prefill_expand": "dense"})
    prefill(step, model, tokens)
    model.double()
    got = prefill(step, model, tokens)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, prefill(model, model, tokens), rtol=1e-6, atol=1e-6)
    packs = list(gate_channel(model).dense_packs.values())
    assert len(packs) == 1 and {b.dtype for b in packs[0].buffers} == {torch.float64}


def test_a_graph_that_computes_adapter_gradients_is_not_packed():
    """Packed copies are detached: with gradients enabled the dense prefill reads the factors
    themselves, so every adapter gets the eager model's gradient."""
    def grads(step, model):
        model.zero_grad(set_to_none=True)
        model.setup_cache(1)
        step(tokens, torch.arange(N_TOKENS)).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    model = adapted(seed=1).train()
    for m in model.modules():  # no dropout: the two runs must see the same forward
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(10))
    want = grads(model, model)
    got = grads(torch.compile(model, backend="adafuse", options={"codegen": "eager", "prefill_expand": "dense"}), model)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    notes = " ".join(backend.last_compilations[-1]["notes"])
    assert "the dense form (plain matmuls, differentiable), unpacked" in notes


def linear_lora_nodes(gm):
    from adafuse_compile.cutlass_kernels.linear_lora import linear_lora
    return [n for n in gm.graph.nodes if n.target is linear_lora]


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_fused_prefill_matches_eager_with_one_call_per_adapted_linear(codegen):
    """prefill_fused: every adapted linear and its expand are one linear_lora call (the linears and
    the dense deltas are gone from the graph), the group's shrink stays one GEMM over the packed A;
    the logits equal the eager model's and the weights are untouched."""
    model = adapted()
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(4))
    ref = prefill(model, model, tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = torch.compile(model, backend="adafuse", options={
        "codegen": codegen, "prefill_expand": "dense", "prefill_fused": True})
    torch.testing.assert_close(prefill(step, model, tokens), ref, rtol=1e-4, atol=1e-4)
    record = backend.last_compilations[0]
    gm = record["graph"]
    assert len(linear_lora_nodes(gm)) == 7 * CFG.num_hidden_layers
    assert not dense_nodes(gm)
    fused_weights = {n.args[1] for n in linear_lora_nodes(gm)}
    assert len(fused_weights) == 7 * CFG.num_hidden_layers
    assert not [n for n in gm.graph.nodes if n.target is torch._C._nn.linear and n.args[1] in fused_weights]
    assert any("14 adapted linear(s) fused with their expand" in n for n in record["notes"]), record["notes"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_prefill_without_packed_factors_says_why_and_stays_exact():
    model = adapted()
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(5))
    ref = prefill(model, model, tokens)
    step = torch.compile(model, backend="adafuse", options={
        "codegen": "eager", "prefill_expand": "dense", "prefill_fused": True, "prefill_packed": False})
    torch.testing.assert_close(prefill(step, model, tokens), ref, rtol=1e-4, atol=1e-4)
    record = backend.last_compilations[0]
    assert not linear_lora_nodes(record["graph"])
    assert any("prefill_fused needs the packed factors" in n for n in record["notes"]), record["notes"]


def test_fused_prefill_follows_adapters_loaded_in_place():
    """The fused graph reads the same packed buffers: new adapters loaded in place are re-packed and
    the next fused prefill equals the eager model with them, without recompiling."""
    model, other = adapted(seed=1), adapted(seed=7)
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(6))
    step = torch.compile(model, backend="adafuse", options={
        "codegen": "eager", "prefill_expand": "dense", "prefill_fused": True})
    first = prefill(step, model, tokens)
    model.load_state_dict({k: v for k, v in other.state_dict().items() if "lora_" in k}, strict=False)
    ref = prefill(model, model, tokens)
    assert (ref - first).abs().max() > 1e-2
    torch.testing.assert_close(prefill(step, model, tokens), ref, rtol=1e-4, atol=1e-4)
    assert len(backend.last_compilations) == 1


def test_fused_prefill_under_autocast_stays_unfused_and_matches_eager():
    """An fp32 model under autocast (bf16): the linears' outputs differ in dtype from their inputs, so
    linear_lora (no autocast rule) is not used; the notes name the reason and the result is eager's."""
    model = adapted()
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = prefill(model, model, tokens)
        step = torch.compile(model, backend="adafuse", options={
            "codegen": "eager", "prefill_expand": "dense", "prefill_fused": True})
        got = prefill(step, model, tokens)
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    record = backend.last_compilations[0]
    assert not linear_lora_nodes(record["graph"]) and dense_nodes(record["graph"])
    assert any("not fused:" in n and "autocast" in n for n in record["notes"]), record["notes"]


def test_fused_prefill_with_sgmm_impl_triton_off_cuda_uses_the_reference(monkeypatch):
    """sgmm_impl="triton" on a CPU model (no interpreter): checked while compiling, the fused calls
    take the reference with a note, and the prefill runs (before: every call raised)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = adapted()
    tokens = torch.randint(0, CFG.vocab_size, (1, N_TOKENS), generator=torch.Generator().manual_seed(9))
    ref = prefill(model, model, tokens)
    step = torch.compile(model, backend="adafuse", options={
        "codegen": "eager", "prefill_expand": "dense", "prefill_fused": True, "sgmm_impl": "triton"})
    torch.testing.assert_close(prefill(step, model, tokens), ref, rtol=1e-4, atol=1e-4)
    record = backend.last_compilations[0]
    assert {n.args[-1] for n in linear_lora_nodes(record["graph"])} == {"auto"}
    assert any("needs a CUDA device" in n and "use the reference" in n for n in record["notes"]), record["notes"]
