"""OpenAI-compatible chat-completions backend (GPT, Gemini's OpenAI endpoint, vLLM, SGLang, sglang-jax).

Standard library only (``urllib``). Per request: images go inline as base64 data URLs;
transient failures (HTTP 5xx, 429, timeouts, dropped connections) are retried with
exponential back-off, or after the wait a ``Retry-After`` header asks for (seconds or an HTTP
date, RFC 9110 §10.2.3), each wait logged and added up in ``stats["wait_s"]``; at most
``concurrency`` requests are in flight at once (one semaphore per backend, shared by every
thread); answers are cached on disk under a SHA-256 of `OpenAIBackend.cache_key_parts` (the
endpoint, the request kind and the whole request body: everything that changes the answer), so
a rerun costs nothing. HTTP 401/403 raise `AuthenticationError` at once.

Choice scoring (`OpenAIBackend.p_first_status`, used by ``TextJudge(choice_scores=True)``): one
request per ordered pair whose assistant turn is continued from the answer's opening
``{"rank": [`` (``continue_final_message``, as vLLM and SGLang accept it), with ``max_tokens=1``,
``logprobs``, ``top_logprobs`` (20) and temperature 0, and ``chat_template_kwargs``
``{"enable_thinking": false}``; P(image 1) = p("1") / (p("1") + p("2")) from the first answer
token's top log-probs, exactly the Flax judge's score (`arr_jax.judge.vlm_backend`). A server
that returns no log-probs, or rejects the parameters, is detected once (`check`, or the first
such reply), logged once, and the backend answers by generating and parsing from then on
(``stats["choice_fallback"]`` counts those requests). `check` verifies the endpoint, the key,
the model name and log-prob support in seconds, before a run builds anything.

Every reply is checked before it is cached or returned (`check_reply`): a reply cut off
(``finish_reason`` other than "stop", e.g. "length" mid-thought with ``content: null`` and the
text in ``reasoning_content``), refused (a ``refusal`` field, ``finish_reason``
"content_filter"), with reasoning but no answer, or empty is returned as a
`arr_jax.judge.parsing.FailedReply` with that status (the parsers count it under it), counted in
``stats[status]``, and never cached: a rerun asks again. A cached reply is checked again when
read (caches written before this check are healed the same way). One request that cannot be
sent (an image that cannot be encoded) or that the server rejects (HTTP 400 / 413 / 422) is a
``bad_image`` / ``rejected`` FailedReply naming the request; the others are still answered.

Configuration: arguments, else the environment: ``ARR_API_BASE`` / ``OPENAI_BASE_URL``
(endpoint), ``ARR_API_MODEL`` (model), the key from the variable named by ``api_key_env``
(default ``OPENAI_API_KEY``; a local server may need none).
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import io
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from arr_jax.data.images import to_rgb_uint8
from arr_jax.judge import parsing
from arr_jax.judge.parsing import FailedReply
from arr_jax.judge.templates import ChatRequest, ImagePart

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
RANK_PREFIX = '{"rank": ['          # the answer's opening, as `arr_jax.judge.vlm_backend.RANK_PREFIX`
CHOICES = ("1", "2")                # the tokens that mean "Image 1 / Image 2 ranks first"
CACHE_VERSION = 2                   # bump when the cache key's parts or an entry's layout change
_FALLBACK = object()                # a choice request the server answered without log-probs


class APIError(RuntimeError):
    """A request that failed for good (non-retryable status, or retries exhausted)."""


class AuthenticationError(APIError):
    """HTTP 401/403: the key is missing, wrong or lacks access."""


def encode_image(image: Any, fmt: str = "png", quality: int = 90, max_side: int | None = None) -> str:
    """An image (uint8 (H, W, 3), or anything `arr_jax.data.images.to_rgb_uint8` takes: other
    layouts, dtypes, files, bytes, PIL images; transparency composited on white) ->
    ``data:image/<fmt>;base64,...`` of its RGB pixels, downscaled (aspect kept) so that its longer
    side is at most ``max_side`` when given. `ImageDecodeError` (a ValueError) for a bad image."""
    im = Image.fromarray(to_rgb_uint8(image))
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=quality)
        mime = "jpeg"
    elif fmt == "png":
        im.save(buf, format="PNG")
        mime = "png"
    else:
        raise ValueError(f"unknown image format {fmt!r}; use 'png' or 'jpeg'")
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _chat_url(endpoint: str) -> str:
    e = endpoint.rstrip("/")
    return e if e.endswith("/chat/completions") else e + "/chat/completions"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


# finish_reason values of a reply that ended by itself ("stop"; None where a server omits it;
# the rest are spellings some OpenAI-compatible servers use for the same thing)
FINISHED = (None, "stop", "eos", "eos_token", "stop_sequence", "end_turn")


def check_reply(raw: dict) -> tuple[str, str | None, str]:
    """``(text, failure, note)`` of a chat-completion response: the answer text, and None or the
    status that makes it no answer (`parsing.REFUSED`, `parsing.TRUNCATED`,
    `parsing.REASONING_ONLY`, `parsing.EMPTY`) with a note saying why."""
    choice = (raw.get("choices") or [{}])[0] or {}
    msg = choice.get("message") or {}
    text = _content_text(msg.get("content"))
    reasoning = _content_text(msg.get("reasoning_content") or msg.get("reasoning"))
    finish = choice.get("finish_reason")
    refusal = msg.get("refusal")
    if refusal or finish == "content_filter":
        return text, parsing.REFUSED, f"refused ({_content_text(refusal) or 'finish_reason ' + repr(finish)})"[:500]
    if finish not in FINISHED:
        return text, parsing.TRUNCATED, (f"finish_reason {finish!r}: {len(text)} characters of answer, "
                                         f"{len(reasoning)} of reasoning")
    if not text.strip():
        if reasoning.strip():
            return text, parsing.REASONING_ONLY, f"reasoning ({len(reasoning)} characters) but no answer"
        return text, parsing.EMPTY, "empty reply"
    return text, None, ""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds ("120") or an HTTP date
    ("Wed, 21 Oct 2026 07:28:00 GMT", RFC 9110 §10.2.3; a date in the past gives 0). None when
    the header is absent or neither form."""
    if value is None or not str(value).strip():
        return None
    v = str(value).strip()
    try:
        return max(float(v), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        import datetime as _dt

        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def public_url(url: str) -> str:
    """``url`` without user info or query (where a key could hide): what logs, cache entries and
    run metadata record of an endpoint."""
    u = urllib.parse.urlsplit(url)
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return urllib.parse.urlunsplit((u.scheme, host, u.path.rstrip("/"), "", ""))


def _option_of(token: str) -> str:
    """The option a returned token spells: byte-level (``Ġ``) and SentencePiece (``▁``) space
    markers and surrounding white space removed."""
    return token.replace("\u0120", " ").replace("\u2581", " ").strip()


def choice_from_reply(raw: dict, choices: Sequence[str] = CHOICES) -> tuple[np.ndarray | None, str | None, str]:
    """``(log-probs (2,) float64 or None, failure or None, note)`` of a one-token choice reply in
    the OpenAI / vLLM schema (``choices[0].logprobs.content[0]``: the chosen ``token`` with its
    ``logprob`` and ``top_logprobs``). Each option's log-prob is the log-sum-exp over the distinct
    returned tokens that spell it (`_option_of`: "1", " 1", "Ġ1" ...). An option missing from the
    top-k while the other is present gets the lowest returned log-prob (an upper bound on its
    own, so P(image 1) is never overstated). Log-probs None with failure None: the reply has no
    log-probs (the server does not return them). Failures: `parsing.REFUSED`,
    `parsing.THINKING` (the answer opens a reasoning block), `parsing.NO_CHOICE` (neither option
    among the returned tokens)."""
    choice = (raw.get("choices") or [{}])[0] or {}
    msg = choice.get("message") or {}
    if msg.get("refusal") or choice.get("finish_reason") == "content_filter":
        return None, parsing.REFUSED, f"refused ({_content_text(msg.get('refusal')) or 'content_filter'})"[:500]
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not content or not isinstance(content[0], dict):
        return None, None, "no log-probs in the reply"
    first = content[0]
    entries: dict[str, float] = {}
    for e in [first] + list(first.get("top_logprobs") or []):
        if isinstance(e, dict) and isinstance(e.get("token"), str) and e.get("logprob") is not None:
            entries.setdefault(e["token"], float(e["logprob"]))
    chosen = _option_of(str(first.get("token", "")))
    if chosen.lower().startswith(("<think", "<thinking")) or (msg.get("reasoning_content") or msg.get("reasoning")):
        return None, parsing.THINKING, f"the reply opens a reasoning block ({first.get('token')!r}) instead of answering"
    lp = np.full(len(choices), -np.inf)
    for tok, v in entries.items():
        o = _option_of(tok)
        if o in choices:
            k = choices.index(o)
            lp[k] = np.logaddexp(lp[k], v)
    found = np.isfinite(lp)
    if not found.any():
        shown = ", ".join(repr(t) for t in list(entries)[:5])
        return None, parsing.NO_CHOICE, (f"neither option {list(choices)} among the {len(entries)} returned tokens "
                                         f"({shown}{', ...' if len(entries) > 5 else ''})")
    if not found.all():
        lp[~found] = min(entries.values())
        return lp, None, "bounded"
    return lp, None, ""


class _Retryable(Exception):
    pass


class _Rejected(Exception):
    """The server rejected this one request (HTTP 400 / 413 / 422)."""


class OpenAIBackend:
    """Text backend over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
      model / endpoint / api_key: see module docstring for the environment fallbacks.
      timeout: seconds per HTTP attempt.  max_retries: retries after the first attempt.
      backoff / backoff_max: first back-off delay and its cap (doubles per retry, +-25% jitter;
        a ``Retry-After`` header, in seconds or as an HTTP date, wins when present, capped at
        ``retry_after_max``).
      concurrency: requests in flight at once.  cache_dir: on-disk response cache (None = off).
      temperature / max_tokens: sampling; ``max_tokens`` caps each request's own budget.
      token_param: "max_tokens", or "max_completion_tokens" for reasoning models.
      image_format: "png" (lossless) or "jpeg" (smaller for photos).  max_image_side: downscale
        images whose longer side exceeds this (None = send as is).
      extra_body: extra JSON fields merged into every request (e.g. {"top_p": 1}).
      top_logprobs: how many top log-probs a choice request asks for (vLLM's default cap is 20).
      template_kwargs: ``chat_template_kwargs`` of choice requests (default: no thinking).
      choice_prefix / choices: the answer's opening a choice request continues, and the two
        option tokens scored after it.

    Requests are built prefix-cache friendly: the system prompt (instructions, rubric) comes
    first and is byte-identical for every pair judged under one rubric; the pair's own text and
    images come last, so vLLM's ``--enable-prefix-caching`` or SGLang's radix cache reuse the rest.
    """

    def __init__(self, model: str | None = None, endpoint: str | None = None, api_key: str | None = None,
                 *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, max_retries: int = 5,
                 backoff: float = 1.0, backoff_max: float = 60.0, concurrency: int = 8,
                 cache_dir: str | os.PathLike | None = None, temperature: float = 0.0,
                 max_tokens: int | None = None, token_param: str = "max_tokens",
                 image_format: str = "png", max_image_side: int | None = None, extra_body: dict | None = None,
                 top_logprobs: int = 20, template_kwargs: dict | None = None, retry_after_max: float = 600.0,
                 choice_prefix: str = RANK_PREFIX, choices: Sequence[str] = CHOICES):
        self.model = model or os.environ.get("ARR_API_MODEL", "")
        if not self.model:
            raise ValueError("no model: pass model= (config backend.openai.model) or set ARR_API_MODEL")
        given = endpoint or os.environ.get("ARR_API_BASE") or os.environ.get("OPENAI_BASE_URL")
        self.endpoint_is_default = not given
        self.endpoint = given or DEFAULT_ENDPOINT
        self.url = _chat_url(self.endpoint)
        self.api_key_env = api_key_env
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env, "")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if not 1 <= int(top_logprobs) <= 20:
            raise ValueError(f"top_logprobs must be in [1, 20] (the OpenAI API's range), got {top_logprobs}")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.backoff_max = float(backoff), float(backoff_max)
        self.retry_after_max = float(retry_after_max)
        self.concurrency = int(concurrency)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.temperature, self.max_tokens = float(temperature), max_tokens
        self.token_param, self.image_format, self.max_image_side = token_param, image_format, max_image_side
        self.extra_body = dict(extra_body or {})
        self.top_logprobs = int(top_logprobs)
        self.template_kwargs = {"enable_thinking": False} if template_kwargs is None else dict(template_kwargs)
        self.choice_prefix, self.choices = choice_prefix, tuple(choices)
        self.choice_supported: bool | None = None   # None: not known yet (see `check`)
        self._sem = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        # requests, HTTP calls, cache hits, retries, seconds waited before retries, choice requests
        # answered by generate-and-parse, and failed replies by status (truncated, no_choice, ...)
        self.stats = {"requests": 0, "http_calls": 0, "cache_hits": 0, "retries": 0, "wait_s": 0.0,
                      "choice_fallback": 0}
        self.name = f"openai:{self.model}"

    # -- request body --------------------------------------------------------------------
    def payload(self, req: ChatRequest) -> dict:
        """The JSON body for one request."""
        content = []
        for p in req.parts:
            if isinstance(p, ImagePart):
                content.append({"type": "image_url",
                                "image_url": {"url": encode_image(p.image, self.image_format,
                                                                    max_side=self.max_image_side)}})
            elif p:
                content.append({"type": "text", "text": p})
        messages = []
        if req.system:
            messages.append({"role": "system", "content": req.system})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        budget = [b for b in (req.max_tokens, self.max_tokens) if b]
        if budget:
            body[self.token_param] = int(min(budget))
        if req.sample:
            body["seed"] = int(req.sample)
        body.update(self.extra_body)
        return body

    def choice_payload(self, req: ChatRequest) -> dict:
        """The JSON body of a one-token choice request: `payload` with an assistant turn holding
        ``choice_prefix`` continued by the server (``add_generation_prompt`` false,
        ``continue_final_message`` true), one token, temperature 0, ``logprobs`` and
        ``top_logprobs``, and ``chat_template_kwargs`` (no thinking)."""
        body = self.payload(req)
        body.pop("max_tokens", None)
        body.pop("max_completion_tokens", None)
        body["messages"].append({"role": "assistant", "content": self.choice_prefix})
        body.update({self.token_param: 1, "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs,
                     "add_generation_prompt": False, "continue_final_message": True})
        if self.template_kwargs:
            body["chat_template_kwargs"] = dict(self.template_kwargs)
        return body

    @staticmethod
    def request_hash(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # -- cache ---------------------------------------------------------------------------
    def cache_key_parts(self, body: dict, kind: str = "generate") -> dict:
        """Everything a cached answer depends on, in one place (the cache key is its SHA-256):

          * ``endpoint``: the server (`public_url` of the chat URL): two servers may serve
            different weights under one model name (``--served-model-name``, a proxy, a fine-tune);
          * ``kind``: "generate" (an answer text) or "choice" (one token's log-probs), so a reply
            of one kind is never read as the other;
          * ``body``: the whole request: model name, messages (system prompt with the
            instructions and the rubric or prompt-specific rubric, the prompt, the images),
            sampling (temperature, token budget, seed, ``logprobs`` / ``top_logprobs``), the
            answer prefix and ``chat_template_kwargs`` of choice requests, and ``extra_body``;
          * ``version``: `CACHE_VERSION`, the layout of keys and entries.

        The API key is not part of it and is never written."""
        return {"version": CACHE_VERSION, "endpoint": public_url(self.url), "kind": kind, "body": body}

    def cache_key(self, body: dict, kind: str = "generate") -> str:
        """SHA-256 of `cache_key_parts`."""
        return self.request_hash(self.cache_key_parts(body, kind))

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_read(self, key: str, kind: str) -> dict | None:
        p = self._cache_path(key)
        if p is None or not p.exists():
            return None
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or entry.get("kind") != kind:
            return None
        return entry

    def _cache_get(self, key: str) -> str | None:
        """The cached answer, or None: no entry, a torn or foreign file, or an entry that is no
        answer (written before replies were checked): ask again."""
        entry = self._cache_read(key, "generate")
        if entry is None:
            return None
        text, raw = entry.get("text"), entry.get("response")
        if not isinstance(text, str) or not text.strip():
            return None
        if isinstance(raw, dict) and check_reply(raw)[1] is not None:
            return None
        return text

    def _cache_put(self, key: str, text: str, raw: dict, kind: str = "generate") -> None:
        p = self._cache_path(key)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps({"key": key, "kind": kind, "endpoint": public_url(self.url), "model": self.model,
                                   "text": text, "response": raw}), encoding="utf-8")
        os.replace(tmp, p)

    # -- HTTP ----------------------------------------------------------------------------
    def _post(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            body = e.read()[:2000].decode("utf-8", "replace") if e.fp is not None else ""
            if e.code in (400, 413, 422):
                raise _Rejected(f"HTTP {e.code} from {public_url(self.url)}: {body[:500]}") from None
            if e.code in (401, 403):
                where = "backend.openai.api_key / " + self.api_key_env
                state = "is set" if self.api_key else "is NOT set"
                raise AuthenticationError(
                    f"HTTP {e.code} from {public_url(self.url)}: the API key was rejected (model {self.model!r}). "
                    f"Set a valid key via {where} (the key {state}). Server said: {body[:500]}") from None
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {body[:300]}", e.headers.get("Retry-After")) from None
            raise APIError(f"HTTP {e.code} from {public_url(self.url)} (model {self.model!r}): {body[:1000]}") from None
        except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {e}", None) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout, ConnectionError, OSError)):
                raise _Retryable(f"URLError: {e.reason}", None) from None
            raise APIError(f"cannot reach {public_url(self.url)}: {e.reason}") from None
        except ValueError as e:  # a 200 with a body that is not JSON: retry
            raise _Retryable(f"bad JSON body: {e}", None) from None

    def _delay(self, attempt: int, retry_after: str | None) -> tuple[float, str]:
        """``(seconds, why)`` to wait before retry ``attempt`` (0-based): what ``Retry-After`` asks
        (seconds or an HTTP date; capped at ``retry_after_max``), else exponential back-off."""
        asked = retry_after_seconds(retry_after)
        if asked is not None:
            return min(asked, self.retry_after_max), f"Retry-After: {retry_after}"
        d = min(self.backoff * 2 ** attempt, self.backoff_max)
        return d * random.uniform(0.75, 1.25), "back-off"

    def _failed(self, text: str, status: str, reason: str) -> FailedReply:
        with self._lock:
            self.stats[status] = self.stats.get(status, 0) + 1
        log.warning("%s", reason)
        return FailedReply(text, status, reason)

    def _send(self, body: dict, label: str) -> dict:
        """POST ``body`` with retries; the parsed response (a dict with ``choices``). Raises
        `_Rejected` (HTTP 400 / 413 / 422), `AuthenticationError`, or `APIError` once retries are
        spent; every wait is logged with its reason and added to ``stats["wait_s"]``."""
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                with self._sem:
                    with self._lock:
                        self.stats["http_calls"] += 1
                    raw = self._post(data)
                if not isinstance(raw, dict) or not raw.get("choices"):
                    raise _Retryable(f"no choices in response: {json.dumps(raw)[:300]}", None)
                return raw
            except _Retryable as e:
                last = str(e.args[0])
                if attempt == self.max_retries:
                    break
                wait_s, why = self._delay(attempt, e.args[1] if len(e.args) > 1 else None)
                with self._lock:
                    self.stats["retries"] += 1
                    self.stats["wait_s"] += wait_s
                log.warning("judge API %s: %s: %s; waiting %.1f s (%s), retry %d of %d", public_url(self.url), label,
                            last[:200], wait_s, why, attempt + 1, self.max_retries)
                time.sleep(wait_s)
        raise APIError(f"{public_url(self.url)}: {label}: giving up after {self.max_retries + 1} attempts; "
                       f"last error: {last}")

    def _one(self, req: ChatRequest, index: int | None = None) -> str:
        label = req.label(index)
        with self._lock:
            self.stats["requests"] += 1
        try:
            body = self.payload(req)
        except ValueError as e:  # an image that cannot be encoded
            return self._failed("", parsing.BAD_IMAGE, f"{label}: {e}")
        key = self.cache_key(body, "generate")
        hit = self._cache_get(key)
        if hit is not None:
            with self._lock:
                self.stats["cache_hits"] += 1
            return hit
        try:
            raw = self._send(body, label)
        except _Rejected as e:
            return self._failed("", parsing.REJECTED, f"{label}: {e}")
        text, failure, note = check_reply(raw)
        if failure is not None:  # not an answer: counted, never cached
            return self._failed(text, failure, f"{label}: {note} (model {self.model!r})")
        self._cache_put(key, text, raw)
        return text

    def _map(self, fn, requests: list) -> list:
        """``[fn(r, i) ...]`` with up to ``concurrency`` calls at once; the first exception
        cancels the pending calls and is raised."""
        if len(requests) <= 1 or self.concurrency == 1:
            return [fn(r, i) for i, r in enumerate(requests)]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)))
        try:
            futures = [pool.submit(fn, r, i) for i, r in enumerate(requests)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for g in futures:
                        g.cancel()
                    raise f.exception()
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        """Answer texts, in order; a reply that is no answer, or a request that could not be sent
        or was rejected, is a `FailedReply` (module docstring). Raises AuthenticationError /
        APIError when the service fails (pending requests are cancelled; finished ones are
        already cached)."""
        return self._map(self._one, list(requests))

    # -- choice scoring ----------------------------------------------------------------------
    def _no_choice_support(self, why: str) -> None:
        with self._lock:
            first = self.choice_supported is not False
            self.choice_supported = False
        if first:
            log.warning("judge API %s (model %r): %s; choice scoring is off for this run, the judge generates and "
                        "parses its verdicts instead (slower; counted in stats['choice_fallback']). Serve the judge "
                        "with vLLM or SGLang (launch/serve_judge.sh) to score from log-probs.",
                        public_url(self.url), self.model, why)

    def _one_choice(self, req: ChatRequest, index: int | None = None):
        """``(log-probs (2,) or None, failure or None, note)`` of one choice request, or `_FALLBACK`."""
        label = req.label(index)
        with self._lock:
            self.stats["requests"] += 1
        try:
            body = self.choice_payload(req)
        except ValueError as e:
            f = self._failed("", parsing.BAD_IMAGE, f"{label}: {e}")
            return None, f.status, f.reason
        key = self.cache_key(body, "choice")
        entry = self._cache_read(key, "choice")
        if entry is not None and isinstance(entry.get("response"), dict):
            lp, failure, _ = choice_from_reply(entry["response"], self.choices)
            if lp is not None and failure is None:
                with self._lock:
                    self.stats["cache_hits"] += 1
                return lp, None, ""
        if self.choice_supported is False:
            return _FALLBACK
        try:
            raw = self._send(body, label)
        except _Rejected as e:
            # the request or its choice parameters: a server that rejects the latter answers the
            # same request in generate mode
            return _FALLBACK if self.choice_supported is None else self._rejected(label, e)
        lp, failure, note = choice_from_reply(raw, self.choices)
        if failure is not None:  # not an answer: counted, never cached
            f = self._failed("", failure, f"{label}: {note} (model {self.model!r})")
            return None, f.status, f.reason
        if lp is None:  # no log-probs at all: this server does not return them
            self._no_choice_support(note)
            return _FALLBACK
        self.choice_supported = True
        if note == "bounded":
            with self._lock:
                self.stats["choice_bounded"] = self.stats.get("choice_bounded", 0) + 1
        self._cache_put(key, "", raw, kind="choice")
        return lp, None, ""

    def _rejected(self, label: str, e: Exception):
        f = self._failed("", parsing.REJECTED, f"{label}: {e}")
        return None, f.status, f.reason

    def p_first_status(self, requests: Sequence[ChatRequest]) -> tuple[np.ndarray, list[str | None], list[str]]:
        """``(p (N,) float64, status, note)`` for pairwise requests: P(Image 1 ranks first) from
        one-token choice requests (module docstring), sent concurrently; ``status[i]`` None when
        scored, else the failure kind (``no_choice``, ``thinking``, ``refused``, ``rejected``,
        ``bad_image``, or a parse status after a fallback) with p NaN and ``note[i]`` naming the
        request. Requests the server answers without log-probs (or whose choice parameters it
        rejects) are answered by generating and parsing (p 1 / 0 / 0.5 for a tie), once the
        server is known not to support them, all of them. Raises as `generate` does."""
        requests = list(requests)
        got = self._map(self._one_choice, requests)
        p = np.full(len(requests), np.nan)
        status: list[str | None] = [None] * len(requests)
        notes = [""] * len(requests)
        again = [i for i, g in enumerate(got) if g is _FALLBACK]
        for i, g in enumerate(got):
            if g is _FALLBACK:
                continue
            lp, failure, note = g
            if failure is None:
                p[i] = float(np.exp(lp[0] - np.logaddexp(lp[0], lp[1])))
            else:
                status[i], notes[i] = failure, note
        if again:
            texts = self.generate([requests[i] for i in again])
            with self._lock:
                self.stats["choice_fallback"] += len(again)
            rejected = 0
            for i, t in zip(again, texts):
                a = parsing.parse_pairwise(t)
                if a.usable:
                    p[i] = 1.0 if a.winner == 1 else 0.0 if a.winner == 2 else 0.5
                else:
                    status[i], notes[i] = a.status, f"{requests[i].label(i)}: {a.reason}"
                    rejected += a.status == parsing.REJECTED
            if self.choice_supported is None and rejected < len(again):
                self._no_choice_support("the server rejects the choice parameters (logprobs, continue_final_message "
                                        "or chat_template_kwargs) but answers the same requests without them")
        return p, status, notes

    def p_first(self, requests: Sequence[ChatRequest]) -> np.ndarray:
        """``(N,)`` P(Image 1 ranks first) (`p_first_status`; NaN for a failed request)."""
        return self.p_first_status(requests)[0]

    # -- start-up check ------------------------------------------------------------------------
    def _get(self, url: str, timeout: float) -> tuple[int, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, (e.read()[:2000].decode("utf-8", "replace") if e.fp is not None else "")

    def check(self, choice: bool = True, timeout: float = 10.0) -> dict:
        """Check, in seconds, that the judge can be used, before a run builds anything:

          1. the endpoint answers (``GET <endpoint>/models``);
          2. the key is accepted (HTTP 401 / 403: `AuthenticationError`);
          3. the model is served (listed by ``/models``; a server without that route is let through);
          4. with ``choice``, whether the server returns log-probs for a one-token choice request
             (a short text-only probe): when it does not, or rejects the parameters, choice scoring
             falls back to generate-and-parse, logged once.

        Returns ``{"endpoint", "models", "choice_scores"}``. Raises `APIError` /
        `AuthenticationError` / ValueError with one line saying what is wrong and what to set."""
        where = public_url(self.endpoint)
        if self.endpoint_is_default:
            if not self.api_key:
                raise AuthenticationError(
                    f"judge API: no endpoint set (judge.api.endpoint / ARR_API_BASE) so the public {where} would be "
                    f"used, and no key in {self.api_key_env}: point judge.api.endpoint at your server (e.g. "
                    "http://localhost:8000/v1, see launch/serve_judge.sh) or set the key")
            log.warning("judge API: no endpoint set (judge.api.endpoint / ARR_API_BASE): using the public %s", where)
        url = self.endpoint.rstrip("/")
        if url.endswith("/chat/completions"):
            url = url[: -len("/chat/completions")]
        t0 = time.perf_counter()
        try:
            code, text = self._get(url + "/models", timeout)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise APIError(f"judge API: cannot reach {where} ({reason}); start the judge server (launch/serve_judge.sh) "
                           "or fix judge.api.endpoint / ARR_API_BASE") from None
        if code in (401, 403):
            state = "is set but was rejected" if self.api_key else "is not set"
            raise AuthenticationError(f"judge API: {where} answered HTTP {code}: the key in {self.api_key_env} {state}; "
                                      f"set judge.api.api_key_env to the variable holding a valid key")
        models: list[str] = []
        if code == 200:
            try:
                models = [m.get("id") for m in json.loads(text).get("data", []) if isinstance(m, dict)]
            except (ValueError, AttributeError):
                models = []
            if models and self.model not in models:
                raise ValueError(f"judge API: {where} does not serve model {self.model!r}; it serves {models[:10]}: "
                                 "set judge.api.model (or ARR_API_MODEL) to one of them")
        elif code >= 500 or code == 429:
            raise APIError(f"judge API: {where}/models answered HTTP {code} ({text[:200]}); is the server still "
                           "starting? Wait until it answers, then start the run")
        else:
            log.warning("judge API %s: GET /models answered HTTP %d; the model name %r is not checked", where, code,
                        self.model)
        if choice and self.choice_supported is None:
            from arr_jax.judge.templates import ChatRequest as _Req

            probe = _Req(task="probe", system="Answer with the number of the better option.",
                         parts=("Which is more than the other, 1 or 2?",))
            body = self.choice_payload(probe)
            try:
                raw = self._send(body, "start-up probe")
            except _Rejected as e:
                self._no_choice_support(f"the server rejects a one-token log-prob request ({str(e)[:200]})")
            else:
                lp, failure, note = choice_from_reply(raw, self.choices)
                if lp is None and failure is None:
                    self._no_choice_support(note)
                else:
                    self.choice_supported = True
        log.info("judge API %s: model %r served, choice scores %s (checked in %.1f s)", where, self.model,
                 {True: "from log-probs", False: "off (generate and parse)", None: "not checked"}[
                     self.choice_supported if choice else None], time.perf_counter() - t0)
        return {"endpoint": where, "models": models, "choice_scores": self.choice_supported}
