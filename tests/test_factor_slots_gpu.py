"""write_factor_slots on a CUDA GPU: the Triton kernel against the reference on Llama-2-7B
shapes (bitwise) and odd shapes, against float64 (one ulp), CUDA-graph capture and replay
with new experts, one launch per call, no host sync once warm, and the compiled `factor`
path keeping one plan across decode steps (the benchmark is benchmarks/bench_factor_slots.py).

Not yet run: written in a session without GPU time.
"""
import pytest
import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.cutlass_kernels import factor_slots as fs
from adafuse_compile.cutlass_kernels.factor_slots import (
    make_slots, reference_write_factor_slots, write_factor_slots_,
)

pytestmark = pytest.mark.gpu

HIDDEN, FFN, RANK, N_EXPERTS, TOP_K, SCALING = 4096, 11008, 64, 8, 2, 0.5
LLAMA7B_QV = [(HIDDEN, HIDDEN, RANK)] * 64  # (in, out, r): 32 layers x q, v
ONE_LAYER_ALL = [(HIDDEN, HIDDEN, RANK)] * 4 + [(HIDDEN, FFN, RANK)] * 2 + [(FFN, HIDDEN, RANK)]
# in % 8 != 0, r not a power of two, r = 3: unaligned, no vectorisation hints, masked columns.
ODD = [(1000, 96, 24), (HIDDEN, FFN, RANK), (40, 72, 8), (33, 5, 3)]
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def _problem(shapes, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(N_EXPERTS, r, i, generator=gen).to("cuda", dtype) * 0.02 for i, o, r in shapes]
    lora_B = [torch.randn(N_EXPERTS, o, r, generator=gen).to("cuda", dtype) * 0.01 for i, o, r in shapes]
    experts = torch.randperm(N_EXPERTS, generator=gen)[:k].cuda()
    gates = torch.softmax(torch.randn(k, generator=gen), 0).cuda()
    return lora_A, lora_B, experts, gates


def _poisoned_slots(lora_A, lora_B, k):
    a_slots, b_slots = make_slots(lora_A, lora_B, k)
    for s in a_slots + b_slots:
        s.fill_(float("nan"))
    return a_slots, b_slots


def _reference_slots(lora_A, lora_B, experts, gates, k):
    ra, rb = make_slots(lora_A, lora_B, k)
    reference_write_factor_slots(lora_A, lora_B, experts, gates, SCALING, ra, rb)
    return ra, rb


def _assert_equal_slots(got_a, got_b, want_a, want_b, what):
    torch.cuda.synchronize()
    for m, (ga, gb, wa, wb) in enumerate(zip(got_a, got_b, want_a, want_b)):
        assert torch.equal(ga, wa), f"{what}: linear {m} A slots {tuple(ga.shape)} differ"
        assert torch.equal(gb, wb), f"{what}: linear {m} B slots {tuple(gb.shape)} differ"


def _ulps(got, exp64, dtype):
    info = torch.finfo(dtype)
    mag = exp64.abs().clamp_min(info.smallest_normal)
    spacing = torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA[dtype])
    return ((got.double() - exp64).abs() / spacing).max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama7b_qv_matches_reference_bitwise(dtype):
    """64 linears 4096 x 4096, r = 64, N = 8, k = 2: a copy and one fp32 product per element,
    rounded once to the slot dtype by both implementations."""
    lora_A, lora_B, experts, gates = _problem(LLAMA7B_QV, TOP_K, dtype)
    want = _reference_slots(lora_A, lora_B, experts, gates, TOP_K)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, TOP_K)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl="triton")
    _assert_equal_slots(a_slots, b_slots, *want, "7B q,v")


def test_llama7b_within_one_ulp_of_float64():
    lora_A, lora_B, experts, gates = _problem(LLAMA7B_QV[:8], TOP_K, torch.bfloat16)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, TOP_K)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl="triton")
    torch.cuda.synchronize()
    for m, (a, b, sa, sb) in enumerate(zip(lora_A, lora_B, a_slots, b_slots)):
        assert torch.equal(sa, torch.cat([a[e] for e in experts.tolist()], 0)), f"linear {m}"
        exp = torch.cat([SCALING * g * b[e].double()
                         for e, g in zip(experts.tolist(), gates.double().tolist())], 1)
        assert _ulps(sb, exp, torch.bfloat16) <= 1.0, f"linear {m}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("shapes", [ONE_LAYER_ALL, ODD], ids=["all7", "odd"])
