"""The judge as RPO and its evaluator use it: a pairwise judge plus the run's rubric.

`RubricJudge` puts the rubric file's text (ARR's Theme + Tips protocol, SPEC §1 step 5) into
every request of a run, training and evaluation alike; adds the prompt-specific criteria of
`PromptRubrics` when the config asks for them (the paper's zero-shot ARR step, applied per
prompt); and passes editing sources so the judge sees Image BASE first. ``identity`` (judge
kind, model, rubric path and sha256) goes into run, checkpoint and LoRA metadata.

`PromptRubrics` decomposes each prompt into K binary criteria with the judge's own text
backend ("decompose" template), once: answers are cached on disk by (prompt, judge identity,
template), so a prompt is decomposed once per run and once across resumes.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from arr_jax.judge.base import PairwiseBatch
from arr_jax.policies.base import PromptItem, as_items

log = logging.getLogger(__name__)


def rubric_sha256(text: str | None) -> str | None:
    """sha256 of a rubric text as judges read it (None: no rubric, the paper's "direct" judge)."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# Backend settings that do not change an answer (transport, batching, where caches live).
_NOT_ANSWER_SETTINGS = frozenset({"api_key_env", "timeout", "max_retries", "backoff", "concurrency", "cache_dir",
                                  "batch_size", "seq_bucket", "patch_bucket", "image_bucket"})


def prompt_rubric_identity(kind: str, backend_settings: dict, model_dir: str | None = None) -> dict:
    """The judge part of the prompt-rubric cache key (`PromptRubrics`), in one place:

      * ``kind``: the judge kind (api / qwen3_vl / world);
      * ``settings``: the backend's settings that change an answer: for an API judge the
        ``endpoint`` and ``model`` (two servers may serve different weights under one model name),
        sampling (temperature, token budget, top_p, seed, reasoning) and image encoding
        (``image_format``, ``max_image_side``); everything but `_NOT_ANSWER_SETTINGS`;
      * ``weights``: for a local model, a fingerprint of ``model_dir``'s config and weight files
        (`arr_jax.convert.snapshot._files_fingerprint`), so re-trained weights in the same folder miss.

    `PromptRubrics` adds the rest: ``k``, the guide (rubric file) sha256 and the decompose template
    text; the file name adds the prompt and a hash of its source image."""
    settings = {k: v for k, v in sorted(backend_settings.items()) if k not in _NOT_ANSWER_SETTINGS}
    out = {"kind": kind, "settings": settings}
    if model_dir and Path(model_dir).is_dir():
        from arr_jax.convert.snapshot import _files_fingerprint

        out["weights"] = _files_fingerprint(Path(model_dir))
    return out


class PromptRubrics:
    """Prompt-specific criteria from a `TextBackend`, cached on disk (one JSON file per prompt).

    Args:
      backend:    the judge's text backend (answers the "decompose" template).
      cache_dir:  folder of the cache ("" / None: memory only).
      k:          criteria per prompt (SPEC §1: K = 5).
      guide:      the rubric file's text, shown as guidance (or None).
      identity:   what fixes the answers (judge kind, model); hashed into the cache key with the
                  template text, so another judge or template never reads stale entries.
      templates:  a `arr_jax.judge.templates.TemplateSet` (default: the package prompts).

    ``stats``: ``lookups``, ``hits`` (memory or disk), ``decompositions`` (backend requests) and
    ``failures`` (answers without usable criteria: that prompt is judged by the rubric file alone).
    """

    def __init__(self, backend, cache_dir: str | Path | None, *, k: int = 5, guide: str | None = None,
                 identity: dict | None = None, templates=None):
        from arr_jax.judge.templates import TemplateSet

        if k < 1:
            raise ValueError(f"prompt rubrics: k must be >= 1, got {k}")
        self.backend, self.k, self.guide = backend, int(k), guide
        self.templates = templates or TemplateSet()
        key = json.dumps({"identity": identity or {"backend": getattr(backend, "name", "?")}, "k": self.k,
                          "guide": rubric_sha256(guide), "template": self.templates.get("decompose").text},
                         sort_keys=True, default=str)
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / self.key if cache_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._mem: dict[tuple[str, str], list[str]] = {}
        self.stats = {"lookups": 0, "hits": 0, "decompositions": 0, "failures": 0}

    def _file(self, prompt: str, source_key: str) -> Path:
        return self.dir / (hashlib.sha256(f"{prompt}\0{source_key}".encode()).hexdigest()[:40] + ".json")

    @staticmethod
    def _source_key(item: PromptItem) -> str:
        if item.source is None:
            return ""
        return hashlib.sha1(np.ascontiguousarray(item.source).tobytes()).hexdigest()

    def _load(self, item: PromptItem, sk: str) -> list[str] | None:
        if (item.text, sk) in self._mem:
            return self._mem[(item.text, sk)]
        if self.dir is None or not self._file(item.text, sk).exists():
            return None
        from arr_jax.checkpoint import read_json

        d = read_json(self._file(item.text, sk), default=None)  # a truncated entry is asked again
        if not isinstance(d, dict) or d.get("prompt") != item.text or not isinstance(d.get("rubrics"), list):
            return None
        self._mem[(item.text, sk)] = list(d["rubrics"])
        return self._mem[(item.text, sk)]

    def criteria(self, items: Sequence[PromptItem | str]) -> list[list[str]]:
        """The criteria of each item (decomposing the prompts not seen before in one backend call)."""
        from arr_jax.judge import parsing

        items = as_items(items)
        keys = [self._source_key(it) for it in items]
        self.stats["lookups"] += len(items)
        missing: dict[tuple[str, str], PromptItem] = {}
        for it, sk in zip(items, keys):
            if self._load(it, sk) is None:
                missing.setdefault((it.text, sk), it)
        self.stats["hits"] += len(items) - len(missing)  # repeats within the call are served once
        if missing:
            reqs = []
            for it in missing.values():
                fields = {"edit": it.source is not None, "prompt": it.text, "k": self.k,
                          "rubric": (self.guide or "").strip()}
                reqs.append(self.templates.fill("decompose", fields, {"BASE": it.source} if it.source is not None
                                                else {}))
            answers = self.backend.generate(reqs)
            self.stats["decompositions"] += len(reqs)
            for (text, sk), ans in zip(missing, answers):
                parsed = parsing.parse_rubrics(ans, self.k)
                crit = list(parsed.rubrics)
                if not crit:
                    self.stats["failures"] += 1
                    log.warning("prompt rubrics: no usable criteria for %r (%s); judged with the rubric file alone",
                                text[:80], parsed.status)
                self._mem[(text, sk)] = crit
                if self.dir is not None and crit:  # failures are asked again on the next run
                    from arr_jax.checkpoint import atomic_write_json

                    atomic_write_json(self._file(text, sk), {"prompt": text, "rubrics": crit, "status": parsed.status})
        return [self._mem[(it.text, sk)] for it, sk in zip(items, keys)]

    @property
    def hit_rate(self) -> float:
        return self.stats["hits"] / self.stats["lookups"] if self.stats["lookups"] else 0.0


class RubricJudge:
    """A pairwise judge with the run's rubric attached (see the module docstring).

    Args:
      judge:          anything with ``compare(prompts, images1, images2[, rubric][, sources])``
                      returning a `PairwiseBatch` (TextJudge, WorldJudge, ...).
      rubric:         the rubric file's text (None: the "direct" judge, no rubric).
      rubric_path:    where it came from (for metadata and messages).
      prompt_rubrics: a `PromptRubrics`, or None (the rubric file alone).
      identity:       judge facts for metadata, e.g. ``{"kind": "qwen3_vl", "model": "/ckpt"}``.
      host_only:      the judge runs no JAX programs (an API, the world's checks), so the trainer
                      may call it from a thread while the devices roll out the next micro-batch.
    """

    def __init__(self, judge, *, rubric: str | None = None, rubric_path: str | None = None,
                 prompt_rubrics: PromptRubrics | None = None, identity: dict | None = None,
                 host_only: bool = False):
        self.judge = judge
        self.host_only = bool(host_only)
        self.rubric = rubric if rubric else None
        self.prompt_rubrics = prompt_rubrics
        self.name = getattr(judge, "name", type(judge).__name__)
        self._takes_rubric = _takes(judge.compare, "rubric")
        self.accepts_sources = _takes(judge.compare, "sources")
        self.identity = {"name": self.name, **(identity or {}), "rubric_path": rubric_path,
                         "rubric_sha256": rubric_sha256(self.rubric),
                         "prompt_rubrics": prompt_rubrics is not None}

    @property
    def rubric_sha256(self) -> str | None:
        return self.identity["rubric_sha256"]

    def rubrics_for(self, items: Sequence[PromptItem]) -> list[str | None]:
        """The rubric text of each item's requests: the file's, then that prompt's own criteria."""
        per_prompt = self.prompt_rubrics.criteria(items) if self.prompt_rubrics is not None else [[]] * len(items)
        out = []
        for crit in per_prompt:
            parts = [self.rubric.strip()] if self.rubric else []
            if crit:
                parts.append("Criteria specific to this prompt:\n" + "\n".join(f"- {c}" for c in crit))
            out.append("\n\n".join(parts) or None)
        return out

    def compare(self, prompts: Sequence[PromptItem | str], images1, images2) -> PairwiseBatch:
        """Judge B pairs: images uint8 (B, H, W, 3); items carrying ``source`` are editing pairs."""
        items = as_items(prompts)
        kw: dict[str, Any] = {}
        if any(it.source is not None for it in items):
            if not self.accepts_sources:
                raise ValueError(f"judge {self.name} cannot judge edits (its compare takes no source images); "
                                 "use judge.kind 'qwen3_vl' or 'api' for an editing policy")
            kw["sources"] = [it.source for it in items]
        if self._takes_rubric:
            rubrics = self.rubrics_for(items)
            kw["rubric"] = rubrics[0] if len(set(rubrics)) == 1 else rubrics
        return self.judge.compare([it.text for it in items], images1, images2, **kw)

    def metrics(self) -> dict[str, float]:
        """Prompt-rubric cache counters (empty without prompt rubrics)."""
        if self.prompt_rubrics is None:
            return {}
        st = self.prompt_rubrics.stats
        return {"prompt_rubrics/hit_rate": self.prompt_rubrics.hit_rate,
                "prompt_rubrics/decompositions": float(st["decompositions"]),
                "prompt_rubrics/failures": float(st["failures"])}


def as_rubric_judge(judge) -> RubricJudge:
    """``judge`` itself when it is a `RubricJudge`, else wrapped without a rubric."""
    return judge if isinstance(judge, RubricJudge) else RubricJudge(judge)
