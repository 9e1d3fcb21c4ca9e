"""ARR rubric induction (SPEC §1): generate K rubrics per labelled pair -> verify without the
label -> refine up to T_max rounds -> discard -> structure into Theme + Tips -> rubric file.

Verification applies a pair's rubrics as the grading protocol to the same pair with the label
withheld. ``verify_orders`` chooses the image orders shown: "both" (our default: the pair
passes only if the judge recovers the label in the given AND the swapped order, so a judge's
positional bias cannot pass it), "random" (one seeded order per round) or "given". A pair
passes at round 0 (first pass), after r <= T_max refinements (refined), or is discarded.

Every finished pair is appended to ``<workdir>/journal.jsonl`` at once; a rerun with the same
configuration skips journaled pairs (no repeated backend calls) and a different configuration
is refused. Backend calls are batched across the pairs of a chunk (``batch_pairs``).

One bad pair never stops the run: a pair that cannot be read, or one of whose requests the
backend cannot process (an image it cannot decode or use, a prompt past the context, a request
the server rejects: `parsing.INPUT_FAILURES`), is journaled as "failed" with the error naming
it (kind and message), left out of the rubric, counted in the provenance, and tried again by a
rerun; the rest of its chunk goes on. More than ``max_failure_fraction`` failed pairs (once 20
pairs are done, and at the end) stop the run with `arr_jax.judge.base.TooManyFailuresError`.
A pair whose answers never parse is "discarded", the method's own outcome, not a failure.

``choice_scores`` (off by default, as in the paper) verifies from one-token choice scores
(``backend.p_first_status``: the Flax judge's one prefill, or an OpenAI-compatible server's
log-probs, `arr_jax.judge.api`) instead of a generated, parsed verdict: the judge's pick is the
image with P > 0.5 (exactly 0.5 is a tie and fails). Faster, but the judge gives no reason, so a
refinement round is told only which image it chose and with what probability.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from arr_jax.arr.rubric_file import RubricFile, Theme
from arr_jax.data.preference_tfds import PreferencePair
from arr_jax.judge import parsing
from arr_jax.judge.base import FailureBudget
from arr_jax.judge.templates import TemplateSet
from arr_jax.judge.text_judge import TextBackend, generate_isolated, pair_request

JOURNAL_FORMAT = "arr-induction/1"
ORDERS = ("both", "random", "given")


@dataclasses.dataclass
class InductionSettings:
    """k: rubrics per pair; t_max: refinement rounds before a pair is discarded; verify_orders:
    see module docstring; batch_pairs: pairs per batched backend call (does not change results);
    max_themes / tips_per_theme: the structured protocol's size; structure_retries: extra
    structuring attempts on an unusable answer; seed: for "random" verification orders;
    max_failure_fraction: the fraction of failed pairs (module docstring) that stops the run
    (does not change results); choice_scores: verify from one-token choice scores (module
    docstring)."""

    k: int = 5
    t_max: int = 5
    verify_orders: str = "both"
    batch_pairs: int = 16
    max_themes: int = 5
    tips_per_theme: int = 4
    structure_retries: int = 2
    seed: int = 0
    max_failure_fraction: float = 0.1
    choice_scores: bool = False

    def validate(self) -> None:
        if self.k < 1 or self.t_max < 0 or self.batch_pairs < 1 or self.max_themes < 1 or self.tips_per_theme < 1:
            raise ValueError(f"bad induction settings {self}: k, batch_pairs, max_themes, tips_per_theme "
                             "must be >= 1 and t_max >= 0")
        if self.verify_orders not in ORDERS:
            raise ValueError(f"verify_orders {self.verify_orders!r} not in {ORDERS}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")


@dataclasses.dataclass
class GuideExemplar:
    """A human-written few-shot exemplar, placed verbatim in the generation prompt."""

    prompt: str
    preferred: str
    rejected: str
    rationale: str



class NoVerifiedRubricsError(RuntimeError):
    """No pair's rubrics survived verification (e.g. a judge whose output never parses)."""

