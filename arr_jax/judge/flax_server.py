"""An OpenAI-compatible chat server over the project's Flax Qwen3-VL judge, in vLLM's response schema.

`FlaxChatServer` answers ``GET /v1/models`` and ``POST /v1/chat/completions`` on a local port from
a `arr_jax.judge.vlm_backend.FlaxVLMBackend`, the way vLLM's OpenAI server does for the requests
the API judge sends (`arr_jax.judge.api.OpenAIBackend`):

  * the messages (text parts and ``image_url`` parts holding base64 data URLs) are rendered with
    the snapshot's chat template (or the built-in Qwen format), with ``chat_template_kwargs``;
    ``continue_final_message`` (with ``add_generation_prompt`` false) continues the final
    assistant message as transformers' ``apply_chat_template`` does: the rendering is cut right
    after that message's text;
  * ``max_tokens`` tokens are decoded greedily (temperature 0; the stop tokens end a reply early,
    ``finish_reason`` "stop", else "length");
  * ``logprobs`` / ``top_logprobs`` give, for the first generated token, its log-prob and the
    ``top_logprobs`` most likely tokens (``choices[0].logprobs.content[0]``: ``token``,
    ``logprob``, ``bytes``, ``top_logprobs``), from the full-vocabulary log-softmax in float32.

Concurrent requests are batched (up to ``max_batch`` rows, always padded to ``max_batch`` rows and
left-padded to ``seq_bucket`` tokens; replies are capped at ``max_new_tokens``) as a serving engine batches them, so the client's concurrency
has the effect it has against vLLM. It exists to test and benchmark the API judge on loopback
without a GPU server (``logprobs=False`` plays a server that returns no log-probs); it is not a
production server (use ``launch/serve_judge.sh``).
"""
from __future__ import annotations

import base64
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from arr_jax.judge.decode import left_pad
from arr_jax.models.qwen3_vl import prepare_inputs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def decode_data_url(url: str) -> np.ndarray:
    """``data:image/...;base64,...`` -> uint8 (H, W, 3). ValueError for anything else."""
    if not isinstance(url, str) or not url.startswith("data:image/") or "," not in url:
        raise ValueError(f"only inline data:image URLs are served here, got {str(url)[:40]!r}")
    from arr_jax.data.images import to_rgb_uint8

    return to_rgb_uint8(base64.b64decode(url.split(",", 1)[1]), name="a request's image")


