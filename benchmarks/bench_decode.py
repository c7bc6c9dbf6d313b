"""Decode latency of the adafuse backend against the compiled backbone, on one GPU (issue 3's figure).

Builds a Llama-shaped TinyLlama (random bf16 weights, std 0.02; expert B std 0.002), then times
decode ms/token (CUDA events, batch 1, after warm-up) for: the backbone eager and compiled
(Inductor + CUDA graphs), the pre-gated model eager and under plain torch.compile, and the
adafuse backend (merge path). Also checks adafuse logits against eager (teacher-forced, same
tokens), and counts switching-kernel launches per decode step with the torch profiler.

    python benchmarks/bench_decode.py --preset llama2-7b --targets qv --out results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import adafuse_compile as af
from adafuse_compile import backend
from adafuse_compile.bench import LLAMA2_7B, tiny_llama_config

PRESETS = {
    "llama2-7b": tiny_llama_config(LLAMA2_7B, max_seq_len=512),
    "tiny": af.TinyLlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_seq_len=128),
    "small": af.TinyLlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=8, max_seq_len=256),
}
DEV = "cuda"  # --device cpu: a smoke run of the script on a CPU machine (tiny preset)
TARGETS = {"qv": ("q_proj", "v_proj"), "all": "all-linear"}


def build(cfg: af.TinyLlamaConfig) -> af.TinyLlama:
    with torch.device(DEV):
        model = af.TinyLlama(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(std=0.02)
    return model.eval()


def decode_ms(step, prompt_len: int, steps: int, repeats: int = 3, prefill=None) -> float:
    """Median over repeats of ms/token for `steps` greedy decode steps after a prompt.

    `prefill` (the eager model) runs the prompt: prefill is excluded from the figure anyway, and a
    compiled prefill graph of a 32-layer model costs a minute of compile time per prompt length."""
    dev = DEV
    positions = [torch.tensor([p], device=dev) for p in range(prompt_len + steps + 1)]
    prompt = torch.randint(0, 1000, (1, prompt_len), device=dev, generator=torch.Generator(dev).manual_seed(0))
    times = []
    for _ in range(repeats + 1):  # first repeat warms up (compiles, records graphs)
        logits = (prefill or step)(prompt, torch.arange(prompt_len, device=dev))
        nxt = logits[:, -1:].argmax(-1)
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            nxt = step(nxt, positions[prompt_len + i])[:, -1:].argmax(-1)
        if dev == "cuda":
            torch.cuda.synchronize()  # CPU-side clock over many steps: the synchronizes bracket the work
        times.append((time.perf_counter() - t) * 1000 / steps)
    return statistics.median(times[1:])


def teacher_forced_logits(step, tokens: torch.Tensor, prefill=None) -> torch.Tensor:
    """Logits of each decode step when fed the given token sequence one token at a time."""
    # clone(): under CUDA-graph trees a step's output buffer is overwritten by the next replay.
    out = [(prefill or step)(tokens[:, :8], torch.arange(8, device=DEV))[:, -1].clone()]
    for i in range(8, tokens.shape[1]):
        out.append(step(tokens[:, i:i + 1], torch.tensor([i], device=DEV))[:, -1].clone())
    return torch.stack(out, 1).float()


def count_switch_kernels(step, cfg) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tok, pos = torch.tensor([[5]], device=DEV), torch.tensor([9], device=DEV)
    step(tok, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(tok, pos)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    switch = [n for n in names if "sgmm" in n.lower() or "cutlass" in n.lower()]
    return {"kernels_per_step": len(names), "switch_kernels_per_step": len(switch),
            "switch_kernel_names": sorted(set(switch)), "kernel_names": sorted(set(names))}


PATHS = {  # name -> adafuse options (CUDA graphs on, as mode="reduce-overhead" would)
    "merge-exact": {"path": "merge", "exact": True},
    "merge-inplace": {"path": "merge", "exact": False},
    "factor": {"path": "factor"},
    "gather": {"path": "gather"},
    "auto": {"path": "auto"},
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS))
    ap.add_argument("--targets", default="qv", choices=sorted(TARGETS))
    ap.add_argument("--impl", default="auto", help="SGMM implementation for the merge paths")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--skip-naive", action="store_true", help="skip torch.compile of the naive pre-gated model")
    ap.add_argument("--paths", default="merge-exact,factor,gather,auto", help=f"adafuse paths to time: {list(PATHS)}")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    global DEV
    DEV = args.device
    cfg = PRESETS[args.preset]
    paths = args.paths.split(",") if args.paths else []
    res = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__, "preset": args.preset,
           "targets": args.targets, "impl": args.impl, "config": cfg.to_dict(), "experts": 8, "rank": 64, "top_k": 2,
           "steps": args.steps, "method": "wall clock (synchronized) over `steps` greedy batch-1 decode steps after a 16-token "
           "prompt (run by the eager model), median of 3 repeats after one warm-up repeat; compiled = Inductor + CUDA graphs"}

    def save() -> None:  # after every phase: a timeout still leaves what was measured
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    t0 = time.time()
    model = build(cfg)
    model.setup_cache(1)
    with torch.no_grad():
        res["backbone_eager_ms"] = decode_ms(model, 16, 16, repeats=2)
        torch._dynamo.reset()
        t1 = time.time()
        compiled = torch.compile(model, mode="reduce-overhead")
        res["backbone_compiled_ms"] = decode_ms(compiled, 16, args.steps, prefill=model)
        res["backbone_compile_and_time_s"] = round(time.time() - t1, 1)
        print(res, flush=True)
        save()
        af.inject(model, af.AdaFuseConfig(num_experts=8, rank=64, top_k=2, target_modules=TARGETS[args.targets]))
        for lin in af.adapted_linears(model).values():
            lin.lora_B.normal_(std=0.002)
        model.setup_cache(1)
        res["adapters_eager_ms"] = decode_ms(model, 16, 16, repeats=2)
        if not args.skip_naive:
            torch._dynamo.reset()
            res["adapters_torch_compile_ms"] = decode_ms(torch.compile(model, mode="reduce-overhead"), 16, args.steps,
                                                        prefill=model)
        print(res, flush=True)
        save()
        # bf16 tolerance, calibrated: the eager bf16 model's own error against an fp32 copy of it.
        tokens = torch.randint(0, 1000, (1, 40), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
        model.setup_cache(1)
        ref = teacher_forced_logits(model, tokens)
        model.float()
        model.setup_cache(1)
        ref32 = teacher_forced_logits(model, tokens)
        model.to(torch.bfloat16)
        res["eager_bf16_vs_fp32_max_rel_logit_err"] = rel_err(ref, ref32)
        res["eager_bf16_vs_fp32_argmax_agreement"] = (ref.argmax(-1) == ref32.argmax(-1)).float().mean().item()
        for name in paths:
            torch._dynamo.reset()
            backend.last_compilations.clear()
            model.setup_cache(1)
            options = {**PATHS[name], "cudagraphs": True, "sgmm_impl": args.impl}
            fused = torch.compile(model, backend="adafuse", options=options)
            t1 = time.time()
            try:
                res[f"adafuse_{name}_ms"] = decode_ms(fused, 16, args.steps, prefill=model)
                res[f"adafuse_{name}_compile_and_time_s"] = round(time.time() - t1, 1)
                res[f"adafuse_{name}_paths_compiled"] = [r["path"] for r in backend.last_compilations]
                af.restore(model)
                model.setup_cache(1)
                got = teacher_forced_logits(fused, tokens, prefill=model)
                af.restore(model)
                res[f"adafuse_{name}_max_rel_logit_err"] = rel_err(got, ref)
                res[f"adafuse_{name}_vs_fp32_max_rel_logit_err"] = rel_err(got, ref32)
                res[f"adafuse_{name}_argmax_agreement"] = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            except Exception as exc:  # one broken path must not lose the others' figures
                af.restore(model)
                res[f"adafuse_{name}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print({k: v for k, v in res.items() if k.startswith(f"adafuse_{name}")}, flush=True)
            save()
        if not args.skip_profile:
            # Launch count without CUDA graphs (graph replay hides kernels from the profiler).
            torch._dynamo.reset()
            model.setup_cache(1)
            # codegen="eager": the rewritten graph run as is, kernel by kernel (no Inductor compile).
            res["profile"] = count_switch_kernels(
                torch.compile(model, backend="adafuse", options={"path": "merge", "cudagraphs": False, "codegen": "eager",
                                                                 "sgmm_impl": args.impl}), cfg)
            af.restore(model)
    base = res["backbone_compiled_ms"]
    for k in list(res):
        if k.endswith("_ms"):
            res[k.replace("_ms", "_x_compiled_backbone")] = round(res[k] / base, 3)
    res["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    save()


if __name__ == "__main__":
    main()
