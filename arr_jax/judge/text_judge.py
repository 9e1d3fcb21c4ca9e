"""A `Judge` over any text-generating backend: builds prompts, parses answers, counts failures.

A *text backend* answers chat requests::

    class TextBackend(Protocol):
        name: str
        def generate(self, requests: Sequence[ChatRequest]) -> list[str]: ...

Implementations: `arr_jax.judge.api.OpenAIBackend` (HTTP), `arr_jax.world.arr_backend.
WorldBackend` (the synthetic world's programmatic judge), and `CallableBackend`, which adapts a
batched ``fn(chats) -> texts`` where ``chats = [(messages, images), ...]`` is exactly what
`arr_jax.judge.processor.Qwen3VLProcessor.__call__` takes; a Flax VLM decode loop plugs in there.

`TextJudge` modes: "pairwise" (the default and the reward; ``{"rank": [r1, r2]}``), "pointwise"
(a 1-5 score per image; higher wins), "listwise" (ranks over N images; `rank` gives rewards
``1 - 1.1 (k-1)/(N-1)``). ``symmetrize`` ("agree" / "mean") judges both orders in one batched
backend call and combines them (SPEC §1.7). Unusable answers give a tie (winner 0, p 0.5).
``choice_scores=True`` (pairwise only) takes P(image 1) from a backend's ``p_first(requests)``
(e.g. `arr_jax.judge.vlm_backend.FlaxVLMBackend`: one prefill, the logits of the rank token)
instead of generating and parsing an answer; the winner is then the side with p > 0.5.
``PairwiseBatch.failures`` counts every parse status except ok / repaired (so ties and prose
fallbacks are counted too); ``compare_with_status`` gives the per-pair statuses.

One bad input never stops a batch: a backend reports a request it could not answer as a
`parsing.FailedReply` (or, for ``p_first``, through ``p_first_status``); a backend that raises a
ValueError (e.g. `arr_jax.judge.base.InputError`) for a batch is asked again one request at a
time, and a request that still raises becomes a failure of kind ``InputError.kind`` (else
"input_error") named in the pair's reason (and logged). A P(image 1) that is not finite is a
"non_finite" failure. Failed pairs have winner 0, p 0.5, ``valid`` False; errors of the service
itself (authentication, retries exhausted) still raise.
"""
from __future__ import annotations

import inspect
import logging
from collections import Counter
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from arr_jax.judge import parsing
from arr_jax.judge.base import PairwiseBatch, combine_orders, flip, winner_from_p
from arr_jax.judge.templates import TASK_DESCRIPTIONS, ChatRequest, TemplateSet

MODES = ("pairwise", "pointwise", "listwise")
log = logging.getLogger(__name__)


def _input_failure(req: ChatRequest, index: int, err: Exception) -> parsing.FailedReply:
    kind = getattr(err, "kind", parsing.INPUT_ERROR)
    msg = str(err)
    label = req.label(index)
    reason = msg if msg.startswith("request") else f"{label}: {msg}"
    log.warning("judge input failed (%s): %s", kind, reason)
    return parsing.FailedReply("", kind, reason)


def generate_isolated(backend: "TextBackend", requests: Sequence[ChatRequest]) -> list[str]:
    """``backend.generate(requests)``, except that a ValueError for the batch (one bad input)
    asks again one request at a time; a request that still raises becomes a `parsing.FailedReply`
    naming it (kind from ``err.kind``, else "input_error")."""
    requests = list(requests)
    try:
        return list(backend.generate(requests))
    except ValueError as e:
        if len(requests) == 1:
            return [_input_failure(requests[0], 0, e)]
    out: list[str] = []
    for i, r in enumerate(requests):
        try:
            out += list(backend.generate([r]))
        except ValueError as e:
            out.append(_input_failure(r, i, e))
    return out


