"""ARR rubric induction on the synthetic world with its programmatic judge as the "VLM".

    python -m arr_jax.induce --config configs/induce_world.py

Variants: "" (default), "tiny" (the test size: 50 pairs), "api" (an OpenAI-compatible model
over local JSONL pairs; set backend.openai.model, backend.openai.endpoint and data.path;
induction.choice_scores=True verifies from one-token log-probs), "qwen3_vl" (the Flax Qwen3-VL
judge on a local snapshot; set backend.qwen3_vl.model_dir).

Departures from the paper's defaults (SPEC §1), for the world only: K = 2 rubrics per pair
(the world has five criteria; at K = 5 the first pass names them all and nothing is ever
refined) and 10% label noise (so that discarding has something to do).
"""
import ml_collections


def data_config(**kw) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict(dict(
        kind="world",          # "world" | "jsonl" | "tfds"
        # world: pairs = a render of the prompt vs a render differing in one attribute
        split="train", n_pairs=100, seed=0, image_size=32, label_noise=0.0, preferred_first=True,
        # jsonl / tfds: the local pairs format of arr_jax.data.preference_tfds
        path="", data_dir="runs/preference_data", name="pairs", tfds_split="train",
        limit=0,               # 0 = all pairs
    ))
    d.update(kw)
    return d


def backend_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        kind="world",          # "world" | "openai" | "qwen3_vl"
        world=dict(default_criteria=("colour", "shape"), tie_break="first"),
        openai=dict(model="", endpoint="", api_key_env="OPENAI_API_KEY", timeout=120.0, max_retries=5,
                    backoff=1.0, concurrency=8, cache_dir="runs/api_cache", temperature=0.0, max_tokens=0,
                    token_param="max_tokens", image_format="png", max_image_side=0,  # 0 = as is
                    # choice scoring (induction.choice_scores / judge.choice_scores): one-token log-prob
                    # requests, without thinking; check: endpoint, key, model and log-probs at start-up
                    top_logprobs=20, chat_template_kwargs=dict(enable_thinking=False), check=True),
        # the Flax judge (arr_jax.judge.vlm_backend): a local HF snapshot, e.g. Qwen3-VL-8B-Instruct
        qwen3_vl=dict(model_dir="", dtype="bfloat16", max_new_tokens=1024, temperature=0.0, top_p=1.0, seed=0,
                      batch_size=8, seq_bucket=256, patch_bucket=256, image_bucket=2,
                      max_length=0,   # 0 = the model's max_position_embeddings
                      # a chat template whose generation prompt opens <think>: "close" it empty or "refuse"
                      reasoning="close"),
    ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/arr_world"
    c.progress = True
    c.data = data_config(n_pairs=100, label_noise=0.1)
    c.backend = backend_config()
    c.induction = ml_collections.ConfigDict(dict(
        k=2,                   # rubrics per pair (paper: 5; see the module docstring)
        t_max=5,               # refinement rounds before a pair is discarded
        verify_orders="both",  # "both" | "random" | "given" (see arr_jax.arr.induction)
        batch_pairs=16,
        max_themes=5, tips_per_theme=4, structure_retries=2, seed=0,
        max_failure_fraction=0.1,  # pairs that fail (unreadable, rejected, no answer) before the run stops
        guide="",              # few-shot exemplars JSONL ("with guide" mode); "" = zero-shot
        templates_dir="",      # a folder of prompt templates overriding arr_jax/judge/prompts
        choice_scores=False,   # verify from one-token choice scores (openai / qwen3_vl): faster, no reason
    ))
    if arg == "tiny":
        c.workdir = "runs/arr_world_tiny"
        c.data.n_pairs = 50
    elif arg == "api":
        c.workdir = "runs/arr_api"
        c.data = data_config(kind="jsonl")
        c.backend.kind = "openai"
        c.induction.k = 5
    elif arg == "qwen3_vl":
        c.workdir = "runs/arr_qwen3_vl"
        c.backend.kind = "qwen3_vl"
        c.induction.k = 5
        c.induction.batch_pairs = 8
    elif arg not in (None, "", "default"):
        raise ValueError(f"unknown induce_world variant {arg!r}; use '', 'tiny', 'api' or 'qwen3_vl'")
    return c
