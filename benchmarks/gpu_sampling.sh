#!/usr/bin/env bash
# Sampled requests through the GPU server (device tool, from the repository root, carrying .whl and
# .carry): the same sweep greedy, sampled with the tokens drawn on the device (`sample_on_device`, the
# default), and sampled with every step's logits brought to the host (`sample_on_device: false`, how
# every sampled step ran before), one fresh server each, in that order. SAMPLE: the bench's sampling
# arguments; LEVELS, HOST_LEVELS (the host variants': they are slow), SECONDS_PER_LEVEL. KINDS picks the
# variants (default "greedy device host"); `device-rp` / `host-rp`: sampled with a repetition penalty
# of REPETITION (default 1.1) as well, chosen on the device (the engine's token counts) or on the host.
set -uo pipefail
OUT=${OUT:-/tmp/out}
SAMPLE=${SAMPLE:---temperature 0.8 --top-p 0.95}
for v in ${KINDS:-greedy device host}; do
  args=$SAMPLE gen="" levels=${LEVELS:-1,16,64}
  case $v in
    greedy) args="" ;;
    *-rp) args="$SAMPLE --repetition-penalty ${REPETITION:-1.1}" ;;
  esac
  case $v in
    host*) gen="{sample_on_device: false}" levels=${HOST_LEVELS:-$levels} ;;
  esac
  echo "=== $v: ${args:-greedy}${gen:+, generator $gen}, levels $levels"
  OUT=$OUT/sampling-$v GENERATOR="$gen" TAG=${gen:+host} LEVELS=$levels PEERS= \
    bash benchmarks/gpu_triton.sh --requests-per-level 640 --max-seconds-per-level "${SECONDS_PER_LEVEL:-15}" $args \
    2>&1 | grep -E "tritonserver|error|Error" | tail -8
done
