"""The Flax Qwen3-VL judge as an ARR text backend, with a one-prefill pairwise fast path.

`FlaxVLMBackend` implements the `arr_jax.judge.text_judge.TextBackend` interface (``name``,
``generate(requests) -> list[str]``) with `arr_jax.judge.processor.Qwen3VLProcessor` and the
jitted decode loop of `arr_jax.judge.decode.Decoder`, so it runs every ARR task (generate,
verify, refine, structure, pairwise / pointwise / listwise judging) through `TextJudge` and
`arr_jax.arr.induction` like any other backend; unusable answers are the parsers' business
(counted as parse failures, never raised).

Shapes stay static so that a run compiles a handful of programs: requests are sorted by
(image count, text length) and cut into batches of ``batch_size`` rows (a smaller last batch is
padded with copies of its last row to the next power of two); each batch is left-padded to a
multiple of ``seq_bucket`` tokens, its image patches to ``patch_bucket`` and its image count to
``image_bucket``; every batch decodes ``max_new_tokens`` steps at most (a request's own
``max_tokens`` truncates its answer afterwards, rather than changing the compiled shape).

Prompts are rendered with the snapshot's own chat template (`arr_jax.judge.chat_template`; a
generation prompt that opens a ``<think>`` block is closed empty, or refused with
``reasoning="refuse"``), so the answer, and the choice-scoring prefix below, follow whatever that
generation prompt ends with.

Fast pairwise path: `p_first(requests)` appends the answer's opening ``{"rank": [`` to the
assistant turn of each pairwise request and reads, from one prefill (`Decoder.score_choices`),
the log-probabilities of the next token being "1" (Image 1 ranks first) or "2";
``P(image 1) = p("1") / (p("1") + p("2"))``, computed stably (`base.choice_probability`). No
decoding, no parsing; `TextJudge(..., choice_scores=True)` uses it.

One bad request never stops a batch: a request whose prompt does not fit the context (prompt
tokens + ``max_new_tokens``, or + 1 for `p_first`, over the text config's
``max_position_embeddings`` or ``max_length``: "too_long") or whose image cannot be decoded or
used (e.g. a 4x1000 strip, over the aspect-ratio limit: "bad_image") is left out of its batch,
which is processed without it; `generate` answers it with a `parsing.FailedReply` of that kind
whose reason names the request, its length and the limit (or the image), `p_first` with NaN
(`p_first_status` says why), and the failure is logged.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from arr_jax.judge.base import InputError, choice_probability
from arr_jax.judge.decode import Decoder
from arr_jax.judge.parsing import FailedReply
from arr_jax.judge.processor import Qwen3VLProcessor
from arr_jax.judge.templates import ChatRequest

log = logging.getLogger(__name__)

RANK_PREFIX = '{"rank": ['


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class FlaxVLMBackend:
    """TextBackend over a Flax `Qwen3VLForConditionalGeneration` (see the module docstring).

    Args:
      model: the model (e.g. from `arr_jax.convert.qwen3_vl.load_qwen3_vl`).
      processor: its `Qwen3VLProcessor`.
      max_new_tokens: decode budget of every batch.
      temperature, top_p, seed: the sampler (temperature 0 = greedy). A request's ``sample``
        index changes the seed of its batch.
      batch_size: rows per decode / prefill call.
      seq_bucket, patch_bucket, image_bucket: shape buckets of the processor.
      max_length: a context limit below the model's ``max_position_embeddings`` (memory).
      rules: sharding rules (the model should be placed with the same rules).
      rank_prefix, choices: the answer prefix and the two tokens `p_first` scores.
      name: the backend name (recorded in rubric provenance and the judge's name).
    """

    def __init__(self, model, processor: Qwen3VLProcessor, *, max_new_tokens: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                 seq_bucket: int | None = 256, patch_bucket: int | None = 256, image_bucket: int | None = 2,
                 max_length: int | None = None, rules=None, rank_prefix: str = RANK_PREFIX,
                 choices: tuple[str, str] = ("1", "2"), name: str = "qwen3_vl"):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"bad sampler settings: temperature {temperature}, top_p {top_p}")
        self.processor = processor
        self.decoder = Decoder(model, rules, max_length=max_length or None)
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.batch_size = batch_size
        self.buckets = dict(seq_bucket=seq_bucket, patch_bucket=patch_bucket, image_bucket=image_bucket)
        self.rank_prefix = rank_prefix
        self.choice_ids = [processor.token_id(c) for c in choices]   # each must be one token
        stops = [processor.im_end_id, processor.tokenizer.token_to_id("<|endoftext|>")]
        self.stop_tokens = sorted({t for t in stops if t is not None})
        self.name = name
        self.calls: Counter = Counter()   # requests answered, by task (and "p_first")

    @classmethod
    def from_snapshot(cls, model_dir: str | Path, dtype="bfloat16", rules=None, *, reasoning: str = "close",
                      template_kwargs: dict | None = None, **kw) -> "FlaxVLMBackend":
        """Load a local Hugging Face Qwen3-VL snapshot (safetensors, config.json, tokenizer.json,
        preprocessor_config.json, and its chat template if it ships one); ``reasoning`` and
        ``template_kwargs`` go to `Qwen3VLProcessor.from_dir`, ``kw`` to the constructor."""
        import jax.numpy as jnp

        from arr_jax.convert.qwen3_vl import load_qwen3_vl

        processor = Qwen3VLProcessor.from_dir(model_dir, reasoning=reasoning, template_kwargs=template_kwargs)
        model, _ = load_qwen3_vl(model_dir, jnp.dtype(dtype), rules)
        kw.setdefault("name", f"qwen3_vl:{Path(model_dir).name}")
        return cls(model, processor, rules=rules, **kw)

    # -- batching ---------------------------------------------------------------------------
    def _batches(self, requests: Sequence[ChatRequest], room: int, prefix: str,
                 failed: dict[int, InputError]) -> Iterator[tuple[list[int], dict]]:
        """(request indices, processor inputs padded to a static batch) per batch; ``room`` tokens
        are kept free after every prompt. A request the processor refuses (`InputError`) goes
        into ``failed`` (request index -> error) and its batch is processed without it."""
        chats = [r.to_chat() for r in requests]

        def size(i):
            msgs, imgs = chats[i]
            text = sum(len(c) if isinstance(c, str) else sum(len(x.get("text", "")) for x in c)
                       for c in (m["content"] for m in msgs))
            return len(imgs), text

        order = sorted(range(len(chats)), key=size)
        limit, where = self.decoder.context_limit
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            while idx:
                rows = _pow2_at_least(len(idx)) if len(idx) < self.batch_size else len(idx)
                rows = min(rows, self.batch_size)
                pad = idx + [idx[-1]] * (rows - len(idx))
                names = [requests[i].label(i) for i in pad]
                try:
                    inputs = self.processor([chats[i] for i in pad], assistant_prefix=prefix, max_length=limit - room,
                                            limit_note=f"{limit}, {where}, minus {room} token(s) for the answer",
                                            names=names, **self.buckets)
                except InputError as e:
                    if e.index is None:
                        raise
                    bad = pad[e.index]
                    failed[bad] = e
                    log.warning("%s: %s (left out of its batch)", self.name, e)
                    idx = [i for i in idx if i != bad]
                    continue
                yield idx, inputs
                break

    # -- TextBackend ------------------------------------------------------------------------
    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        """Decoded answers (special tokens dropped), in request order; a request that could not
        be processed is a `FailedReply` (kind "too_long" / "bad_image" / "input_error")."""
        out: list[str] = [""] * len(requests)
        failed: dict[int, InputError] = {}
        for idx, inputs in self._batches(requests, self.max_new_tokens, "", failed):
            sample = max(requests[i].sample for i in idx)
            seed = self.seed + 1_000_003 * sample + sum(self.calls.values())
            toks, lengths = self.decoder.generate(
                inputs, max_new_tokens=self.max_new_tokens, stop_tokens=self.stop_tokens,
                pad_id=self.processor.pad_id, temperature=self.temperature, top_p=self.top_p, seed=seed,
                return_lengths=True)
            for row, i in enumerate(idx):
                n = int(lengths[row])
                cap = requests[i].max_tokens
                if cap:
                    n = min(n, int(cap))
                out[i] = self.processor.decode(toks[row, :n])
                self.calls[requests[i].task] += 1
        for i, e in failed.items():
            out[i] = FailedReply("", e.kind, str(e))
        return out

    # -- pairwise fast path -----------------------------------------------------------------
    def _choice_logprobs(self, requests: Sequence[ChatRequest]) -> tuple[np.ndarray, dict[int, InputError]]:
        out = np.full((len(requests), len(self.choice_ids)), np.nan, np.float32)
        failed: dict[int, InputError] = {}
        for idx, inputs in self._batches(requests, 1, self.rank_prefix, failed):
            lp = self.decoder.score_choices(inputs, self.choice_ids)
            out[idx] = lp[:len(idx)]
            self.calls["p_first"] += len(idx)
        return out, failed

    def choice_logprobs(self, requests: Sequence[ChatRequest]) -> np.ndarray:
        """``(N, 2)`` log-probabilities of the answer continuing ``rank_prefix`` with "1" / "2";
        NaN rows for requests that could not be processed."""
        return self._choice_logprobs(requests)[0]

    def p_first_status(self, requests: Sequence[ChatRequest]) -> tuple[np.ndarray, list[str | None], list[str]]:
        """``(p (N,) float32, status, note)``: P(Image 1 ranks first) per pairwise request (see
        `p_first`); ``status[i]`` None when it was scored, else the failure kind of a request that
        could not be processed (p NaN), with ``note[i]`` naming it. A NaN or infinite p of a
        scored request is left for the caller to count (`text_judge.p_first_isolated`)."""
        lp, failed = self._choice_logprobs(requests)
        p = choice_probability(lp[:, 0], lp[:, 1]).astype(np.float32)
        status = [failed[i].kind if i in failed else None for i in range(len(requests))]
        notes = [str(failed[i]) if i in failed else "" for i in range(len(requests))]
        return p, status, notes

    def p_first(self, requests: Sequence[ChatRequest]) -> np.ndarray:
        """``(N,)`` float32 P(Image 1 ranks first) for pairwise requests, from one prefill each:
        the two candidates' probabilities renormalised, ``p("1") / (p("1") + p("2"))`` by
        log-sum-exp (`base.choice_probability`); NaN where undefined (both log-probs -inf) or
        where the request could not be processed (`p_first_status` says why)."""
        return self.p_first_status(requests)[0]
