#!/usr/bin/env bash
# NVIDIA's own benchmark clients against the tritonchat OpenAI gateway (docs/gateway.md, "Benchmarks"):
# AIPerf and GenAI-Perf, each in its own virtual environment under .tools/ (git-ignored, ~1.2 GB each,
# installed on the first run), OpenAI chat endpoint, streaming, on loopback only.
#
#   benchmarks/gateway_nvidia_clients.sh            # both tools, 16 streams
#   TOOLS="aiperf" CONCURRENCY=1 benchmarks/gateway_nvidia_clients.sh
#
# Settings (environment): MODEL (HF folder; default ../shared/models/stories260K), REPO (built here if
# absent), CONCURRENCY (16), REQUESTS (128), ISL (32 prompt tokens), OSL (128 output tokens, pinned with
# min_tokens), OUT (bench-results/nvidia-clients). tritonserver and the gateway (response cache off) are
# started here and stopped by pid when the script ends.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=$ROOT/.venv/bin/python
MODEL=${MODEL:-$ROOT/../shared/models/stories260K}
OUT=${OUT:-$ROOT/bench-results/nvidia-clients}
REPO=${REPO:-$OUT/repo}
CONCURRENCY=${CONCURRENCY:-16}
REQUESTS=${REQUESTS:-128}
ISL=${ISL:-32}
OSL=${OSL:-128}
TOOLS=${TOOLS:-aiperf genai-perf}
AIPERF_VERSION=0.13.0
GENAI_PERF_VERSION=0.0.16
mkdir -p "$OUT"
export COLUMNS=${COLUMNS:-200}  # the tools draw their result tables as wide as the terminal

install() {  # install <venv> <package==version>: once; each tool keeps its own dependencies
  local venv=$ROOT/.tools/$1
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip show -q "${2%%==*}" >/dev/null 2>&1; then
    echo "installing $2 into $venv (about 1 GB)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "$2"
  fi
}
for tool in $TOOLS; do
  case $tool in
    aiperf) install aiperf-venv "aiperf==$AIPERF_VERSION" ;;
    genai-perf) install genai-perf-venv "genai-perf==$GENAI_PERF_VERSION"
                [ -x "$ROOT/.tools/bin/perf_analyzer" ] || "$ROOT/.venv/bin/tritonchat" install-perf-analyzer ;;
    *) echo "unknown tool $tool (aiperf, genai-perf)" >&2; exit 2 ;;
  esac
done

[ -f "$REPO/manifest.json" ] || "$ROOT/.venv/bin/tritonchat" build --model "$MODEL" --output "$REPO"

# tritonserver + gateway, in one child that stops both when it gets SIGTERM
URLS=$OUT/urls.json
rm -f "$URLS"
"$PY" - "$REPO" "$URLS" <<'EOF' &
import json, signal, sys, time
from tritonchat.gateway import GatewayConfig
from tritonchat.gateway.process import GatewayProcess
from tritonchat.server import TritonServer

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
with TritonServer(sys.argv[1]) as srv, GatewayProcess(GatewayConfig(
        triton_url=srv.grpc_url, metrics_url=srv.metrics_url, port=0, cache="off", access_log=False,
        log_level="warning")) as gw:
    with open(sys.argv[2] + ".tmp", "w") as f:
        json.dump({"openai": gw.base_url, "grpc": srv.grpc_url, "metrics": srv.metrics_url}, f)
    import os
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    while not stop:
        time.sleep(0.2)
EOF
PAIR=$!
trap 'kill $PAIR 2>/dev/null; wait $PAIR 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -f "$URLS" ] && break; kill -0 $PAIR || exit 1; sleep 0.2; done
GATEWAY=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['openai'])" "$URLS")
TOKENIZER=$REPO/preprocessing/1/tokenizer
echo "gateway $GATEWAY; C=$CONCURRENCY, $REQUESTS requests, ISL $ISL, OSL $OSL"

for tool in $TOOLS; do
  case $tool in
    aiperf)
      # --use-server-token-count --per-chunk-usage: token counts from the gateway's usage (every chunk)
      "$ROOT/.tools/aiperf-venv/bin/aiperf" profile --model ensemble --url "$GATEWAY" --endpoint-type chat \
        --streaming --concurrency "$CONCURRENCY" --request-count "$REQUESTS" --warmup-request-count 8 \
        --prompt-input-tokens-mean "$ISL" --prompt-input-tokens-stddev 0 --prompt-output-tokens-mean "$OSL" \
        --prompt-output-tokens-stddev 0 --extra-inputs "min_tokens:$OSL" --use-legacy-max-tokens \
        --use-server-token-count --per-chunk-usage --tokenizer "$TOKENIZER" --random-seed 0 \
        --output-artifact-dir "$OUT/aiperf-c$CONCURRENCY" --ui-type none 2>&1 | tee "$OUT/aiperf-c$CONCURRENCY.log" ;;
    genai-perf)
      # genai-perf drives NVIDIA's perf_analyzer (.tools/bin) with its OpenAI chat client
      PATH=$ROOT/.tools/bin:$PATH "$ROOT/.tools/genai-perf-venv/bin/genai-perf" profile -m ensemble \
        --endpoint-type chat --url "${GATEWAY#http://}" --streaming --concurrency "$CONCURRENCY" \
        --request-count "$REQUESTS" --warmup-request-count 8 --num-dataset-entries "$REQUESTS" \
        --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 --output-tokens-mean "$OSL" \
        --output-tokens-stddev 0 --extra-inputs "min_tokens:$OSL" --tokenizer "$TOKENIZER" --random-seed 0 \
        --artifact-dir "$OUT/genai-perf-c$CONCURRENCY" 2>&1 | tee "$OUT/genai-perf-c$CONCURRENCY.log" ;;
  esac
done
