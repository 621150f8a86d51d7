#!/bin/sh
# Runs inside `docker build` (docker/Dockerfile): install tritonchat for FLAVOR (cpu | gpu) from the source
# folder SRC, then the user the image runs as. Kept out of the Dockerfile: Docker 20.10 has no RUN heredocs.
set -eu
FLAVOR="$1"
SRC="$2"
if [ -f /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi
# wheels shipped in the context (.whl/) win over the index: the CPU-only torch wheel, for one
FIND_LINKS=""
if [ -d "$SRC/.whl" ]; then FIND_LINKS="--find-links $SRC/.whl"; fi

case "$FLAVOR" in
  cpu)
    python3 -m venv "$VIRTUAL_ENV"
    PY="$VIRTUAL_ENV/bin/python"
    "$PY" -m pip install --quiet --upgrade pip
    # torch first, so that `pip install .` finds it satisfied instead of fetching a CUDA build
    TORCH_WHEEL="$(ls "$SRC"/.whl/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$TORCH_WHEEL" ]; then "$PY" -m pip install --quiet "$TORCH_WHEEL"; fi
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet $FIND_LINKS "$SRC"
    # the backend directory (Python stub for this Python) now: at run time the root file system is read-only
    "$VIRTUAL_ENV/bin/tritonchat" setup-server
    ;;
  gpu)
    # the NGC container's python3 and server; no venv (the container's Python stub runs its python3)
    python3 -m venv --system-site-packages "$VIRTUAL_ENV"
    PY="$VIRTUAL_ENV/bin/python"
    "$PY" "$SRC/docker/requirements.py" "$SRC/pyproject.toml" --without nvidia-pytriton > /tmp/requirements.txt
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet $FIND_LINKS -r /tmp/requirements.txt
    "$PY" -m pip install --quiet --no-deps "$SRC"
    rm -f /tmp/requirements.txt
    "$VIRTUAL_ENV/bin/tritonchat" setup-server --no-probe || echo "tritonchat setup-server reported a problem (above)"
    ;;
  *)
    echo "FLAVOR must be cpu or gpu, not $FLAVOR" >&2; exit 2 ;;
esac

install -m 0755 "$SRC/docker/entrypoint.sh" /usr/local/bin/tritonchat-entrypoint
# the user the image runs as: no home, no shell, owns nothing of the image
groupadd --gid 10001 tritonchat
useradd --no-create-home --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin tritonchat
mkdir -p /models
# a GPU server's kernel tuning and Triton's compiled kernels (TRITONCHAT_TUNE_CACHE, TRITON_CACHE_DIR): a
# volume there keeps them for the next start (compose's kernel-cache; deploy/k8s/components/kernel-cache). Owned
# by the image's user, so a named volume created from it is writable.
install -d -o 10001 -g 10001 /var/cache/tritonchat
