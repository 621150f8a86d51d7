#!/usr/bin/env bash
# Issue 18 on the GPU machine in one call (device tool, from the repository root, carrying .whl and
# .carry): the 8-bit kernel's GPU test, the decode step of bf16 / INT8 / FP8 weights against the
# memory bound, and the server sweep beside the static-cache compiled `generate` peer.
# STEPS picks the parts (default: test step sweep; gemm: the products alone, benchmarks/gpu_gemm.py;
# multiturn: prefix reuse on and off, benchmarks/multiturn.py; tunecache: starts compiling one after
# another or in parallel, with and without the kept tuning, benchmarks/gpu_tune_cache.py); LEVELS and
# PEER_LEVELS the sweep's levels; ROUNDS the step's
# rounds (torch_engine_gpu.py --rounds), STEP_TIMEOUT its limit in s, PROFILE the variants it profiles
# (empty: none); GEMM_ARGS more gpu_gemm.py arguments; MT_CONCURRENCY, MT_ROUNDS the multi-turn clients,
# rounds, MT_ARGS more multiturn.py arguments, MT_VARIANTS generator settings (as gpu_first_senders.sh's
# VARIANTS, one multi-turn run each), MT_TIMELINE=1 each pass's request timeline (multiturn.py --timeline); TUNE_WEIGHTS the tune-cache starts' weights (fp8), TUNE_STARTS
# which starts (gpu_tune_cache.py --starts; default all five); senders: the server with and without
# first-token senders or other generator settings, with the request timeline (gpu_first_senders.sh;
# SENDERS or VARIANTS, ROUNDS there); sampling: the server greedy, sampled with tokens drawn on the
# device and sampled on the host (gpu_sampling.sh); draw: what drawing costs a step (gpu_draw.py;
# DRAW_ARGS more of its arguments, e.g. "--profile 64": the kernels of the 64-row draw graph);
# megakernel: the one-kernel decode step against the engine's (gpu_megakernel.py; MK_CONFIGS its
# --configs); TESTS the test step's files (default: test_engine_8bit test_gpu_chain), TEST_K its -k (gpu).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# the tokenizer gpu_carry.sh puts in .carry (the sweeps build the TinyLlama-shaped model with it)
export TRITONCHAT_SHARED=${TRITONCHAT_SHARED:-$PWD/.carry/shared}
source "$(dirname "$0")/gpu_setup.sh"  # leaves us in /tmp, REPO_ROOT = the checkout, make_model
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for step in ${STEPS:-test step sweep}; do
  echo "=== $step at $(date +%T)"
  case $step in
    test) timeout 420 python3 -m pytest -q -rs -s -p no:cacheprovider \
            $(for t in ${TESTS:-test_engine_8bit test_gpu_chain}; do echo "$REPO_ROOT/tests/$t.py"; done) -k "${TEST_K:-gpu}" \
            2>&1 | tee "$OUT/test-8bit.txt" ;;
    megakernel) timeout 480 python3 "$REPO_ROOT/benchmarks/gpu_megakernel.py" --out "$OUT" \
            --configs "${MK_CONFIGS:-0:32:256:128:3:8,0:32:256:128:3:8:2,0:32:256:128:3:8:2:1}" 2>&1 \
            | tee "$OUT/megakernel.txt" ;;
    gemm) timeout 300 python3 "$REPO_ROOT/benchmarks/gpu_gemm.py" --m "${GEMM_M:-1,16,64}" ${GEMM_ARGS:-} 2>&1 | tee "$OUT/gemm.txt" ;;
    step) timeout "${STEP_TIMEOUT:-300}" python3 "$REPO_ROOT/benchmarks/torch_engine_gpu.py" --out "$OUT/step" --skip-correctness \
            --skip-long --skip-hf --variants "${VARIANTS:-triton+graphs,triton+graphs int8,triton+graphs fp8}" \
            --profile "${PROFILE-triton+graphs,triton+graphs fp8}" --rounds "${ROUNDS:-1}" 2>&1 | tee "$OUT/step.txt" ;;
    sweep) (cd "$REPO_ROOT" && LEVELS=${LEVELS:-1,16,64} \
              PEERS="--peers transformers-compiled --peer-concurrency ${PEER_LEVELS:-64}" \
              bash benchmarks/gpu_triton.sh --requests-per-level 640 --max-seconds-per-level 20) \
            2>&1 | tail -60 | tee "$OUT/sweep.txt" ;;
    multiturn) for v in ${MT_VARIANTS:-default}; do  # generator settings as gpu_first_senders.sh's VARIANTS
              n=$(variant_name "$v"); echo "=== multiturn, $v"
              (make_model && printf 'engine: torch\ndevice: cuda\ndtype: bfloat16\nmodels:\n%s\n' \
                 "$(variant_models "$v")" > /tmp/mt-$n.yaml &&
               # from /tmp, as the servers it starts: the checkout's tritonchat/ would hide the package
               timeout 500 python3 "$REPO_ROOT/benchmarks/multiturn.py" --model $MODEL --work /tmp/multiturn-$n \
                 --config /tmp/mt-$n.yaml --concurrency "${MT_CONCURRENCY:-8}" --rounds "${MT_ROUNDS:-1}" \
                 ${MT_TIMELINE:+--timeline /tmp/mt-timeline-$n-$SECONDS} ${MT_ARGS:-}) 2>&1 \
              | tail -70 \
              | tee "$OUT/multiturn-$n.txt"; done ;;
    tunecache) timeout 400 python3 "$REPO_ROOT/benchmarks/gpu_tune_cache.py" --weights "${TUNE_WEIGHTS:-fp8}" ${TUNE_STARTS:+--starts $TUNE_STARTS} \
                 --cache /tmp/tune-cache 2>&1 | tail -12 | tee "$OUT/tune-cache.txt" ;;
    senders) (cd "$REPO_ROOT" && bash benchmarks/gpu_first_senders.sh) 2>&1 | tee "$OUT/senders.txt" ;;
    sampling) (cd "$REPO_ROOT" && bash benchmarks/gpu_sampling.sh) 2>&1 | tee "$OUT/sampling.txt" ;;
    draw) timeout 120 python3 "$REPO_ROOT/benchmarks/gpu_draw.py" ${DRAW_ARGS:-} 2>&1 | tee "$OUT/draw.txt" ;;
    sweep-8bit) for p in ${PRECISIONS:-bf16 int8-weight-only}; do  # bf16: the build's own dtype
              (cd "$REPO_ROOT" && PRECISION=${p#bf16} LEVELS=${LEVELS:-1,16,64} PEERS= \
                 bash benchmarks/gpu_triton.sh --requests-per-level 640 --max-seconds-per-level 20) \
                2>&1 | tail -40 | tee "$OUT/sweep-$p.txt"; done ;;
  esac
done
echo "=== done at $(date +%T)"
