#!/usr/bin/env bash
# Sampled requests through the GPU server (device tool, from the repository root, carrying .whl and
# .carry): the same sweep greedy, sampled with the tokens drawn on the device (`sample_on_device`, the
# default), and sampled with every step's logits brought to the host (`sample_on_device: false`, how
# every sampled step ran before), one fresh server each, in that order. SAMPLE: the bench's sampling
# arguments; LEVELS, HOST_LEVELS (the host variant's: it is slow), SECONDS_PER_LEVEL.
set -uo pipefail
OUT=${OUT:-/tmp/out}
SAMPLE=${SAMPLE:---temperature 0.8 --top-p 0.95}
for v in greedy device host; do
  args=$SAMPLE gen="" levels=${LEVELS:-1,16,64}
  [ $v = greedy ] && args=""
  [ $v = host ] && gen="{sample_on_device: false}" levels=${HOST_LEVELS:-$levels}
  echo "=== $v: ${args:-greedy}${gen:+, generator $gen}, levels $levels"
  OUT=$OUT/sampling-$v GENERATOR="$gen" TAG=${gen:+host} LEVELS=$levels PEERS= \
    bash benchmarks/gpu_triton.sh --requests-per-level 640 --max-seconds-per-level "${SECONDS_PER_LEVEL:-15}" $args \
    2>&1 | grep -E "tritonserver|error|Error" | tail -8
done
