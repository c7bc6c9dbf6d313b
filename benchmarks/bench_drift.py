"""Weight drift of repeated adapter switching: exact vs in place, with and without resync.

For each dtype and mode, switches a set of adapted weights to fresh random top-2 experts n times
through the runtime the backend uses (SwitchState bookkeeping + sgmm_switch_), and at each
checkpoint n in --counts measures
  weight_max_abs_err   max |W - (W0 + delta_t)|, the reference computed in float64,
  weight_err_ulps      that error over the dtype's spacing at the mean |W| (eps * mean|W|),
  vs_single_switch     max |W - W1| where W1 is ONE switch of a fresh W0 to the same experts in the
                       same dtype and kernel: what repeated switching added (zero = no drift),
  output_max_rel_err   max relative error of y = W x on random inputs against an unmerged
                       fp32 reference (W0 x + B(A x) in fp32), the per-layer proxy of logit error,
and, with --model, the max relative logit error of a TinyLlama (q,v adapted; --model-preset small
or llama2-7b) compiled with the adafuse backend (merge path) against the same model unmerged in
fp32, probed at each checkpoint with a one-token step at position 0 (which attends to nothing
earlier, so the probe does not depend on the decode history); the exact mode's value is the floor
(bf16/fp16 rounding and any router flip), what in place adds above it is drift. Between probes the
model either decodes (--between decode: every switch is a compiled decode step with the router's
experts) or is switched directly (--between switch: the compiled step's own SwitchState and SGMM
call with random top-2 experts, as the weight-level runs do; the same kernel and bookkeeping
without a forward pass, so 10,000 switches of a 7B model take seconds). In-place runs also time
one exact resync (the pinned-host copy of every adapted weight) and its cost per token.

    python benchmarks/bench_drift.py --device cpu --shape small --out results/drift_cpu.json
    python benchmarks/bench_drift.py --device cuda --shape llama2-7b-qv --out results/drift_h200.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from adafuse_compile.bench import LLAMA2_7B, tiny_llama_config
from adafuse_compile.cutlass_kernels.ops import sgmm_switch_
from adafuse_compile.runtime.switch_state import SwitchState

SHAPES = {  # (number of weights, out, in)
    "small": (4, 256, 256),
    "llama2-7b-qv": (64, 4096, 4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
N, R, K, SCALING = 8, 64, 2, 2.0


def make_weights(shape, dtype, device, gen):
    count, out_f, in_f = shape
    weights = [(torch.randn(out_f, in_f, generator=gen, device=device) * 0.02).to(dtype) for _ in range(count)]
    lora_a = [(torch.rand(N, R, in_f, generator=gen, device=device) * 2 - 1).mul(in_f ** -0.5).to(dtype) for _ in range(count)]
    lora_b = [(torch.randn(N, out_f, R, generator=gen, device=device) * 0.002).to(dtype) for _ in range(count)]
    return weights, lora_a, lora_b


def random_switch(state, targets, lora_a, lora_b, scaling, pristine, impl, gen) -> tuple:
    """One switch of `targets` to random top-K experts (drawn with `gen`, on its device), through
    the SwitchState bookkeeping and SGMM call a compiled decode step makes; returns (experts, gates)."""
    device = targets[0].device
    experts = torch.randperm(N, generator=gen, device=gen.device)[:K].to(device)
    gates = torch.softmax(torch.randn(K, generator=gen, device=gen.device), 0).to(device)
    state.before_merge_step()
    sgmm_switch_(targets, lora_a, lora_b, experts, gates, state.prev_experts, state.prev_gates, scaling, pristine, impl)
    return experts, gates


def run_mode(shape, dtype, device, counts, mode, resync_every, impl, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    weights, lora_a, lora_b = make_weights(shape, dtype, device, gen)
    w0 = [w.double().clone() for w in weights]
    exact = mode == "exact"
    state = SwitchState(weights, K, exact=exact, resync_every=resync_every)
    # Exact: the switch writes the state's own buffers from W (never written); in place: W itself.
    weights, pristine = state.switch_operands(weights)
    x = torch.randn(16, shape[2], generator=gen, device=device)
    rows, n = [], 0
    for target in counts:
        while n < target:
            experts, gates = random_switch(state, weights, lora_a, lora_b, SCALING, pristine, impl, gen)
            n += 1
        w_err, out_err, ulps = 0.0, 0.0, 0.0
        eps = torch.finfo(dtype).eps
        single = [w.to(dtype) for w in w0]
        zero_e, zero_g = torch.zeros_like(experts), torch.zeros(K, device=device)
        sgmm_switch_(single, lora_a, lora_b, experts, gates, zero_e, zero_g, SCALING, None, impl)
        vs_single = max((w - w1).abs().max().item() for w, w1 in zip(weights, single))
        for w, w_ref, a, b in zip(weights, w0, lora_a, lora_b):
            g = (gates.double() * SCALING)
            delta = torch.einsum("kor,kri->oi", b[experts].double() * g[:, None, None], a[experts].double())
            expected = w_ref + delta
            err = (w.double() - expected).abs().max().item()
            w_err = max(w_err, err)
            ulps = max(ulps, err / (eps * w_ref.abs().mean().item()))
            ref_out = x @ w_ref.float().T + (x @ a[experts].float().reshape(-1, shape[2]).T
                                           * g.float().repeat_interleave(R)) @ b[experts].float().permute(1, 0, 2).reshape(shape[1], -1).T
            got = x @ w.float().T
            out_err = max(out_err, ((got - ref_out).abs().max() / ref_out.abs().max()).item())
        rows.append({"switches": n, "weight_max_abs_err": w_err, "weight_err_ulps": ulps,
                     "vs_single_switch": vs_single, "output_max_rel_err": out_err})
        print(f"{mode:>16} {str(dtype):>15} n={n:>6}  max|W-(W0+d)|={w_err:.3e} ({ulps:.1f} ulp of mean|W|)  "
              f"vs one switch={vs_single:.1e}  out rel err={out_err:.2e}", flush=True)
    return rows


MODEL_PRESETS = {
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_seq_len=64),
    "llama2-7b": dict(LLAMA2_7B, max_seq_len=64),
}


def direct_switcher(model, impl, gen):
    """Switches the compiled model's adapted weights to random top-K experts without a forward pass:
    the SwitchState and SGMM call the compiled decode step uses, in the same order."""
    import adafuse_compile as af
    from adafuse_compile.modeling.inject import gate_channel

    state = gate_channel(model).switch_state
    by_weight = {id(lin.weight): lin for lin in af.adapted_linears(model).values()}
    lins = [by_weight[id(w)] for w in state.weights]
    lora_a, lora_b = [lin.lora_A for lin in lins], [lin.lora_B for lin in lins]
    targets, pristine = state.switch_operands(state.weights)

    def switch() -> None:
        random_switch(state, targets, lora_a, lora_b, lins[0].scaling, pristine, impl, gen)
    return state, switch


def time_resync(state, device, repeats=5) -> dict:
    """One exact resync of every adapted weight (from pinned host memory in place), and per token."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state._write_pristine()  # warm-up; also leaves W = W0 with nothing merged, as a resync does
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        state._write_pristine()
    sync()
    ms = (time.perf_counter() - t) * 1000 / repeats
    nbytes = sum(w.numel() * w.element_size() for w in state.weights)
    return {"resync_ms": ms, "resync_bytes": nbytes, "resync_GBps": nbytes / ms / 1e6,
            "resync_ms_per_token": ms / state.resync_every if state.resync_every else None}


