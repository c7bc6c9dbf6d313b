"""The adafuse backend on a CUDA GPU, bf16: parity under CUDA graphs, one switching launch per step."""
import copy

import pytest
import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.cutlass_kernels import gather_lora as gl

pytestmark = pytest.mark.gpu
CFG = af.TinyLlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_seq_len=128)


def build(targets=("q_proj", "v_proj"), router_placement="first_adapted"):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = af.TinyLlama(CFG).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.05)
    af.inject(model, af.AdaFuseConfig(num_experts=8, rank=64, top_k=2, target_modules=targets,
                                      router_placement=router_placement))
    for lin in af.adapted_linears(model).values():
        lin.lora_B.data.normal_(std=0.01)
    return model.eval()


def teacher_forced(step, tokens):
    # clone(): under CUDA-graph trees a step's output buffer is overwritten by the next replay.
    out = [step(tokens[:, :8], torch.arange(8, device="cuda"))[:, -1].clone()]
    for i in range(8, tokens.shape[1]):
        out.append(step(tokens[:, i:i + 1], torch.tensor([i], device="cuda"))[:, -1].clone())
    return torch.stack(out, 1).float()


@pytest.mark.parametrize("options", [
    {"cudagraphs": True, "path": "merge"},  # exact, auto SGMM implementation
    {"cudagraphs": True, "path": "merge", "exact": False, "sgmm_impl": "triton"},
    {"codegen": "eager", "path": "merge", "sgmm_impl": "triton"},
    {"cudagraphs": True},  # path auto: whichever the calibrated cost model picks
    {"cudagraphs": True, "path": "factor"},
    {"cudagraphs": True, "path": "gather"},  # adapter kernels on the side stream (the default)
    {"cudagraphs": True, "path": "gather", "side_stream": False},
], ids=["merge-exact", "merge-inplace-triton", "merge-eager-triton", "auto", "factor", "gather", "gather-inline"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_bf16_parity_under_cuda_graphs(options, targets):
    torch._dynamo.reset()
    backend.last_compilations.clear()
    model = build(targets)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, CFG.vocab_size, (1, 40), device="cuda")
    with torch.no_grad():
        model.setup_cache(1)
        ref = teacher_forced(model, tokens)
        # bf16's own tolerance, measured: the eager bf16 model against an fp32 copy of itself.
        model.float()
        model.setup_cache(1)
        ref32 = teacher_forced(model, tokens)
        model.to(torch.bfloat16)
        model.setup_cache(1)
        got = teacher_forced(torch.compile(model, backend="adafuse", options=options), tokens)
    if options.get("exact") is not False:  # exact merge, factor, gather: W is never written, even mid-decode
        assert all(torch.equal(v, w0[k]) for k, v in model.state_dict(keep_vars=True).items())
    af.restore(model)
    paths = [r["path"] for r in backend.last_compilations]
    decode_path = options.get("path", "auto")
    if decode_path == "auto":
        decisions = [r["path_decision"] for r in backend.last_compilations if r["path_decision"]]
        decode_path = next(d["path"] for d in decisions if d["estimates_ms"]["merge"] is not None)
    assert paths.count(decode_path) >= 1 and paths.count("merge") <= 1, paths

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    bf16_err, err = rel(ref, ref32), rel(got, ref32)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    drift = max((v.float() - w0[k].float()).abs().max().item() for k, v in model.state_dict().items())
    print(f"options={options} targets={targets}: max rel logit err vs fp32 {err:.2e} (eager bf16: {bf16_err:.2e}), "
          f"vs eager bf16 {rel(got, ref):.2e}, argmax agreement {agree:.3f}, max |W - W0| after restore {drift:.2e}")
    # Exact paths round like the eager bf16 model does; in place adds the drift of 32 unresynced
    # switches (H200, 7B q,v shapes: 56 ulp of mean |W| after 100 switches, docs/weights.md).
    in_place = options.get("exact") is False
    assert err <= (3.0 if in_place else 1.5) * bf16_err + 1e-3, (err, bf16_err)
    assert agree >= 0.9, agree
    # factor/gather and exact merge never write W; in place restores W0 exactly from the pinned
    # host copy, so the drift ends with the decode.
    assert drift == 0.0


@pytest.mark.parametrize("side_stream", [True, False, None])
def test_layerwise_routing_gathers_under_cuda_graphs_like_eager(side_stream):
    """A router in every adapted linear (MoLA style): batch-1 decode under CUDA graphs (auto takes
    the gather path with each region's own router), a batch-4 step and a 128-token (dense) prefill,
    against an fp32 copy of the model with bf16's own tolerance; W never written. None: the
    default, the side stream on (and no compile note of kernels in line)."""
    torch._dynamo.reset()
    backend.last_compilations.clear()
    gl._side_streams.__dict__.pop("by_device", None)
    model = build("all-linear", router_placement="every_adapted")
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator("cuda").manual_seed(3)
    tokens = torch.randint(0, CFG.vocab_size, (1, 40), device="cuda", generator=g)
    batch = torch.randint(0, CFG.vocab_size, (4, 17), device="cuda", generator=g)
    long = torch.randint(0, CFG.vocab_size, (1, 128), device="cuda", generator=g)
    compiled = torch.compile(model, backend="adafuse", options={"cudagraphs": True, "side_stream": side_stream})

    def run(step):
        model.setup_cache(1)
        decode = teacher_forced(step, tokens)
        model.setup_cache(4)
        b4 = step(batch, torch.arange(17, device="cuda"))[:, -1].clone().float()
        model.setup_cache(1)
        prefill = step(long, torch.arange(128, device="cuda"))[:, -1].clone().float()
        return decode, b4, prefill
    with torch.no_grad():
        ref = run(model)
        model.float()
        ref32 = run(model)
        model.to(torch.bfloat16)
        got = run(compiled)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert {r["path"] for r in backend.last_compilations} == {"gather"}, [r["notes"][-1] for r in backend.last_compilations]
    # the side stream ran (the default included) or not: the note of every graph with gather calls
    # says so (the 128-token prefill is dense: no gather call), and a start made this thread's stream
    gathers = [n for r in backend.last_compilations for n in r["notes"] if "fused gather call(s)" in n]
    assert gathers and all(("adapter kernels on a side stream" in n) == (side_stream is not False) for n in gathers), gathers
    assert ("by_device" in gl._side_streams.__dict__) == (side_stream is not False)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    for name, g_, r_, r32 in zip(("decode", "batch4", "prefill128"), got, ref, ref32):
        bf16_err, err = rel(r_, r32), rel(g_, r32)
        print(f"layer-wise {name} side_stream={side_stream}: max rel logit err vs fp32 {err:.2e} "
              f"(eager bf16: {bf16_err:.2e})")
        assert err <= 1.5 * bf16_err + 1e-3, (name, err, bf16_err)


def test_one_switching_launch_per_decode_step():
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    model = build("all-linear")
    model.setup_cache(1)
    compiled = torch.compile(model, backend="adafuse", options={"path": "merge", "sgmm_impl": "triton"})
    tok, pos = torch.tensor([[5]], device="cuda"), torch.tensor([3], device="cuda")
    with torch.no_grad():
        compiled(tok, pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                compiled(tok, pos + 1 + i)
            torch.cuda.synchronize()
    af.restore(model)
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    switch = [n for n in names if "sgmm" in n.lower()]
    assert len(switch) == 3, sorted(set(names))


@pytest.mark.parametrize("path", ["gather", "auto", "gather-slots"])
def test_batch4_and_prefill17_match_eager(path):
    """Batch 4 with different experts per sequence, and a 17-token prefill, run unmerged (gather;
    gather-slots: the per-slot prefill expand, its slots summed in the add)."""
    torch._dynamo.reset()
    backend.last_compilations.clear()
    model = build("all-linear")
    g = torch.Generator("cuda").manual_seed(2)
    prompt = torch.randint(0, CFG.vocab_size, (4, 17), device="cuda", generator=g)
    nxt = torch.randint(0, CFG.vocab_size, (4, 1), device="cuda", generator=g)
    options = {"path": "gather", "prefill_expand": "slots"} if path == "gather-slots" else {"path": path}
    compiled = torch.compile(model, backend="adafuse", options={**options, "cudagraphs": True})
    with torch.no_grad():
        outs = []
        for step in (model, compiled):
            model.setup_cache(4)
            a = step(prompt, torch.arange(17, device="cuda"))[:, -1].clone().float()
            b = step(nxt, torch.tensor([17], device="cuda"))[:, -1].clone().float()
            outs.append((a, b))
    af.restore(model)
    for got, ref in zip(outs[1], outs[0]):
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        print(f"path={path}: batch-4 max rel logit err {rel:.2e}")
        assert rel < 2e-2, rel
    assert "gather" in [r["path"] for r in backend.last_compilations]


@pytest.mark.parametrize("prefill_expand", ["auto", "auto-unpacked", "auto-fused", "sets", "slots"])
def test_dense_prefill_and_gather_prefill_match_eager(prefill_expand):
    """A prefill of DENSE_MIN_TOKENS tokens under CUDA graphs: dense matmuls by default ("auto"),
    the Triton gather kernels with "sets" / "slots". Tolerance calibrated as in bench_decode.py:
    against an fp32 copy of the model, the compiled step's error may be at most 1.5x the eager bf16
    model's own. (The first version compared with eager bf16 at a fixed 2e-2 and failed sets and
    slots on the H200 at 2.3e-2 and 2.1e-2: bf16 rounding, not a bug; this version has not run on
    a GPU yet.)"""
    from adafuse_compile.cutlass_kernels.gather_lora import DENSE_MIN_TOKENS

    torch._dynamo.reset()
    backend.last_compilations.clear()
    model = build("all-linear")
    n = DENSE_MIN_TOKENS
    assert n <= CFG.max_seq_len, "CFG.max_seq_len must hold a DENSE_MIN_TOKENS-token prompt: raise it with the threshold"
    prompt = torch.randint(0, CFG.vocab_size, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    pos = torch.arange(n, device="cuda")
    with torch.no_grad():
        model.setup_cache(1)
        ref = model(prompt, pos)[:, -8:].float()
        model.float()
        model.setup_cache(1)
        ref32 = model(prompt, pos)[:, -8:].float()
        model.to(torch.bfloat16)
        options = {"auto-unpacked": {"prefill_expand": "auto", "prefill_packed": False},
                   "auto-fused": {"prefill_expand": "auto", "prefill_fused": True}}.get(
                       prefill_expand, {"prefill_expand": prefill_expand})
        compiled = torch.compile(model, backend="adafuse", options={**options, "cudagraphs": True})
        got = []
        for _ in range(2):  # the second call replays the CUDA graph
            model.setup_cache(1)
            got.append(compiled(prompt, pos)[:, -8:].clone().float())
    af.restore(model)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    own = rel(ref, ref32)
    for g in got:
        print(f"prefill_expand={prefill_expand}: {n}-token prefill, max rel logit err vs fp32 {rel(g, ref32):.2e} "
              f"(eager bf16's own: {own:.2e})")
        assert rel(g, ref32) <= 1.5 * own + 1e-3
    notes = " ".join(str(r.get("notes", "")) for r in backend.last_compilations)
    assert ("dense call" in notes) == prefill_expand.startswith("auto"), notes
    assert ("reads packed factors" in notes) == (prefill_expand in ("auto", "auto-fused")), notes
    assert ("fused with their expand" in notes) == (prefill_expand == "auto-fused"), notes


def test_packed_dense_prefill_under_cuda_graphs_follows_adapters_changed_in_place():
    """The packed factors are static inputs of the recorded CUDA graph: adapters changed in place
    after the recording are re-packed into the same buffers before the next replay, which then
    equals the eager model with the new adapters (bf16, the 1.5x-of-eager's-own-error rule)."""
    from adafuse_compile.cutlass_kernels.gather_lora import DENSE_MIN_TOKENS

    torch._dynamo.reset()
    backend.last_compilations.clear()
    model = build("all-linear")
    n = DENSE_MIN_TOKENS
    prompt = torch.randint(0, CFG.vocab_size, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    pos = torch.arange(n, device="cuda")

    def run(step):
        model.setup_cache(1)
        return step(prompt, pos)[:, -8:].clone().float()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    with torch.no_grad():
        compiled = torch.compile(model, backend="adafuse", options={"cudagraphs": True})
        first = [run(compiled) for _ in range(3)]  # record, then replays
        for lin in af.adapted_linears(model).values():  # new adapters, 5x larger, in the same parameters
            lin.lora_B.normal_(std=0.05)
            lin.lora_A.add_(0.01)
        ref = run(model)
        got = run(compiled)
        model32 = copy.deepcopy(model).float()  # the user's model keeps its tensors (and their addresses)
        model32.setup_cache(1)
        ref32 = model32(prompt, pos)[:, -8:].float()
    af.restore(model)
    own = rel(ref, ref32)
    print(f"after the in-place change: compiled {rel(got, ref32):.2e} vs fp32, eager bf16's own {own:.2e}; "
          f"before the change the outputs differed by {rel(first[-1], ref32):.2e}")
    assert rel(first[-1], ref32) > 3 * own  # the change is visible
    assert rel(got, ref32) <= 1.5 * own + 1e-3
    assert len(backend.last_compilations) == 1


@pytest.mark.parametrize("options", [
    {"path": "merge"},
    {"path": "merge", "exact": False, "sgmm_impl": "triton"},
    {"path": "factor"},
    {"path": "gather"},
], ids=["merge", "merge-inplace-triton", "factor", "gather"])
def test_two_instances_share_one_compiled_graph_under_cuda_graphs(options):
    """Dynamo runs a second instance of the model class through the first one's graph; under
    CUDA-graph trees that graph is recorded again for the second instance's addresses, so its
    kernel plans must exist before (built when the instance is first bound) and its own state used."""
    torch._dynamo.reset()
    models = [build(), build()]
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for name, p in models[1].named_parameters():  # a different backbone and different experts
            if "norm" not in name:
                p.normal_(std=0.01 if "lora_B" in name else 0.05, generator=gen)
    tokens = torch.randint(0, CFG.vocab_size, (1, 24), device="cuda")
    refs, got = [], []
    with torch.no_grad():
        for m in models:
            m.setup_cache(1)
            refs.append(teacher_forced(m, tokens))
        for m in models + models[:1]:  # the second instance, then back to the first
            m.setup_cache(1)
            got.append(teacher_forced(torch.compile(m, backend="adafuse", options={"cudagraphs": True, **options}),
                                      tokens))
            af.restore(m)
    for g, r in zip(got, refs + refs[:1]):
        assert ((g - r).abs().max() / r.abs().max()).item() < 0.2
        assert (g.argmax(-1) == r.argmax(-1)).float().mean().item() >= 0.85
    assert ((refs[0] - refs[1]).abs().max() / refs[0].abs().max()).item() > 0.5  # the test can tell them apart
