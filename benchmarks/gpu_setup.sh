# Sourced by the GPU scripts (gpu_triton.sh, gpu_issue18.sh) on the GPU machine, from the repository
# root with the wheels in .whl/: installs them, the package and tritonserver's Python backend, then
# leaves the shell in /tmp with REPO_ROOT set to the checkout.
REPO_ROOT=$PWD
# into the image's own environment: the Python backend stub imports from there.
# numpy 1.26: the 24.10 Python backend stub (pybind11 built for numpy 1.x; nvidia-pytriton pins
# numpy<2) reads numpy 2 arrays with the wrong item size (seen: every prompt arrived as its first
# byte repeated). scipy and scikit-learn go: they need numpy 2 and transformers imports them.
# The nvidia-pytriton wheel may come as a trimmed tarball (only the stub of this Python) to fit
# the 64 MiB that travel to the GPU machine.
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f /tmp/.tritonchat-gpu-setup ]; then  # once a machine: a second script in the same call skips it
python3 -m pip uninstall -y -q scikit-learn scipy 2>/dev/null || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl
[ -f .whl/pytriton-min.tar.xz ] && tar -xJf .whl/pytriton-min.tar.xz -C "$SITE"
touch /tmp/.tritonchat-gpu-setup
fi
# the package again whenever the checkout changed: a later call on a warm machine brings a new tree,
# and the servers import the installed copy (a stale one once ran a call under the last call's defaults)
tree=$(find pyproject.toml tritonchat build client gateway loadtest python_backend model_repository -type f \
         -not -path '*/__pycache__/*' | sort | xargs cat | md5sum)
if [ "$(cat /tmp/.tritonchat-gpu-package 2>/dev/null)" != "$tree" ]; then
python3 -m pip install -q --no-deps --no-build-isolation --no-compile . 2>&1 | tail -2
rm -rf /tmp/repo-* /tmp/multiturn*  # repositories the scripts keep were built by the last copy
echo "$tree" > /tmp/.tritonchat-gpu-package
fi
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
# the multi-turn benchmark's text travels compressed (gpu_carry.sh)
sh_data=${TRITONCHAT_SHARED:-$PWD/.carry/shared}/data
[ -f "$sh_data/tinyshakespeare.txt.xz" ] && [ ! -f "$sh_data/tinyshakespeare.txt" ] && xz -dk "$sh_data/tinyshakespeare.txt.xz"
# Python stacks of a crashing generator stub (python_backend/generator.py reads it). One entry with
# "<no Python frame>" per server stop is the stub's teardown, after every response went out.
export TRITONCHAT_FAULTHANDLER=${TRITONCHAT_FAULTHANDLER:-$OUT/generator-faults.txt}
cd /tmp  # the checkout's own tritonchat/ folder would shadow the installed, mapped package
[ -f /tmp/.tritonchat-gpu-server ] || { python3 -m tritonchat.cli setup-server && touch /tmp/.tritonchat-gpu-server; }
# the seeded TinyLlama-1.1B-shaped Llama the server benchmarks measure (bf16, the Llama-2 tokenizer):
# `make_model` writes it to $MODEL once a machine (~2 GB: only the steps that serve it ask)
MODEL=/tmp/tinyllama-shape
# a variant of settings as the scripts' VARIANTS words give it ("prefill_token_budget=1024,pdl=false";
# "default": none; keys are models.generator's, or the entry's as ensemble.KEY: "ensemble.generate=entry"):
# its name for files, and the YAML lines under `models:` (generator and ensemble)
variant_name() { echo "${1//[=,:]/-}"; }
variant_models() {
  local kv gen="" ens=""
  for kv in $(echo "${1#default}" | tr , ' '); do
    case $kv in
      ensemble.*) kv=${kv#ensemble.}; ens="$ens${ens:+, }${kv/=/: }" ;;
      *) gen="$gen${gen:+, }${kv/=/: }" ;;
    esac
  done
  printf '  generator: {%s}\n  ensemble: {%s}\n' "$gen" "$ens"
}
make_model() {
  [ -f $MODEL/config.json ] || python3 -m tritonchat.cli synthetic-model --arch llama --tokenizer llama2 --out $MODEL \
      --layers 22 --hidden 2048 --heads 32 --kv-heads 4 --intermediate 5632 --max-positions 2048 --dtype bfloat16
}