class FlaxChatServer:
    """See the module docstring. ``backend``: a FlaxVLMBackend; ``model_name``: the served name;
    ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get HTTP 401;
    ``logprobs``: False drops every log-prob field from the replies (a server without them).
    ``bodies`` keeps every request body received (tests read them). Use as a context manager."""

    def __init__(self, backend, model_name: str = "judge", *, api_key: str | None = None, logprobs: bool = True,
                 max_batch: int = 8, seq_bucket: int = 128, max_new_tokens: int = 64, host: str = "127.0.0.1",
                 port: int = 0):
        self.backend, self.model_name, self.api_key = backend, model_name, api_key
        self.logprobs, self.max_batch, self.seq_bucket = logprobs, max_batch, seq_bucket
        self.max_new_tokens = max_new_tokens
        self.bodies: list[dict] = []
        self.batches: list[int] = []           # rows of every model call
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, code: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._reply(401, {"error": {"message": "invalid API key", "type": "authentication_error"}})
                    return False
                return True

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._reply(200, {"object": "list", "data": [{"id": server.model_name, "object": "model",
                                                                  "owned_by": "arr_jax"}]})
                else:
                    self._reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                with server._lock:
                    server.bodies.append(body)
                if body.get("model") != server.model_name:
                    self._reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                    return
                try:
                    job = server._parse(body)
                except (ValueError, KeyError, TypeError) as e:
                    self._reply(400, {"error": {"message": str(e), "type": "BadRequestError"}})
                    return
                done = threading.Event()
                job["done"] = done
                server._jobs.put(job)
                done.wait()
                if "error" in job:
                    self._reply(400, {"error": {"message": job["error"], "type": "BadRequestError"}})
                else:
                    self._reply(200, job["reply"])

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self._threads = [threading.Thread(target=self.httpd.serve_forever, daemon=True),
                         threading.Thread(target=self._worker, daemon=True)]

    # -- requests -------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False,
               template_kwargs: dict | None = None) -> tuple[str, list[np.ndarray]]:
        """The prompt text the model reads and the images, in order (see the module docstring)."""
        msgs, images = [], []
        for m in messages:
            c = m.get("content")
            if isinstance(c, list):
                parts = []
                for p in c:
                    if p.get("type") == "text":
                        parts.append({"type": "text", "text": p["text"]})
                    elif p.get("type") == "image_url":
                        images.append(decode_data_url(p["image_url"]["url"]))
                        parts.append({"type": "image"})
                    else:
                        raise ValueError(f"unsupported content part type {p.get('type')!r}")
                c = parts
            msgs.append({"role": m["role"], "content": c})
        pr = self.backend.processor
        gen = add_generation_prompt and not continue_final_message
        if pr.chat_template is not None:
            text = pr.chat_template.render(msgs, gen, **(template_kwargs or {}))
        else:
            text = pr._format_builtin(msgs, gen)
        if continue_final_message:
            final = msgs[-1]["content"]
            final = final if isinstance(final, str) else final[-1]["text"]
            if msgs[-1]["role"] != "assistant" or final not in text:
                raise ValueError("continue_final_message needs a final assistant message with text")
            text = text[:text.rindex(final) + len(final)]
        return text, images

    def _parse(self, body: dict) -> dict:
        text, images = self.render(body["messages"], body.get("add_generation_prompt", True),
                                   body.get("continue_final_message", False), body.get("chat_template_kwargs"))
        ids, pv, grid = self.backend.processor.encode(text, images)
        n = min(int(body.get("max_tokens") or body.get("max_completion_tokens") or 16), self.max_new_tokens)
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else -1
        return {"ids": ids, "pv": pv, "grid": grid, "max_tokens": n, "top": top}

    # -- the model ------------------------------------------------------------------------------
    def _worker(self):
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs = [first]
            time.sleep(0.002)   # let concurrent requests arrive, as a serving engine's step does
            while len(jobs) < self.max_batch:
                try:
                    j = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if j is None:
                    self._jobs.put(None)
                    break
                jobs.append(j)
            groups: dict[int, list] = {}
            for j in jobs:
                groups.setdefault(j["max_tokens"], []).append(j)
            for n, group in groups.items():
                try:
                    self._run(group, n)
                except Exception as e:  # noqa: BLE001 (each request gets the error, the server stays up)
                    for j in group:
                        j["error"] = f"{type(e).__name__}: {e}"
                for j in group:
                    j["done"].set()

    def _run(self, jobs: list[dict], max_tokens: int) -> None:
        import jax
        import jax.numpy as jnp

        b = self.backend
        pr = b.processor
        rows = self.max_batch   # one compiled shape per length bucket
        pad = jobs + [jobs[-1]] * (rows - len(jobs))
        length = _round_up(max(len(j["ids"]) for j in pad), self.seq_bucket)
        ids, mask = left_pad([j["ids"] for j in pad], pr.pad_id, length)
        grids = [j["grid"] for j in pad]
        if sum(len(g) for g in grids):
            inputs = prepare_inputs(pr.model_cfg, ids, mask, np.concatenate([j["pv"] for j in pad]),
                                    np.concatenate(grids), patch_bucket=256, image_bucket=2)
        else:
            inputs = prepare_inputs(pr.model_cfg, ids, mask)
        self.batches.append(len(jobs))
        want_lp = max_tokens == 1 or any(j["top"] >= 0 for j in jobs)
        if want_lp:
            logits, _ = b.decoder.prefill(inputs, length + 1)
            lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))
        if max_tokens > 1:
            toks, lengths = b.decoder.generate(inputs, max_new_tokens=max_tokens, stop_tokens=b.stop_tokens,
                                               pad_id=pr.pad_id, temperature=0.0, return_lengths=True)
        for r, j in enumerate(jobs):
            first = int(np.argmax(lp[r])) if want_lp else int(toks[r, 0])
            if max_tokens > 1:
                n = int(lengths[r])
                content = pr.decode(toks[r, :n])
                finish = "stop" if n < max_tokens else "length"
                completion = n
            else:
                content, finish, completion = pr.decode([first]), "length", 1
                if first in b.stop_tokens:
                    content, finish = "", "stop"
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content,
                                                               "reasoning_content": None, "tool_calls": []},
                                      "logprobs": None, "finish_reason": finish, "stop_reason": None}
            if j["top"] >= 0 and self.logprobs:
                def entry(t):
                    s = pr.decode([int(t)], skip_special_tokens=False)
                    return {"token": s, "logprob": float(lp[r, t]), "bytes": list(s.encode("utf-8"))}

                order = np.argsort(-lp[r], kind="stable")[:j["top"]]
                choice["logprobs"] = {"content": [dict(entry(first), top_logprobs=[entry(t) for t in order])]}
            j["reply"] = {"id": f"chatcmpl-{id(j):x}", "object": "chat.completion", "created": int(time.time()),
                          "model": self.model_name, "choices": [choice],
                          "usage": {"prompt_tokens": len(j["ids"]), "completion_tokens": completion,
                                    "total_tokens": len(j["ids"]) + completion}}

    # -- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> "FlaxChatServer":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._jobs.put(None)
        self.httpd.shutdown()
        self.httpd.server_close()
