#!/usr/bin/env bash
# GPU runbook for the device machine (one H200): each stage fits one 10-minute `run` call and
# writes logs/JSON under $OUT. From the repository root, with the nvidia-cutlass wheel carried in
# .whl/ (see /work/.library/device/README.md):  bash benchmarks/run_h200.sh <stage> [<stage> ...]
#   tests    all GPU-marked tests (backend, SGMM, gather, factor slots)  ~4 min
#   tests-backend  only the backend's GPU tests                           ~2 min
#   decode   Llama-2-7B shape, q,v: batch-1 decode (KV 512) for the backbone, the naive model and
#            each adafuse path; batch 8/32 decode and 512-token prefill for backbone and auto  ~9 min
#   decode-all  the same for all seven linears                            ~9 min
#   kernels  SGMM and gather kernel benchmarks                             ~4 min
#   factor-layout  factor path: three-op vs extended weight layouts, 7B q,v and all  ~1 min (not yet run)
#   drift    weight drift at Llama-2-7B q,v shapes, bf16 and fp16         ~5 min
#   drift-model  7B-shaped model's logit error after 1..10,000 switches (direct switches between
#            probes), bf16 and fp16, and the in-place resync's cost    ~4 min
#   bench-qv     adafuse bench, 7B q,v, own loop, short protocol            ~9 min (not yet run)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . .whl/*.whl > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site   # installed (not editable) so the torch_dynamo_backends entry point is found
for stage in "${@:-tests}"; do
  echo "=== stage $stage ($(date +%T))"
  case "$stage" in
  tests-gather)
    timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gather_lora_gpu.py 2>&1 | tee "$OUT/gpu_gather_tests.log" | grep -v -i warn | tail -15 ;;
  tests)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -v -i warn | tail -40 ;;
  tests-backend)
    timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests/test_backend_gpu.py 2>&1 | tee "$OUT/gpu_backend_tests.log" | grep -v -i warn | tail -40 ;;
  decode)
    timeout "${DECODE_TIMEOUT:-570}" python3 benchmarks/bench_decode.py --preset llama2-7b --targets qv --skip-profile \
      --budget-s "${DECODE_BUDGET:-470}" --paths "${PATHS:-merge-exact,factor,gather,auto}" --phases "${PHASES:-b1,batch,prefill}" \
      --out "$OUT/decode_llama2-7b_qv.json" 2>&1 | grep -v -i "warn" | tail -12 ;;
  decode-all)
    timeout "${DECODE_TIMEOUT:-570}" python3 benchmarks/bench_decode.py --preset llama2-7b --targets all --skip-profile \
      --budget-s "${DECODE_BUDGET:-470}" --paths "${PATHS:-merge-exact,factor,gather,auto}" --phases "${PHASES:-b1,batch,prefill}" \
      --out "$OUT/decode_llama2-7b_all.json" 2>&1 | grep -v -i "warn" | tail -12 ;;
  kernels)
    timeout 280 python3 benchmarks/bench_sgmm.py --out "$OUT/sgmm_h200.json" 2>&1 | tail -15
    timeout 260 python3 benchmarks/bench_gather.py --out "$OUT/gather_h200.json" 2>&1 | tail -15 ;;
  factor-layout)
    timeout 120 python3 benchmarks/bench_factor_layout.py --out "$OUT/factor_layout_h200.json" 2>&1 | tail -30 ;;
  drift)
    timeout 300 python3 benchmarks/bench_drift.py --device cuda --shape llama2-7b-qv --counts 1,100,1000,10000 \
      --out "$OUT/drift_h200.json" 2>&1 | tail -30 ;;
  drift-model)
    timeout "${DRIFT_TIMEOUT:-330}" python3 benchmarks/bench_drift.py --device cuda --model --skip-weights --model-preset llama2-7b \
      --between switch --dtypes bf16,fp16 --counts 1,100,1000,10000 --out "$OUT/drift_model_h200.json" 2>&1 | tail -20 ;;
  bench-qv)
    timeout 560 python3 -m adafuse_compile.cli bench --preset llama2-7b --targets qv --loop own --prompts 5 --new-tokens 64 --no-progress \
      --methods backbone,pregated_eager,pregated_inductor,simple_merge,adafuse_merge_cutlass,adafuse_factor,adafuse_auto \
      --out "$OUT/bench_llama2-7b_qv_own_h200.json" 2>&1 | tail -25 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
