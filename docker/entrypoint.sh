#!/bin/sh
# The image's entry point: `tritonchat "$@"`, through NVIDIA's own entry point where the NGC base has one
# (it sets up CUDA forward compatibility and prints the driver banner).
if [ -x /opt/nvidia/nvidia_entrypoint.sh ]; then
  exec /opt/nvidia/nvidia_entrypoint.sh tritonchat "$@"
fi
exec tritonchat "$@"
