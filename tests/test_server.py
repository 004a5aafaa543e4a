"""The OpenAI-compatible server, started in-process on 127.0.0.1:0 and driven with the real openai
client (and raw httpx for malformed requests, disconnects and concurrency)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import pcmoe  # noqa: E402
from pcmoe.server import create_app  # noqa: E402
from pcmoe.server.api import Service  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny"


class Engine:
    """The engine with spies and knobs: a per-token delay and no EOS (to keep it busy), a gate each
    token waits for (a stuck engine), a hold that tokens after the first wait for (an engine held
    busy), and a hook called before each token is handed over."""

    def __init__(self, engine):
        self._engine = engine
        self.delay = 0.0
        self.stop_on_eos = True
        self.gate = None          # threading.Event: every token waits for it
        self.hold = None          # threading.Event: every token after a generation's first waits for it
        self.before_step = None   # callable(index) run before step `index` is handed over
        self.steps = 0            # tokens produced
        self.generations = []     # per generate() call: {"tokens", "finish" (None: stopped before the end), "done"}
        self.loaded_states = []   # arguments of load_state()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        kwargs.setdefault("stop_on_eos", self.stop_on_eos)
        record = {"tokens": 0, "finish": None, "done": False}
        self.generations.append(record)
        try:
            with contextlib.closing(self._engine.generate(*args, **kwargs)) as steps:
                for step in steps:
                    if self.gate is not None:
                        self.gate.wait(60)
                    if self.hold is not None and record["tokens"] >= 1:
                        self.hold.wait(60)
                    if self.before_step is not None:
                        self.before_step(step.index)
                    self.steps += 1
                    record["tokens"] += 1
                    record["finish"] = step.finish_reason
                    if self.delay:
                        time.sleep(self.delay)
                    yield step
        finally:
            record["done"] = True

    def load_state(self, state):
        self.loaded_states.append(state)
        self._engine.load_state(state)


def _load(folder, tmp_path_factory, **options):
    cache = tmp_path_factory.mktemp("cache")
    return Engine(pcmoe.load(folder, progress=False, cache_dir=str(cache), **options))


@contextlib.contextmanager
def serve(engine, **kwargs):
    """Run create_app(engine) with uvicorn in a thread on a port the OS picks; yields the base URL and app."""
    app = create_app(engine, model_name=MODEL, **kwargs)
    with serving(app) as url:
        yield url, app


@contextlib.contextmanager
def serving(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def full(tiny_lm, tmp_path_factory):
    """All experts resident (deterministic outputs), API key required."""
    engine = _load(tiny_lm, tmp_path_factory, policy="full")
    with serve(engine, api_key=KEY) as (url, app):
        yield SimpleNamespace(url=url, app=app, engine=engine,
                              client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30))
    engine.close()


@pytest.fixture(scope="module")
def srv(tiny_lm, tmp_path_factory):
    """A committee under 60% of the experts, queue of 2, per-user states, 16 KiB body limit."""
    engine = _load(tiny_lm, tmp_path_factory, budget="60%experts", policy="committee")
    state_dir = tmp_path_factory.mktemp("states") / "users"
    with serve(engine, queue_size=2, state_dir=state_dir, max_body_bytes=16384) as (url, app):
        yield SimpleNamespace(url=url, app=app, engine=engine, state_dir=state_dir,
                              http=httpx.Client(base_url=url, timeout=30))
    engine.close()


@pytest.fixture
def slow(srv):
    """Generations of 20 ms a token that run to max_tokens."""
    srv.engine.delay, srv.engine.stop_on_eos = 0.02, False
    yield srv
    srv.engine.delay, srv.engine.stop_on_eos = 0.0, True


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _events(lines) -> list:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def _until(condition, timeout: float = 60.0) -> bool:
    """Poll `condition` until it holds (True), or give up after `timeout` seconds, a bound only a
    broken server reaches (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _raw(body: dict) -> bytes:
    """JSON with \\uXXXX escapes, lone surrogates included (httpx's json= cannot encode those)."""
    return json.dumps(body).encode()


# -- the openai client ------------------------------------------------------------------------


def test_completions_with_the_openai_client(full):
    client = full.client
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(full.engine.encode("hello world"))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert set(r.pcmoe) >= {"hit_rate", "router_mass_outside", "swaps", "stall_s"}
    assert r.pcmoe["hit_rate"] == 1.0  # policy full: every expert is resident

    chunks = list(client.completions.create(model=MODEL, prompt="hello world", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_streams_the_same_text_and_is_deterministic(full):
    client = full.client
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16, temperature=0)
    assert a.choices[0].message.role == "assistant"
    assert a.choices[0].message.content == b.choices[0].message.content
    prompt = full.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert a.usage.prompt_tokens == len(full.engine.encode(prompt))  # the chat template was applied

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == a.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == a.choices[0].finish_reason


def test_stop_strings_cut_the_text(full):
    client = full.client
    kwargs = dict(model=MODEL, prompt="the quick brown", max_tokens=24, temperature=0)
    full.engine.stop_on_eos = False  # 24 tokens of text
    try:
        text = client.completions.create(**kwargs).choices[0].text
        stop = text[3:6]  # may span tokens: its start must not be streamed before the match
        r = client.completions.create(**kwargs, stop=["never", stop])
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True))
    finally:
        full.engine.stop_on_eos = True
    assert len(text) >= 6 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == streamed == text[:text.find(stop)]


