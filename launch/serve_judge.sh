#!/usr/bin/env bash
# Serve the reward judge (Qwen3-VL-8B-Instruct by default) over an OpenAI-compatible API, then
# point training at it with judge.kind=api. One-token log-prob choice scoring (the default,
# judge.choice_scores=True) needs a server that returns top log-probs and continues an assistant
# message (continue_final_message): vLLM and SGLang / sglang-jax both do.
#
#   launch/serve_judge.sh vllm        # one GPU node: vLLM, prefix caching on
#   launch/serve_judge.sh sglang-jax  # a TPU slice beside the policy's pod: sglang-jax (radix cache)
#   launch/serve_judge.sh flags       # print the --config.judge.* flags for arr_jax.train
#
# Environment: JUDGE_MODEL (HF id or local path), JUDGE_NAME (served name), PORT, TP (tensor
# parallel size), JUDGE_HOST (where training reaches the server), ARR_JUDGE_KEY (optional key;
# training reads it from the variable named by judge.api.api_key_env).
# Then:  python -m arr_jax.train --config configs/flux_dev_t2i.py ... $(launch/serve_judge.sh flags)
set -euo pipefail

JUDGE_MODEL=${JUDGE_MODEL:-Qwen/Qwen3-VL-8B-Instruct}
JUDGE_NAME=${JUDGE_NAME:-qwen3-vl-judge}
PORT=${PORT:-8000}
TP=${TP:-1}
JUDGE_HOST=${JUDGE_HOST:-localhost}
KEY_ARGS=()
if [[ -n "${ARR_JUDGE_KEY:-}" ]]; then KEY_ARGS=(--api-key "$ARR_JUDGE_KEY"); fi

case "${1:-}" in
  vllm)
    # --max-logprobs 20: the judge asks for top_logprobs=20; prefix caching reuses the shared
    # system prompt (instructions + rubric) across every pair; 2 images (or 3 with Kontext's BASE).
    exec vllm serve "$JUDGE_MODEL" \
      --served-model-name "$JUDGE_NAME" \
      --host 0.0.0.0 --port "$PORT" \
      --tensor-parallel-size "$TP" \
      --dtype bfloat16 \
      --max-model-len 16384 \
      --max-logprobs 20 \
      --enable-prefix-caching \
      --limit-mm-per-prompt '{"image": 3}' \
      --gpu-memory-utilization 0.90 \
      "${KEY_ARGS[@]}"
    ;;
  sglang-jax)
    # On the judge's TPU slice (e.g. a v6e-4 beside the policy's pod); TP = chips of the slice.
    JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jit_cache} \
    exec python3 -u -m sgl_jax.launch_server \
      --model-path "$JUDGE_MODEL" \
      --served-model-name "$JUDGE_NAME" \
      --host 0.0.0.0 --port "$PORT" \
      --device tpu --tp-size "$TP" \
      --dtype bfloat16 \
      --context-length 16384 \
      --mem-fraction-static 0.8 \
      --trust-remote-code \
      "${KEY_ARGS[@]}"
    ;;
  flags)
    KEY_FLAGS=""
    if [[ -n "${ARR_JUDGE_KEY:-}" ]]; then KEY_FLAGS=" --config.judge.api.api_key_env=ARR_JUDGE_KEY"; fi
    echo "--config.judge.kind=api --config.judge.model=$JUDGE_NAME" \
         "--config.judge.api.endpoint=http://$JUDGE_HOST:$PORT/v1 --config.judge.choice_scores=True" \
         "--config.judge.symmetrize=mean --config.judge.api.concurrency=64${KEY_FLAGS}"
    ;;
  *)
    echo "usage: $0 vllm | sglang-jax | flags   (see the comments at the top of $0)" >&2
    exit 2
    ;;
esac