def p_first_isolated(backend, requests: Sequence[ChatRequest]) -> tuple[np.ndarray, list[str | None], list[str]]:
    """``(p (N,) float64, status (None = ok), note)`` per request from the backend's
    ``p_first_status`` (or ``p_first``, asked one request at a time after a ValueError for the
    batch); a P(image 1) that is not finite is a `parsing.NON_FINITE` failure with p = 0.5."""
    requests = list(requests)
    n = len(requests)
    status: list[str | None] = [None] * n
    notes = [""] * n
    detailed = getattr(backend, "p_first_status", None)
    if callable(detailed):
        p, st, nt = detailed(requests)
        p = np.asarray(p, np.float64).reshape(n)
        status, notes = list(st), list(nt)
    else:
        try:
            p = np.asarray(backend.p_first(requests), np.float64).reshape(n)
        except ValueError:
            p = np.full(n, np.nan)
            for i, r in enumerate(requests):
                try:
                    p[i] = float(np.asarray(backend.p_first([r]), np.float64).reshape(()))
                except ValueError as e:
                    f = _input_failure(r, i, e)
                    status[i], notes[i] = f.status, f.reason
    for i in range(n):
        if status[i] is None and not (np.isfinite(p[i]) and 0.0 <= p[i] <= 1.0):
            status[i] = parsing.NON_FINITE if not np.isfinite(p[i]) else parsing.BAD_VALUE
            notes[i] = f"{requests[i].label(i)}: unusable P(image 1) = {p[i]}"
            log.warning("judge score failed: %s", notes[i])
    p = np.where([s is None for s in status], p, 0.5)
    return p, status, notes


@runtime_checkable
class TextBackend(Protocol):
    name: str

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]: ...


class CallableBackend:
    """Adapts ``fn(chats) -> list[str]`` (``chats = [(messages, images), ...]``, see
    `ChatRequest.to_chat`) to a TextBackend, calling it in chunks of ``batch_size``."""

    def __init__(self, fn: Callable[[list], list[str]], name: str = "callable", batch_size: int | None = None):
        self.fn, self.name, self.batch_size = fn, name, batch_size

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        chats = [r.to_chat() for r in requests]
        step = self.batch_size or max(len(chats), 1)
        out: list[str] = []
        for i in range(0, len(chats), step):
            got = list(self.fn(chats[i:i + step]))
            if len(got) != len(chats[i:i + step]):
                raise ValueError(f"backend {self.name} returned {len(got)} texts for {len(chats[i:i + step])} requests")
            out += [t if isinstance(t, str) else str(t) for t in got]  # a FailedReply keeps its status
        return out


def as_images(x) -> list[np.ndarray]:
    """(B, H, W, 3) array or a sequence of (H, W, 3) arrays -> list of uint8 arrays."""
    return [np.asarray(im) for im in x]


def pair_request(templates: TemplateSet, template: str, prompt: str, image1: np.ndarray, image2: np.ndarray,
                 source: np.ndarray | None = None, fields: dict | None = None, meta: dict | None = None,
                 sample: int = 0) -> ChatRequest:
    """A request about one pair (generate / verify / refine / pairwise templates); a source
    image makes it an editing request with ``Image BASE`` first."""
    imgs = {} if source is None else {"BASE": source}
    imgs.update({"1": image1, "2": image2})
    f = {"edit": source is not None, "prompt": prompt}
    f.update(fields or {})
    return templates.fill(template, f, imgs, meta=meta, sample=sample)


