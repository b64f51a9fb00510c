#!/usr/bin/env bash
# Trains on a Cloud TPU VM / pod slice: create it, put the code on every worker, install, start
# `python -m vit_jax.main` on all workers, stream worker 0's log, delete it.
#
#   launch/tpu_pod.sh ACTION... --name NAME --zone ZONE --type ACCELERATOR_TYPE --version RUNTIME [options] \
#       [-- MAIN_ARGS...]
#
# ACTION (one or more, in this order): create, copy, install, train, logs, delete; or all (= create copy
# install train logs).
#   create    a TPU VM (gcloud compute tpus tpu-vm create), or with --queued a queued resource that waits
#             for capacity (gcloud compute tpus queued-resources create, polled until ACTIVE)
#   copy      the code to ~/vit_jax on every worker: this checkout's git-tracked files (tar over scp), or
#             with --repo URL a `git clone` on the workers
#   install   pip install -e ".[tpu]" on every worker (jax with libtpu at the matching version)
#   train     python -m vit_jax.main MAIN_ARGS on every worker (in the background, log ~/train.log);
#             jax.distributed.initialize() finds the pod's workers itself
#   logs      streams worker 0's ~/train.log
#   delete    deletes the TPU VM (and the queued resource)
# Options:
#   --project P          gcloud project (default: gcloud's)
#   --spot | --reserved  capacity kind (default: on-demand)
#   --queued             go through a queued resource (NAME-qr)
#   --repo URL [--ref R] clone URL (at branch/tag R) instead of copying this checkout
#   --dry-run            print every command, run none
#
# Example (v5e-256, ViT-B/16 on ImageNet-21k in a bucket):
#   launch/tpu_pod.sh all --name vit-pod --zone us-west4-a --type v5litepod-256 --version v2-alpha-tpuv5-lite \
#     --spot --queued -- --config=configs/vit_pretrain.py:recipe=i21k,model=ViT-B_16 \
#     --config.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/runs/b16
set -euo pipefail

usage() { sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

ACTIONS=() NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" CAPACITY="" QUEUED=0 REPO="" REF="" DRY=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    create|copy|install|train|logs|delete) ACTIONS+=("$1"); shift ;;
    all) ACTIONS+=(create copy install train logs); shift ;;
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --spot) CAPACITY=--spot; shift ;;
    --reserved) CAPACITY=--reserved; shift ;;
    --queued) QUEUED=1; shift ;;
    --repo) REPO=$2; shift 2 ;;
    --ref) REF=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument '$1'" >&2; usage ;;
  esac
done
MAIN_ARGS=()
[[ $# -gt 0 && "$1" == "--" ]] && { shift; MAIN_ARGS=("$@"); }
[[ ${#ACTIONS[@]} -gt 0 ]] || { echo "give at least one action" >&2; usage; }
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "--name and --zone are required" >&2; usage; }
wants() { local a; for a in "${ACTIONS[@]}"; do [[ "$a" == "$1" ]] && return 0; done; return 1; }
if wants create && [[ -z "$TYPE" || -z "$VERSION" ]]; then
  echo "create needs --type (e.g. v5litepod-256, v4-128, v5p-128, v6e-256) and --version (the TPU runtime, e.g." \
       "v2-alpha-tpuv5-lite, tpu-ubuntu2204-base, v2-alpha-tpuv5, v2-alpha-tpuv6e)" >&2
  exit 2
fi
if wants train && [[ ${#MAIN_ARGS[@]} -eq 0 ]]; then
  echo "train needs the arguments of vit_jax.main after --, e.g. -- --config=... --workdir=gs://..." >&2
  exit 2
fi

# One word for a shell: as is when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() { local first=1 a; for a in "$@"; do ((first)) || printf ' '; first=0; quote "$a"; done; printf '\n'; }
run() { if ((DRY)); then show "$@"; else show "$@" >&2; "$@"; fi; }

GCLOUD=(gcloud compute tpus)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
CAP=()
[[ -n "$CAPACITY" ]] && CAP=("$CAPACITY")
ssh_all() { run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

if wants create; then
  if ((QUEUED)); then
    run "${GCLOUD[@]}" queued-resources create "$NAME-qr" --node-id="$NAME" "${LOC[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$VERSION" "${CAP[@]}"
    if ((DRY)); then
      show "${GCLOUD[@]}" queued-resources describe "$NAME-qr" "${LOC[@]}" --format='value(state.state)'
    else
      until [[ "$("${GCLOUD[@]}" queued-resources describe "$NAME-qr" "${LOC[@]}" --format='value(state.state)')" \
               == ACTIVE ]]; do echo "waiting for $NAME-qr to become ACTIVE..." >&2; sleep 60; done
    fi
  else
    run "${GCLOUD[@]}" tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE" --version="$VERSION" "${CAP[@]}"
  fi
fi

if wants copy; then
  if [[ -n "$REPO" ]]; then
    clone="git clone --depth=1 $( [[ -n "$REF" ]] && printf -- '--branch %s ' "$(quote "$REF")")$(quote "$REPO") ~/vit_jax"
    ssh_all "rm -rf ~/vit_jax && $clone"
  else
    cd "$(git rev-parse --show-toplevel)"
    if ((DRY)); then
      show tar czf /tmp/vit_jax_code.tgz -T '<(git ls-files)'
    else
      git ls-files -z | tar czf /tmp/vit_jax_code.tgz --null -T -
    fi
    run "${GCLOUD[@]}" tpu-vm scp /tmp/vit_jax_code.tgz "$NAME:~/vit_jax_code.tgz" "${LOC[@]}" --worker=all
    ssh_all "rm -rf ~/vit_jax && mkdir -p ~/vit_jax && tar xzf ~/vit_jax_code.tgz -C ~/vit_jax"
  fi
fi

if wants install; then
  ssh_all 'cd ~/vit_jax && python3 -m pip install -q -e ".[tpu]"'
fi

if wants train; then
  args=""
  for a in "${MAIN_ARGS[@]}"; do args+=" $(quote "$a")"; done
  ssh_all "cd ~/vit_jax && nohup python3 -m vit_jax.main$args > ~/train.log 2>&1 &"
fi

if wants logs; then
  run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker=0 --command='tail -n +1 -F ~/train.log'
fi

if wants delete; then
  if ((QUEUED)); then
    run "${GCLOUD[@]}" queued-resources delete "$NAME-qr" "${LOC[@]}" --force --quiet
  else
    run "${GCLOUD[@]}" tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
fi
