#!/usr/bin/env bash
# Make the CPU image's base without a container registry: a minimal Debian 12 (bookworm) root file
# system from Debian's package archive (debootstrap), imported as a Docker image. Where a registry can
# be reached, `debian:bookworm-slim` + the same packages does the same job.
#
#   docker/base-image.sh [IMAGE]     # default tritonchat-base:bookworm; skipped when it exists
#
# Needs root, debootstrap and a reachable Debian mirror ($DEBIAN_MIRROR, default deb.debian.org).
# The packages: python3 + venv (the image's venv), libpython3.11 (Triton's Python backend stub links
# it), ca-certificates (pip), libgomp1 (onnxruntime, torch), procps (the healthcheck's process tools).
set -euo pipefail

IMAGE="${1:-tritonchat-base:bookworm}"
DOCKER="${DOCKER_CLI:-/usr/bin/docker}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,libpython3.11,ca-certificates,libgomp1,procps"

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 && [ "${FORCE:-0}" != 1 ]; then
  echo "$IMAGE exists (FORCE=1 rebuilds it)"; exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 3; }
ROOTFS="$(mktemp -d /tmp/tritonchat-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# apt's caches are not part of an image
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' . \
  | "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "built $IMAGE"