class TextJudge:
    """`Judge` over a `TextBackend`.

    Args:
      backend: the TextBackend.  mode: "pairwise" | "pointwise" | "listwise".
      templates: a TemplateSet (default: the package prompts).  template: override the
        template name for pairwise requests (induction verifies with "verify").
      task_description: text for the judge prompt; default by task (T2I / editing).
      symmetrize: None, "agree" or "mean": ``compare`` judges both orders and combines them.
      choice_scores: pairwise only; P(image 1) from ``backend.p_first(requests)`` (no decoding).
    """

    def __init__(self, backend: TextBackend, mode: str = "pairwise", templates: TemplateSet | None = None,
                 template: str | None = None, task_description: str | None = None,
                 symmetrize: str | None = None, choice_scores: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown judge mode {mode!r}; expected one of {MODES}")
        if symmetrize not in (None, "", "agree", "mean"):
            raise ValueError(f"unknown symmetrize {symmetrize!r}; expected None, 'agree' or 'mean'")
        if choice_scores and (mode != "pairwise" or not callable(getattr(backend, "p_first", None))):
            raise ValueError(f"choice_scores needs mode 'pairwise' (got {mode!r}) and a backend with p_first "
                             f"({backend.name} has {'one' if hasattr(backend, 'p_first') else 'none'})")
        self.choice_scores = bool(choice_scores)
        self.backend, self.mode = backend, mode
        self.templates = templates or TemplateSet()
        self.template = template or mode
        self.task_description = task_description
        self.symmetrize = symmetrize or None
        self.name = (f"text/{mode}:{backend.name}" + ("/p_first" if self.choice_scores else "")
                     + (f"/sym-{self.symmetrize}" if self.symmetrize else ""))

    def _fields(self, rubric: str | None, edit: bool) -> dict:
        desc = self.task_description or TASK_DESCRIPTIONS["edit" if edit else "t2i"]
        return {"rubric": (rubric or "").strip(), "task_description": desc}

    # -- request building ----------------------------------------------------------------
    def pair_requests(self, prompts, images1, images2, rubric=None, sources=None, meta=None) -> list[ChatRequest]:
        """Requests for B pairs in the given order (pairwise / listwise-of-2: 1 each;
        pointwise: 2 each, image 1 then image 2). ``rubric``: one text for every pair, or a
        sequence of B texts (prompt-specific rubrics)."""
        i1, i2 = as_images(images1), as_images(images2)
        src = [None] * len(prompts) if sources is None else list(sources)
        rub = list(rubric) if isinstance(rubric, (list, tuple)) else [rubric] * len(prompts)
        if not (len(i1) == len(i2) == len(src) == len(rub) == len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but {len(i1)}/{len(i2)} images, {len(src)} sources and "
                             f"{len(rub)} rubrics")
        reqs = []
        for b, p in enumerate(prompts):
            m = dict(meta or {}, index=b)
            f = self._fields(rub[b], src[b] is not None)
            if self.mode == "pairwise":
                reqs.append(pair_request(self.templates, self.template, p, i1[b], i2[b], src[b], f, m))
            elif self.mode == "pointwise":
                for k, im in ((1, i1[b]), (2, i2[b])):
                    reqs.append(self._single(p, im, src[b], f, dict(m, image=k)))
            else:
                reqs.append(self._list(p, [i1[b], i2[b]], src[b], f, m))
        return reqs

    def _single(self, prompt, image, source, fields, meta) -> ChatRequest:
        imgs = {} if source is None else {"BASE": source}
        imgs["1"] = image
        return self.templates.fill("pointwise", dict(fields, edit=source is not None, prompt=prompt), imgs, meta)

    def _list(self, prompt, images, source, fields, meta) -> ChatRequest:
        imgs = {} if source is None else {"BASE": source}
        imgs.update({str(k + 1): im for k, im in enumerate(images)})
        return self.templates.fill("listwise", dict(fields, edit=source is not None, prompt=prompt, n=len(images)),
                                   imgs, meta)

    # -- answers -> batch ----------------------------------------------------------------
    def _decode(self, texts: list[str], b: int) -> tuple[PairwiseBatch, list[str]]:
        winner = np.zeros(b, np.int8)
        p = np.full(b, 0.5, np.float32)
        statuses, reasons = [], []
        if len(texts) != (2 * b if self.mode == "pointwise" else b):
            raise ValueError(f"backend {self.backend.name} returned {len(texts)} answers for "
                             f"{2 * b if self.mode == 'pointwise' else b} requests")
        if self.mode == "pairwise":
            for i, t in enumerate(texts):
                a = parsing.parse_pairwise(t)
                statuses.append(a.status)
                reasons.append(a.reason)
                if a.usable and a.winner in (1, 2):
                    winner[i] = a.winner
                    p[i] = 1.0 if a.winner == 1 else 0.0
        elif self.mode == "pointwise":
            for i in range(b):
                s1, s2 = parsing.parse_pointwise(texts[2 * i]), parsing.parse_pointwise(texts[2 * i + 1])
                bad = [s.status for s in (s1, s2) if s.score is None]
                statuses.append(bad[0] if bad else (s1.status if s1.status != parsing.OK else s2.status))
                reasons.append(f"image 1: {s1.score} ({s1.reason}); image 2: {s2.score} ({s2.reason})")
                if not bad:
                    d = s1.score - s2.score
                    winner[i] = 1 if d > 0 else 2 if d < 0 else 0
                    p[i] = 0.5 + d / 8.0
                    if d == 0:
                        statuses[-1] = parsing.TIE
        else:
            for i, t in enumerate(texts):
                a = parsing.parse_listwise(t, 2)
                statuses.append(a.status)
                reasons.append(a.reason)
                if a.ranks is not None:
                    winner[i] = 1 if a.ranks[0] < a.ranks[1] else 2
                    p[i] = 1.0 if winner[i] == 1 else 0.0
        fails = {k: v for k, v in Counter(statuses).items() if k not in (parsing.OK, parsing.REPAIRED)}
        valid = np.array([s not in parsing.FAILURES for s in statuses], bool)
        return (PairwiseBatch(winner=winner, p_first=p, failures=fails, reasons=reasons, valid=valid, statuses=statuses),
                statuses)

    def _run(self, reqs: list[ChatRequest], b: int, parts: int = 1) -> list[tuple[PairwiseBatch, list[str]]]:
        """One backend call for ``parts`` consecutive blocks of requests about B pairs each."""
        if self.choice_scores:
            p_all, st_all, notes_all = p_first_isolated(self.backend, reqs)
            out = []
            for k in range(parts):
                q, st, notes = p_all[k * b:(k + 1) * b], st_all[k * b:(k + 1) * b], notes_all[k * b:(k + 1) * b]
                valid = np.array([x is None for x in st], bool)
                w = np.where(valid, winner_from_p(q), 0).astype(np.int8)
                why = [f"P(Image 1 ranks first) = {x:.4f}" if ok else note for x, ok, note in zip(q, valid, notes)]
                status = [x if x is not None else parsing.OK if wi else parsing.TIE for x, wi in zip(st, w)]
                fails = {k: v for k, v in Counter(status).items() if k != parsing.OK}
                out.append((PairwiseBatch(winner=w, p_first=q, reasons=why, failures=fails, valid=valid, statuses=status),
                            status))
            return out
        texts = generate_isolated(self.backend, reqs)
        n = len(reqs) // parts
        return [self._decode(texts[k * n:(k + 1) * n], b) for k in range(parts)]

    def compare_orders(self, prompts, images1, images2, rubric=None, sources=None):
        """Both orders in one backend call: (fwd batch, swapped batch flipped back to the
        (images1, images2) numbering, fwd statuses, swapped statuses)."""
        b = len(prompts)
        reqs = self.pair_requests(prompts, images1, images2, rubric, sources, {"order": "fwd"})
        reqs += self.pair_requests(prompts, images2, images1, rubric, sources, {"order": "rev"})
        (fwd, sf), (rev, sr) = self._run(reqs, b, 2)
        return fwd, flip(rev), sf, sr

    def compare_with_status(self, prompts, images1, images2, rubric=None, sources=None):
        """``compare`` plus the per-pair parse status (symmetrised: the worse of the two)."""
        if self.symmetrize:
            fwd, rev, sf, sr = self.compare_orders(prompts, images1, images2, rubric, sources)
            worst = [a if a not in parsing.USABLE else b for a, b in zip(sf, sr)]
            return combine_orders(fwd, rev, self.symmetrize), worst
        return self._run(self.pair_requests(prompts, images1, images2, rubric, sources), len(prompts))[0]

    def compare(self, prompts: Sequence[str], images1, images2, rubric: str | None = None,
                sources=None) -> PairwiseBatch:
        """Judge B pairs (images: (B, H, W, 3) or sequences of (H, W, 3)); sources: per-pair
        source images for editing, or None."""
        return self.compare_with_status(prompts, images1, images2, rubric, sources)[0]

    # -- other protocols -----------------------------------------------------------------
    def score(self, prompts, images, rubric=None, sources=None) -> tuple[np.ndarray, list[str]]:
        """Pointwise scores (B,) float32 (nan where unusable) and statuses."""
        ims = as_images(images)
        src = [None] * len(prompts) if sources is None else list(sources)
        reqs = [self._single(p, ims[i], src[i], self._fields(rubric, src[i] is not None), {"index": i})
                for i, p in enumerate(prompts)]
        out = [parsing.parse_pointwise(t) for t in generate_isolated(self.backend, reqs)]
        return np.array([np.nan if a.score is None else a.score for a in out], np.float32), [a.status for a in out]

    def rank(self, prompts, image_lists, rubric=None, sources=None):
        """Listwise: per prompt, ranks (list or None) and rewards ``1 - 1.1 (k-1)/(N-1)``
        (all 0 when unusable). Returns (ranks, rewards, statuses)."""
        src = [None] * len(prompts) if sources is None else list(sources)
        reqs = [self._list(p, as_images(image_lists[i]), src[i], self._fields(rubric, src[i] is not None),
                           {"index": i}) for i, p in enumerate(prompts)]
        answers = [parsing.parse_listwise(t, len(image_lists[i]))
                   for i, t in enumerate(generate_isolated(self.backend, reqs))]
        ranks = [a.ranks for a in answers]
        return ranks, [parsing.listwise_rewards(r, len(image_lists[i])) for i, r in enumerate(ranks)], \
            [a.status for a in answers]


def accepts_sources(judge) -> bool:
    """Whether ``judge.compare`` takes a ``sources`` argument (editing pairs)."""
    try:
        return "sources" in inspect.signature(judge.compare).parameters
    except (TypeError, ValueError):
        return False
