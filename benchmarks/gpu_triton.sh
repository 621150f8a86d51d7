#!/usr/bin/env bash
# The issue-4 GPU measurement: TinyLlama-1.1B-shaped seeded random Llama (bf16) in the real
# tritonserver of the nvidia-pytriton wheel, generator = torch executor with CUDA graphs.
# Run on the GPU machine from the repository root, with the wheels in .whl/ and the Llama-2
# tokenizer in $TRITONCHAT_SHARED/tokenizers/llama2/ (see docs/benchmarks.md).
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . 2>&1 | tail -2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
export PATH=/tmp/site/bin:$(dirname "$(command -v python3)"):$PATH
python3 -m tritonchat.server --install
MODEL=/tmp/tinyllama-shape REPO=/tmp/repo-tinyllama
[ -f $MODEL/config.json ] || python3 -m tritonchat.build.synthetic --arch llama --tokenizer llama2 --out $MODEL \
    --layers 22 --hidden 2048 --heads 32 --kv-heads 4 --intermediate 5632 --max-positions 2048 --dtype bfloat16
[ -f $REPO/manifest.json ] || python3 -m tritonchat.cli build --model $MODEL --output $REPO --engine torch \
    --device cuda --dtype bfloat16 --max-batch-size ${SLOTS:-128} --max-seq-len ${CTX:-512}
python3 -m tritonchat.cli bench --model-repository $REPO --concurrency ${LEVELS:-1,16,64,128} \
    --prompt-len 128 --output-len 128 --peers transformers --model $MODEL --out "$OUT/bench" "$@"
