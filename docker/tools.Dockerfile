# Stand-ins for the official redis and prometheus images where no container registry can be reached: Debian's
# redis-server 7.0 and prometheus 2.42 (with promtool) on the same local base as the CPU image.
#
#   DOCKER_BUILDKIT=1 docker build --network host -f docker/tools.Dockerfile -t tritonchat-tools docker
#   REDIS_IMAGE=tritonchat-tools PROMETHEUS_IMAGE=tritonchat-tools docker-compose -f docker/compose.yaml up -d ...
ARG BASE=tritonchat-base:bookworm
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown 10001:10001 /prometheus
USER 10001:10001
