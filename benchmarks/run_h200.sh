#!/usr/bin/env bash
# GPU runbook for the device machine (one H200): each stage fits one 10-minute `run` call and
# writes logs/JSON under $OUT. From the repository root, with the nvidia-cutlass wheel carried in
# .whl/ (see /work/.library/device/README.md):  bash benchmarks/run_h200.sh <stage> [<stage> ...]
#   install  only the install (also what no stage does)
#   tests    all GPU-marked tests (backend, SGMM, gather, factor slots, generate): more than one call holds;
#            run the two halves below instead
#   tests-kernels / tests-models  the two halves of `tests` (SGMM, gather and factor-slot kernels / backend,
#            generate(), diff, plan cache), to run side by side: -p tests-kernels tests-models (2026-12-04:
#            kernels 169 passed in 220 s; models cut by its 560 s timeout after 29 of 31 passed, in the
#            generate() tests, which it now leaves to tests-generate: -p tests-kernels tests-models, then
#            tests-generate; 2026-12-05 on an H100: kernels 248 passed in 471 s next to tests-generate;
#            models cut at 540 s after 22 of its 34, the other 12 in 105 s with tests-k; 2026-12-05 on the
#            H200: kernels 248 passed, 10 xpassed in 412 s, alone)
#   tests-k:<expr>  the GPU tests that pytest -k <expr> selects from every file (quote the stage:
#            'tests-k:layerwise or side_stream'); the way to run a few tests after a fix
#   build:<variants>  build the SGMM extension with these variants (e.g. build:23,30), for later stages to load
#   tests-backend  the backend and factor-slot GPU tests (63 tests: 19 passed in its 520 s beside a
#            32-layer profile on 2026-12-05; split it with tests-k) (252 s on 2026-11-29, before the
#            two-instance tests were added)                                ~5 min
#   decode   Llama-2-7B shape, q,v: batch-1 decode (KV 512) for the backbone, the naive model and
#            each adafuse path; batch 8/32 decode and 512-token prefill for backbone and auto  ~9 min
#   decode-all  the same for all seven linears                            ~9 min
#   decode:<qv|all>:<phases>[:<batches>[:<naive phases>[:<routing>]]]  one slice of decode / decode-all, so
#            slices can run side by side with -p (e.g. decode:all:b1,batch:8:batch); ROUTING=layerwise
#            times a router in every adapted linear instead (MoLA style: gather and auto only)
#            (PHASES=b1,batch,prefill PATHS=auto,gather SKIP_NAIVE=1: only what is still missing)
#   kernels  SGMM kernel benchmark, every CUTLASS variant and the op's own plan (KERNELS_CONTEXT=decode_like:
#            between a decode's weight reads)                                ~6 min
#   probe-gemm  probe_sgmm_gemm.py: the SGMM switch (plan's choice, candidates, old defaults, Triton, simple
#            merge) interleaved over rounds; PROBE_ARGS="--gemm --sweeps" adds the GEMM-alone experiments,
#            PROBE_VARIANTS the variants built, PROBE_NCU=variant,K,mode,groups ncu's sections for one launch  ~3 min
#   probe-stationary  probe_stationary.py: one operand held on chip (Triton) against variant 14's GEMM  ~3 min
#   probe-inplace-modes  probe_inplace_modes.py: all seven in place, each switch timed alone in four contexts  ~2 min
#   probe-switch-contexts  probe_switch_contexts.py: each switch timed alone, back to back, between a decode's
#            weight reads and after an idle gap, q,v and all seven, both modes, with the SM clock  ~4 min
#   probe-decode  probe_switch_contexts.py --graphs: the op, Triton and the simple merge as graph replays, back to
#            back and between a decode's weight reads, % of copy and speed-up in the same context (needs build:23,24)  ~5 min
#   probe-timing-context  probe_timing_context.py: the candidates the plans' twins keep when they time back to back
#            and after an idle gap (the package's timing), fresh twins per repeat, q,v and all seven  ~3 min
#   probe-power  probe_sgmm_gemm.py --power: does the GEMM's speed depend on its operands' values (clock,
#            power and throttle reasons with random / zero / cancelling operands)  ~2 min
#   gather-kernels  gather kernel benchmark (GATHER_SWEEP=1: also the config sweep)  ~3 min
#   gather-variants  expand out blocks per program and prefill block sizes, decode then prefill T  ~5 min
#   tests-backend-gather  the backend's gather GPU tests (side stream on and off)   ~2 min
#   tests-generate  generate() under CUDA graphs: prompts after the warm-up record nothing (cache kept), and
#            the deferred stop check's tokens (skipped without HF_WHEELS: the machine has transformers 5.17)  ~3 min
#   tests-backend-prefill  the backend's prefill GPU tests (dense packed and unpacked, sets, slots)  ~2 min
#   profile-side  profile_paths.py: gather with and without the side stream  ~5 min (PROFILE_LAYERS: layers, default 4)
#            (PROFILE_PATHS=gather-sets,gather-slots,gather PROFILE_SHAPES=p512: the prefill forms)
#   profile  per-kernel time of each path vs the backbone, b1/b8/b32/p512, 4 layers, q,v then all  ~8 min
#   prefill-forms  prefill adapter forms (dense, its layouts, Triton dense expand, grouped_mm, gather),
#            one 7B layer's seven linears at T = 128, 512, 2048  ~5 min
#   prefill-fused  the fused prefill (linear_lora, setting prefill_fused): its GPU tests (kernel against
#            the oracle, CUDA graph, the backend's 128-token prefill), then prefill-forms' backbone, dense_cat,
#            fused (pointer loads), fused_tma and triton_linear at T = 128, 512, 2048. End to end after it, two calls side by side:
#            MULTI_PATHS=auto,auto-fused bash benchmarks/run_h200.sh -p decode:qv:prefill decode:all:prefill  ~4 min
#   probe-linear-lora  linear_lora's every tile, both kernels, 7B prefill shapes, against the oracle  ~3 min
#   tests-generate-stop  the deferred stop check's GPU test (needs HF_WHEELS with transformers 5.18+)  ~1 min
#   generate-host  generate()'s time per token and a cProfile of one generate(), backbone and auto, each with
#            the KV cache reused and made per call (HOST_CACHES)  ~6 min
#            (HOST_METHODS, HOST_TARGETS, HOST_REPS, HOST_TIMEOUT; HOST_METHODS may name
#            backbone_hf_default_compile: transformers' own compile recipe)
#   backbone-modes  probe_backbone_modes.py in BACKBONE_MODES_PROCS (4) processes at once, odd ones
#            with their own Inductor cache: backbone b1/b8 decode per process (auto b1 in the first
#            two), kernel tables, Inductor's autotuning picks  ~5 min
#   factor-layout  factor path: three-op vs extended weight layouts, 7B q,v and all  ~1 min
#   drift    weight drift at Llama-2-7B q,v shapes, bf16 and fp16         ~5 min
#   drift-model  7B-shaped model's logit error after 1..10,000 switches (direct switches between
#            probes), bf16 and fp16, and the in-place resync's cost    ~4 min
#   bench-qv     adafuse bench, 7B q,v, own loop, time-budgeted protocol (see the case)  ~9 min
#            (BENCH_METHODS_qv / _all, BENCH_NEW_TOKENS, BENCH_METHOD_BUDGET, BENCH_BUDGET, BENCH_TAG: a
#            subset of the methods, the protocol's knobs, a suffix for the output names)
#   bench-all    the same for all seven linears (331 s for six methods on 2026-12-04)     ~9 min
#   bench-qv-hf  q,v through Hugging Face generate() (281 s on 2026-11-29)              ~5 min
#   bench-all-hf all seven through generate() (BENCH_METHODS, BENCH_NEW_TOKENS, BENCH_METHOD_BUDGET,
#            BENCH_BUDGET, BENCH_TIMEOUT, BENCH_TAG, BENCH_HF_STOP_CHECK=deferred|per-step (deferral needs
#            transformers 5.18+: HF_WHEELS), BENCH_HF_CACHE=reused|per-call: generate()'s
#            KV cache; run3 on 2026-12-04 with a new cache per prompt, run4 with both: 326 s and 318 s
#            for backbone,adafuse_auto,adafuse_factor at 200 new tokens)                        ~9 min
#
# -p (first argument): run the stages side by side, each in its own process, and pack $OUT into
# results.tgz at the end (the device returns 8 files at most). A 7B benchmark is mostly compile
# time on the CPU (16 cores there), so three of them fit one 10-minute call where one did before.
# Each benchmark holds a file lock (adafuse_compile/gpu_lock.py) whenever it uses the GPU and lets
# go only while Dynamo compiles (and bench_sgmm while nvcc builds), so no two ever use the GPU at
# once. (The first side-by-side run, 2026-11-29, locked only the timed sections: the others'
# untimed GPU work disturbed them; its results carry the suffix _shared.) GPU tests hold the lock for
# each test's whole run (tests/conftest.py), so `tests*` stages may run next to timed ones.
# Per-set overrides for decode / decode-all: PHASES_qv, PATHS_qv, PHASES_all, PATHS_all; MULTI_PATHS: the
# paths timed at batch > 1 and prefill (default auto); the naive model's torch.compile runs at every
# shape unless SKIP_NAIVE=1.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
parallel=0; [ "${1:-}" = -p ] && { parallel=1; shift; }
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . .whl/*.whl > "$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site   # installed (not editable) so the torch_dynamo_backends entry point is found
# HF_WHEELS=<dir>: wheels installed over the machine's own (a transformers with the deferred stop check, 5.18+,
# where the machine has 5.17), e.g. HF_WHEELS=.whl-hf with transformers-5.18.0 and huggingface_hub-1.33.0 carried.
# If they do not import, they are removed again and the machine's own are used.
if [ -n "${HF_WHEELS:-}" ]; then
  python3 -m pip install -q --no-deps --upgrade --target /tmp/site "$HF_WHEELS"/*.whl >> "$OUT/install.log" 2>&1
  python3 -c "import transformers, huggingface_hub; from transformers import LlamaForCausalLM; print('transformers', transformers.__version__, 'hub', huggingface_hub.__version__)" \
    || { echo "HF_WHEELS do not import: using the machine's transformers"; rm -rf /tmp/site/transformers* /tmp/site/huggingface_hub*; }
fi

# The GPU tests split in two halves that together are `tests`, to run side by side: -p tests-kernels tests-models
KERNEL_TESTS=${KERNEL_TESTS:-"tests/test_sgmm_gpu.py tests/test_gather_lora_gpu.py tests/test_factor_slots_gpu.py tests/test_linear_lora_gpu.py"}

run_stage() {
  local stage=$1
  echo "=== stage $stage ($(date +%T))"
  case "$stage" in
  install) ;;  # the install above is all (with -p too)
  tests-k:*)
    # tests-k:<pytest -k expression>: the GPU tests it selects, from every file (e.g.
    # "tests-k:layerwise or side_stream"); the log is named after the expression's letters and digits.
    local expr=${stage#tests-k:} name
    name=$(printf '%s' "$expr" | tr -c 'A-Za-z0-9' '_' | cut -c1-60)
    timeout "${TESTS_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s -k "$expr" tests 2>&1 \
      | tee "$OUT/gpu_tests_k_$name.log" | grep -v -i warn | tail -20 ;;
  build:*)
    # build:<variants>: build the SGMM extension holding these variants (and build.BUILD_VARIANTS) into the
    # cache, e.g. beside a tests stage, so that later processes asking for a subset load it (no build of
    # their own)
    python3 -c "import sys; from adafuse_compile.cutlass_kernels import build; \
m = build.load_extension(tuple(int(v) for v in sys.argv[1].split(','))); print('built', m.__name__)" "${stage#build:}" 2>&1 | tail -5 ;;
  tests-gather)
    timeout "${TESTS_GATHER_TIMEOUT:-60}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gather_lora_gpu.py 2>&1 | tee "$OUT/gpu_gather_tests.log" | grep -v -i warn | tail -15 ;;
  tests-generate)
    timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests/test_generate_gpu.py 2>&1 | tee "$OUT/gpu_generate_tests.log" | grep -v -i warn | tail -15 ;;
  tests-generate-stop)
    timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s -k deferred tests/test_generate_gpu.py 2>&1 | tee "$OUT/gpu_generate_stop_tests.log" | grep -v -i warn | tail -15 ;;
  tests-backend-prefill)
    timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s -k prefill tests/test_backend_gpu.py 2>&1 | tee "$OUT/gpu_backend_prefill_tests.log" | grep -v -i warn | tail -15 ;;
  tests-backend-gather)
    timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -k gather tests/test_backend_gpu.py 2>&1 | tee "$OUT/gpu_backend_gather_tests.log" | grep -v -i warn | tail -15 ;;
  profile-side)
    # The gather path with and without the side stream, all seven then q,v, every step shape.
    for t in ${PROFILE_TARGETS:-all qv}; do
      timeout "${PROFILE_TIMEOUT:-200}" python3 benchmarks/profile_paths.py --layers "${PROFILE_LAYERS:-4}" --targets "$t" --paths "${PROFILE_PATHS:-gather,gather-inline}" \
        --shapes "${PROFILE_SHAPES:-b1,b8,b32,p512}" --out "$OUT/profile_side_$t.json" 2>&1 | grep -v -i -e warn -e USDT -e softmax -e "split the" -e "important use" | tail -12
    done ;;
  tests)
    timeout "${TESTS_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -v -i warn | tail -40 ;;
  tests-kernels)
    timeout "${TESTS_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs $KERNEL_TESTS 2>&1 | tee "$OUT/gpu_kernel_tests.log" | grep -v -i warn | tail -20 ;;
  tests-models)
    # without the generate() tests (about 4 min of compiles): stage tests-generate runs them
    timeout "${TESTS_TIMEOUT:-560}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests ${KERNEL_TESTS//tests\//--ignore=tests/} \
      --ignore=tests/test_generate_gpu.py 2>&1 | tee "$OUT/gpu_model_tests.log" | grep -v -i warn | tail -20 ;;
  tests-backend)
    timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests/test_backend_gpu.py tests/test_factor_slots_gpu.py 2>&1 | tee "$OUT/gpu_backend_tests.log" | grep -v -i warn | tail -40 ;;
  decode:*)
    # One slice of a decode benchmark, so that slices run side by side (-p):
    # decode:<qv|all>:<phases>[:<batches>[:<naive phases>]], e.g. decode:all:batch,prefill:32:batch.
    # Paths from PATHS_<targets> (default auto), MULTI_PATHS (default auto). ROUTING=layerwise: a router
    # in every adapted linear (MoLA style; naive = that model under plain torch.compile; gather/auto only).
    # A sixth field names the routing of this slice alone (decode:all:b1:8::layerwise), so pre-gated and
    # layer-wise slices can run side by side; ROUTING sets it for every slice that names none.
    local targets phases batches naive routing paths_var tag
    IFS=: read -r _ targets phases batches naive routing <<< "$stage"
    routing=${routing:-${ROUTING:-pregated}}
    paths_var=PATHS_$targets
    tag="${phases//,/-}${batches:+_b${batches//,/-}}${naive:+_naive-${naive//,/-}}"
    [ "$routing" = layerwise ] && tag="layerwise_$tag"
    timeout "${DECODE_TIMEOUT:-570}" python3 benchmarks/bench_decode.py --preset llama2-7b --targets "$targets" --skip-profile \
      --routing "$routing" \
      --budget-s "${DECODE_BUDGET:-470}" --paths "${!paths_var:-auto}" --multi-paths "${MULTI_PATHS:-auto}" \
      --phases "$phases" --batches "${batches:-8,32}" ${naive:+--naive-phases "$naive"} \
      --out "$OUT/decode_llama2-7b_${targets}_$tag.json" 2>&1 | grep -v -i "warn" | tail -12 ;;
  decode|decode-all)
    local targets phases paths
    targets=$([ "$stage" = decode ] && echo qv || echo all)
    phases_var=PHASES_$targets; paths_var=PATHS_$targets
    phases=${!phases_var:-${PHASES:-b1,batch,prefill}}; paths=${!paths_var:-${PATHS:-merge-exact,factor,gather,auto}}
    timeout "${DECODE_TIMEOUT:-570}" python3 benchmarks/bench_decode.py --preset llama2-7b --targets "$targets" --skip-profile \
      ${SKIP_NAIVE:+--skip-naive} --budget-s "${DECODE_BUDGET:-470}" --paths "$paths" --multi-paths "${MULTI_PATHS:-auto}" \
      --phases "$phases" --out "$OUT/decode_llama2-7b_$targets.json" 2>&1 | grep -v -i "warn" | tail -12 ;;
  kernels)
    # Every CUTLASS variant (30; the reduce-add ones in place only) (sequential timing; probe-gemm interleaves): ~3 min build + timing. A variant that hangs
    # loses the ones after it: rerun with --cutlass-variants leaving it out (CUTLASS_VARIANTS=...).
    # KERNELS_CONTEXT=decode_like: a decode's weight reads between the timed switches (sgmm_h200_decode_like.json).
    timeout "${KERNELS_TIMEOUT:-560}" python3 benchmarks/bench_sgmm.py ${CUTLASS_VARIANTS:+--cutlass-variants "$CUTLASS_VARIANTS"} \
      --context "${KERNELS_CONTEXT:-back_to_back}" --out "$OUT/sgmm_h200${KERNELS_CONTEXT:+_$KERNELS_CONTEXT}.json" 2>&1 | tail -40 ;;
  probe-gemm)
    # The SGMM switch interleaved over rounds (probe_sgmm_gemm.py; PROBE_ARGS adds e.g. --gemm --sweeps),
    # and with PROBE_NCU=variant,K,mode,groups ncu's sections for one GEMM launch, where ncu reads counters.
    timeout "${PROBE_TIMEOUT:-420}" python3 benchmarks/probe_sgmm_gemm.py ${PROBE_VARIANTS:+--variants "$PROBE_VARIANTS"} ${PROBE_ARGS:-} \
      --out "$OUT/probe_sgmm_gemm_h200.json" 2>&1 | tail -60
    if [ -n "${PROBE_NCU:-}" ] && command -v ncu > /dev/null; then
      timeout 150 ncu --clock-control none --kernel-name-base function --kernel-name regex:device_kernel \
        --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section Occupancy \
        python3 benchmarks/probe_sgmm_gemm.py ${PROBE_VARIANTS:+--variants "$PROBE_VARIANTS"} --ncu-one "$PROBE_NCU" \
        > "$OUT/probe_sgmm_gemm_ncu.txt" 2>&1; tail -80 "$OUT/probe_sgmm_gemm_ncu.txt"
    fi ;;
  probe-stationary)
    # probe_stationary.py: a Triton GEMM that holds each row strip's L on chip against CUTLASS variant 14
    # (GEMM alone, q,v bytes, in place K = 256 and pristine K = 128): is the in-place GEMM L2-bound?  ~3 min
    timeout "${STATIONARY_TIMEOUT:-240}" python3 benchmarks/probe_stationary.py --rounds "${STATIONARY_ROUNDS:-5}" \
      --out "$OUT/probe_stationary_h200.json" 2>&1 | grep -v -i warn | tail -40 ;;
  probe-power)
    # One GEMM at a time with cancelling, random, zero and random operands, launched back to back while
    # nvidia-smi samples SM clock, power and throttle reasons (POWER_CONFIGS: variant.K.mode,...).
    timeout "${PROBE_TIMEOUT:-300}" python3 benchmarks/probe_sgmm_gemm.py --variants "${PROBE_VARIANTS:-1,3,14,17,21}" \
      --power "${POWER_CONFIGS:-14.256.inplace,14.128.pristine,21.256.inplace,17.128.pristine}" \
      --out "$OUT/probe_sgmm_power_h200.json" 2>&1 | grep -v "^\[" | tail -20 ;;
  probe-inplace-modes)
    # All seven in place, each switch timed alone: the gather form's two speeds per launch or per stretch,
    # back to back, between a decode's weight reads, after an L2 flush, after an idle gap (needs build:23,25).
    timeout "${PROBE_TIMEOUT:-300}" python3 benchmarks/probe_inplace_modes.py ${PROBE_ARGS:-} \
      --out "$OUT/probe_inplace_modes.json" 2>&1 | tail -20 ;;
  probe-decode)
    # The issue's benchmark where a decode runs the switch: every implementation (the op's CUTLASS plan,
    # Triton, the simple merge) as CUDA graph replays, back to back and between a decode's weight reads,
    # q,v and all seven, both modes: ms, share of the copy bandwidth, speed-up in the same context.
    timeout "${PROBE_TIMEOUT:-420}" python3 benchmarks/probe_switch_contexts.py --graphs --simple-merge --triton \
      --inplace-variants "${PROBE_INPLACE_VARIANTS:-23}" --pristine-variants "${PROBE_PRISTINE_VARIANTS:-24}" \
      --contexts back_to_back,decode_like --rounds "${PROBE_ROUNDS:-3}" --tokens 30 ${PROBE_ARGS:-} \
      --out "$OUT/probe_decode.json" 2>&1 | grep -v "^\[" | grep -v "^  round" | tail -60 ;;
  probe-timing-context)
    # What the plans' own timing keeps, timed back to back (the old timing) and after an idle gap (the
    # package's), fresh twins per repeat; compare with probe-decode's decode_like figures.
    timeout "${PROBE_TIMEOUT:-300}" python3 benchmarks/probe_timing_context.py --repeats "${PROBE_REPEATS:-3}" ${PROBE_ARGS:-} \
      --out "$OUT/probe_timing_context.json" 2>&1 | grep -v "^\[" | tail -40 ;;
  probe-switch-contexts)
    # The switch timed where a decode runs it (between the weight reads, after an idle gap) against back
    # to back, every mode and set, the op's own plan among the forms (needs build:23,24,25).
    timeout "${PROBE_TIMEOUT:-420}" python3 benchmarks/probe_switch_contexts.py ${PROBE_ARGS:-} \
      --out "$OUT/probe_switch_contexts.json" 2>&1 | grep -v "^\[" | tail -60 ;;
  gather-kernels)
    timeout "${GATHER_TIMEOUT:-260}" python3 benchmarks/bench_gather.py ${GATHER_SWEEP:+--sweep} --out "$OUT/gather_h200.json" 2>&1 | tail -15 ;;
  gather-variants)
    # Out blocks per expand program (h read once per program) and the prefill expand's block sizes:
    # decode shapes, then prefill shapes, each variant against the shape-picked default.
    local decode_variants prefill_variants
    decode_variants='[{"O_ITERS": 1}, {"O_ITERS": 2}, {"O_ITERS": 4}, {"O_ITERS": 8}, {"SPLIT_K": 4, "O_ITERS": 4}, {"SPLIT_K": 2, "O_ITERS": 8}]'
    prefill_variants='[{"SETS_O_ITERS": 1}, {"SETS_O_ITERS": 4}, {"SETS_O_ITERS": 16}, {"SETS_BLOCK_T": 16}, {"SETS_BLOCK_T": 64}, {"SETS_WARPS": 8}, {"SETS_BLOCK_O": 128}, {"SPLIT_K": 1}, {"SPLIT_K": 1, "SETS_BLOCK_O": 128, "SETS_O_ITERS": 4}]'
    timeout "${GATHER_TIMEOUT:-280}" python3 benchmarks/bench_gather.py --tokens 1,8,32 --reps 20 \
      --variants "${GATHER_DECODE_VARIANTS:-$decode_variants}" --out "$OUT/gather_h200_variants_decode.json" 2>&1 | tail -80
    timeout "${GATHER_TIMEOUT:-280}" python3 benchmarks/bench_gather.py --tokens 128,512 --reps 20 \
      --variants "${GATHER_PREFILL_VARIANTS:-$prefill_variants}" --out "$OUT/gather_h200_variants_prefill.json" 2>&1 | tail -60 ;;
  profile)
    # Per-kernel time of each path against the backbone, 4 layers of the 7B shape (profile_paths.py).
    for t in ${PROFILE_TARGETS:-qv all}; do
      timeout "${PROFILE_TIMEOUT:-280}" python3 benchmarks/profile_paths.py --layers "${PROFILE_LAYERS:-4}" --targets "$t" --out "$OUT/profile_$t.json" 2>&1 \
        | grep -v -i -e warn -e USDT | tail -12
    done ;;
  prefill-fused)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests/test_linear_lora_gpu.py tests/test_backend_gpu.py \
      -k "test_linear_lora_gpu or auto-fused" 2>&1 | tee "$OUT/gpu_prefill_fused_tests.log" | grep -v -i warn | tail -15
    timeout "${PREFILL_FORMS_TIMEOUT:-330}" python3 benchmarks/bench_prefill_forms.py --tokens "${PREFILL_FORMS_TOKENS:-128,512,2048}" \
      --forms backbone,dense_cat,fused,fused_tma,triton_linear --out "$OUT/prefill_forms_fused_h200.json" 2>&1 | grep -v -i warn | tail -20 ;;
  probe-linear-lora)
    # Every fixed tile of linear_lora's autotuner, TMA and pointer kernels, 7B prefill shapes, against the oracle
    timeout "${PROBE_TIMEOUT:-300}" python3 benchmarks/probe_linear_lora.py --out "$OUT/probe_linear_lora_h200.json" 2>&1 \
      | grep -v -i warn | tail -60 ;;
  prefill-forms)
    timeout "${PREFILL_FORMS_TIMEOUT:-330}" python3 benchmarks/bench_prefill_forms.py --tokens "${PREFILL_FORMS_TOKENS:-128,512,2048}" \
      --out "$OUT/prefill_forms_h200.json" 2>&1 | grep -v -i warn | tail -40 ;;
  generate-host)
    timeout "${HOST_TIMEOUT:-480}" python3 benchmarks/profile_generate_host.py --targets "${HOST_TARGETS:-all}" \
      --methods "${HOST_METHODS:-backbone,adafuse_auto}" --hf-caches "${HOST_CACHES:-reused,per-call}" --stop-checks "${HOST_STOP_CHECKS:-per-step,deferred}" --reps "${HOST_REPS:-3}" --out "$OUT/generate_host_profile_h200.json" 2>&1 \
      | grep -v -i warn | tail -120 ;;
  backbone-modes)
    # Why the compiled backbone runs at 4.71 or 4.99 ms/step depending on the process: several
    # processes side by side (GPU lock: their GPU work never overlaps), odd ones with a private
    # Inductor cache so that each makes its own run-time autotuning choices.
    local n=${BACKBONE_MODES_PROCS:-4} i pids=() threads
    threads=$(( $(nproc) / n > 1 ? $(nproc) / n : 1 ))
    for ((i = 0; i < n; i++)); do
      ( [ $# -gt 0 ] || { echo "-p needs at least one stage"; exit 2; }
export ADAFUSE_GPU_LOCK=/tmp/adafuse_gpu.lock TORCHINDUCTOR_COMPILE_THREADS=$threads
        [ $((i % 2)) = 1 ] && export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_private_$i
        timeout "${BACKBONE_MODES_TIMEOUT:-540}" python3 benchmarks/probe_backbone_modes.py --label "p$i" \
          --targets "$([ $i -lt 2 ] && echo "${BACKBONE_MODES_TARGETS:-all}" || echo none)" --out "$OUT/backbone_modes_p$i.json" ) > "$OUT/backbone_modes_p$i.log" 2>&1 &
      pids+=($!); sleep 5
    done
    wait "${pids[@]}"
    grep -h -v -i warn "$OUT"/backbone_modes_p*.log | tail -40 ;;
  factor-layout)
    timeout 120 python3 benchmarks/bench_factor_layout.py --out "$OUT/factor_layout_h200.json" 2>&1 | tail -30 ;;
  drift)
    timeout 300 python3 benchmarks/bench_drift.py --device cuda --shape llama2-7b-qv --counts 1,100,1000,10000 \
      --out "$OUT/drift_h200.json" 2>&1 | tail -30 ;;
  drift-model)
    timeout "${DRIFT_TIMEOUT:-330}" python3 benchmarks/bench_drift.py --device cuda --model --skip-weights --model-preset llama2-7b \
      --between switch --dtypes bf16,fp16 --counts 1,100,1000,10000 --out "$OUT/drift_model_h200.json" 2>&1 | tail -20 ;;
  # adafuse bench stages. The paper's 50 prompts x 200 tokens per method (about 100 s of decoding
  # for a fast method, 17 min for MoLA eager at all seven) cannot fit a 10-minute call, and the
  # compiles dominate anyway: one 32-layer Inductor compile of the decode step takes 35-120 s on the
  # H200 (bench_decode's phase_s: backbone ~35, q,v gather 65 / factor 70 / naive torch.compile 55 /
  # merge 40 + 70 for the CUTLASS JIT build, once per fresh machine; all seven gather 98 / factor 108
  # / naive 122 / merge 83 + 70). So: --prefill eager (only the decode step is compiled: one graph
  # per method, not three), 50 prompts asked and --method-budget-s 5 (each method serves prompts
  # until 5 s of them have passed: ~9 prompts at 5-6 ms/token, 1-2 for the eager baselines, always
  # at least one), --new-tokens 100 (the own loop's attention reads the whole static cache, 1152
  # positions here, every step, so ms/token does not depend on the position: 100 tokens measure the
  # same as 200, in half the time of a slow method's one prompt), and --budget-s: no method starts
  # after it, the rest are recorded as skipped. JSON and .md are rewritten after each method, so a
  # run killed by `timeout` keeps what finished. Estimates (s, build ~5 + compile + serve; python
  # start ~15) in run order, cumulative:
  #   qv:  backbone 45 (60), gather 75 (135), auto 60 (195), merge_cutlass 120 (315), pregated_inductor
  #        65 (380), simple_merge 13 (393), pregated_eager 13 (406), mola_eager ~15 (421), backbone_eager 10
  #        (431), factor 80 (511); mola_compiled (whole-model compile of minutes when this was written; regional since, 40 s at all seven) starts after --budget-s 440: skipped.
  #        A factor that starts at 440 and compiles 1.4x slower still ends before the 560-s timeout.
  #   all: backbone 45 (60), gather 108 (168), merge_cutlass 163 (331), then the eager baselines, cheap
  #        because they compile nothing: simple_merge ~15 (346), pregated_eager 14 (360), mola_eager ~35
  #        (395), backbone_eager 11 (406); pregated_inductor 133 (539) starts before --budget-s 425;
  #        auto (the cost model picks gather at all seven), factor (7.6 ms/token at all seven in
  #        decode_llama2-7b_all_kv512_h200.json) and mola_compiled are skipped.
  bench-qv)
    timeout "${BENCH_TIMEOUT:-560}" python3 -m adafuse_compile.cli bench --preset llama2-7b --targets qv --loop own --prefill eager \
      --prompts 50 --new-tokens "${BENCH_NEW_TOKENS:-100}" --method-budget-s "${BENCH_METHOD_BUDGET:-5}" --budget-s "${BENCH_BUDGET:-440}" --no-progress \
      --methods "${BENCH_METHODS_qv:-backbone,adafuse_gather,adafuse_auto,adafuse_merge_cutlass,pregated_inductor,simple_merge,pregated_eager,mola_eager,backbone_eager,adafuse_factor,mola_compiled}" \
      --out "$OUT/bench_llama2-7b_qv_own_h200${BENCH_TAG:-}.json" 2>&1 | tee "$OUT/bench_llama2-7b_qv_own_h200${BENCH_TAG:-}.log" | grep -v -i warn | tail -40 ;;
  bench-all)
    timeout "${BENCH_TIMEOUT:-560}" python3 -m adafuse_compile.cli bench --preset llama2-7b --targets all --loop own --prefill eager \
      --prompts 50 --new-tokens "${BENCH_NEW_TOKENS:-100}" --method-budget-s "${BENCH_METHOD_BUDGET:-5}" --budget-s "${BENCH_BUDGET:-425}" --no-progress \
      --methods "${BENCH_METHODS_all:-backbone,adafuse_gather,adafuse_merge_cutlass,simple_merge,pregated_eager,mola_eager,backbone_eager,pregated_inductor,adafuse_auto,adafuse_factor,mola_compiled}" \
      --out "$OUT/bench_llama2-7b_all_own_h200${BENCH_TAG:-}.json" 2>&1 | tee "$OUT/bench_llama2-7b_all_own_h200${BENCH_TAG:-}.log" | grep -v -i warn | tail -40 ;;
  # generate() with the static cache, generate()'s own decode-only compile (our backend and options):
  # never run on a GPU. Same protocol; HF's forward traces slower (estimate 1.2x the own loop's
  # compiles) and its eager forward pays more Python. Estimates: backbone 56 (71), gather 91 (162),
  # pregated_inductor 76 (238), pregated_eager 14 (252), backbone_eager 11 (263), auto 71 (334) <
  # the 370-s timeout; merge (70-s CUTLASS build), simple_merge, MoLA and factor start after
  # --budget-s 270 and are skipped. Feasible only as a third call: the two own-loop tables first.
  bench-qv-hf)
    timeout 370 python3 -m adafuse_compile.cli bench --preset llama2-7b --targets qv --loop hf --prefill eager \
      --prompts 50 --new-tokens 100 --method-budget-s 5 --budget-s 270 --no-progress \
      --methods backbone,adafuse_gather,pregated_inductor,pregated_eager,backbone_eager,adafuse_auto,adafuse_merge_cutlass,simple_merge,mola_eager,adafuse_factor,mola_compiled \
      --out "$OUT/bench_llama2-7b_qv_hf_h200.json" 2>&1 | tee "$OUT/bench_llama2-7b_qv_hf_h200.log" | grep -v -i warn | tail -40 ;;
  bench-all-hf)
    # All seven through generate(): the issue's bar is under 6.2 ms/token (HF eager, static cache).
    timeout "${BENCH_TIMEOUT:-560}" python3 -m adafuse_compile.cli bench --preset llama2-7b --targets all --loop hf --prefill eager \
      --prompts 50 --new-tokens "${BENCH_NEW_TOKENS:-100}" --method-budget-s "${BENCH_METHOD_BUDGET:-5}" \
      --budget-s "${BENCH_BUDGET:-430}" --no-progress --hf-cache "${BENCH_HF_CACHE:-reused}" \
      --hf-stop-check "${BENCH_HF_STOP_CHECK:-deferred}" \
      --methods "${BENCH_METHODS:-backbone,adafuse_auto,adafuse_gather,pregated_inductor,pregated_eager,backbone_eager,adafuse_merge_cutlass,simple_merge,mola_eager,adafuse_factor,mola_compiled}" \
      --out "$OUT/bench_llama2-7b_all_hf_h200${BENCH_TAG:-}.json" 2>&1 | tee "$OUT/bench_llama2-7b_all_hf_h200${BENCH_TAG:-}.log" | grep -v -i warn | tail -40 ;;
  *) echo "unknown stage $stage"; return 2 ;;
  esac
}

# `install` (or no stage at all): only the install above. No stage used to mean `tests`, the whole GPU
# suite, which outlasts one device call: on 2026-12-04 a call meant to install only ran it for 442 s.
if [ "$parallel" = 0 ]; then
  for stage in "${@:-install}"; do [ "$stage" = install ] || run_stage "$stage"; done
  exit 0
fi
export ADAFUSE_GPU_LOCK=/tmp/adafuse_gpu.lock
# Inductor's compile workers: a share of the cores each, not all of them to every process.
export TORCHINDUCTOR_COMPILE_THREADS=$(( $(nproc) / $# > 1 ? $(nproc) / $# : 1 ))
pids=()
for stage in "$@"; do
  run_stage "$stage" > "$OUT/stage_$stage.out" 2>&1 &
  pids+=($!)
  sleep 5  # start-up (imports, the 13-GB model build) staggered
done
for pid in "${pids[@]}"; do wait "$pid"; done
for stage in "$@"; do echo; cat "$OUT/stage_$stage.out"; done
(cd "$OUT" && tar czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
