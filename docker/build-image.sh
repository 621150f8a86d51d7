#!/usr/bin/env bash
# Build a tritonchat image from this checkout's files (tracked + untracked-not-ignored: never .venv or
# build outputs), in a temporary context folder, with Debian's docker CLI and BuildKit.
#
#   docker/build-image.sh cpu [TAG]   # default tritonchat:cpu; FROM tritonchat-base:bookworm (made if missing)
#   docker/build-image.sh gpu [TAG]   # default tritonchat:gpu; FROM the NGC tritonserver image (GPU-only)
#
# cpu: the newest CPU-only torch wheel (torch-*+cpu-cp311-*) on pip's find-links path ($PIP_FIND_LINKS,
# `pip config`) or in $TORCH_WHEEL_DIR goes into the context's .whl/: PyPI's default torch is the CUDA build.
# BASE=... overrides the base image; DOCKER_HOST as usual (docker/dockerd.sh start prints one).
set -euo pipefail

FLAVOR="${1:-}"
case "$FLAVOR" in
  cpu) TAG="${2:-tritonchat:cpu}"; BASE="${BASE:-tritonchat-base:bookworm}" ;;
  gpu) TAG="${2:-tritonchat:gpu}"; BASE="${BASE:-nvcr.io/nvidia/tritonserver:24.10-py3}" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DOCKER="${DOCKER_CLI:-/usr/bin/docker}"
CACERT="${CACERT:-/etc/ssl/certs/ca-certificates.crt}"

CTX="$(mktemp -d /tmp/tritonchat-context.XXXXXX)"
trap 'rm -rf "$CTX"' EXIT
# the checkout's files as git sees them (a clean clone and a working tree give the same list)
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -C "$CTX" -xf -

if [ "$FLAVOR" = cpu ]; then
  "$DOCKER" image inspect "$BASE" >/dev/null 2>&1 || "$HERE/base-image.sh" "$BASE"
  dirs="${TORCH_WHEEL_DIR:-} ${PIP_FIND_LINKS:-}"
  if command -v pip3 >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1; then
    dirs="$dirs $(python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | tr '\n' ' ')"
  fi
  wheel=""
  for d in $dirs; do
    d="${d#file://}"
    [ -d "$d" ] || continue
    found="$(ls "$d"/torch-*+cpu-cp311-cp311-*linux*_"$(uname -m)".whl 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$found" ] && wheel="$found"
  done
  if [ -n "$wheel" ]; then
    mkdir -p "$CTX/.whl" && cp "$wheel" "$CTX/.whl/"
    echo "CPU torch wheel: $(basename "$wheel")"
  else
    echo "warning: no CPU-only torch wheel found (TORCH_WHEEL_DIR): pip takes PyPI's CUDA build (large)" >&2
  fi
fi

secret=()
[ -f "$CACERT" ] && secret=(--secret "id=cacert,src=$CACERT")
DOCKER_BUILDKIT=1 "$DOCKER" build --network host "${secret[@]}" --progress plain \
  -f "$CTX/docker/Dockerfile" --build-arg FLAVOR="$FLAVOR" --build-arg BASE="$BASE" -t "$TAG" "$CTX"
echo "built $TAG"
