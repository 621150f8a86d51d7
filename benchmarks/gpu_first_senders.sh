#!/usr/bin/env bash
# models.generator.first_token_senders on the GPU machine (device tool, from the repository root,
# carrying .whl and .carry; `bash benchmarks/gpu_carry.sh` first): the TinyLlama-shaped bf16 server
# with SENDERS first-token senders (default "3 0", in that order, then again reversed with ROUNDS=2),
# each on a fresh tritonserver with the request timeline on, at LEVELS (16,64) streams of 128-token
# prompts and answers; prints the bench rows, the timeline (benchmarks/timeline.py: posted -> send_start
# is the wait for a sender) and the generator's send statistics.
# VARIANTS, where set, replaces SENDERS with any models.generator settings (and the entry's as ensemble.KEY),
# one variant a word, key=value joined by commas (e.g. "first_token_senders=3 gil_switch_ms=5
# ensemble.generate=entry"; "default": none).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TRITONCHAT_SHARED=${TRITONCHAT_SHARED:-$PWD/.carry/shared}
export TRITONCHAT_TUNE_CACHE=/tmp/tune-cache  # later starts take the first one's kernel tuning
source "$(dirname "$0")/gpu_setup.sh"  # leaves us in /tmp, REPO_ROOT = the checkout, make_model
make_model
now() { python3 -c 'import time; print(time.perf_counter())'; }
order=${VARIANTS:-$(for n in ${SENDERS:-3 0}; do printf 'first_token_senders=%s ' $n; done)}
[ "${ROUNDS:-1}" = 2 ] && order="$order $(echo $order | tr ' ' '\n' | tac | tr '\n' ' ')"
for v in $order; do
  n=$(variant_name "$v"); settings=$(variant_models "$v")
  repo=/tmp/repo-senders-$n
  printf "models:\n  postprocessing: {instances: 4}\n%s\n" "$settings" > /tmp/senders-$n.yaml
  [ -f $repo/manifest.json ] || python3 -m tritonchat.cli build --model $MODEL --output $repo --engine torch \
      --device cuda --dtype bfloat16 --max-batch-size 128 --max-seq-len 512 --config /tmp/senders-$n.yaml 2>&1 | tail -1
  tl=/tmp/timeline-$n-$SECONDS; mkdir -p $tl
  TRITONCHAT_TIMELINE=$tl setsid python3 -m tritonchat.cli serve --model-repository $repo --http-port 18000 \
    --grpc-port 18001 --metrics-port 18002 > /tmp/serve-senders.log 2>&1 & echo $! > /tmp/serve-senders.pid
  for i in $(seq 240); do curl -sf 127.0.0.1:18000/v2/health/ready >/dev/null && break; sleep 1; done
  echo "=== $v (ready after $i s)"
  for c in $(echo ${LEVELS:-16,64} | tr , ' '); do
    a=$(now)
    python3 -m tritonchat.cli bench --url 127.0.0.1:18001 --http-url 127.0.0.1:18000 \
      --tokenizer $repo/preprocessing/1/tokenizer --concurrency $c --prompt-len 128 --output-len 128 \
      --requests-per-level $((c * 10 + 220)) 2>&1 | grep -E "grpc\)"
    b=$(now)
    python3 "$REPO_ROOT/benchmarks/timeline.py" $tl --since $a --until $b | tee -a "$OUT/timeline-senders-$n.txt"
  done
  kill -- -$(cat /tmp/serve-senders.pid); sleep 3
  grep -ao "send_ms_mean=[0-9.]*\|send_lag_ms_mean=[0-9.]*\|metric_ms_mean=[0-9.]*\|sends=[0-9]*\|[a-z_]*wait_ms_mean=[0-9.]*\|launch_ms_mean=[0-9.]*\|avg_batch=[0-9.]*" \
    /tmp/serve-senders.log | tr '\n' ' '; echo
done
