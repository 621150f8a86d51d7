#!/usr/bin/env bash
# Makes what the GPU scripts carry to the device machine (Python 3.12 there, no network), from a
# checkout where `bash setup.sh` ran (.venv with nvidia-pytriton, network to PyPI):
#   .whl/   numpy 1.26 (the 24.10 stub's), tritonclient 2.51 without its perf_analyzer binaries,
#           grpcio, protobuf, python-rapidjson, and pytriton-min.tar.xz: the nvidia-pytriton wheel's
#           files with only the Python 3.12 backend stub (gpu_setup.sh unpacks it)
#   .carry/shared/tokenizers/llama2   the tokenizer of the TinyLlama-shaped model
#   .carry/shared/data/tinyshakespeare.txt.xz   the multi-turn benchmark's user messages
# About 62 MiB of the 64 the device tool carries. Then: run(carry=[".whl", ".carry"], ...).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .whl && mkdir -p .whl
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
.venv/bin/pip download -q --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all: -d "$tmp" \
    numpy==1.26.4 tritonclient==2.51.0 grpcio==1.85.3 protobuf==6.33.6 python-rapidjson==1.25
# tritonclient's wheel is 14 MB, 13.9 of them two copies of perf_analyzer: not needed there
(cd "$tmp" && mkdir tc && cd tc && unzip -q ../tritonclient-*.whl && rm -rf tritonclient-*.data/data \
    && sed -i '/data\/bin\/perf/d' tritonclient-*.dist-info/RECORD && rm ../tritonclient-*.whl \
    && zip -q -r ../tritonclient-2.51.0-py3-none-manylinux1_x86_64.whl . && cd .. && rm -rf tc)
mv "$tmp"/*.whl .whl/
dist=$(cd "$SITE" && ls -d nvidia_pytriton-*.dist-info)
tar -C "$SITE" -cJf .whl/pytriton-min.tar.xz --exclude='__pycache__' \
    --exclude='pytriton/tritonserver/python_backend_stubs/3.[0-9]' \
    --exclude='pytriton/tritonserver/python_backend_stubs/3.1[013]' pytriton nvidia_pytriton.libs "$dist"
mkdir -p .carry/shared/tokenizers
cp -r "${TRITONCHAT_SHARED:-../shared}/tokenizers/llama2" .carry/shared/tokenizers/
# xz: 1.1 MB -> 0.4 (the 64 MiB are nearly full; gpu_setup.sh unpacks it there)
mkdir -p .carry/shared/data && rm -f .carry/shared/data/tinyshakespeare.txt* \
    && xz -9 -c "${TRITONCHAT_SHARED:-../shared}/data/tinyshakespeare.txt" > .carry/shared/data/tinyshakespeare.txt.xz
du -sh .whl .carry
