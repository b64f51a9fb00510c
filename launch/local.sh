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
# Environment: PYTHON (default: python), PORT (default: a free port).
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
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# Drop a device count inherited from the environment (e.g. the test suite's 8): K wins.
BASE_XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
  XLA_FLAGS="$BASE_XLA_FLAGS --xla_force_host_platform_device_count=$K" \
    "$PYTHON" -m vit_jax.main --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

status=0
for ((i = 0; i < N; i++)); do
  # The first process to fail stops the others (they would wait for it forever).
  if ! wait -n; then
    status=1
    cleanup
  fi
done
trap - EXIT
exit $status
