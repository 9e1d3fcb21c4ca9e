#!/usr/bin/env bash
# Multi-host GPU launch (one process per host, all local GPUs per process), e.g. under Slurm:
#
#   srun --nodes=4 --ntasks-per-node=1 launch/gpu_multihost.sh python -m arr_jax.train \
#       --config configs/flux_dev_t2i.py --config.model_dir=/data/FLUX.1-dev --config.prompts_file=/data/prompts.txt \
#       --config.eval.prompts_file=/data/heldout.txt --config.judge.rubric=/data/rubric.txt \
#       --config.judge.model_dir=/data/Qwen3-VL-8B-Instruct
#
# JAX reads the coordinator address, process count and id from the Slurm environment.
# Outside Slurm (and Open MPI), set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
# and JAX_PROCESS_ID on every host instead. On one machine, run the command without this script.
set -euo pipefail
usage="launch/gpu_multihost.sh COMMAND...: run it under Slurm (srun --nodes=N --ntasks-per-node=1 launch/gpu_multihost.sh python -m arr_jax.train FLAGS), or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host; on one machine run the command without this script"
if [ $# -eq 0 ]; then
  echo "error: no command given. $usage" >&2
  exit 2
fi
if [ -z "${SLURM_JOB_ID:-}${SLURM_PROCID:-}${OMPI_COMM_WORLD_SIZE:-}" ] \
   && [ -z "${JAX_COORDINATOR_ADDRESS:-}" ] && [ -z "${JAX_NUM_PROCESSES:-}" ] && [ -z "${JAX_PROCESS_ID:-}" ]; then
  echo "error: not inside a Slurm job (no SLURM_JOB_ID) and no JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set. $usage" >&2
  exit 2
fi
export ARR_JAX_DISTRIBUTED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "$@"
