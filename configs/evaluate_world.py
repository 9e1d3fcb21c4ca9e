"""Judge evaluation on held-out world pairs, with and without the induced rubric.

    python -m arr_jax.induce --config configs/induce_world.py      # writes runs/arr_world/rubric.txt
    python -m arr_jax.evaluate --config configs/evaluate_world.py

Variants: "" (500 held-out pairs), "tiny" (100), "api" (an OpenAI-compatible judge on a local
JSONL test set; set backend.openai.model, backend.openai.endpoint, data.path and rubric;
judge.choice_scores=True reads P(image 1) from one-token log-probs), "qwen3_vl" (the Flax Qwen3-VL
judge; set backend.qwen3_vl.model_dir; judge.choice_scores=True reads P(image 1) from the rank
token's logits instead of decoding an answer).
"""
import importlib.util
from pathlib import Path

import ml_collections


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"_arr_configs_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_induce = _sibling("induce_world")  # shares the data / backend sections
data_config, backend_config = _induce.data_config, _induce.backend_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/arr_world_eval"
    c.title = "synthetic world, held-out prompts"
    c.progress = True
    c.data = data_config(split="heldout", n_pairs=500, seed=1)
    c.backend = backend_config()   # kind "world_programmatic" = WorldJudge itself (reference)
    c.judge = ml_collections.ConfigDict(dict(mode="pairwise", task_description="", templates_dir="",
                                             choice_scores=False))  # P(image 1) from one prefill (qwen3_vl) or
                                                                    # one-token log-probs (api) instead of text
    c.rubric = "runs/arr_world/rubric.txt"
    c.conditions = ("direct", "rubric")
    c.batch_size = 64
    c.max_failure_fraction = 0.1   # pairs that fail (unreadable, rejected, no answer) before the run stops
    if arg == "tiny":
        c.workdir = "runs/arr_world_eval_tiny"
        c.data.n_pairs = 100
        c.rubric = "runs/arr_world_tiny/rubric.txt"
    elif arg == "api":
        c.workdir = "runs/arr_api_eval"
        c.data = data_config(kind="jsonl", tfds_split="test")
        c.backend.kind = "openai"
        c.batch_size = 32
    elif arg == "qwen3_vl":
        c.workdir = "runs/arr_qwen3_vl_eval"
        c.backend.kind = "qwen3_vl"
        c.rubric = "runs/arr_qwen3_vl/rubric.txt"
        c.batch_size = 16
    elif arg not in (None, "", "default"):
        raise ValueError(f"unknown evaluate_world variant {arg!r}; use '', 'tiny', 'api' or 'qwen3_vl'")
    return c