def test_matches_reference_bitwise(dtype, k, shapes):
    lora_A, lora_B, experts, gates = _problem(shapes, k, dtype, seed=k)
    want = _reference_slots(lora_A, lora_B, experts, gates, k)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, k)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots, impl="triton")
    _assert_equal_slots(a_slots, b_slots, *want, f"k={k}")


def test_auto_is_triton_on_cuda():
    from adafuse_compile.cutlass_kernels.triton_factor_slots import SlotPlan

    lora_A, lora_B, experts, gates = _problem(ONE_LAYER_ALL, TOP_K, torch.bfloat16)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, TOP_K)
    fs.clear_plan_cache()
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)
    assert [type(p) for p in fs._plans.values()] == [SlotPlan]
    _assert_equal_slots(a_slots, b_slots, *_reference_slots(lora_A, lora_B, experts, gates, TOP_K), "auto")


def test_cuda_graph_replay_with_new_experts():
    lora_A, lora_B, experts, gates = _problem(LLAMA7B_QV, TOP_K, torch.bfloat16)
    a_slots, b_slots = _poisoned_slots(lora_A, lora_B, TOP_K)

    def step():
        torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: plan built, kernel compiled
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(1)
    for replay in range(3):
        experts.copy_(torch.randperm(N_EXPERTS, generator=gen)[:TOP_K])
        gates.copy_(torch.softmax(torch.randn(TOP_K, generator=gen), 0))
        for t in a_slots + b_slots:
            t.fill_(float("nan"))
        graph.replay()
        _assert_equal_slots(a_slots, b_slots, *_reference_slots(lora_A, lora_B, experts, gates, TOP_K),
                            f"replay {replay}")


def test_one_launch_per_call():
    from torch.profiler import ProfilerActivity, profile

    lora_A, lora_B, experts, gates = _problem(LLAMA7B_QV, TOP_K, torch.bfloat16)
    a_slots, b_slots = make_slots(lora_A, lora_B, TOP_K)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)  # plan built
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]  # memcpy / memset count too: none allowed


def test_no_host_sync_once_warm():
    lora_A, lora_B, experts, gates = _problem(ONE_LAYER_ALL, TOP_K, torch.bfloat16)
    a_slots, b_slots = make_slots(lora_A, lora_B, TOP_K)
    write_factor_slots_(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.adafuse.write_factor_slots(lora_A, lora_B, experts, gates, SCALING, a_slots, b_slots)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------------------
# The compiled `factor` path: the op gets the same slot buffers every step (one plan)
# ------------------------------------------------------------------------------------------
CFG = af.TinyLlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_seq_len=128)


def _tiny_model():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = af.TinyLlama(CFG).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.05)
    af.inject(model, af.AdaFuseConfig(num_experts=8, rank=64, top_k=2, target_modules="all-linear"))
    for lin in af.adapted_linears(model).values():
        lin.lora_B.data.normal_(std=0.01)
    return model.eval()


def _teacher_forced(step, tokens):
    out = [step(tokens[:, :8], torch.arange(8, device="cuda"))[:, -1].clone()]
    for i in range(8, tokens.shape[1]):
        out.append(step(tokens[:, i:i + 1], torch.tensor([i], device="cuda"))[:, -1].clone())
    return torch.stack(out, 1).float()


@pytest.mark.parametrize("options", [{"codegen": "eager"}, {"cudagraphs": True}])
def test_compiled_factor_path_one_plan(options):
    """Every decode step hands the op the same slot buffers: one Triton plan, built once (a
    plan per step would mean the slots arrive as fresh copies, and a host-to-device copy per
    step)."""
    from adafuse_compile.cutlass_kernels.triton_factor_slots import SlotPlan

    torch._dynamo.reset()
    backend.last_compilations.clear()
    fs.clear_plan_cache()
    model = _tiny_model()
    tokens = torch.randint(0, CFG.vocab_size, (1, 24), device="cuda")
    with torch.no_grad():
        model.setup_cache(1)
        ref = _teacher_forced(model, tokens)
        model.setup_cache(1)
        got = _teacher_forced(torch.compile(model, backend="adafuse", options={"path": "factor", **options}),
                              tokens)
    assert any(r["path"] == "factor" for r in backend.last_compilations)
    assert [type(p) for p in fs._plans.values()] == [SlotPlan], list(fs._plans.values())
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 3e-2, rel  # bf16: the slots and the two slot products round differently
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
