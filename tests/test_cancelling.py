"""The inputs the CUTLASS plans time on (adafuse_compile/cutlass_kernels/cancelling.py): a switch
over them adds exactly 0, bit for bit, whatever order its sums run in, in every mode, k and rank a
plan may time; a changed gate makes the same switch change W (the checks can fail)."""
import pytest
import torch

from adafuse_compile.cutlass_kernels import cancelling, ops
from adafuse_compile.cutlass_kernels.reference import reference_switch_, switch_coefficients

SHAPES = [(96, 200), (40, 72), (96, 200), (130, 24)]  # two weights share a shape


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o, i, generator=g).to(dtype) for o, i in SHAPES]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("k_total,bits", [(128, 7), (256, 6), (384, 6), (1024, 5), (2048, 5),
                                          (2**21, 0), (2**21 + 1, -1)])
def test_mantissa_bits_keep_every_sum_inside_fp32(k_total, bits):
    assert cancelling.mantissa_bits(k_total) == bits
    if bits >= 0:  # the largest sum, 4 K, on the 2^-2b grid: 23 bits, one to spare in fp32's 24
        assert 4 * k_total * 2 ** (2 * bits) <= 2**23
        assert 4 * k_total * 2 ** (2 * bits + 2) > 2**23 or bits == cancelling.MAX_BITS  # the largest b


@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_the_step_cancels_on_each_expert_with_non_zero_gates(mode, k):
    """Per expert, the coefficients sum to 0; none is 0 but pristine k = 1's (one slot alone)."""
    inplace = mode == "inplace"
    values = torch.tensor(cancelling.expert_values(k, inplace))
    steps = cancelling.steps(k, inplace, "cpu")
    assert len(steps) == (2 if inplace else 1) and torch.equal(cancelling.step(k, inplace, "cpu")[0], steps[0][0])
    for experts, gates, prev_experts, prev_gates in steps:
        assert experts.dtype == torch.int64 and gates.dtype == torch.float32 and experts.max() < len(values)
        idx, coef = switch_coefficients(experts, gates, prev_experts, prev_gates, 1.0, inplace)
        assert len(idx.unique()) == len(idx)  # every slot reads an expert of its own
        for v in values[idx].unique().tolist():  # copies cancel: per value set the sum is 0
            assert coef[values[idx] == v].sum() == 0
        assert (coef != 0).all() or (not inplace and k == 1)
        weight = cancelling.coefficient_weight(k, inplace)  # what the factors' grid is sized for
        assert coef.abs().sum() == (0 if (not inplace and k == 1) else weight)
        if inplace:  # the call publishes this token's experts: the next step unmerges them
            prev_experts.copy_(experts)


@pytest.mark.parametrize("mode", ["inplace", "pristine"])
def test_each_weight_reads_factors_of_its_own_up_to_the_budget(mode):
    """Memory of its own per weight (a real switch reads each weight's factors from memory, not
    L2), the experts of a value set equal copies; past the byte budget a shape's weights take turns."""
    inplace = mode == "inplace"
    k, rank = 2, 8
    weights = _weights(torch.bfloat16)
    values = cancelling.expert_values(k, inplace)
    lora_A, lora_B = cancelling.factors(weights, k, rank, inplace)
    ptrs = [t.data_ptr() for t in lora_A + lora_B]
    assert len(set(ptrs)) == len(ptrs)
    assert torch.equal(lora_A[0], lora_A[2]) and torch.equal(lora_B[0], lora_B[2])  # same values
    for a, b in zip(lora_A, lora_B):
        assert a.shape[0] == b.shape[0] == len(values)
        for e, v in enumerate(values):
            assert torch.equal(a[e], a[values.index(v)]) and torch.equal(b[e], b[values.index(v)])
        assert len({a[values.index(v)].sum().item() for v in set(values)}) == len(set(values))
    shared_A, _ = cancelling.factors(weights, k, rank, inplace, distinct_bytes=0)
    assert shared_A[0] is shared_A[2] and shared_A[0] is not shared_A[1]  # one per shape, no more
    pair = lora_A[0].nbytes + lora_B[0].nbytes
    first = sum(a.nbytes + b.nbytes for a, b in zip(lora_A[:2], lora_B[:2])) + lora_A[3].nbytes + lora_B[3].nbytes
    budget_A, _ = cancelling.factors(weights + weights[:1], k, rank, inplace, distinct_bytes=first + pair)
    assert budget_A[2] is not budget_A[0] and budget_A[4] is budget_A[0]  # one more, then in turn