@torch.no_grad()
def run_model(dtype, device, counts, mode, resync_every, impl, preset="small", codegen="eager", seed=0,
              between="decode"):
    import copy

    import adafuse_compile as af

    shape = MODEL_PRESETS[preset]
    cfg = tiny_llama_config(shape, shape["max_seq_len"])
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B model is built on the GPU (minutes of CPU init otherwise)
        model = af.TinyLlama(cfg)
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.data.normal_(std=0.02)
    af.inject(model, af.AdaFuseConfig(num_experts=N, rank=R, top_k=K, alpha=R * SCALING,
                                      target_modules=("q_proj", "v_proj")))
    for lin in af.adapted_linears(model).values():
        lin.lora_B.normal_(std=0.002)
    ref = copy.deepcopy(model).float().eval()
    ref.setup_cache(1)
    model = model.to(device=device, dtype=dtype).eval()
    model.setup_cache(1)
    torch._dynamo.reset()
    # codegen="inductor" with CUDA graphs for the 7B preset: 10,000 eager-FX steps take too long there.
    options = {"path": "merge", "codegen": codegen, "sgmm_impl": impl, "exact": mode == "exact",
               "cudagraphs": codegen == "inductor" and device == "cuda"}
    if mode != "exact":
        options["resync_every"] = resync_every
    step = torch.compile(model, backend="adafuse", options=options)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (max(counts) + 1,), generator=gen).to(device)
    probe, pos0 = torch.tensor([[7]], device=device), torch.tensor([0], device=device)
    want = ref(probe, pos0).float()
    rows, n, switch = [], 0, None
    for target in counts:
        while n < target - 1:  # the probe below is switch number `target`
            if between == "switch":
                if switch is None:  # the probe at n=1 compiled the step and made its SwitchState
                    state, switch = direct_switcher(model, impl, gen)
                switch()
            else:
                pos = torch.tensor([1 + n % (cfg.max_seq_len - 1)], device=device)
                step(tokens[n].view(1, 1), pos)
            n += 1
        got = step(probe, pos0).float().clone()
        n += 1
        err = ((got - want).abs().max() / want.abs().max()).item()
        rows.append({"switches": n, "logit_max_rel_err": err})
        print(f"{'model ' + mode:>22} {str(dtype):>15} n={n:>6}  logit rel err vs fp32 unmerged={err:.2e}", flush=True)
    extra = {}
    if mode != "exact":
        from adafuse_compile.modeling.inject import gate_channel

        extra = time_resync(gate_channel(model).switch_state, device)
        print(f"{'model ' + mode:>22} {str(dtype):>15} one resync {extra['resync_ms']:.2f} ms "
              f"({extra['resync_GBps']:.1f} GB/s), {extra['resync_ms_per_token'] or 0:.3f} ms/token", flush=True)
    af.restore(model)
    del model, ref, step
    torch._dynamo.reset()
    return rows, extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--counts", default="1,100,1000,10000")
    ap.add_argument("--resync", type=int, default=64, help="in-place resync interval to test")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--model", action="store_true", help="also the model-level logit error (small TinyLlama)")
    ap.add_argument("--skip-weights", action="store_true", help="only the model-level runs")
    ap.add_argument("--model-preset", default="small", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--model-codegen", default="eager", choices=("eager", "inductor"))
    ap.add_argument("--between", default="decode", choices=("decode", "switch"),
                    help="between probes: compiled decode steps, or direct switches to random experts")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    res = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "torch": torch.__version__, "shape": args.shape, "weights_out_in": SHAPES[args.shape], "experts": N,
           "rank": R, "top_k": K, "scaling": SCALING, "impl": args.impl, "runs": []}
    t0 = time.time()
    if args.model:
        res["model"] = {"preset": args.model_preset, "config": MODEL_PRESETS[args.model_preset], "codegen": args.model_codegen,
                        "between": args.between,
                        "adapted": ["q_proj", "v_proj"], "runs": []}
    for name in args.dtypes.split(","):
        for mode, resync in (("exact", None), ("inplace", 0), ("inplace_resync", args.resync)):
            if args.model:
                rows, extra = run_model(DTYPES[name], args.device, counts, mode, resync, args.impl, args.model_preset,
                                        args.model_codegen, between=args.between)
                res["model"]["runs"].append({"dtype": name, "mode": mode, "resync_every": resync, "checkpoints": rows,
                                             **extra})
                res["wall_s"] = round(time.time() - t0, 1)
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
            if args.skip_weights:
                continue
            rows = run_mode(SHAPES[args.shape], DTYPES[name], args.device, counts, mode, resync, args.impl)
            res["runs"].append({"dtype": name, "mode": mode, "resync_every": resync, "checkpoints": rows})
            res["wall_s"] = round(time.time() - t0, 1)
            with open(args.out, "w") as f:  # after every run: a timeout keeps what was measured
                json.dump(res, f, indent=1)
    res["wall_s"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
