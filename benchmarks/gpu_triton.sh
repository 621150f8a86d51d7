#!/usr/bin/env bash
# The issue-4 GPU measurement: TinyLlama-1.1B-shaped seeded random Llama (bf16) in the real
# tritonserver of the nvidia-pytriton wheel, generator = torch engine with CUDA graphs.
# Run on the GPU machine from the repository root, with the wheels in .whl/ and the Llama-2
# tokenizer in $TRITONCHAT_SHARED/tokenizers/llama2/ (see docs/benchmarks.md).
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/gpu_setup.sh"  # wheels, the package, tritonserver, make_model; cd /tmp
make_model
# PRECISION=fp8: the products' weights in FP8 (the build's accuracy gate runs on the GPU)
# GENERATOR='{pdl: false}': build settings of the generator, ENSEMBLE='{generate: entry}' the entry's
# (docs/build-config.md); TAG names that build
REPO=/tmp/repo-tinyllama${PRECISION:+-$PRECISION}${TAG:+-$TAG}
# postprocessing x4: 16 CPU cores here; at 64-128 streams two Python instances are too few
printf 'models:\n  postprocessing: {instances: 4}\n' > /tmp/gpu-build.yaml
[ -n "${GENERATOR:-}" ] && printf '  generator: %s\n' "$GENERATOR" >> /tmp/gpu-build.yaml
[ -n "${ENSEMBLE:-}" ] && printf '  ensemble: %s\n' "$ENSEMBLE" >> /tmp/gpu-build.yaml
[ -f $REPO/manifest.json ] || python3 -m tritonchat.cli build --model $MODEL --output $REPO --engine torch \
    --device cuda --dtype bfloat16 --max-batch-size ${SLOTS:-128} --max-seq-len ${CTX:-512} --config /tmp/gpu-build.yaml \
    ${PRECISION:+--precision $PRECISION}
# PROFILE=S: py-spy of the generator stub S seconds into the bench (ready: 6 s after the generator
# is ready), for $PROFILE_SECONDS (10) s;
# PYSPY_ARGS=--gil samples only the thread holding the GIL. PEERS= (empty): no peers.
if [ -n "${PROFILE:-}" ]; then
  ( if [ "$PROFILE" = ready ]; then  # 6 s after the generator said it is ready
      until grep -qs "malloc keeps freed memory" /tmp/tritonchat-server-*/tritonserver.log; do sleep 0.5; done; sleep 6
    else sleep "$PROFILE"; fi
    pid=$(pgrep -f 'generator/1/model.py' | head -1)
    [ -n "$pid" ] && py-spy record -p "$pid" -d ${PROFILE_SECONDS:-10} -r 100 -f raw --threads --nonblocking ${PYSPY_ARGS:-} \
      -o "$OUT/generator-profile.txt" \
      > "$OUT/py-spy.log" 2>&1 ) &
fi
python3 -m tritonchat.cli bench --model-repository $REPO --concurrency ${LEVELS:-1,16,64,128} \
    --prompt-len 128 --output-len 128 ${PEERS---peers transformers} --model $MODEL --out "$OUT/bench${PRECISION:+-$PRECISION}" "$@"