def test_values_are_exact_in_16_bits_and_never_zero():
    g = torch.Generator().manual_seed(1)
    x = cancelling.exact_values((4096,), 7, torch.float32, "cpu", g)
    assert ((x.abs() >= 1) & (x.abs() < 2)).all()
    assert torch.equal((x * 128).round(), x * 128)  # on the 2^-7 grid
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(x.to(dtype).float(), x)
    assert (x > 0).any() and (x < 0).any()
    assert torch.equal(cancelling.exact_values((3, 2), -1, torch.bfloat16, "cpu", g), torch.zeros(3, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("rank", [64, 128])
def test_the_products_cancel_in_any_summation_order(mode, k, rank):
    """The GEMM's K dimension (slots x rank, with their coefficients) summed in fp32 in a random
    order, element by element: every partial sum equals the float64 one and the total is 0."""
    inplace = mode == "inplace"
    weights = [torch.zeros(48, 40)]
    lora_A, lora_B = cancelling.factors(weights, k, rank, inplace)
    experts, gates, prev_experts, prev_gates = cancelling.step(k, inplace, "cpu")
    idx, coef = switch_coefficients(experts, gates, prev_experts, prev_gates, 1.0, inplace)
    # every term c_j B[e_j][:, t] A[e_j][t, :], K = slots x rank of them
    terms = torch.cat([c * torch.einsum("o,i->oi", lora_B[0][e][:, t], lora_A[0][e][t])[None]
                       for e, c in zip(idx.tolist(), coef.tolist()) for t in range(rank)])
    assert terms.abs().amax(dim=(1, 2)).gt(0).sum() >= (len(idx) - 1) * rank  # a real switch's operands
    order = torch.randperm(terms.shape[0], generator=torch.Generator().manual_seed(k))
    partial32 = torch.cumsum(terms[order], 0, dtype=torch.float32)
    partial64 = torch.cumsum(terms[order].double(), 0)
    assert torch.equal(partial32.double(), partial64)
    assert torch.equal(partial32[-1], torch.zeros(48, 40))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_the_reference_switch_leaves_the_weights_bit_for_bit(dtype, mode, k):
    inplace = mode == "inplace"
    weights = _weights(dtype)
    pristine = None if inplace else _weights(dtype, seed=1)
    target = [w.clone() for w in (weights if inplace else pristine)]
    lora_A, lora_B = cancelling.factors(weights, k, 64, inplace)
    n = len(cancelling.expert_values(k, inplace))
    assert all(a.dtype == dtype and a.shape == (n, 64, i) for a, (_, i) in zip(lora_A, SHAPES))
    steps = cancelling.steps(k, inplace, "cpu")
    for step in steps + steps + [steps[0]]:  # in turn, as time_switch runs them; then one again
        reference_switch_(weights, lora_A, lora_B, *step, 1.0, pristine)
        assert all(torch.equal(_bits(w), _bits(t)) for w, t in zip(weights, target))
    step = steps[-1]
    step[1][0] = 0.5  # the control: one coefficient changed, and W changes
    reference_switch_(weights, lora_A, lora_B, *step, 1.0, pristine)
    assert not torch.equal(weights[0], target[0])


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("mode", ["inplace", "pristine"])
@pytest.mark.parametrize("k", [2, 3])
def test_the_triton_switch_leaves_the_weights_bit_for_bit(mode, k):
    """Another summation order (Triton's K blocks and tl.dot), in the interpreter, fp16."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("interpreter test; the GPU timing plans are checked in tests/test_sgmm_gpu.py")
    inplace = mode == "inplace"
    weights = _weights(torch.float16)
    pristine = None if inplace else _weights(torch.float16, seed=1)
    target = [w.clone() for w in (weights if inplace else pristine)]
    lora_A, lora_B = cancelling.factors(weights, k, 16, inplace)
    step = cancelling.step(k, inplace, "cpu")
    ops.sgmm_switch_(weights, lora_A, lora_B, *step, 1.0, pristine=pristine, impl="triton")
    assert all(torch.equal(_bits(w), _bits(t)) for w, t in zip(weights, target))
    step[1][0] = 0.5
    ops.sgmm_switch_(weights, lora_A, lora_B, *step, 1.0, pristine=pristine, impl="triton")
    assert not torch.equal(weights[0], target[0])


def test_the_distinct_factor_budget_is_four_times_the_l2(monkeypatch):
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(L2_cache_size=50 * 2**20))
    assert cancelling.distinct_bytes_for("cuda:0") == 200 * 2**20
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace())
    assert cancelling.distinct_bytes_for("cuda") == 256 * 2**20  # a driver that does not say: 4x 64 MiB
    assert cancelling.distinct_bytes_for("cpu") == float("inf")
