#!/usr/bin/env bash
# Run an arr_jax entry point on every host of a Cloud TPU pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE "python -m arr_jax.train --config configs/flux_dev_t2i.py --config.model_dir=/data/FLUX.1-dev"
#
# Assumes the repo is checked out at the same path on every host (e.g. via a shared disk or a
# prior `gcloud compute tpus tpu-vm scp`). JAX discovers the pod topology itself on TPU VMs;
# arr_jax.distributed_init() calls jax.distributed.initialize() when more than one process runs.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "error: expected 3 arguments, got $#: launch/tpu_pod.sh TPU_NAME ZONE \"python -m arr_jax.train FLAGS\" (the command quoted as one argument)" >&2
  exit 2
fi
if ! command -v gcloud >/dev/null 2>&1; then
  echo "error: gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), run \`gcloud auth login\`, then rerun this command" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CMD=$3
REPO=${REPO:-$HOME/arr_jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && (test -d .venv || (python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]')) && \
   ARR_JAX_DISTRIBUTED=1 .venv/bin/$CMD"