def test_sampling_with_a_seed_repeats(full):
    kwargs = dict(model=MODEL, prompt="hello", max_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    assert full.client.completions.create(**kwargs).choices[0].text == \
        full.client.completions.create(**kwargs).choices[0].text


def test_api_key(full):
    with httpx.Client(base_url=full.url, timeout=10) as http:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        error = _error(http.post("/v1/completions", json=body), 401)
        assert error["code"] == "invalid_api_key"
        _error(http.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _error(http.get("/v1/models", headers={"Authorization": KEY}), 401)  # no scheme
        assert http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert http.get("/health").json()["status"] == "ok"  # health and metrics stay open
        assert http.get("/metrics").status_code == 200
        _error(http.get("/v1/pcmoe/stats"), 401)
    bad = openai.OpenAI(base_url=full.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_an_empty_api_key_is_an_error(full):
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(full.engine, model_name=MODEL, api_key="")


def test_stream_usage_follows_openai(full):
    """Without stream_options.include_usage no chunk has `usage`; with it every chunk has usage null
    and one last chunk, before [DONE], has no choices and the usage."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=full.url, headers=headers, timeout=30) as http:
        def chunks(path, body):
            with http.stream("POST", path, json={**body, "stream": True, "temperature": 0}) as r:
                events = _events(r.iter_lines())
            assert events[-1] == "[DONE]"
            return [json.loads(e) for e in events[:-1]]

        for path, body in (("/v1/completions", _OK), ("/v1/chat/completions", _CHAT)):
            plain = chunks(path, body)
            assert plain and all("usage" not in c for c in plain)
            counted = chunks(path, {**body, "stream_options": {"include_usage": True}})
            *rest, last = counted
            assert all(c["usage"] is None and c["choices"] for c in rest)
            assert last["choices"] == []
            assert last["usage"] == http.post(path, json={**body, "temperature": 0}).json()["usage"]


# -- malformed requests -----------------------------------------------------------------------

_OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path, body, status, param, says", [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"", 400, None, "empty"),
    ("/v1/completions", [1, 2], 400, None, "JSON object"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "missing"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "missing"),
    ("/v1/chat/completions", {**_CHAT, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", None),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content", "text"),
    ("/v1/completions", {**_OK, "max_tokens": "abc"}, 400, "max_tokens", None),
    ("/v1/completions", {**_OK, "max_tokens": "4"}, 400, "max_tokens", None),
    ("/v1/completions", {**_OK, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {**_OK, "max_tokens": 10**6}, 400, "max_tokens", "512"),
    ("/v1/chat/completions", {**_CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens", None),
    ("/v1/completions", {**_OK, "temperature": 2.5}, 400, "temperature", None),
    ("/v1/completions", {**_OK, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {**_OK, "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {**_OK, "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {**_OK, "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {**_OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("/v1/completions", {**_OK, "stop": ["a", 1]}, 400, "stop", "a string or a list of at most 4 strings"),
    ("/v1/completions", {**_OK, "n": 2}, 400, "n", None),
    ("/v1/completions", {**_OK, "logprobs": 3}, 400, "logprobs", "not supported"),
    ("/v1/completions", {**_OK, "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {**_OK, "prompt": ["a", "b"]}, 400, "prompt", "batched"),
    ("/v1/completions", {**_OK, "prompt": [1, 10**9]}, 400, "prompt", None),
    ("/v1/completions", {**_OK, "prompt": "hello " * 600}, 400, "prompt", "context is 512 tokens"),
    ("/v1/completions", {**_OK, "user": "u" * 1000}, 400, "user", None),
    ("/v1/completions", {**_OK, "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {**_CHAT, "model": "gpt-4"}, 404, "model", None),
    ("/v1/completions", {**_OK, "prompt": "x" * 20000}, 413, None, "exceeds"),
    ("/v1/completions", {**_OK, "seed": 2**70}, 400, "seed", None),
    ("/v1/completions", {**_OK, "seed": -(2**64)}, 400, "seed", None),
    ("/v1/completions", _raw({**_OK, "prompt": "a\ud800b"}), 400, "prompt", "surrogate (U+D800) at character 1"),
    ("/v1/completions", _raw({**_OK, "prompt": ["\udfff"]}), 400, "prompt", "surrogate"),
    ("/v1/chat/completions", _raw({**_CHAT, "messages": [{"role": "user", "content": "hi \ud800"}]}), 400,
     "messages[0].content", "surrogate"),
    ("/v1/chat/completions", _raw({**_CHAT, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                      "text": "\ud800"}]}]}),
     400, "messages[0].content[0].text", "surrogate"),
    ("/v1/completions", _raw({**_OK, "user": "\ud800"}), 400, "user", None),
    ("/v1/completions", _raw({**_OK, "model": "\ud800"}), 400, "model", "surrogate"),
    ("/v1/completions", _raw({**_OK, "stop": ["\ud800"]}), 400, "stop", "surrogate"),
])
def test_bad_requests_get_openai_style_4xx(srv, path, body, status, param, says):
    if isinstance(body, bytes):
        r = srv.http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = srv.http.post(path, json=body)
    error = _error(r, status)
    assert error["param"] == param
    if says:
        assert says in error["message"]


def test_other_bad_requests(srv):
    r = srv.http.post("/v1/completions", content=json.dumps(_OK), headers={"Content-Type": "text/plain"})
    assert _error(r, 415)["code"] == "unsupported_media_type"
    assert _error(srv.http.get("/v1/nothing"), 404)["code"] == "not_found"
    _error(srv.http.get("/v1/completions"), 405)
    _error(srv.http.get("/v1/models/gpt-4"), 404)
    # a body over the limit without Content-Length (chunked) is cut off too
    r = srv.http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * 20000, b'"}']),
                      headers={"Content-Type": "application/json"})
    _error(r, 413)
    # and the server still answers
    assert srv.http.post("/v1/completions", json=_OK).status_code == 200


@pytest.mark.parametrize("seed", [-(2**63), 2**64 - 1])
def test_seeds_at_the_ends_of_the_range_work(srv, seed):
    assert srv.http.post("/v1/completions", json={**_OK, "seed": seed, "temperature": 1.0}).status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_tokenising(full):
    service = full.app.state.service
    assert service.prompts.max_chars == 512 * 13  # the tiny tokenizer's longest token, <|endoftext|>, is 13 characters
    calls = []
    full.engine.encode = lambda text: calls.append(text) or full.engine._engine.encode(text)
    try:
        with httpx.Client(base_url=full.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as http:
            r = http.post("/v1/completions", json={**_OK, "prompt": "x" * (service.prompts.max_chars + 1)})
            error = _error(r, 400)
            assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
            long = [{"role": "user", "content": "x" * 10**5}]
            r = http.post("/v1/chat/completions", json={**_CHAT, "messages": long})
            assert _error(r, 400)["param"] == "messages"
            assert calls == []
            r = http.post("/v1/completions", json={**_OK, "prompt": "x" * service.prompts.max_chars})
            assert _error(r, 400)["code"] == "context_length_exceeded" and len(calls) == 1  # tokenised, then refused
    finally:
        del full.engine.encode


def test_the_character_bound_holds_for_the_worst_text(full):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pcmoe.server.prompts import chars_per_token

    tok = full.engine.tokenizer
    per_token = chars_per_token(tok)
    longest = sorted(tok.get_vocab(), key=len)[-40:]
    for token in longest:  # text made of the longest tokens has the most characters per token
        text = (tok.convert_tokens_to_string([token]) if token not in tok.all_special_tokens else token) * 30
        assert len(text) <= per_token * len(full.engine.encode(text)), token

    def fast(tokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)

    nfc = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    nfc.normalizer = normalizers.NFC()
    assert chars_per_token(fast(nfc)) == 4 * per_token  # "e" + 3 combining marks can become one character
    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # drops whitespace: no bound
    assert chars_per_token(fast(words)) is None
    stripped = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    stripped.normalizer = normalizers.Strip()
    assert chars_per_token(fast(stripped)) is None
    few_bytes = Tokenizer(models.BPE({"a": 0, "b": 1}, []))  # BPE drops the bytes it lacks
    few_bytes.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert chars_per_token(fast(few_bytes)) is None


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**_OK, "prompt": "hello there"}),
    ("/v1/chat/completions", _CHAT),
])
def test_tokenising_runs_off_the_event_loop(srv, path, body):
    entered, release = threading.Event(), threading.Event()

    def slow_encode(text):
        entered.set()
        release.wait(10)
        return srv.engine._engine.encode(text)

    srv.engine.encode = slow_encode
    result = {}
    request = threading.Thread(target=lambda: result.update(r=srv.http.post(path, json=body)))
    try:
        request.start()
        assert entered.wait(10)
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200  # while the prompt is tokenised
    finally:
        release.set()
        request.join(20)
        del srv.engine.encode
    assert result["r"].status_code == 200, result["r"].text


# -- queueing, cancellation, time limits ------------------------------------------------------


def _post_raw(url: str, body: dict) -> socket.socket:
    """Send a POST and return its socket unread: closing it is a client that leaves, at a moment the
    test chooses."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(data), data))
    return sock


def _health(srv) -> dict:
    return srv.http.get("/health").json()


def test_a_full_queue_gets_429_and_the_others_finish(slow):
    """Queue of 2 and the engine held after the running request's first token: exactly one runs and
    two wait; the other five get 429 at once, and the three finish once the engine goes on."""
    statuses, results = [None] * 8, [None] * 8
    barrier = threading.Barrier(8)

    def client(i):
        with httpx.Client(base_url=slow.url, timeout=60) as http:
            barrier.wait()
            body = {**_OK, "prompt": f"request {i}", "max_tokens": 12, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                statuses[i] = r.status_code
                if r.status_code == 200:
                    results[i] = (None, list(r.iter_lines()), None)
                else:
                    r.read()
                    results[i] = (r.headers.get("retry-after"), [], r.json())

    slow.engine.hold = threading.Event()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        assert _until(lambda: statuses.count(429) == 5), statuses
        assert _health(slow)["queue_depth"] == 2 and statuses.count(200) <= 1
    finally:
        slow.engine.hold.set()
        slow.engine.hold = None
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert sorted(statuses) == [200] * 3 + [429] * 5, statuses
    for status, (retry_after, lines, body) in zip(statuses, results):
        if status == 429:
            assert int(retry_after) >= 1 and body["error"]["code"] == "queue_full"
        else:
            events = _events(lines)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert _health(slow)["queue_depth"] == 0


def _abandoned_then_served(engine, first: int):
    """The generations since `first`: every one but the last was stopped early by its client's
    leaving, the last (4 tokens) ran to its end."""
    *abandoned, served = engine.generations[first:]
    assert served["done"] and served["finish"] == "length" and served["tokens"] == 4
    for record in abandoned:  # it did not run its 400 tokens before the next request could start
        assert record["done"] and record["finish"] is None and record["tokens"] < 400, record
    return abandoned


def test_disconnect_cancels_the_generation(slow):
    first = len(slow.engine.generations)
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        body = {**_OK, "max_tokens": 400, "stream": True}  # 8 s at 20 ms a token
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break
    r = slow.http.post("/v1/completions", json={**_OK, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert len(_abandoned_then_served(slow.engine, first)) == 1


def test_disconnect_cancels_a_non_streaming_request(slow):
    first = len(slow.engine.generations)
    sock = _post_raw(slow.url, {**_OK, "max_tokens": 400})
    assert _until(lambda: len(slow.engine.generations) > first and slow.engine.generations[first]["tokens"] >= 2)
    sock.close()  # the client leaves while its reply is being generated
    assert slow.http.post("/v1/completions", json={**_OK, "max_tokens": 4}).status_code == 200
    assert len(_abandoned_then_served(slow.engine, first)) == 1


def test_request_timeout_ends_with_length(slow):
    service = slow.app.state.service
    service.request_timeout_s = 0.5  # 300 tokens take 6 s at 20 ms a token
    try:
        r = slow.http.post("/v1/completions", json={**_OK, "max_tokens": 300})
    finally:
        service.request_timeout_s = 300.0
    body = r.json()
    assert r.status_code == 200, r.text
    assert body["choices"][0]["finish_reason"] == "length" and body["pcmoe"]["timed_out"] is True
    assert 1 <= body["usage"]["completion_tokens"] < 300
    record = slow.engine.generations[-1]
    assert record["finish"] is None and record["tokens"] == body["usage"]["completion_tokens"]
    assert body["pcmoe"]["choices"] > 0  # the statistics of what ran, though the engine did not end it


def test_a_timed_out_reply_keeps_the_text_held_back_for_a_stop_string(full):
    """generate() holds back text that may begin a stop string; a request that times out there gets it."""
    service, engine = full.app.state.service, full.engine
    headers = {"Authorization": f"Bearer {KEY}"}
    engine.stop_on_eos = False
    try:
        with httpx.Client(base_url=full.url, headers=headers, timeout=30) as http:
            for k in range(4, 32):  # k tokens ending in whole characters (a random model emits bad UTF-8)
                text = http.post("/v1/completions", json={**_OK, "max_tokens": k, "temperature": 0}).json()
                text = text["choices"][0]["text"]
                if len(text) >= 2 and "\ufffd" not in text[-2:]:
                    break
            else:
                pytest.fail("no text that ends in two whole characters")
            stop = text[-2:] + "\x00"  # its start ends the k tokens' text; it never comes whole
            body = {**_OK, "max_tokens": 2 * k, "temperature": 0, "stop": stop}
            assert http.post("/v1/completions", json=body).json()["choices"][0]["finish_reason"] == "length"

            def deadline_now(index):  # the deadline passes while token k is computed
                if index == k - 1:
                    service.worker._current.deadline = time.monotonic()

            engine.before_step = deadline_now
            try:
                r = http.post("/v1/completions", json=body).json()
            finally:
                engine.before_step = None
    finally:
        engine.stop_on_eos = True
    assert r["pcmoe"]["timed_out"] and r["usage"]["completion_tokens"] == k
    assert r["choices"][0]["text"] == text


@contextlib.contextmanager
def _running(srv):
    """A streamed generation that holds the engine after its first token until the block ends."""
    srv.engine.hold = threading.Event()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={**_OK, "max_tokens": 400, "stream": True}) as r:
                assert r.status_code == 200  # the reply starts with the first token: it runs (and holds)
                yield srv.engine.generations[-1]
    finally:
        srv.engine.hold.set()
        srv.engine.hold = None
    assert _until(lambda: not _health(srv)["busy"]), "the abandoned generation runs on"


def test_a_queued_request_times_out_with_503(slow):
    service = slow.app.state.service
    with _running(slow) as running:
        service.request_timeout_s = 0.3  # the running request keeps its own, earlier, deadline
        try:
            r = slow.http.post("/v1/completions", json=_OK)
        finally:
            service.request_timeout_s = 300.0
        error = _error(r, 503)
        assert error["code"] == "timeout" and error["type"] == "server_error"
        assert int(r.headers["retry-after"]) >= 1
        assert not running["done"]  # answered while the engine was still busy with the other request
        assert _health(slow)["queue_depth"] == 0


def test_a_queued_client_that_leaves_frees_its_place(slow):
    with _running(slow) as running:
        sock = _post_raw(slow.url, _OK)
        assert _until(lambda: _health(slow)["queue_depth"] == 1)
        sock.close()
        assert _until(lambda: _health(slow)["queue_depth"] == 0)
        assert _health(slow)["busy"] and not running["done"]  # it left the queue; nothing ran it
    generations = len(slow.engine.generations)
    assert slow.http.post("/v1/completions", json={**_OK, "max_tokens": 4}).status_code == 200
    assert len(slow.engine.generations) == generations + 1  # the one that left never reached the engine


def test_a_stuck_engine_gets_503_soon_after_the_deadline(slow):
    service = slow.app.state.service
    slow.engine.gate = threading.Event()
    service.request_timeout_s, service.grace_s = 1.0, 0.3
    try:
        r = slow.http.post("/v1/completions", json=_OK)
        stuck = slow.engine.generations[-1]
        error = _error(r, 503)
        assert error["code"] == "timeout" and "the engine did not answer" in error["message"]
        assert stuck["tokens"] == 0 and not stuck["done"]  # answered while the engine was still stuck
    finally:
        slow.engine.gate.set()
        slow.engine.gate = None
        service.request_timeout_s, service.grace_s = 300.0, Service.grace_s
    assert slow.http.post("/v1/completions", json=_OK).status_code == 200  # the engine came back: it serves


def test_an_engine_failure_outside_the_generation_is_a_500(srv):
    def broken():
        raise RuntimeError("stats are broken")

    for stream in (False, True):
        srv.engine.stats = broken
        try:
            r = srv.http.post("/v1/completions", json={**_OK, "stream": stream}, timeout=10)
        finally:
            del srv.engine.stats
        if stream:
            events = _events(r.text.splitlines())
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
        else:
            assert _error(r, 500)["type"] == "server_error"
        assert srv.http.post("/v1/completions", json=_OK, timeout=10).status_code == 200


def test_a_failed_save_keeps_the_reply(srv, caplog):
    def broken():
        raise TypeError("cannot save")

    srv.engine.save_state = broken
    try:
        r = srv.http.post("/v1/completions", json={**_OK, "user": "unsaved"}, timeout=10)
    finally:
        del srv.engine.save_state
    assert r.status_code == 200 and not _state_file(srv.state_dir, "unsaved").exists()
    assert "cannot save committee state" in caplog.text


def _corrupt_states(shape):
    good = {"format": "pcmoe-state/1", "num_experts": shape, "score": [[0.0] * n for n in shape],
            "window": [[0.0] * n for n in shape], "members": [[0] for _ in shape]}
    return {
        "deeply nested": "[" * 100_000 + "]" * 100_000,  # RecursionError in json
        "not JSON": "{",
        "a list": "[]",
        "short score": json.dumps({**good, "score": [[1.0]] * len(shape)}),
        "member out of range": json.dumps({**good, "members": [[shape[0] + 5]] * len(shape)}),
        "NaN window": json.dumps({**good, "window": [[float("nan")] * n for n in shape]}),
        "layers missing": json.dumps({**good, "members": []}),
    }


def test_a_bad_user_state_starts_fresh(srv, caplog):
    shape = [c.num_experts for c in srv.engine.committees]
    for name, text in _corrupt_states(shape).items():
        user = f"corrupt {name}"
        _state_file(srv.state_dir, user).write_text(text)
        loads = len(srv.engine.loaded_states)
        r = srv.http.post("/v1/completions", json={**_OK, "user": user, "max_tokens": 8}, timeout=10)
        assert r.status_code == 200, (name, r.text)
        assert r.json()["pcmoe"]["user_state"] == "new", name
        assert len(srv.engine.loaded_states) == loads, name  # refused before engine.load_state
        assert srv.http.post("/v1/completions", json={**_OK, "max_tokens": 8}, timeout=10).status_code == 200
        json.loads(_state_file(srv.state_dir, user).read_text())  # saved afresh
        _state_file(srv.state_dir, user).unlink()
    assert "ignoring committee state" in caplog.text
    for line in caplog.messages:
        assert "\n" not in line


# -- metrics and per-user committees ----------------------------------------------------------


def test_metrics(srv):
    from prometheus_client.parser import text_string_to_metric_families

    assert srv.http.post("/v1/completions", json={**_OK, "prompt": "metrics please"}).status_code == 200
    srv.http.post("/v1/completions", json={**_OK, "temperature": 9})
    r = srv.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("pcmoe_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert value("pcmoe_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert value("pcmoe_prompt_tokens_total") >= len(srv.engine.encode("metrics please"))
    assert value("pcmoe_completion_tokens_total") >= 1
    assert value("pcmoe_time_to_first_token_seconds_count", endpoint="/v1/completions") >= 1
    assert value("pcmoe_request_seconds_count", endpoint="/v1/completions") >= 2
    assert value("pcmoe_queue_depth") == 0
    stats = srv.http.get("/v1/pcmoe/stats").json()
    layers = stats["per_layer"]
    assert sum(value("pcmoe_expert_hits_total", layer=str(i)) for i in range(len(layers))) == stats["hits"]
    assert sum(value("pcmoe_expert_misses_total", layer=str(i)) for i in range(len(layers))) == stats["misses"]
    assert 0 <= value("pcmoe_router_mass_outside") <= 1
    assert value("pcmoe_resident_bytes") == stats["resident_bytes"] > 0
    assert value("pcmoe_process_rss_bytes") > 0
    for name in ("pcmoe_swaps_total", "pcmoe_expert_bytes_read_total", "pcmoe_stall_seconds_total",
                 "pcmoe_decode_tokens_per_second"):
        assert (name, ()) in samples, name


def test_each_reply_has_the_statistics_of_its_own_request(srv):
    """Per-request statistics are the engine's counters over that request alone: two requests' add
    up to what the cumulative statistics gained, and the second's are not the running total."""
    snapshots, replies = [srv.http.get("/v1/pcmoe/stats").json()], []
    for prompt in ("def main():\n    return 0", "the quick brown fox jumps over the lazy dog"):
        r = srv.http.post("/v1/completions", json={**_OK, "prompt": prompt, "max_tokens": 8})
        assert r.status_code == 200, r.text
        replies.append(r.json()["pcmoe"])
        snapshots.append(srv.http.get("/v1/pcmoe/stats").json())
    for info, before, after in zip(replies, snapshots, snapshots[1:]):
        for key in ("choices", "hits", "exchanged", "skipped", "swaps"):
            assert info[key] == after[key] - before[key], key
        assert info["choices"] > 0 and info["hit_rate"] == pytest.approx(info["hits"] / info["choices"])
        mass = after["mass_total"] - before["mass_total"]
        assert info["router_mass_outside"] == pytest.approx((after["mass_outside"] - before["mass_outside"]) / mass)
    assert replies[1]["choices"] < snapshots[2]["choices"] - snapshots[0]["choices"]


_SAMPLING_VALUES = {
    "temperature": [0, 0.0, 1, 2, 2.0, -0.1, 2.0001, float("nan"), float("inf"), "1", True, None],
    "top_p": [1e-9, 0.5, 1, 0, 0.0, -1, 1.01, float("nan"), "0.5", True, None],
    "max_tokens": [1, 10**6, 0, -1, 1.0, "4", True, None],
    "seed": [0, -(2**63), 2**64 - 1, -(2**63) - 1, 2**64, 1.5, "7", True, None],
    "stop": ["x", "", [], ["a"] * 4, ["a"] * 5, ["a", 1], 3, None],
}


@pytest.mark.parametrize("name, value", [(n, v) for n, values in _SAMPLING_VALUES.items() for v in values])
def test_the_request_schema_has_the_cli_sampling_rules(name, value):
    """The request model's bounds (which the OpenAPI schema shows) accept exactly what
    pcmoe.options.check_sampling, the CLI's validator, accepts."""
    from pydantic import ValidationError

    from pcmoe.options import OptionError, check_sampling
    from pcmoe.server.schema import CompletionRequest

    try:
        CompletionRequest(prompt="x", **{name: value})
        schema = True
    except ValidationError:
        schema = False
    try:
        check_sampling(**{name: value})
        rules = True
    except OptionError:
        rules = False
    assert schema == rules


@pytest.mark.parametrize("name, value", [("temperature", 2.5), ("temperature", "hot"), ("top_p", 0),
                                         ("max_tokens", "4"), ("seed", 2**70), ("stop", list("abcde"))])
def test_sampling_errors_say_what_the_cli_says(srv, name, value):
    from pcmoe.options import OptionError, check_sampling

    with pytest.raises(OptionError) as cli:
        check_sampling(**{name: value})
    error = _error(srv.http.post("/v1/completions", json={**_OK, name: value}), 400)
    assert error["message"] == cli.value.message(f"'{name}'") and error["param"] == name


def _state_file(state_dir, user):
    return state_dir / f"{hashlib.sha256(user.encode()).hexdigest()[:32]}.json"


def test_user_committees_are_saved_and_restored(srv, tiny_lm, tmp_path_factory):
    def ask(url, user, prompt):
        r = httpx.post(url + "/v1/completions", json={**_OK, "prompt": prompt, "max_tokens": 8, "user": user},
                       timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["pcmoe"]

    assert ask(srv.url, "alice", "def main():\n    return 0")["user_state"] == "new"
    alice = _state_file(srv.state_dir, "alice")
    saved = json.loads(alice.read_text())
    assert saved["format"] == "pcmoe-state/1" and len(saved["members"]) == 2
    ask(srv.url, "bob", "the quick brown fox jumps over the lazy dog")
    assert _state_file(srv.state_dir, "bob").exists()
    loads = len(srv.engine.loaded_states)
    assert ask(srv.url, "alice", "def f():\n    pass")["user_state"] == "restored"
    assert srv.engine.loaded_states[loads:] == [saved]  # alice's state went back into the engine

    # a user name is never a path
    ask(srv.url, "../../escape", "hello")
    ask(srv.url, "/etc/passwd", "hello")
    names = sorted(p.name for p in srv.state_dir.iterdir())
    assert all(re.fullmatch(r"[0-9a-f]{32}\.json", n) for n in names), names
    assert len(names) == 4
    assert not list(srv.state_dir.parent.parent.glob("escape*"))

    # a restarted server finds alice's state
    saved = json.loads(alice.read_text())
    engine = _load(tiny_lm, tmp_path_factory, budget="60%experts", policy="committee")
    with serve(engine, state_dir=srv.state_dir) as (url, _):
        assert ask(url, "alice", "def g():\n    pass")["user_state"] == "restored"
    engine.close()
    assert engine.loaded_states == [saved]


def test_user_states_keep_the_most_recent_users(srv, tmp_path):
    from pcmoe.server.states import UserStates

    states = UserStates(tmp_path, max_users=2)
    for user in ("a", "b", "c"):
        states.save(srv.engine, user)
    assert not states.path("a").exists() and states.path("b").exists() and states.path("c").exists()
    assert not states.restore(srv.engine, "a")
    states.save(srv.engine, "b")  # b used again: c is now the oldest
    states.save(srv.engine, "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(states.path(u).name for u in ("b", "d"))

    (tmp_path / "notes.txt").write_text("not a state")
    os.utime(states.path("d"), ns=(10**18, 10**18))
    os.utime(states.path("b"), ns=(2 * 10**18, 2 * 10**18))
    states = UserStates(tmp_path, max_users=1)  # a restart with a smaller cap keeps the latest by mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([states.path("b").name, "notes.txt"])
    with pytest.raises(ValueError):
        UserStates(tmp_path, max_users=0)


def test_remote_chat(full):
    from pcmoe.chat import RemoteChat, run_chat

    args = SimpleNamespace(url=full.url + "/v1", api_key=KEY, model_name=None, user="tester", max_tokens=8,
                           temperature=0.0, top_p=1.0)
    out = io.StringIO()
    backend = RemoteChat(args)
    assert run_chat(backend, stdin=io.StringIO("hello\n/stats\n/reset\n/nope\n"), out=out) == 0
    backend.close()
    text = out.getvalue()
    assert "hit rate" in text and "conversation cleared" in text and "unknown command /nope" in text


def test_chat_command_against_a_server(full, monkeypatch, capsys):
    from pcmoe.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/stats\n/exit\n"))
    url = full.url + "/v1"
    assert main(["chat", "--url", url, "--api-key", KEY, "--user", "cli", "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "hit rate" in out and "Traceback" not in err and "error" not in out
    assert main(["chat", "--url", url, "--api-key", "wrong"]) == 2
    assert f"error: {url} refused the API key (401)" in capsys.readouterr().err
    monkeypatch.delenv("PCMOE_API_KEY", raising=False)
    assert main(["chat", "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"error: {url} refused the API key (401): pass the server's key with --api-key" in err
    assert err.count("\n") == 1


def test_chat_command_against_no_server(monkeypatch, capsys):
    from pcmoe.cli import main

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()  # nothing listens there now
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--url", url, "--api-key", KEY]) == 2
    assert f"error: cannot reach {url}" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["budget", "plan"])
def test_serve_command(srv, tiny_lm, tmp_path, monkeypatch, capsys, how):
    from pcmoe.cli import main

    shape = [c.num_experts for c in srv.engine.committees]
    sizes = [max(1, n // 2 - i % 2) for i, n in enumerate(shape)]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "pcmoe-plan/1", "committee_sizes": sizes}))
    seen = {}

    def run(app, host, port, **kwargs):  # uvicorn.run, on 127.0.0.1 and a free port whatever was asked
        seen.update(host=host, port=port)
        with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            auth = {"Authorization": "Bearer k"} if how == "plan" else {}
            seen["stats"] = http.get("/v1/pcmoe/stats", headers=auth).json()
            for user in ("one", "two"):
                r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "user": user}, headers=auth)
                assert r.status_code == 200, r.text
            seen["unauthorized"] = http.get("/v1/models").status_code

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.delenv("PCMOE_API_KEY", raising=False)
    users = tmp_path / "users"
    argv = ["serve", "--model", str(tiny_lm), "--host", "0.0.0.0", "--port", "9999", "--state-dir", str(users),
            "--max-users", "1", "--quiet"]
    argv += ["--budget", "60%experts"] if how == "budget" else ["--plan", str(plan), "--api-key", "k"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9999 and f"user states in {users}" in err
    assert ("without --api-key" in err) == (how == "budget")
    if how == "plan":
        assert seen["stats"]["committee_sizes"] == sizes and seen["unauthorized"] == 401
    else:
        assert sum(seen["stats"]["committee_sizes"]) < sum(shape) and seen["unauthorized"] == 200
    assert [p.name for p in users.iterdir()] == [_state_file(users, "two").name]  # --max-users 1


@pytest.mark.parametrize("argv, env, says", [
    (["--api-key", ""], None, "--api-key (or $PCMOE_API_KEY) is empty"),
    ([], "", "is empty"),
    (["--max-users", "0"], None, "--max-users must be at least 1"),
    (["--port", "70000"], None, "--port must be in 0..65535"),
])
def test_serve_command_refuses_bad_options(tiny_lm, monkeypatch, capsys, argv, env, says):
    from pcmoe.cli import main

    if env is None:
        monkeypatch.delenv("PCMOE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("PCMOE_API_KEY", env)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served"))
    assert main(["serve", "--model", str(tiny_lm), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err


@pytest.mark.parametrize("where", ["HOME", "--state-dir"])
def test_serve_without_a_usable_state_folder(tiny_lm, tmp_path, monkeypatch, capsys, where):
    """A state folder that cannot be made (read-only HOME with the default one, a read-only --state-dir):
    serve without per-user states, saying so in one line."""
    from pcmoe.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # nothing can be made under a file, whoever runs this (root ignores modes)
    argv = ["serve", "--model", str(tiny_lm), "--quiet"]
    if where == "HOME":
        monkeypatch.delenv("PCMOE_CACHE", raising=False)
        monkeypatch.setenv("HOME", str(blocker))
    else:
        argv += ["--state-dir", str(blocker / "users")]
    seen = {}

    def run(app, host, port, **kwargs):
        with serving(app) as url:
            seen["r"] = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "user": "u"},
                                   timeout=30)

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(argv) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "per-user" in line]
    assert len(notices) == 1 and notices[0].startswith("warning: serving without per-user committee states"), err
    assert "Traceback" not in err and "user states in" not in err
    assert seen["r"].status_code == 200 and seen["r"].json()["pcmoe"]["user_state"] is None


def test_decode_speed_metric(slow):
    from prometheus_client.parser import text_string_to_metric_families

    body = slow.http.post("/v1/completions", json={**_OK, "max_tokens": 10}).json()
    info = body["pcmoe"]
    assert body["usage"]["completion_tokens"] == 10
    assert info["decode_tokens_per_s"] == pytest.approx(9 / info["decode_s"])
    assert info["decode_s"] >= 9 * slow.engine.delay  # 9 decode steps, each after a 20 ms wait
    families = {f.name: f for f in text_string_to_metric_families(slow.http.get("/metrics").text)}
    assert families["pcmoe_decode_tokens_per_second"].samples[0].value == pytest.approx(info["decode_tokens_per_s"])


def test_serve_command_line_defaults(monkeypatch):
    from pcmoe.cli import build_parser

    monkeypatch.delenv("PCMOE_API_KEY", raising=False)
    args = build_parser("serve").parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.queue_size, args.api_key) == ("127.0.0.1", 8000, 8, None)
    assert args.max_body_bytes == 1 << 20 and args.state_dir is None and not args.no_user_state
    assert args.max_users == 1000
