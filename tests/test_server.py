"""The OpenAI-compatible server, started in-process on 127.0.0.1:0 and driven with the real openai
client (and raw httpx for malformed requests, disconnects and concurrency)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
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

KEY = "sk-test-key"
MODEL = "tiny"


class Engine:
    """The engine, with an adjustable per-token delay and no EOS (to hold the engine busy), and spies."""

    def __init__(self, engine):
        self._engine = engine
        self.delay = 0.0
        self.stop_on_eos = True
        self.steps = 0            # tokens produced
        self.loaded_states = []   # arguments of load_state()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        kwargs.setdefault("stop_on_eos", self.stop_on_eos)
        with contextlib.closing(self._engine.generate(*args, **kwargs)) as steps:
            for step in steps:
                self.steps += 1
                if self.delay:
                    time.sleep(self.delay)
                yield step

    def load_state(self, state):
        self.loaded_states.append(state)
        self._engine.load_state(state)


def _load(folder, tmp_path_factory, **options):
    cache = tmp_path_factory.mktemp("cache")
    return Engine(pcmoe.load(folder, progress=False, cache_dir=str(cache), **options))


@contextlib.contextmanager
def serve(engine, **kwargs):
    """Run create_app(engine) with uvicorn in a thread on a port the OS picks; yields the base URL."""
    app = create_app(engine, model_name=MODEL, **kwargs)
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
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
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
    bad = openai.OpenAI(base_url=full.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


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
    ("/v1/completions", {**_OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
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


# -- queueing, cancellation, time limits ------------------------------------------------------


def test_concurrent_streams_finish_or_get_429(slow):
    results = [None] * 8
    barrier = threading.Barrier(8)

    def client(i):
        with httpx.Client(base_url=slow.url, timeout=30) as http:
            barrier.wait()
            body = {**_OK, "prompt": f"request {i}", "max_tokens": 12, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code == 200:
                    results[i] = (200, None, list(r.iter_lines()), None)
                else:
                    r.read()
                    results[i] = (r.status_code, r.headers.get("retry-after"), [], r.json())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads), "a request hung"
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses  # 1 running + 2 queued at most
    for status, retry_after, lines, body in results:
        if status == 429:
            assert int(retry_after) >= 1 and body["error"]["code"] == "queue_full"
        else:
            events = _events(lines)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert slow.http.get("/health").json()["queue_depth"] == 0


def test_disconnect_cancels_the_generation(slow):
    before = slow.engine.steps
    with httpx.Client(base_url=slow.url, timeout=30) as http:
        body = {**_OK, "max_tokens": 400, "stream": True}  # 8 s at 20 ms a token
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break
    t0 = time.monotonic()
    r = slow.http.post("/v1/completions", json={**_OK, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - t0 < 3, "the next request waited for the abandoned one"
    assert slow.engine.steps - before < 100


def test_disconnect_cancels_a_non_streaming_request(slow):
    before = slow.engine.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", json={**_OK, "max_tokens": 400}, timeout=0.5)
    t0 = time.monotonic()
    assert slow.http.post("/v1/completions", json={**_OK, "max_tokens": 4}).status_code == 200
    assert time.monotonic() - t0 < 3
    assert slow.engine.steps - before < 100


def test_request_timeout_ends_with_length(slow):
    service = slow.app.state.service
    service.request_timeout_s = 0.5
    try:
        t0 = time.monotonic()
        r = slow.http.post("/v1/completions", json={**_OK, "max_tokens": 300})
        elapsed = time.monotonic() - t0
    finally:
        service.request_timeout_s = 300.0
    body = r.json()
    assert r.status_code == 200 and elapsed < 3
    assert body["choices"][0]["finish_reason"] == "length" and body["pcmoe"]["timed_out"] is True
    assert 1 <= body["usage"]["completion_tokens"] < 300


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


def test_serve_command_line_defaults(monkeypatch):
    from pcmoe.cli import build_parser

    monkeypatch.delenv("PCMOE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.queue_size, args.api_key) == ("127.0.0.1", 8000, 8, None)
    assert args.max_body_bytes == 1 << 20 and args.state_dir is None and not args.no_user_state


def test_stop_strings_hold_back_a_possible_start():
    from pcmoe.server import _StopStrings

    stops = _StopStrings(["bcd", "xy"])
    out = [stops.feed(d) for d in ("a", "b", "c", "x", "bc", "d")]
    assert out == [("a", False), ("", False), ("", False), ("bc", False), ("x", False), ("", True)]
    stops = _StopStrings(["abc"])
    assert stops.feed("ab") == ("", False) and stops.flush() == "ab"  # no stop came: the rest goes out
