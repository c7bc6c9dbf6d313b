"""All seven in place: probe-gemm's two-switch cases of gather v23 and pack v1 alone, interleaved over 4
rounds (ms per switch), then v23's graph under nvidia-smi sampling (session 26: is its 11.4 ms real?)."""
import sys, torch
sys.path.insert(0, ".")
from benchmarks import probe_sgmm_gemm as P
cases, meta = P.real_switch_cases("all7", {"inplace": [(23, 1, 1), (1, 1, 1)]}, gather_default=False)
keep = {k: v for k, v in cases.items() if "/inplace/" in k and "/pack" not in k and "triton" not in k}
res = P.interleaved(keep, 4, 15, seed=1)
for k, v in res["per_case"].items():
    print(k, [round(x / 2, 3) for x in v], flush=True)
g = P.captured(keep["all7/inplace/cutlass_v23_r1_s1"])
print("v23 two-switch graph sampled:", {k: v for k, v in P._sampled(g.replay, 3.0).items() if not isinstance(v, list)})
