"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 started in the test:
request shape (images inline), retries after 500s and timeouts, the concurrency limit, the
on-disk cache, a clear error on 401, and TextJudge parse-failure accounting over HTTP."""
import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from arr_jax.judge.api import APIError, AuthenticationError, OpenAIBackend
from arr_jax.judge.templates import TemplateSet
from arr_jax.judge.text_judge import CallableBackend, TextJudge


class FakeServer:
    """A chat-completions server. ``behave(body, attempt) -> (status, answer, delay_s)``: the
    answer is the reply's text, or a dict of the message's fields plus ``finish_reason``;
    ``attempt`` counts earlier requests with the same last user text."""

    def __init__(self, behave, models=None):
        self.behave, self.models = behave, models   # models: what GET /models lists (None: no such route)
        self.bodies, self.headers = [], []
        self.attempts: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body["messages"][-1]["content"][-1])
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    attempt = server.attempts.get(key, 0)
                    server.attempts[key] = attempt + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True
                try:
                    status, text, delay = server.behave(body, attempt)
                    time.sleep(delay)
                    # Done before the reply goes out: once the client has the reply it may send its
                    # next request at once, which must not be counted alongside this one.
                    with server.lock:
                        server.in_flight -= 1
                        counted = False
                    if isinstance(text, dict):  # a whole reply: content, finish_reason, reasoning_content, ...
                        reply = dict(text)
                        finish = reply.pop("finish_reason", "stop")
                        lps = reply.pop("logprobs", None)
                        choice = {"index": 0, "finish_reason": finish, "message": {"role": "assistant", **reply},
                                  "logprobs": lps}
                    else:
                        choice = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}
                    payload = ({"id": "x", "object": "chat.completion", "choices": [choice]}
                               if status == 200 else {"error": {"message": text}})
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    if counted:
                        with server.lock:
                            server.in_flight -= 1

            def do_GET(self):
                server.headers.append(dict(self.headers))
                data = json.dumps({"object": "list", "data": [{"id": m, "object": "model"}
                                                              for m in server.models or ()]}).encode()
                self.send_response(200 if server.models else 404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def hits(self) -> int:
        return len(self.bodies)


def _backend(server, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return OpenAIBackend(model="judge-test", endpoint=server.url, api_key="test-key", **kw)


def _pairs(n, seed=0, size=8):
    rng = np.random.default_rng(seed)
    return ([f"prompt {i}" for i in range(n)], rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _decode(url: str) -> np.ndarray:
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_request_shape_with_images_and_edit_source():
    answer = lambda body, attempt: (200, '{"rank": [2, 1], "reason": "r"}', 0.0)  # noqa: E731
    prompts, a, b = _pairs(3)
    src = np.full((3, 8, 8, 3), 7, np.uint8)
    with FakeServer(answer) as srv:
        judge = TextJudge(_backend(srv, concurrency=1), mode="pairwise")
        out = judge.compare(prompts, a, b, rubric="Theme 1: Alignment\n- every object is present")
        assert out.winner.tolist() == [2, 2, 2] and out.p_first.tolist() == [0.0, 0.0, 0.0]
        body, head = srv.bodies[0], srv.headers[0]
        assert body["model"] == "judge-test" and body["temperature"] == 0.0 and body["max_tokens"] > 0
        assert head["Authorization"] == "Bearer test-key"
        sys_msg, user = body["messages"]
        assert sys_msg["role"] == "system" and "every object is present" in sys_msg["content"]
        assert '"rank"' in sys_msg["content"]
        kinds = [c["type"] for c in user["content"]]
        assert kinds == ["text", "image_url", "text", "image_url"]
        assert "Prompt: prompt 0" in user["content"][0]["text"] and "Image 1" in user["content"][0]["text"]
        np.testing.assert_array_equal(_decode(user["content"][1]["image_url"]["url"]), a[0])
        np.testing.assert_array_equal(_decode(user["content"][3]["image_url"]["url"]), b[0])
        # editing: Image BASE first, every judgement refers to it
        judge.compare(prompts[:1], a[:1], b[:1], sources=src[:1])
        user = srv.bodies[-1]["messages"][1]["content"]
        assert [c["type"] for c in user][:2] == ["text", "image_url"] and "Image BASE" in user[0]["text"]
        np.testing.assert_array_equal(_decode(user[1]["image_url"]["url"]), src[0])
        assert "Image BASE" in srv.bodies[-1]["messages"][0]["content"]
        # large images can be capped before sending
        TextJudge(_backend(srv, max_image_side=4)).compare(prompts[:1], a[:1], b[:1])
        assert _decode(srv.bodies[-1]["messages"][1]["content"][1]["image_url"]["url"]).shape == (4, 4, 3)


def test_retries_after_500s_and_gives_up_eventually():
    flaky = lambda body, attempt: (500 if attempt < 2 else 200, '{"rank": [1, 2]}', 0.0)  # noqa: E731
    prompts, a, b = _pairs(4)
    with FakeServer(flaky) as srv:
        be = _backend(srv, concurrency=2, max_retries=3)
        out = TextJudge(be).compare(prompts, a, b)
        assert out.winner.tolist() == [1, 1, 1, 1]
        assert srv.hits == 12 and be.stats["retries"] == 8
    with FakeServer(lambda body, attempt: (503, "overloaded", 0.0)) as srv:
        be = _backend(srv, max_retries=2)
        with pytest.raises(APIError, match="giving up after 3 attempts.*503"):
            TextJudge(be).compare(prompts[:1], a[:1], b[:1])
        assert srv.hits == 3


def test_retries_after_timeouts():
    slow_first = lambda body, attempt: (200, '{"rank": [2, 1]}', 1.0 if attempt == 0 else 0.0)  # noqa: E731
    prompts, a, b = _pairs(2)
    with FakeServer(slow_first) as srv:
        be = _backend(srv, timeout=0.3, concurrency=2)
        out = TextJudge(be).compare(prompts, a, b)
        assert out.winner.tolist() == [2, 2]
        assert srv.hits == 4 and be.stats["retries"] == 2


def test_concurrency_limit_is_respected():
    slow = lambda body, attempt: (200, '{"rank": [1, 2]}', 0.15)  # noqa: E731
    prompts, a, b = _pairs(12)
    with FakeServer(slow) as srv:
        t0 = time.perf_counter()
        TextJudge(_backend(srv, concurrency=3)).compare(prompts, a, b)
        took = time.perf_counter() - t0
        assert srv.max_in_flight == 3, srv.max_in_flight
        assert took >= 4 * 0.15 * 0.9  # 12 requests, 3 at a time


def test_cache_makes_reruns_free(tmp_path):
    answer = lambda body, attempt: (200, f'{{"rank": [{1 + attempt % 2}, {2 - attempt % 2}]}}', 0.0)  # noqa: E731
    prompts, a, b = _pairs(4)
    with FakeServer(answer) as srv:
        first = TextJudge(_backend(srv, cache_dir=tmp_path / "cache")).compare(prompts, a, b)
        assert srv.hits == 4
        be = _backend(srv, cache_dir=tmp_path / "cache")  # a new process would see the same
        again = TextJudge(be).compare(prompts, a, b)
        assert srv.hits == 4 and be.stats["cache_hits"] == 4 and be.stats["http_calls"] == 0
        np.testing.assert_array_equal(first.winner, again.winner)
        TextJudge(be).compare(prompts, a, b, rubric="a different prompt")  # a new request: asked
        assert srv.hits == 8
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 8


def test_clear_error_on_401():
    with FakeServer(lambda body, attempt: (401, "Incorrect API key provided", 0.0)) as srv:
        be = OpenAIBackend(model="judge-test", endpoint=srv.url, api_key="wrong", api_key_env="MY_JUDGE_KEY",
                           backoff=0.01)
        prompts, a, b = _pairs(3)
        with pytest.raises(AuthenticationError) as e:
            TextJudge(be).compare(prompts, a, b)
        msg = str(e.value)
        assert "401" in msg and "MY_JUDGE_KEY" in msg and "Incorrect API key" in msg
        assert srv.hits <= 3 and be.stats["retries"] == 0  # never retried


def test_unusable_answers_are_counted_not_fatal():
    texts = ['{"rank": [2, 1]}', "I think they are equally good.", '{"rank": [1, 1]}', '```json\n{"rank": [1, 2],}\n```',
             '{"reason": "no rank"}', '{"rank": [1, 2], "reason": "Image 1 has the right col']
    pick = lambda body: int(re.search(r"prompt (\d+)", body["messages"][1]["content"][0]["text"]).group(1))  # noqa: E731
    answer = lambda body, attempt: (200, texts[pick(body)], 0.0)  # noqa: E731
    prompts, a, b = _pairs(len(texts))
    with FakeServer(answer) as srv:
        out, statuses = TextJudge(_backend(srv)).compare_with_status(prompts, a, b)
    assert out.winner.tolist() == [2, 0, 0, 1, 0, 1]
    assert statuses == ["ok", "no_json", "tie", "repaired", "missing_field", "repaired"]
    assert out.failures == {"no_json": 1, "tie": 1, "missing_field": 1}


def test_symmetrised_judge_is_one_batched_call():
    class Biased:  # always answers "Image 1": the positional bias symmetrising removes
        name = "biased"
        calls = []

        def generate(self, requests):
            self.calls.append(len(requests))
            return ['{"rank": [1, 2]}'] * len(requests)

    be = Biased()
    prompts, a, b = _pairs(5)
    out = TextJudge(be, symmetrize="agree").compare(prompts, a, b)
    assert be.calls == [10] and out.winner.tolist() == [0] * 5 and np.all(out.p_first == 0.5)
    assert TextJudge(be).compare(prompts, a, b).winner.tolist() == [1] * 5


def test_callable_backend_feeds_a_vlm_style_fn():
    seen = []

    def fn(chats):  # the shape Qwen3VLProcessor.__call__ takes: [(messages, images)]
        seen.extend(chats)
        return ['{"score": 4}' if "score" in msgs[0]["content"] else '{"rank": [2, 1]}' for msgs, _ in chats]

    prompts, a, b = _pairs(2)
    judge = TextJudge(CallableBackend(fn, "vlm", batch_size=1), templates=TemplateSet())
    assert judge.compare(prompts, a, b).winner.tolist() == [2, 2]
    msgs, images = seen[0]
    assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    assert [c["type"] for c in msgs[1]["content"]] == ["text", "image", "text", "image"]
    assert len(images) == 2 and np.array_equal(images[0], a[0])
    scores, st = TextJudge(CallableBackend(fn), mode="pointwise").score(prompts, a)
    assert scores.tolist() == [4.0, 4.0] and st == ["ok", "ok"]


def _pick(body) -> int:
    return int(re.search(r"prompt (\d+)", body["messages"][1]["content"][0]["text"]).group(1))


BAD_REPLIES = [  # (reply, status): none of them is an answer
    ({"content": None, "reasoning_content": "Image 2 looks better so far, but", "finish_reason": "length"},
     "truncated"),                                  # vLLM: cut off mid-thought
    ({"content": '{"rank": [2, 1], "reason": "the lef', "finish_reason": "length"}, "truncated"),
    ({"content": None, "refusal": "I can't help with that."}, "refused"),
    ({"content": "", "finish_reason": "content_filter"}, "refused"),
    ({"content": None, "reasoning_content": "Image 1 has three circles."}, "reasoning_only"),
    ("", "empty"),
    ({"content": "  \n"}, "empty"),
]


def test_replies_are_checked_before_caching(tmp_path):
    """A reply that is no answer is counted under its own status, never cached: a rerun asks the
    server again; a good reply is cached and a rerun does not ask again."""
    good = '{"rank": [1, 2], "reason": "ok"}'
    fixed = {"on": False}

    def answer(body, attempt):
        i = _pick(body)
        if i == len(BAD_REPLIES) or fixed["on"]:
            return 200, good, 0.0
        return 200, BAD_REPLIES[i][0], 0.0

    prompts, a, b = _pairs(len(BAD_REPLIES) + 1)
    cache = tmp_path / "cache"
    with FakeServer(answer) as srv:
        be = _backend(srv, cache_dir=cache, concurrency=3)
        out, statuses = TextJudge(be).compare_with_status(prompts, a, b)
        assert statuses == [s for _, s in BAD_REPLIES] + ["ok"]
        assert out.winner.tolist() == [0] * len(BAD_REPLIES) + [1]
        assert out.p_first.tolist() == [0.5] * len(BAD_REPLIES) + [1.0]
        assert out.failures == {"truncated": 2, "refused": 2, "reasoning_only": 1, "empty": 2}
        assert {k: be.stats.get(k) for k in out.failures} == out.failures
        assert not out.valid[:-1].any() and out.valid[-1]
        assert "request 0 (pairwise, index=0)" in out.reasons[0] and "'length'" in out.reasons[0]
        assert "I can't help with that." in out.reasons[2]
        assert srv.hits == len(BAD_REPLIES) + 1
        assert len(list(cache.rglob("*.json"))) == 1        # only the answer was kept

        again = _backend(srv, cache_dir=cache)               # a rerun: only the failures are asked again
        out2 = TextJudge(again).compare(prompts, a, b)
        assert srv.hits == 2 * len(BAD_REPLIES) + 1
        assert again.stats["cache_hits"] == 1 and again.stats["http_calls"] == len(BAD_REPLIES)
        assert out2.failures == out.failures

        fixed["on"] = True                                   # the server answers now: all cached
        out3 = TextJudge(_backend(srv, cache_dir=cache)).compare(prompts, a, b)
        assert out3.winner.tolist() == [1] * (len(BAD_REPLIES) + 1) and out3.failures == {}
        hits = srv.hits
        last = _backend(srv, cache_dir=cache)
        TextJudge(last).compare(prompts, a, b)
        assert srv.hits == hits and last.stats["cache_hits"] == len(BAD_REPLIES) + 1


def test_a_cache_written_before_checking_is_asked_again(tmp_path):
    prompts, a, b = _pairs(1)
    with FakeServer(lambda body, attempt: (200, '{"rank": [2, 1]}', 0.0)) as srv:
        be = _backend(srv, cache_dir=tmp_path)
        req = TextJudge(be).pair_requests(prompts, a, b)[0]
        key = be.cache_key(be.payload(req))
        poisoned = {"choices": [{"finish_reason": "length", "message": {"content": None,
                                                                       "reasoning_content": "Image 1 is"}}]}
        be._cache_put(key, "", poisoned)                     # what older versions stored
        assert TextJudge(be).compare(prompts, a, b).winner.tolist() == [2]
        assert srv.hits == 1 and be.stats["cache_hits"] == 0
        assert TextJudge(_backend(srv, cache_dir=tmp_path)).compare(prompts, a, b).winner.tolist() == [2]
        assert srv.hits == 1                                 # the good answer replaced it


def test_one_bad_request_does_not_stop_the_batch():
    """A request the server rejects (HTTP 400) and an image that cannot be encoded fail alone,
    named; the other pairs are judged."""
    def answer(body, attempt):
        return (400, "Invalid image: too large", 0.0) if _pick(body) == 1 else (200, '{"rank": [2, 1]}', 0.0)

    prompts, a, b = _pairs(4)
    b = list(b)
    b[3] = np.zeros((8, 8, 5), np.uint8)                     # no image has 5 channels
    with FakeServer(answer) as srv:
        be = _backend(srv, concurrency=2)
        out, statuses = TextJudge(be).compare_with_status(prompts, a, b)
    assert statuses == ["ok", "rejected", "ok", "bad_image"]
    assert out.winner.tolist() == [2, 0, 2, 0] and out.failures == {"rejected": 1, "bad_image": 1}
    assert "request 1 (pairwise, index=1)" in out.reasons[1] and "Invalid image: too large" in out.reasons[1]
    assert out.reasons[3].startswith("request 3 (pairwise, index=3): ") and "5" in out.reasons[3]
    assert srv.hits == 3 and be.stats["rejected"] == 1 and be.stats["bad_image"] == 1


# -- issue #19 b05 / b07: cache key parts, Retry-After as an HTTP date ----------------------------

def test_cache_key_includes_the_endpoint_b05(tmp_path):
    """Two servers exposing the same model name share one cache directory: each is asked (b05)."""
    prompts, a, b = _pairs(1)
    with FakeServer(lambda body, attempt: (200, '{"rank": [1, 2]}', 0.0)) as s1, \
            FakeServer(lambda body, attempt: (200, '{"rank": [2, 1]}', 0.0)) as s2:
        w1 = TextJudge(_backend(s1, cache_dir=tmp_path)).compare(prompts, a, b).winner.tolist()
        be2 = _backend(s2, cache_dir=tmp_path)
        w2 = TextJudge(be2).compare(prompts, a, b).winner.tolist()
        assert (w1, w2) == ([1], [2]) and s2.hits == 1 and be2.stats["cache_hits"] == 0
        again = _backend(s2, cache_dir=tmp_path)                   # the same server again: cached
        assert TextJudge(again).compare(prompts, a, b).winner.tolist() == [2] and again.stats["cache_hits"] == 1
        # the key's parts, in one place: endpoint (without credentials), kind, the whole body, version
        body = be2.payload(TextJudge(be2).pair_requests(prompts, a, b)[0])
        parts = be2.cache_key_parts(body, "choice")
        assert set(parts) == {"version", "endpoint", "kind", "body"} and parts["endpoint"] == s2.url + "/chat/completions"
        assert be2.cache_key(body, "choice") != be2.cache_key(body, "generate")
        entry = json.loads(next(tmp_path.rglob("*.json")).read_text())
        assert "test-key" not in json.dumps(entry) and entry["kind"] == "generate"
    from arr_jax.judge.api import public_url
    assert public_url("https://user:sk-secret@host:8000/v1/?key=sk-x") == "https://host:8000/v1"


def test_retry_after_as_an_http_date_b07():
    """A 429 whose Retry-After is an HTTP date is honoured: the client waits until then (b07)."""
    from email.utils import formatdate

    from arr_jax.judge.api import retry_after_seconds

    now = 1_800_000_000.0
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None) is None
    until = time.time() + 0.5

    def limited(body, attempt):
        return (429, "rate limited", 0.0) if time.time() < until else (200, '{"rank": [2, 1]}', 0.0)

    with FakeServer(limited) as srv:
        orig = srv.httpd.RequestHandlerClass.send_response

        def send_response(self, code, message=None):            # every 429 names a date, not seconds
            orig(self, code, message)
            if code == 429:
                self.send_header("Retry-After", formatdate(until + 1.0, usegmt=True))

        srv.httpd.RequestHandlerClass.send_response = send_response
        be = _backend(srv, max_retries=3, backoff=0.01)
        t0 = time.time()
        assert TextJudge(be).compare(*_pairs(1)).winner.tolist() == [2]
        # the date has one-second resolution and lies after `until`: one wait, then the answer
        assert time.time() - t0 >= 0.4 and srv.hits == 2 and be.stats["retries"] == 1
        assert be.stats["wait_s"] >= 0.4


# -- one-token log-prob choice scoring ----------------------------------------------------------

def _lp_reply(top: dict, chosen: str | None = None, **msg):
    """A one-token reply in vLLM's schema whose first token's top log-probs are ``top``."""
    chosen = chosen if chosen is not None else max(top, key=top.get)
    entry = lambda t: {"token": t, "logprob": top[t], "bytes": list(t.encode())}  # noqa: E731
    return dict({"content": chosen, "finish_reason": "length",
                 "logprobs": {"content": [dict(entry(chosen), top_logprobs=[entry(t) for t in top])]}}, **msg)


def test_choice_replies_read_every_spelling_and_fail_by_name(tmp_path):
    """P(image 1) from the two options' log-probs (spellings " 1", "Ġ2" folded in); neither option,
    a reasoning block, or a refusal: a counted, named failure with p 0.5, never cached."""
    import math

    replies = [_lp_reply({"1": math.log(0.6), "2": math.log(0.2), "x": math.log(0.1)}),
               _lp_reply({"2": math.log(0.5), "\u01201": math.log(0.1), " 1": math.log(0.1), "\u01202": math.log(0.2)}),
               _lp_reply({"1": math.log(0.9), "a": math.log(0.05), "b": math.log(0.01)}),   # "2" below the top-k
               _lp_reply({"the": -0.1, "a": -3.0}),
               _lp_reply({"<think>": -0.01, "1": -6.0}),
               {"content": None, "refusal": "no", "finish_reason": "stop"}]
    prompts, a, b = _pairs(len(replies))
    with FakeServer(lambda body, attempt: (200, replies[_pick(body)], 0.0)) as srv:
        be = _backend(srv, cache_dir=tmp_path, concurrency=3)
        out, st = TextJudge(be, choice_scores=True).compare_with_status(prompts, a, b)
        body = srv.bodies[0]
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["temperature"] == 0.0 and body["chat_template_kwargs"] == {"enable_thinking": False}
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert body["messages"][-1] == {"role": "assistant", "content": '{"rank": ['}
    np.testing.assert_allclose(out.p_first[:3], [0.75, 0.2 / 0.9, 0.9 / 0.91], atol=1e-6)
    assert st == ["ok", "ok", "ok", "no_choice", "thinking", "refused"] and out.winner.tolist() == [1, 2, 1, 0, 0, 0]
    assert out.p_first[3:].tolist() == [0.5] * 3 and not out.valid[3:].any()
    assert "neither option ['1', '2']" in out.reasons[3] and "request 3" in out.reasons[3]
    assert be.stats["no_choice"] == 1 and be.stats["thinking"] == 1 and be.stats["choice_bounded"] == 1
    assert len(list(tmp_path.rglob("*.json"))) == 3                       # only the three answers


def test_choice_answers_are_cached_apart_from_generated_ones(tmp_path):
    import math

    top = {"1": math.log(0.3), "2": math.log(0.6)}
    answer = lambda body, attempt: (200, _lp_reply(top) if body.get("logprobs") else '{"rank": [1, 2]}', 0.0)  # noqa: E731
    prompts, a, b = _pairs(2)
    with FakeServer(answer) as srv:
        p1 = TextJudge(_backend(srv, cache_dir=tmp_path), choice_scores=True).compare(prompts, a, b).p_first
        g1 = TextJudge(_backend(srv, cache_dir=tmp_path)).compare(prompts, a, b).p_first   # same pairs, generated
        assert srv.hits == 4 and p1.tolist() == pytest.approx([1 / 3] * 2) and g1.tolist() == [1.0, 1.0]
        be = _backend(srv, cache_dir=tmp_path)
        p2 = TextJudge(be, choice_scores=True).compare(prompts, a, b).p_first
        assert srv.hits == 4 and be.stats["cache_hits"] == 2 and p2.tolist() == p1.tolist()


def test_startup_check_says_what_is_wrong_in_one_line(monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                             # nothing listens there
    with pytest.raises(APIError, match=f"cannot reach http://127.0.0.1:{port}/v1 .*launch/serve_judge.sh"):
        OpenAIBackend(model="m", endpoint=f"http://127.0.0.1:{port}/v1", api_key="").check()
    with FakeServer(lambda body, attempt: (200, _lp_reply({"1": -0.5, "2": -1.0}), 0.0), ["judge-test"]) as srv:
        with pytest.raises(ValueError, match="does not serve model 'other'; it serves \\['judge-test'\\]"):
            OpenAIBackend(model="other", endpoint=srv.url, api_key="").check()
        be = _backend(srv)
        assert be.check() == {"endpoint": srv.url, "models": ["judge-test"], "choice_scores": True}
        assert srv.headers[1]["Authorization"] == "Bearer test-key" and "Authorization" not in srv.headers[0]
    with FakeServer(lambda body, attempt: (401, "bad key", 0.0)) as srv:
        srv.httpd.RequestHandlerClass.do_GET = lambda self: (self.send_response(401), self.send_header(
            "Content-Length", "0"), self.end_headers())
        with pytest.raises(AuthenticationError, match="HTTP 401: the key in MY_KEY is set but was rejected"):
            OpenAIBackend(model="m", endpoint=srv.url, api_key="sk-secret", api_key_env="MY_KEY").check()
    for var in ("ARR_API_BASE", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(AuthenticationError, match="no endpoint set .*public https://api.openai.com/v1"):
        OpenAIBackend(model="m").check()


# -- against the project's own Flax Qwen3-VL served on loopback -----------------------------------

def decisive(backend, requests, scale: float = 1.0):
    """Make the options "1" / "2" likely next tokens after the rank prefix, as in a trained judge, so
    both sit in the server's top-20: add the direction of the random model's favourite token there to
    both options' lm_head rows (their logit difference, hence P(image 1), stays the model's own)."""
    import jax.numpy as jnp

    from arr_jax.judge.vlm_backend import RANK_PREFIX

    inputs = backend.processor([r.to_chat() for r in requests], assistant_prefix=RANK_PREFIX, seq_bucket=128)
    logits, _ = backend.decoder.prefill(inputs, inputs["input_ids"].shape[1] + 1)
    kernel = backend.decoder.state["lm_head"]["kernel"]
    k = np.array(kernel[...])
    v = k[:, np.asarray(jnp.argmax(logits, -1))].mean(axis=1)
    for i in backend.choice_ids:
        k[:, i] += scale * v
    kernel[...] = jnp.asarray(k)


@pytest.fixture(scope="module")
def flax_judge():
    """(FlaxVLMBackend on the tiny random snapshot of test_vlm_judge, made decisive, pairs, rubric)."""
    from test_vlm_judge import RUBRIC, judge_snapshot, pair_batch

    from arr_jax.judge.vlm_backend import FlaxVLMBackend

    b = FlaxVLMBackend.from_snapshot(judge_snapshot(), "float32", max_new_tokens=16, batch_size=8, seq_bucket=128)
    prompts, i1, i2 = pair_batch(5)
    decisive(b, TextJudge(b).pair_requests(prompts, i1, i2, RUBRIC))
    return b, (prompts, i1, i2), RUBRIC


def test_served_choice_scores_equal_the_flax_judges(flax_judge, tmp_path):
    """The API judge's P(image 1), read from the top-20 log-probs a vLLM-schema server computes with our
    Flax Qwen3-VL from the prompt it receives (rendered by the snapshot's chat format, the assistant
    turn continued), equals the in-process Flax judge's one-prefill choice score within 1e-5, in
    both orders and symmetrised; requests are prefix-cache friendly."""
    from arr_jax.judge.api import RANK_PREFIX as API_PREFIX
    from arr_jax.judge.flax_server import FlaxChatServer
    from arr_jax.judge.vlm_backend import RANK_PREFIX

    assert API_PREFIX == RANK_PREFIX
    b, (prompts, i1, i2), rubric = flax_judge
    local = TextJudge(b, choice_scores=True, symmetrize="mean")
    with FlaxChatServer(b, "qwen3-vl-judge") as srv:
        be = OpenAIBackend(model="qwen3-vl-judge", endpoint=srv.url, api_key="", cache_dir=tmp_path, concurrency=8)
        assert be.check()["choice_scores"] is True
        served = TextJudge(be, choice_scores=True, symmetrize="mean")
        f, r, sf, sr = served.compare_orders(prompts, i1, i2, rubric)
        lf, lr, _, _ = local.compare_orders(prompts, i1, i2, rubric)
        np.testing.assert_allclose(f.p_first, lf.p_first, atol=1e-5)
        np.testing.assert_allclose(r.p_first, lr.p_first, atol=1e-5)
        assert sf == sr == ["ok"] * 5 and np.ptp(f.p_first) > 0.05           # real, varied scores
        sym = served.compare(prompts, i1, i2, rubric)
        np.testing.assert_allclose(sym.p_first, local.compare(prompts, i1, i2, rubric).p_first, atol=1e-5)
        assert max(srv.batches) > 1                                           # concurrent requests batched
        bodies = [x for x in srv.bodies if any(isinstance(m["content"], list) and len(m["content"]) > 2
                                               for m in x["messages"])]
        assert len(bodies) == 10 and all(x["max_tokens"] == 1 and x["logprobs"] for x in bodies)
        # prefix-cache friendly: the system prompt (rubric, instructions) is byte-identical and first
        assert len({json.dumps(x["messages"][0]) for x in bodies}) == 1 and rubric.strip() in bodies[0]["messages"][0]["content"]
        hits = len(srv.bodies)
        again = OpenAIBackend(model="qwen3-vl-judge", endpoint=srv.url, api_key="", cache_dir=tmp_path)
        np.testing.assert_array_equal(TextJudge(again, choice_scores=True).compare(prompts, i1, i2, rubric).p_first,
                                      f.p_first)
        assert len(srv.bodies) == hits and again.stats["cache_hits"] == 5


def test_a_server_without_logprobs_falls_back_to_parsing_once(flax_judge, caplog):
    """Log-prob fields removed from every reply: detected at start-up (or on the first reply), said once,
    and every pair is judged by generating and parsing (counted), no error storm."""
    import logging

    from arr_jax.judge.flax_server import FlaxChatServer

    b, (prompts, i1, i2), rubric = flax_judge
    with FlaxChatServer(b, "judge", logprobs=False, max_new_tokens=8) as srv, caplog.at_level(logging.WARNING, "arr_jax.judge.api"):
        for probe in (True, False):
            be = OpenAIBackend(model="judge", endpoint=srv.url, api_key="", concurrency=4)
            if probe:
                assert be.check()["choice_scores"] is False
            out, st = TextJudge(be, choice_scores=True).compare_with_status(prompts, i1, i2, rubric)
            assert be.choice_supported is False and be.stats["choice_fallback"] == 5
            # the tiny random judge's generated verdicts are junk: parse failures, counted by name
            assert len(st) == 5 and all(s in ("ok", "tie") or out.failures.get(s) for s in st)
            said = [r for r in caplog.records if "choice scoring is off" in r.getMessage()]
            assert len(said) == 1
            caplog.clear()
        generated = [x for x in srv.bodies if not x.get("logprobs")]
        assert len(generated) == 10 and all(x["max_tokens"] > 1 for x in generated)


def test_serving_script_is_valid_bash_and_its_flags_are_judge_keys():
    """launch/serve_judge.sh: syntax checked (it needs a GPU / TPU to run); the flags it prints for
    arr_jax.train name existing judge config keys with values of their types."""
    import subprocess
    from pathlib import Path

    from arr_jax.judge.factory import judge_config

    root = Path(__file__).resolve().parents[1]
    for script in sorted((root / "launch").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(root / "launch" / "serve_judge.sh"), "flags"], check=True, text=True,
                         capture_output=True, env={"PATH": "/usr/bin:/bin", "ARR_JUDGE_KEY": "k"}).stdout.split()
    c = judge_config()
    for flag in out:
        key, value = flag.removeprefix("--config.judge.").split("=", 1)
        node = c
        for part in key.split(".")[:-1]:
            node = node[part]
        leaf = key.split(".")[-1]
        assert leaf in node, flag
        node[leaf] = type(node[leaf])(value == "True" if isinstance(node[leaf], bool) else value)
    assert (c.kind, c.api.endpoint, c.api.api_key_env, c.choice_scores) == (
        "api", "http://localhost:8000/v1", "ARR_JUDGE_KEY", True)
    bad = subprocess.run(["bash", str(root / "launch" / "serve_judge.sh")], text=True, capture_output=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr


# -- induction, evaluation and prompt-specific rubrics over the API --------------------------------

def _user(body) -> list:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def _urls(body) -> list[str]:
    return [c["image_url"]["url"] for c in _user(body) if isinstance(c, dict) and c.get("type") == "image_url"]


def _prompt_of(body) -> str:
    return re.search(r"(?:Prompt|Editing instruction): (.*)\n", "".join(
        c.get("text", "") for c in _user(body) if isinstance(c, dict))).group(1)


def test_prompt_specific_rubrics_over_the_api(tmp_path):
    """judge.kind=api with judge.prompt_rubrics=generate: each prompt is decomposed once by a generated
    (not choice) request, cached on disk under the endpoint's identity, and its criteria reach that
    prompt's one-token choice requests after the rubric file's text."""
    from arr_jax.arr.rubric_file import RubricFile
    from arr_jax.judge.factory import build_judge, judge_config

    RubricFile.from_text("Theme 1: Look\n- Colours match the prompt.\n").save(tmp_path / "r" / "rubric")

    def answer(body, attempt):
        if body.get("logprobs"):
            return 200, _lp_reply({"1": -0.2, "2": -1.8}), 0.0
        return 200, json.dumps({"rubrics": [f"{_prompt_of(body)} is shown", "nothing else"], "reason": "r"}), 0.0

    def judge():
        c = judge_config(kind="api", model="judge-test", rubric=str(tmp_path / "r" / "rubric.txt"),
                         prompt_rubrics="generate", prompt_rubrics_k=2)
        c.api.endpoint, c.api.cache_dir, c.api.backoff = srv.url, str(tmp_path / "api"), 0.01
        return build_judge(c, workdir=tmp_path / "run")

    prompts, a, b = _pairs(3)
    prompts[2] = prompts[0]
    with FakeServer(answer, ["judge-test"]) as srv:
        j = judge()
        out = j.compare(prompts, a, b)
        decompose = [x for x in srv.bodies[1:] if not x.get("logprobs")]
        choice = [x for x in srv.bodies[1:] if x.get("logprobs")]
        assert len(decompose) == 2 and len(choice) == 3                    # "prompt 0" decomposed once
        assert all(x["max_tokens"] > 1 and not _urls(x) for x in decompose)
        assert all(x["max_tokens"] == 1 and len(_urls(x)) == 2 for x in choice)
        for x in choice:
            system = x["messages"][0]["content"]
            assert system.index("Colours match the prompt.") < system.index("Criteria specific to this prompt:")
            assert f"- {_prompt_of(x)} is shown\n- nothing else" in system
        np.testing.assert_allclose(out.p_first, 1 / (1 + np.exp(-1.6)), atol=1e-6)
        assert j.identity["endpoint"] == srv.url + "/chat/completions" and j.prompt_rubrics.stats["decompositions"] == 2
        hits = srv.hits
        again = judge()                                  # a rerun: criteria from disk, choices from the cache
        again.compare(prompts, a, b)
        assert again.prompt_rubrics.stats["decompositions"] == 0 and srv.hits == hits   # and no second probe (once per process)


def _world_config(name, variant, tmp_path, srv):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", Path(__file__).resolve().parents[1] / "configs"
                                                  / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant)
    c.data.kind, c.data.n_pairs, c.data.split, c.data.label_noise = "world", 4, "heldout", 0.0
    c.backend.openai.model, c.backend.openai.endpoint = "judge-test", srv.url
    c.backend.openai.cache_dir, c.backend.openai.backoff = str(tmp_path / "api"), 0.01
    c.workdir, c.progress = str(tmp_path / name), False
    return c


def test_evaluate_api_reads_choice_scores(tmp_path):
    """``arr_jax.evaluate`` with configs/evaluate_world.py:api and judge.choice_scores=True: every pair is
    judged in both orders by one-token log-prob requests (with the rubric in the "rubric" condition, none in
    "direct"); a judge that always prefers the first image scores 100% forward and 0% swapped."""
    from arr_jax import evaluate
    from arr_jax.arr.rubric_file import RubricFile

    RubricFile.from_text("Theme 1: Look\n- Colours match the prompt.\n").save(tmp_path / "r" / "rubric")
    with FakeServer(lambda body, attempt: (200, _lp_reply({"1": -0.1, "2": -2.4}), 0.0), ["judge-test"]) as srv:
        c = _world_config("evaluate_world", "api", tmp_path, srv)
        c.judge.choice_scores, c.rubric = True, str(tmp_path / "r" / "rubric.txt")
        report = evaluate.run(c)
    assert "p_first" in report["judge"]
    for cond in ("direct", "rubric"):
        m = report["conditions"][cond]["overall"]
        assert (m["acc_fwd"], m["acc_rev"], m["parse_fail_fwd"], m["parse_fail_rev"]) == (1.0, 0.0, 0.0, 0.0)
    bodies = srv.bodies[1:]                              # after the start-up probe
    assert len(bodies) == 2 * 2 * 4 and all(x["max_tokens"] == 1 and x["logprobs"] for x in bodies)
    with_rubric = [x for x in bodies if "Colours match the prompt." in x["messages"][0]["content"]]
    assert len(with_rubric) == 8


def test_induce_api_verifies_from_choice_scores(tmp_path):
    """``arr_jax.induce`` with configs/induce_world.py:api and induction.choice_scores=True: rubrics are
    generated and refined as text, verification is one-token log-prob requests in both orders. A judge that
    follows the first rubrics with a position bias fails the swapped order; told so (which image it chose,
    with what probability), the refined rubrics make it pick the labelled image, and the pair is kept."""
    from arr_jax.arr.induction import induce_from_config

    preferred: set[str] = set()
    refine_texts = []

    def answer(body, attempt):
        system = body["messages"][0]["content"]
        if body.get("logprobs"):
            if "refined criterion" in system:            # follows the refined rubrics: picks the preferred image
                first = _urls(body)[0] in preferred
                return 200, _lp_reply({"1": -0.1, "2": -2.4} if first else {"1": -2.4, "2": -0.1}), 0.0
            return 200, _lp_reply({"1": -0.3, "2": -1.4}), 0.0   # position bias: always image 1
        if '"themes"' in system:
            return 200, json.dumps({"themes": [{"name": "Looks", "tips": ["refined criterion A"]}]}), 0.0
        urls = _urls(body)
        preferred.add(urls[0])                           # the world pairs put the preferred image first
        if "previous" in system.lower() or "refine" in system.lower():
            refine_texts.append("".join(c.get("text", "") for c in _user(body)) + system)
            return 200, json.dumps({"rubrics": ["refined criterion A", "refined criterion B"], "reason": "r"}), 0.0
        return 200, json.dumps({"rubrics": ["first criterion A", "first criterion B"], "reason": "r"}), 0.0

    with FakeServer(answer, ["judge-test"]) as srv:
        c = _world_config("induce_world", "api", tmp_path, srv)
        c.data.split, c.induction.k, c.induction.choice_scores = "train", 2, True
        rf = induce_from_config(c)
    prov = rf.provenance["pairs"]
    assert (prov["first_pass"], prov["refined"], prov["discarded"], prov["failed"]) == (0, 4, 0, 0)
    verify = [x for x in srv.bodies[1:] if x.get("logprobs")]
    assert len(verify) == 2 * 2 * 4 and all(x["max_tokens"] == 1 and len(_urls(x)) == 2 for x in verify)
    assert all(not x.get("logprobs") and x["max_tokens"] > 1 for x in srv.bodies[1:] if x not in verify)
    assert len(refine_texts) == 4
    assert all("chose the image shown here as Image 2 (probability 0.75; scored from its first answer token"
               in t for t in refine_texts), refine_texts[0]
    assert rf.provenance["statuses"]["verify:ok"] == 16 and "refined criterion A" in rf.text
