"""Judges and text backends from config sections: one small factory per kind.

``make_backend(config.backend)`` builds the text backend of `arr_jax.induce` and
`arr_jax.evaluate` (kinds "world", "openai", "qwen3_vl"). ``build_judge(config.judge)`` builds
the reward judge of `arr_jax.train` as a `arr_jax.judge.reward.RubricJudge`:

    kind                 what judges                                      rubric
    world                TextJudge over the world's programmatic backend  read (criteria named in it)
    world_programmatic   the world's WorldJudge itself (a ceiling)         ignored (logged)
    qwen3_vl             TextJudge over our Flax Qwen3-VL (same process,   read
                         same mesh); one-prefill choice scores by default
    api                  TextJudge over an OpenAI-compatible server;       read
                         one-token log-prob choice scores by default

``judge.rubric`` is a rubric file from `arr_jax.induce` (.txt, or the .json beside it); empty means
the paper's "direct" judge, and the log says so.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

JUDGE_KINDS = ("world", "world_programmatic", "qwen3_vl", "api")


def make_backend(b, rules=None):
    """A TextBackend from a ``backend`` section (kind "world", "openai" or "qwen3_vl": the Flax
    judge on a local Hugging Face snapshot, `arr_jax.judge.vlm_backend.FlaxVLMBackend`)."""
    if b.kind == "world":
        from arr_jax.world.arr_backend import WorldBackend

        return WorldBackend(default_criteria=tuple(b.world.default_criteria), tie_break=b.world.tie_break)
    if b.kind == "openai":
        backend = api_backend(b.openai)
        check_api(backend, b.openai)
        return backend
    if b.kind == "qwen3_vl":
        from arr_jax.judge.vlm_backend import FlaxVLMBackend

        q = b.qwen3_vl
        if not q.model_dir:
            raise ValueError("bad config value qwen3_vl.model_dir: empty (a local Qwen3-VL snapshot directory, "
                             "e.g. Qwen/Qwen3-VL-8B-Instruct, is needed for a qwen3_vl judge)")
        return FlaxVLMBackend.from_snapshot(
            q.model_dir, q.dtype, rules=rules, max_new_tokens=q.max_new_tokens, temperature=q.temperature,
            top_p=q.top_p, seed=q.seed, batch_size=q.batch_size, seq_bucket=q.seq_bucket or None,
            patch_bucket=q.patch_bucket or None, image_bucket=q.image_bucket or None,
            max_length=q.max_length or None, reasoning=q.get("reasoning", "close"))
    raise ValueError(f"bad config value backend.kind: {b.kind!r} (expected 'world', 'openai' or 'qwen3_vl')")


_CHECKED: dict = {}   # (endpoint, model, key variable) -> choice support, checked once per process


def api_backend(o):
    """An `arr_jax.judge.api.OpenAIBackend` from a ``judge.api`` / ``backend.openai`` section
    (not yet checked: see `check_api`)."""
    from arr_jax.judge.api import OpenAIBackend

    kwargs = o.get("chat_template_kwargs", None)
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs
    return OpenAIBackend(model=o.model or None, endpoint=o.endpoint or None, api_key_env=o.api_key_env,
                         timeout=o.timeout, max_retries=o.max_retries, backoff=o.backoff,
                         concurrency=o.concurrency, cache_dir=o.cache_dir or None, temperature=o.temperature,
                         max_tokens=o.max_tokens or None, token_param=o.token_param,
                         image_format=o.image_format, max_image_side=o.max_image_side or None,
                         top_logprobs=o.get("top_logprobs", 20), template_kwargs=kwargs)


def check_api(backend, o=None) -> None:
    """`OpenAIBackend.check` (endpoint, key, model, log-prob support), once per endpoint, model and
    key variable in a process; ``o.check`` False skips it (offline tests of the request path)."""
    if o is not None and not o.get("check", True):
        return
    key = (backend.url, backend.model, backend.api_key_env)
    if key not in _CHECKED:
        _CHECKED[key] = backend.check()["choice_scores"]
    if backend.choice_supported is None:
        backend.choice_supported = _CHECKED[key]


def check_judge(jc) -> None:
    """Start-up check of a ``judge`` section's server (kind "api" only), before a run loads or
    compiles anything: one line saying what is wrong (`OpenAIBackend.check`)."""
    if jc is not None and jc.get("kind", "") == "api":
        check_api(api_backend(_backend_section(jc).openai), jc.api)


def _backend_section(jc):
    """The ``backend`` section `make_backend` reads, from a ``judge`` section."""
    import ml_collections

    kind = {"world": "world", "qwen3_vl": "qwen3_vl", "api": "openai"}[jc.kind]
    b = ml_collections.ConfigDict({"kind": kind, "world": jc.world.to_dict(), "openai": jc.api.to_dict(),
                                   "qwen3_vl": jc.qwen3_vl.to_dict()})
    if jc.get("model_dir", ""):
        b.qwen3_vl.model_dir = jc.model_dir
    if jc.get("model", "") and kind == "openai":
        b.openai.model = jc.model
    return b


def load_rubric(path: str) -> str | None:
    """The rubric text of a rubric file (None for ""), with errors that say what to run first."""
    from arr_jax.arr.rubric_file import load_rubric_text

    if not path:
        return None
    p = Path(path)
    if not (p.exists() or p.with_suffix(".json").exists() or p.with_suffix(".txt").exists()):
        raise FileNotFoundError(f"rubric file {p} does not exist: make it with `python -m arr_jax.induce` "
                                "(it writes <workdir>/rubric.txt), or set --config.judge.rubric='' to judge "
                                "without a rubric (the paper's direct judge)")
    text = load_rubric_text(p)
    if not text.strip():
        raise ValueError(f"rubric file {p} is empty: rerun `python -m arr_jax.induce`, or set "
                         "--config.judge.rubric='' to judge without a rubric")
    return text


def build_judge(jc, *, rules=None, workdir: str | Path | None = None):
    """The `RubricJudge` of a ``judge`` config section (see the module docstring).

    ``judge.prompt_rubrics = "generate"`` adds the paper's prompt-specific rubrics, cached under
    ``judge.prompt_rubrics_dir`` (default ``<workdir>/prompt_rubrics``).
    """
    from arr_jax.judge.api import public_url
    from arr_jax.judge.reward import PromptRubrics, RubricJudge
    from arr_jax.judge.text_judge import TextJudge

    if jc.kind not in JUDGE_KINDS:
        raise ValueError(f"bad config value judge.kind: {jc.kind!r} (expected one of {JUDGE_KINDS})")
    if jc.symmetrize not in ("off", "agree", "mean"):
        raise ValueError(f"bad config value judge.symmetrize: {jc.symmetrize!r} (expected 'off', 'agree' or 'mean')")
    if jc.prompt_rubrics not in ("off", "generate"):
        raise ValueError(f"bad config value judge.prompt_rubrics: {jc.prompt_rubrics!r} (expected 'off' or "
                         "'generate')")
    rubric = load_rubric(jc.rubric)
    if jc.kind == "world_programmatic":
        from arr_jax.world.judge import WorldJudge

        if rubric or jc.prompt_rubrics != "off":
            log.warning("judge.kind 'world_programmatic' checks the world's criteria itself and ignores rubrics")
        return RubricJudge(WorldJudge(), identity={"kind": jc.kind, "model": "world-programmatic"}, host_only=True)
    backend_cfg = _backend_section(jc)
    backend = make_backend(backend_cfg, rules=rules)
    choice = bool(jc.choice_scores) and jc.kind in ("qwen3_vl", "api")
    judge = TextJudge(backend, mode=jc.mode, symmetrize=None if jc.symmetrize == "off" else jc.symmetrize,
                      choice_scores=choice)
    model = {"world": "world-programmatic", "qwen3_vl": backend_cfg.qwen3_vl.model_dir,
             "api": backend_cfg.openai.model}[jc.kind]
    served = {"endpoint": public_url(backend.url)} if jc.kind == "api" else {}
    identity = {"kind": jc.kind, "model": model, **served, "mode": jc.mode, "symmetrize": jc.symmetrize,
                "choice_scores": choice}
    prompt_rubrics = None
    if jc.prompt_rubrics == "generate":
        cache = jc.get("prompt_rubrics_dir", "") or (Path(workdir) / "prompt_rubrics" if workdir else None)
        from arr_jax.judge.reward import prompt_rubric_identity

        section = {"world": backend_cfg.world, "qwen3_vl": backend_cfg.qwen3_vl, "api": backend_cfg.openai}[jc.kind]
        prompt_rubrics = PromptRubrics(backend, cache, k=jc.prompt_rubrics_k, guide=rubric,
                                       identity=prompt_rubric_identity(
                                           jc.kind, section.to_dict(),
                                           backend_cfg.qwen3_vl.model_dir if jc.kind == "qwen3_vl" else None))
    if rubric is None:
        log.warning("judge %s: no rubric file (judge.rubric is empty): judging directly, the paper's baseline",
                    judge.name)
    return RubricJudge(judge, rubric=rubric, rubric_path=jc.rubric or None, prompt_rubrics=prompt_rubrics,
                       identity=identity, host_only=jc.kind in ("world", "api"))


def judge_config(**overrides):
    """The default ``judge`` config section (ml_collections), with ``overrides`` applied.

    kind / rubric / symmetrize / prompt_rubrics as in the module docstring; ``mode``: "pairwise"
    (the reward) | "pointwise" | "listwise"; ``choice_scores``: qwen3_vl reads P(image 1) from
    one prefill, api from one-token log-prob requests (``max_tokens=1``, ``logprobs``,
    ``api.top_logprobs``, no thinking via ``api.chat_template_kwargs``; a server without
    log-probs falls back to generate-and-parse, logged once), instead of decoding and parsing.
    API requests are prefix-cache friendly: the system prompt (instructions and rubric) comes first
    and is byte-identical across pairs, the pair's text and images last, so vLLM's
    ``--enable-prefix-caching`` or SGLang's radix cache reuse it; up to ``api.concurrency`` go out
    at once across pairs and both orders. ``api.check`` checks the endpoint, key, model and
    log-prob support at start-up. ``model_dir`` (qwen3_vl) / ``model`` (api): the
    judge model; ``max_failure_fraction``: the share of pairs of one iteration whose judgement
    may fail (counted, judged as ties) before the run stops with a message; ``order_check_pairs`` /
    ``order_flip_warn``: the trainer's order-flip check of a one-order judge (`RPOTrainer.order_check`).
    """
    import ml_collections

    c = ml_collections.ConfigDict(dict(
        kind="world", rubric="", symmetrize="off", prompt_rubrics="off", prompt_rubrics_k=5,
        prompt_rubrics_dir="", mode="pairwise", choice_scores=True, model_dir="", model="",
        max_failure_fraction=0.1,
        order_check_pairs=4,  # pairs per iteration a one-order judge also judges swapped (order-flip rate); 0: off
        order_flip_warn=0.3,  # warn once when the run's order-flip rate is above this (set judge.symmetrize)
        world=dict(default_criteria=("colour", "shape"), tie_break="first"),
        api=dict(model="", endpoint="", api_key_env="OPENAI_API_KEY", timeout=120.0, max_retries=5,
                 backoff=1.0, concurrency=8, cache_dir="runs/api_cache", temperature=0.0, max_tokens=0,
                 token_param="max_tokens", image_format="png", max_image_side=0, top_logprobs=20,
                 chat_template_kwargs=dict(enable_thinking=False), check=True),
        qwen3_vl=dict(model_dir="", dtype="bfloat16", max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0,
                      batch_size=8, seq_bucket=256, patch_bucket=256, image_bucket=2, max_length=0,
                      reasoning="close"),  # a template opening <think>: "close" it empty or "refuse"
    ))
    c.update(overrides)
    return c
