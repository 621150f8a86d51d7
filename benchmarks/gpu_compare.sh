#!/usr/bin/env bash
# The same GPU sweep (benchmarks/gpu_triton.sh) for several versions of the code, alternating:
# round 1 runs every tree in order, round 2 in reverse order, and so on, so that a drift of the
# machine during the call falls on every version alike. Each tree is a checkout (e.g. from
# `git archive COMMIT | tar -x -C .cmp/NAME`); each one builds its own repository from the same
# synthetic model (made once) and runs its own gpu_triton.sh, which installs that tree.
#
#   TREES=".cmp/old .cmp/mid ." ROUNDS=1 LEVELS=16,64 bash benchmarks/gpu_compare.sh \
#       --requests-per-level 640 --max-seconds-per-level 20
#
# ROUND_OFFSET=k numbers the rounds from k+1 (a later call continuing the alternation: with 1, its
# first round runs the trees in reverse). $OUT gets one log per run (NAME-rK.log) and summary.txt
# (each run's rows of the bench's table).
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$PWD
read -r -a trees <<< "${TREES:?name the trees, e.g. TREES=\".cmp/old .\"}"
for ((r = 1; r <= ${ROUNDS:-1}; r++)); do
  order=("${trees[@]}")
  if (( (r + ${ROUND_OFFSET:-0}) % 2 == 0 )); then  # even rounds: reverse order
    order=(); for ((i = ${#trees[@]} - 1; i >= 0; i--)); do order+=("${trees[i]}"); done
  fi
  for t in "${order[@]}"; do
    name=$(basename "$(cd "$t" && pwd)"); [ "$t" = . ] && name=head
    k=$((r + ${ROUND_OFFSET:-0}))
    [ -e "$t/.whl" ] || ln -s "$ROOT/.whl" "$t/.whl"
    rm -rf /tmp/repo-tinyllama  # every tree builds its own repository (its own model.py files)
    start=$(date +%s)
    ( cd "$t" && OUT=/tmp/runs/$name-r$k PEERS= bash benchmarks/gpu_triton.sh "$@" ) \
        > "$OUT/$name-r$k.log" 2>&1 || echo "$name round $k failed" >> "$OUT/summary.txt"
    { echo "== $name round $k ($(( $(date +%s) - start )) s)";
      grep -E '^\| (tritonserver|source)' /tmp/runs/$name-r$k/bench/bench.md 2>/dev/null || tail -5 "$OUT/$name-r$k.log"; } >> "$OUT/summary.txt"
  done
done
cat "$OUT/summary.txt"
