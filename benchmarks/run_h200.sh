#!/usr/bin/env bash
# GPU runbook for the device machine (one H200): each stage fits one 10-minute `run` call and
# writes logs/JSON under $OUT. From the repository root, with the nvidia-cutlass wheel carried in
# .whl/ (see /work/.library/device/README.md):  bash benchmarks/run_h200.sh <stage>
#   tests    all GPU-marked tests (backend, SGMM, gather, diff)          ~3 min
#   decode   Llama-2-7B-shaped decode: backbone vs adafuse, q,v            ~5 min
#   decode-all  the same for all seven linears                            ~6 min
#   kernels  SGMM and gather kernel benchmarks                             ~4 min
#   drift    weight drift at Llama-2-7B q,v shapes, bf16 and fp16         ~5 min
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . .whl/*.whl > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site   # installed (not editable) so the torch_dynamo_backends entry point is found
case "${1:-tests}" in
  tests)
    timeout 560 python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
  decode)
    timeout 560 python3 benchmarks/bench_decode.py --preset llama2-7b --targets qv --impl auto --skip-naive \
      --out "$OUT/decode_llama2-7b_qv.json" 2>&1 | grep -v -i "warn" | tail -30 ;;
  decode-all)
    timeout 560 python3 benchmarks/bench_decode.py --preset llama2-7b --targets all --impl auto --skip-naive \
      --modes exact --out "$OUT/decode_llama2-7b_all.json" 2>&1 | grep -v -i "warn" | tail -30 ;;
  kernels)
    timeout 280 python3 benchmarks/bench_sgmm.py --out "$OUT/sgmm_h200.json" 2>&1 | tail -15
    timeout 260 python3 benchmarks/bench_gather.py --out "$OUT/gather_h200.json" 2>&1 | tail -15 ;;
  drift)
    timeout 560 python3 benchmarks/bench_drift.py --device cuda --shape llama2-7b-qv --counts 1,100,1000,10000 \
      --out "$OUT/drift_h200.json" 2>&1 | tail -30 ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
