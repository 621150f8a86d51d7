#!/usr/bin/env bash
# Start or stop a private Docker daemon for the image tests (tests/test_docker.py) and for CI:
# its own data root, socket and pid file under $DOCKERD_ROOT, host networking only (no bridge, no NAT
# rules), overlay2. Nothing here touches a system daemon.
#
#   docker/dockerd.sh start    # prints the DOCKER_HOST to use; waits until the daemon answers
#   docker/dockerd.sh stop     # SIGTERM by pid file, SIGKILL after 30 s; the data root is kept (image cache)
#   docker/dockerd.sh status   # exit 0 when it answers
#   docker/dockerd.sh purge    # stop, then delete the data root
#
# DOCKERD_ROOT (default /tmp/tritonchat-dockerd) holds data/, exec/, dockerd.pid, dockerd.log, docker.sock.
set -euo pipefail

ROOT="${DOCKERD_ROOT:-/tmp/tritonchat-dockerd}"
PIDFILE="$ROOT/dockerd.pid"
SOCK="$ROOT/docker.sock"
LOG="$ROOT/dockerd.log"
DOCKER="${DOCKER_CLI:-/usr/bin/docker}"  # Debian's CLI: BuildKit builds without buildx
export DOCKER_HOST="unix://$SOCK"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
answers() { "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

case "${1:-}" in
  start)
    command -v dockerd >/dev/null || { echo "dockerd not found: apt-get install docker.io" >&2; exit 3; }
    [ "$(id -u)" = 0 ] || { echo "dockerd needs root" >&2; exit 3; }
    mkdir -p "$ROOT/data" "$ROOT/exec"
    if running && answers; then echo "DOCKER_HOST=$DOCKER_HOST"; exit 0; fi
    # setsid: the daemon outlives this shell but not a `stop`
    setsid dockerd --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none \
      --data-root="$ROOT/data" --exec-root="$ROOT/exec" --pidfile="$PIDFILE" -H "$DOCKER_HOST" \
      >"$LOG" 2>&1 < /dev/null &
    for _ in $(seq 1 120); do
      if answers; then echo "DOCKER_HOST=$DOCKER_HOST"; exit 0; fi
      if ! kill -0 $! 2>/dev/null; then break; fi
      sleep 0.5
    done
    echo "dockerd did not start; last lines of $LOG:" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
    ;;
  stop|purge)
    if running; then
      pid="$(cat "$PIDFILE")"
      kill -TERM "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
    fi
    rm -f "$PIDFILE"
    if [ "$1" = purge ]; then
      # overlay mounts left by a killed daemon would make rm fail
      grep -o " $ROOT/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
      rm -rf "$ROOT"
    fi
    ;;
  status)
    running && answers && { echo "DOCKER_HOST=$DOCKER_HOST"; exit 0; }
    exit 1
    ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
