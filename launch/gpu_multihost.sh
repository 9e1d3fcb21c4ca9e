#!/usr/bin/env bash
# Multi-host GPU launch (one process per host, all local GPUs per process), e.g. under Slurm:
#
#   srun --nodes=4 --ntasks-per-node=1 launch/gpu_multihost.sh python -m arr_jax.train \
#       --config configs/flux_dev_t2i.py --config.model_dir=/data/FLUX.1-dev --config.prompts_file=/data/prompts.txt \
#       --config.eval.prompts_file=/data/heldout.txt --config.judge.rubric=/data/rubric.txt \
#       --config.judge.model_dir=/data/Qwen3-VL-8B-Instruct
#
# JAX reads the coordinator address, process count and id from the Slurm environment.
set -euo pipefail
export ARR_JAX_DISTRIBUTED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "$@"
