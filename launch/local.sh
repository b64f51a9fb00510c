#!/usr/bin/env bash
# Starts N training processes on this machine that form one multi-process JAX run
# (coordinator on 127.0.0.1, CPU collectives over gloo): the multi-host code path
# without a cluster.
#
#   launch/local.sh N [--devices-per-process K] -- MAIN_ARGS...
#   launch/local.sh 2 --devices-per-process 2 -- --config=configs/testing.py --workdir=/tmp/mp
#
# Each process gets K simulated CPU devices (default 1) and its share of the data.
# Process i logs to stdout with the prefix "[i]"; the first failure stops the others.
# Environment: PYTHON (default: python), PORT (default: a free port; if another program takes it before the
# coordinator binds it, the start is retried with a new one, up to 3 times).
set -euo pipefail

usage() { echo "usage: $0 N [--devices-per-process K] -- MAIN_ARGS..." >&2; exit 2; }
[[ $# -ge 2 ]] || usage
N=$1; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$N'" >&2; usage; }
K=1
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --devices-per-process) K=$2; shift 2 ;;
    *) echo "unknown option '$1'" >&2; usage ;;
  esac
done
[[ $# -gt 0 && "$1" == "--" ]] || usage
shift
PYTHON=${PYTHON:-python}

# A port free on every interface (the coordinator listens on [::]:PORT).
free_port() {
  "$PYTHON" -c 'import socket
try:
  s = socket.socket(socket.AF_INET6); s.bind(("::", 0))
except OSError:
  s = socket.socket(); s.bind(("", 0))
print(s.getsockname()[1])'
}

# Drop a device count inherited from the environment (e.g. the test suite's 8): K wins.
BASE_XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
LOG=$(mktemp)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'cleanup; rm -f "$LOG"' EXIT
trap 'cleanup; exit 130' INT TERM

# Starts the N processes on port $1; returns 0 when all of them succeed.
run_once() {
  local port=$1 status=0
  shift
  pids=()
  : > "$LOG"
  for ((i = 0; i < N; i++)); do
    JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    XLA_FLAGS="$BASE_XLA_FLAGS --xla_force_host_platform_device_count=$K" \
      "$PYTHON" -m vit_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$N" --process_id="$i" "$@" \
      > >(sed -u "s/^/[$i] /" | tee -a "$LOG") 2>&1 &
    pids+=($!)
  done
  for ((i = 0; i < N; i++)); do
    # The first process to fail stops the others (they would wait for it forever).
    if ! wait -n; then
      status=1
      cleanup
    fi
  done
  return $status
}

for attempt in 1 2 3; do
  port=${PORT:-$(free_port)}
  if run_once "$port" "$@"; then
    exit 0
  fi
  sleep 0.2  # let the output pipes drain into the log
  # The free port was taken by someone else before the coordinator bound it: retry on another one.
  if [[ -z "${PORT:-}" ]] && grep -q "Failed to add port to server\|Failed to start RPC server\|coordinator port [0-9]* is already in use" "$LOG"; then
    echo "launch/local.sh: port $port was taken before the coordinator could bind it; retrying with another" >&2
    continue
  fi
  exit 1
done
exit 1
