"""OpenAI-compatible chat-completions backend (GPT, Gemini's OpenAI endpoint, vLLM, ...).

Standard library only (``urllib``). Per request: images go inline as base64 data URLs;
transient failures (HTTP 5xx, 429, timeouts, dropped connections) are retried with
exponential back-off; at most ``concurrency`` requests are in flight at once (one semaphore
per backend, shared by every thread); answers are cached on disk under a SHA-256 of the
request body, so a rerun costs nothing. HTTP 401/403 raise `AuthenticationError` at once.

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
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from arr_jax.data.images import to_rgb_uint8
from arr_jax.judge import parsing
from arr_jax.judge.parsing import FailedReply
from arr_jax.judge.templates import ChatRequest, ImagePart

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://api.openai.com/v1"


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
        a ``Retry-After`` header wins when present).
      concurrency: requests in flight at once.  cache_dir: on-disk response cache (None = off).
      temperature / max_tokens: sampling; ``max_tokens`` caps each request's own budget.
      token_param: "max_tokens", or "max_completion_tokens" for reasoning models.
      image_format: "png" (lossless) or "jpeg" (smaller for photos).  max_image_side: downscale
        images whose longer side exceeds this (None = send as is).
      extra_body: extra JSON fields merged into every request (e.g. {"top_p": 1}).
    """

    def __init__(self, model: str | None = None, endpoint: str | None = None, api_key: str | None = None,
                 *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, max_retries: int = 5,
                 backoff: float = 1.0, backoff_max: float = 60.0, concurrency: int = 8,
                 cache_dir: str | os.PathLike | None = None, temperature: float = 0.0,
                 max_tokens: int | None = None, token_param: str = "max_tokens",
                 image_format: str = "png", max_image_side: int | None = None, extra_body: dict | None = None):
        self.model = model or os.environ.get("ARR_API_MODEL", "")
        if not self.model:
            raise ValueError("no model: pass model= (config backend.openai.model) or set ARR_API_MODEL")
        self.endpoint = endpoint or os.environ.get("ARR_API_BASE") or os.environ.get("OPENAI_BASE_URL") \
            or DEFAULT_ENDPOINT
        self.url = _chat_url(self.endpoint)
        self.api_key_env = api_key_env
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env, "")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.backoff, self.backoff_max = float(backoff), float(backoff_max)
        self.concurrency = int(concurrency)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.temperature, self.max_tokens = float(temperature), max_tokens
        self.token_param, self.image_format, self.max_image_side = token_param, image_format, max_image_side
        self.extra_body = dict(extra_body or {})
        self._sem = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        # requests, HTTP calls, cache hits, retries, and failed replies by status (truncated, ...)
        self.stats = {"requests": 0, "http_calls": 0, "cache_hits": 0, "retries": 0}
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

    @staticmethod
    def request_hash(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # -- cache ---------------------------------------------------------------------------
    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        """The cached answer, or None: no entry, a torn or foreign file, or an entry that is no
        answer (written before replies were checked): ask again."""
        p = self._cache_path(key)
        if p is None or not p.exists():
            return None
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
            text = entry["text"]
            raw = entry.get("response")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not isinstance(text, str) or not text.strip():
            return None
        if isinstance(raw, dict) and check_reply(raw)[1] is not None:
            return None
        return text

    def _cache_put(self, key: str, text: str, raw: dict) -> None:
        p = self._cache_path(key)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(json.dumps({"key": key, "model": self.model, "text": text, "response": raw}),
                       encoding="utf-8")
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
                raise _Rejected(f"HTTP {e.code} from {self.url}: {body[:500]}") from None
            if e.code in (401, 403):
                where = "backend.openai.api_key / " + self.api_key_env
                state = "is set" if self.api_key else "is NOT set"
                raise AuthenticationError(
                    f"HTTP {e.code} from {self.url}: the API key was rejected (model {self.model!r}). "
                    f"Set a valid key via {where} (the key {state}). Server said: {body[:500]}") from None
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {body[:300]}", e.headers.get("Retry-After")) from None
            raise APIError(f"HTTP {e.code} from {self.url} (model {self.model!r}): {body[:1000]}") from None
        except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {e}", None) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout, ConnectionError, OSError)):
                raise _Retryable(f"URLError: {e.reason}", None) from None
            raise APIError(f"cannot reach {self.url}: {e.reason}") from None
        except ValueError as e:  # a 200 with a body that is not JSON: retry
            raise _Retryable(f"bad JSON body: {e}", None) from None

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max)
            except ValueError:
                pass
        d = min(self.backoff * 2 ** attempt, self.backoff_max)
        return d * random.uniform(0.75, 1.25)

    def _failed(self, text: str, status: str, reason: str) -> FailedReply:
        with self._lock:
            self.stats[status] = self.stats.get(status, 0) + 1
        log.warning("%s", reason)
        return FailedReply(text, status, reason)

    def _one(self, req: ChatRequest, index: int | None = None) -> str:
        label = req.label(index)
        with self._lock:
            self.stats["requests"] += 1
        try:
            body = self.payload(req)
        except ValueError as e:  # an image that cannot be encoded
            return self._failed("", parsing.BAD_IMAGE, f"{label}: {e}")
        key = self.request_hash(body)
        hit = self._cache_get(key)
        if hit is not None:
            with self._lock:
                self.stats["cache_hits"] += 1
            return hit
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
                text, failure, note = check_reply(raw)
                if failure is not None:  # not an answer: counted, never cached
                    return self._failed(text, failure, f"{label}: {note} (model {self.model!r})")
                self._cache_put(key, text, raw)
                return text
            except _Rejected as e:
                return self._failed("", parsing.REJECTED, f"{label}: {e}")
            except _Retryable as e:
                last = str(e.args[0])
                if attempt == self.max_retries:
                    break
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(self._delay(attempt, e.args[1] if len(e.args) > 1 else None))
        raise APIError(f"{self.url}: {label}: giving up after {self.max_retries + 1} attempts; last error: {last}")

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        """Answer texts, in order; a reply that is no answer, or a request that could not be sent
        or was rejected, is a `FailedReply` (module docstring). Raises AuthenticationError /
        APIError when the service fails (pending requests are cancelled; finished ones are
        already cached)."""
        requests = list(requests)
        if not requests:
            return []
        if len(requests) == 1 or self.concurrency == 1:
            return [self._one(r, i) for i, r in enumerate(requests)]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests)))
        try:
            futures = [pool.submit(self._one, r, i) for i, r in enumerate(requests)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for g in futures:
                        g.cancel()
                    raise f.exception()
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