def load_guide(path: str | os.PathLike) -> list[GuideExemplar]:
    """Exemplars from a JSONL file of {"prompt", "preferred", "rejected", "rationale"}
    (preferred / rejected describe the two images in words)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            d = json.loads(line)
            try:
                out.append(GuideExemplar(*(str(d[k]) for k in ("prompt", "preferred", "rejected", "rationale"))))
            except KeyError as e:
                raise ValueError(f"{path}:{n}: guide exemplar lacks {e}") from None
    return out


def format_guide(guide: Sequence[GuideExemplar]) -> str:
    return "\n\n".join(f"Example {i}.\nPrompt: {g.prompt}\nPreferred: {g.preferred}\nRejected: {g.rejected}\n"
                       f"Rationale: {g.rationale}" for i, g in enumerate(guide, 1))


def numbered(rubrics: Sequence[str]) -> str:
    return "\n".join(f"{i}. {r}" for i, r in enumerate(rubrics, 1))


class Journal:
    """Append-only JSONL of finished pairs, headed by the configuration hash."""

    def __init__(self, path: str | os.PathLike, config_hash: str):
        self.path, self.config_hash = Path(path), config_hash

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        done: dict[str, dict] = {}
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    break  # a line torn by a crash: that pair is simply redone
                raise ValueError(f"{self.path}:{i + 1} is corrupt") from None
            if i == 0:
                if rec.get("journal") != JOURNAL_FORMAT or rec.get("config_hash") != self.config_hash:
                    raise ValueError(
                        f"{self.path} belongs to another run (config hash {rec.get('config_hash')} != "
                        f"{self.config_hash}); use a new workdir or delete the journal to start over")
                continue
            done[rec["pair_id"]] = rec
        return done

    def append(self, rec: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"journal": JOURNAL_FORMAT, "config_hash": self.config_hash}) + "\n")
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


def config_hash(settings: InductionSettings, backend_name: str, templates: TemplateSet, guide_text: str,
                pair_ids: Sequence[str], extra: Any = None) -> str:
    """What makes two runs interchangeable (batching and progress display excluded)."""
    s = dataclasses.asdict(settings)
    s.pop("batch_pairs")
    s.pop("max_failure_fraction")
    if not s["choice_scores"]:
        s.pop("choice_scores")   # off: the hash of runs from before the setting existed
    blob = json.dumps({"settings": s, "backend": backend_name, "templates": templates.digest(),
                       "guide": hashlib.sha256(guide_text.encode()).hexdigest(),
                       "pairs": hashlib.sha256("\0".join(pair_ids).encode()).hexdigest(), "extra": extra},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _PairState:
    def __init__(self, pair: PreferencePair):
        self.pair = pair
        self.rubrics: list[str] = []
        self.last_rubrics: list[str] = []
        self.history: list[dict] = []
        self.calls = Counter()
        self.statuses = Counter()
        self.error: tuple[str, str] | None = None   # (kind, message) of a request that could not be answered

    def check(self, text: str) -> None:
        """Note an input failure (the pair cannot go on)."""
        if isinstance(text, parsing.FailedReply) and text.status in parsing.INPUT_FAILURES and self.error is None:
            self.error = (text.status, text.reason or f"pair {self.pair.id}: {text.status}")


class Inducer:
    """Runs the induction loop over pairs with one backend (see `induce`)."""

    def __init__(self, backend: TextBackend, settings: InductionSettings, templates: TemplateSet,
                 guide_text: str = ""):
        settings.validate()
        if settings.choice_scores and not callable(getattr(backend, "p_first_status", None)):
            raise ValueError(f"induction.choice_scores needs a backend that scores choices (backend.kind 'openai' or "
                             f"'qwen3_vl'); {backend.name} has none: set induction.choice_scores=False")
        self.backend, self.s, self.t, self.guide = backend, settings, templates, guide_text

    # -- requests ------------------------------------------------------------------------
    def _label_fields(self, p: PreferencePair) -> dict:
        return {"k": self.s.k, "preferred": p.label, "rejected": 3 - p.label, "guide": self.guide}

    def _orders(self, p: PreferencePair, rnd: int) -> list[bool]:
        """Verification orders as 'swapped?' flags."""
        if self.s.verify_orders == "both":
            return [False, True]
        if self.s.verify_orders == "given":
            return [False]
        rng = np.random.default_rng([self.s.seed, zlib.crc32(p.id.encode()), rnd])
        return [bool(rng.integers(2))]

    def _verify_requests(self, st: _PairState, rnd: int):
        p = st.pair
        out = []
        for sw in self._orders(p, rnd):
            a, b = (p.image2, p.image1) if sw else (p.image1, p.image2)
            out.append((sw, pair_request(self.t, "verify", p.prompt, a, b, p.source,
                                         {"rubrics": numbered(st.rubrics)},
                                         {"pair_id": p.id, "round": rnd, "swapped": sw})))
        return out

    # -- the loop ------------------------------------------------------------------------
    def _generate(self, states: list[_PairState], rnd: int, answers: dict[str, str]) -> None:
        reqs = []
        for st in states:
            p = st.pair
            if rnd == 0:
                reqs.append(pair_request(self.t, "generate", p.prompt, p.image1, p.image2, p.source,
                                         self._label_fields(p), {"pair_id": p.id, "round": 0}))
            else:
                f = dict(self._label_fields(p), previous_rubrics=numbered(st.last_rubrics) or "(none could be read)",
                         verifier_answer=answers[p.id], round=rnd)
                reqs.append(pair_request(self.t, "refine", p.prompt, p.image1, p.image2, p.source, f,
                                         {"pair_id": p.id, "round": rnd}))
        texts = generate_isolated(self.backend, reqs)
        task = "generate" if rnd == 0 else "refine"
        for st, text in zip(states, texts):
            st.check(text)
            a = parsing.parse_rubrics(text, self.s.k)
            st.calls[task] += 1
            st.statuses[f"{task}:{a.status}"] += 1
            st.rubrics = a.rubrics
            if a.rubrics:
                st.last_rubrics = a.rubrics
            st.history.append({"round": rnd, "task": task, "status": a.status, "rubrics": a.rubrics,
                               "reason": a.reason})

    def _verify(self, states: list[_PairState], rnd: int) -> tuple[list[bool], dict[str, str]]:
        jobs = [(st, sw, req) for st in states if st.rubrics for sw, req in self._verify_requests(st, rnd)]
        per: dict[str, list] = {st.pair.id: [] for st in states}
        if self.s.choice_scores:
            verdicts = self._choices([req for _, _, req in jobs])
        else:
            verdicts = []
            for text in generate_isolated(self.backend, [req for _, _, req in jobs]):
                a = parsing.parse_pairwise(text)
                verdicts.append((text, a.status, a.winner if a.usable else 0, a.reason, None,
                                 text if not a.usable else ""))
        for (st, sw, _), (text, status, winner, reason, p, shown) in zip(jobs, verdicts):
            st.check(text)
            st.calls["verify"] += 1
            st.statuses[f"verify:{status}"] += 1
            pick = (3 - winner if sw else winner) if winner else 0  # dataset numbering
            per[st.pair.id].append({"swapped": sw, "status": status, "pick": pick, "reason": reason, "p_first": p,
                                    "text": shown})
        passed, answers = [], {}
        for st in states:
            v = per[st.pair.id]
            ok = bool(v) and all(x["pick"] == st.pair.label for x in v)
            passed.append(ok)
            st.history[-1]["verify"] = [{k: x[k] for k in ("swapped", "status", "pick", "reason")} for x in v]
            st.history[-1]["passed"] = ok
            answers[st.pair.id] = self._describe(v)
        return passed, answers

    def _choices(self, requests) -> list[tuple]:
        """``(text, status, winner 0/1/2, reason, P(image 1) or None, text shown to a refinement)`` per
        verification request from one-token choice scores; a failed score is a `FailedReply` text
        with its status."""
        from arr_jax.judge.text_judge import p_first_isolated

        p, status, notes = p_first_isolated(self.backend, requests)
        out = []
        for q, st, note in zip(p, status, notes):
            if st is not None:
                out.append((parsing.FailedReply("", st, note), st, 0, note, None, note))
                continue
            winner = 1 if q > 0.5 else 2 if q < 0.5 else 0
            out.append(("", parsing.OK if winner else parsing.TIE, winner, f"P(Image 1 ranks first) = {q:.3f}",
                        float(q), ""))
        return out

    @staticmethod
    def _describe(v: list[dict]) -> str:
        if not v:
            return "No rubrics could be read from the previous answer, so nothing was verified."
        lines = []
        for x in v:
            head = "With the two images shown in swapped order, the judge" if x["swapped"] else "The judge"
            if x["pick"] == 0:
                lines.append(f"{head} gave no usable answer ({x['status']}): {x['text'][:300]!r}")
            elif x.get("p_first") is not None:   # scored from one answer token: no reason given
                shown = " the image shown here as" if x["swapped"] else ""
                lines.append(f"{head} chose{shown} Image {x['pick']} (probability "
                             f"{max(x['p_first'], 1 - x['p_first']):.2f}; scored from its first answer token, "
                             "without a reason).")
            else:
                shown = " the image shown here as" if x["swapped"] else ""
                note = " (its reason numbers the images in the order it saw them)" if x["swapped"] else ""
                lines.append(f"{head} chose{shown} Image {x['pick']}. Its reason{note}: {x['reason']}")
        return "\n".join(lines)

    @staticmethod
    def _record(st: _PairState, status: str, rnd: int, rubrics: list[str]) -> dict:
        p = st.pair
        rec = {"pair_id": p.id, "status": status, "refinements": rnd, "rubrics": rubrics, "prompt": p.prompt,
               "category": p.category, "edit": p.source is not None, "calls": dict(st.calls),
               "statuses": dict(st.statuses), "history": st.history}
        if st.error is not None:
            rec["kind"], rec["error"] = st.error
        return rec

    def run_chunk(self, pairs: Sequence[PreferencePair], on_done) -> None:
        """Induce rubrics for ``pairs``; ``on_done(record)`` is called as each pair finishes
        (status "first_pass", "refined", "discarded", or "failed" with its ``kind`` and ``error``)."""
        states = [_PairState(p) for p in pairs]
        active, answers = states, {}
        for rnd in range(self.s.t_max + 1):
            self._generate(active, rnd, answers)
            for st in active:
                if st.error is not None:
                    on_done(self._record(st, "failed", rnd, []))
            active = [st for st in active if st.error is None]
            if not active:
                return
            passed, answers = self._verify(active, rnd)
            still = []
            for st, ok in zip(active, passed):
                if st.error is not None:
                    on_done(self._record(st, "failed", rnd, []))
                elif ok or rnd == self.s.t_max:
                    status = ("first_pass" if rnd == 0 else "refined") if ok else "discarded"
                    on_done(self._record(st, status, rnd, st.rubrics if ok else []))
                else:
                    still.append(st)
            active = still
            if not active:
                return

    # -- structuring ---------------------------------------------------------------------
    def structure(self, kept: list[dict]) -> tuple[list[Theme], str, Counter]:
        """Theme + Tips from the verified rubric sets; falls back to the most frequent rubrics
        under one theme when no usable answer comes back."""
        sets = "\n\n".join(f"Pair {i} ({r['prompt']}):\n" + "\n".join(f"- {x}" for x in r["rubrics"])
                           for i, r in enumerate(kept, 1))
        edit = sum(r["edit"] for r in kept) * 2 > len(kept)
        f = {"edit": edit, "max_themes": self.s.max_themes, "tips_per_theme": self.s.tips_per_theme,
             "n_sets": len(kept), "rubric_sets": sets}
        statuses = Counter()
        for attempt in range(self.s.structure_retries + 1):
            req = self.t.fill("structure", f, meta={"attempt": attempt}, sample=attempt)
            a = parsing.parse_themes(generate_isolated(self.backend, [req])[0], self.s.max_themes,
                                     self.s.tips_per_theme)
            statuses[f"structure:{a.status}"] += 1
            if a.themes:
                return [Theme(n, tips) for n, tips in a.themes], a.status, statuses
        freq = Counter(x for r in kept for x in r["rubrics"])
        tips = [t for t, _ in freq.most_common(self.s.tips_per_theme * self.s.max_themes)]
        return [Theme("Verified criteria", tips)], "fallback_most_frequent", statuses


def induce(pairs: Sequence[PreferencePair], backend: TextBackend, workdir: str | os.PathLike,
           settings: InductionSettings | None = None, templates: TemplateSet | None = None,
           guide: Sequence[GuideExemplar] = (), config: Any = None, progress: bool = True,
           rubric_name: str = "rubric") -> RubricFile:
    """Run ARR over ``pairs`` and write ``<workdir>/<rubric_name>.{txt,json}``; resumes from
    ``<workdir>/journal.jsonl``. ``config`` (JSON-able) is recorded and hashed with the run."""
    s = settings or InductionSettings()
    s.validate()
    t = templates or TemplateSet()
    work = Path(workdir)
    guide_text = format_guide(guide)
    ids = list(getattr(pairs, "ids", None) or [p.id for p in pairs])
    if len(set(ids)) != len(ids):
        raise ValueError("pair ids are not unique")
    chash = config_hash(s, backend.name, t, guide_text, ids, config)
    journal = Journal(work / "journal.jsonl", chash)
    done = journal.load()
    inducer = Inducer(backend, s, t, guide_text)
    todo = [i for i, pid in enumerate(ids) if pid not in done or done[pid]["status"] == "failed"]
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="ARR induction", unit="pair",
               disable=not progress)
    budget = FailureBudget(s.max_failure_fraction, min_items=20, what="pairs")

    def finish(rec):
        journal.append(rec)
        done[rec["pair_id"]] = rec
        bar.update(1)
        bar.set_postfix(kept=sum(r["status"] not in ("discarded", "failed") for r in done.values()))
        failed = rec["status"] == "failed"
        budget.add(1, [rec["error"]] if failed else [], {rec["kind"]: 1} if failed else {})

    for c in range(0, len(todo), s.batch_pairs):
        chunk = []
        for i in todo[c:c + s.batch_pairs]:
            try:
                chunk.append(pairs[i])
            except (OSError, ValueError, KeyError) as e:  # one unreadable pair: named, journaled, the run goes on
                finish({"pair_id": ids[i], "status": "failed", "kind": parsing.INPUT_ERROR,
                        "error": f"pair {ids[i]} (index {i}): could not be read: {type(e).__name__}: {e}",
                        "refinements": 0, "rubrics": [], "prompt": "", "category": "", "edit": False,
                        "calls": {}, "statuses": {}, "history": []})
        if chunk:
            inducer.run_chunk(chunk, finish)
    bar.close()
    budget.check(final=True)

    recs = [done[pid] for pid in ids]
    kept = [r for r in recs if r["status"] not in ("discarded", "failed")]
    failed = [r for r in recs if r["status"] == "failed"]
    if not kept:
        raise NoVerifiedRubricsError(f"every one of the {len(recs)} pairs was discarded"
                                     + (f" or failed ({len(failed)} failed)" if failed else "")
                                     + f"; nothing to structure (see {journal.path})")
    themes, structure_status, st_statuses = inducer.structure(kept)
    n = len(recs)
    by = Counter(r["status"] for r in recs)
    statuses = Counter(st_statuses)
    calls = Counter(structure=sum(st_statuses.values()))
    for r in recs:
        statuses.update(r["statuses"])
        calls.update(r["calls"])
    prov = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": "ARR (SPEC §1): generate -> verify without label -> refine <= T_max -> discard -> structure",
        "model": getattr(backend, "model", backend.name), "backend": backend.name,
        "pairs": {"total": n, "used": [r["pair_id"] for r in kept],
                  "discarded_ids": [r["pair_id"] for r in recs if r["status"] == "discarded"],
                  "failed": len(failed), "failed_ids": [r["pair_id"] for r in failed],
                  "failures": dict(Counter(r.get("kind", "") for r in failed)),
                  "first_failures": [r.get("error", "") for r in failed[:5]],
                  "first_pass": by["first_pass"], "refined": by["refined"], "discarded": by["discarded"],
                  "first_pass_rate": by["first_pass"] / n, "discard_rate": by["discarded"] / n,
                  "refinements_of_kept": dict(sorted(Counter(str(r["refinements"]) for r in kept).items()))},
        "settings": dataclasses.asdict(s), "config": config, "config_hash": chash,
        "prompts": {"digest": t.digest(), "override_dir": str(t.override_dir or ""), "templates": t.texts()},
        "guide": {"n": len(guide), "text": guide_text},
        "calls": dict(calls), "statuses": dict(sorted(statuses.items())),
        "structure_status": structure_status, "journal": str(journal.path),
    }
    rf = RubricFile(themes, prov)
    rf.save(work / f"{rubric_name}.txt")
    return rf


# Backend settings that change what the model answers (others, e.g. timeouts, do not).
_ANSWER_KEYS = {"openai": ("model", "endpoint", "temperature", "max_tokens", "token_param", "image_format",
                           "max_image_side"),
                "world": ("default_criteria", "tie_break"),
                "qwen3_vl": ("model_dir", "dtype", "max_new_tokens", "temperature", "top_p", "seed", "reasoning")}


def backend_identity(b) -> dict:
    """The part of ``config.backend`` that determines answers (hashed into the run)."""
    sub = b.get(b.kind, None)
    keys = _ANSWER_KEYS.get(b.kind, ())
    return {"kind": b.kind, **({k: sub[k] for k in keys} if sub is not None else {})}


def settings_from(c) -> InductionSettings:
    return InductionSettings(k=c.k, t_max=c.t_max, verify_orders=c.verify_orders, batch_pairs=c.batch_pairs,
                             max_themes=c.max_themes, tips_per_theme=c.tips_per_theme,
                             structure_retries=c.structure_retries, seed=c.seed,
                             max_failure_fraction=c.get("max_failure_fraction", 0.1),
                             choice_scores=bool(c.get("choice_scores", False)))


def induce_from_config(cfg) -> RubricFile:
    """Induce a rubric file as a config says (sections ``data``, ``backend``, ``induction``, ``workdir``);
    returns it (also written as ``<workdir>/rubric.txt`` + ``rubric.json``)."""
    import time

    from arr_jax.data.pairs import make_pairs
    from arr_jax.judge.factory import make_backend

    for key in ("data", "backend", "induction"):
        if key not in cfg:
            raise ValueError(f"config has no '{key}' section: pass --config configs/induce_world.py (or your own)")
    t0 = time.perf_counter()
    pairs = make_pairs(cfg.data)
    backend = make_backend(cfg.backend)
    ic = cfg.induction
    templates = TemplateSet(ic.templates_dir or None)
    guide = load_guide(ic.guide) if ic.guide else []
    rf = induce(pairs, backend, cfg.workdir, settings_from(ic), templates, guide,
                config={"data": cfg.data.to_dict(), "backend": backend_identity(cfg.backend)},
                progress=cfg.get("progress", True))
    p = rf.provenance["pairs"]
    print(f"ARR induction: {p['total']} pairs -> first pass {p['first_pass']} ({100 * p['first_pass_rate']:.1f}%), "
          f"refined {p['refined']}, discarded {p['discarded']} ({100 * p['discard_rate']:.1f}%), "
          f"failed {p['failed']}{' ' + str(p['failures']) if p['failed'] else ''}; "
          f"{len(rf.themes)} themes, structure {rf.provenance['structure_status']}; "
          f"{time.perf_counter() - t0:.1f}s")
    print(f"rubric file: {cfg.workdir}/rubric.txt (+ rubric.json)\n")
    print(rf.text)
    return rf
