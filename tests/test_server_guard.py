"""What a request can do to the server (inference/server.py, chat_request.py, http_guard.py):
prompt fitting in linear time that never cuts the system message, the limits (413, 400s, 408),
the API key (401), browser safety (415, Host, CORS), no 500 for any body (a Hypothesis fuzz),
and, against a real server process, that huge requests and slow clients do not stall it."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from config import EtudeConfig
from inference.chat_request import Limits, RequestError, Settings, decode_json, parse_request, prepare_prompt
from inference.http_guard import resolve_api_key
from inference.inference import Chat, PromptTooLong, fit_to_context
from inference.server import create_app
from model.model import EtudeModel
from model.tokenizer import load_tokenizer
from tests.conftest import TINY_VOCAB_SIZE
from tests.test_server import browser  # noqa: F401  (the headless Chromium fixture)

starlette_testclient = pytest.importorskip("starlette.testclient", reason="needs httpx (an openai dependency)")

CONTEXT = 128
NAME = "toy"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def toy_chat(tiny_tokenizer_dir) -> Chat:
    torch.manual_seed(0)
    model = EtudeModel(EtudeConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=CONTEXT))
    return Chat(model, load_tokenizer(tiny_tokenizer_dir), max_new_tokens=4, temperature=0, seed=0)


def history(n: int, system: str | None = "You are a toy.") -> list[dict]:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"word{i}"} for i in range(n)]
    return ([{"role": "system", "content": system}] if system else []) + turns


class CountingRender:
    """A render that counts the messages and characters it was given."""

    def __init__(self, chat: Chat):
        self.chat, self.messages, self.chars, self.calls = chat, 0, 0, 0

    def __call__(self, messages):
        self.calls += 1
        self.messages += len(messages)
        self.chars += sum(len(m["content"]) for m in messages)
        return self.chat.tokenizer.render_chat(messages, add_generation_prompt=True)[0]


def fit(chat: Chat, messages, render=None, **kwargs):
    return fit_to_context(messages, render or CountingRender(chat), CONTEXT, chat.max_new_tokens,
                          max_token_chars=max(chat.tokenizer.token_bytes()), **kwargs)


# ---- prompt fitting ------------------------------------------------------------------------

def test_trimming_drops_the_fewest_oldest_turns_and_keeps_the_system_message(toy_chat):
    room = CONTEXT - toy_chat.max_new_tokens
    for n in (1, 2, 7, 40, 41, 300):
        messages = history(n)
        ids, note = fit(toy_chat, messages)
        render = lambda m: toy_chat.tokenizer.render_chat(m, add_generation_prompt=True)[0]  # noqa: E731
        dropped = next(k for k in range(n) if len(render(messages[:1] + messages[1 + k:])) <= room)  # brute force
        assert ids == render(messages[:1] + messages[1 + dropped:]) and len(ids) <= room
        assert ids[:1] == [toy_chat.tokenizer.im_start_id] and toy_chat.tokenizer.decode(ids).startswith(
            "<|im_start|>system\nYou are a toy.<|im_end|>")
        assert (note is None) == (dropped == 0) and (not note or f"the {dropped} oldest" in note)


def test_fitting_is_linear_in_the_history(toy_chat):
    work = {}
    for n in (2_001, 8_001):
        render = CountingRender(toy_chat)
        fit(toy_chat, history(n), render)
        work[n] = render.messages
    # the character bound leaves only the turns that could fit: the same work for any length
    assert work[8_001] <= work[2_001] * 1.1 and work[2_001] < 2_000
    render = CountingRender(toy_chat)  # without the bound: a binary search, about two renders' worth
    fit_to_context(history(2_001), render, CONTEXT, toy_chat.max_new_tokens)
    assert render.messages < 3 * 2_001 and render.calls < 15


def test_a_huge_message_is_refused_or_cut_without_tokenizing_it_all(toy_chat):
    huge = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 1_000_000}]
    render = CountingRender(toy_chat)
    with pytest.raises(PromptTooLong, match="is at least .* tokens") as refused:
        fit(toy_chat, huge, render, trim=False)
    assert render.calls == 0 and not refused.value.exact
    render = CountingRender(toy_chat)
    ids, note = fit(toy_chat, huge, render, trim=True)
    assert "characters of the last message" in note and len(ids) <= CONTEXT - toy_chat.max_new_tokens
    assert render.chars < 25 * CONTEXT * max(toy_chat.tokenizer.token_bytes())  # a few probes of the tail only
    assert toy_chat.tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_hf_chat_trims_a_history_as_the_native_chat_does(toy_chat, tiny_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    from inference.hf import HFChat
    hf_chat = HFChat.__new__(HFChat)  # prompt_ids needs the tokenizer and the sizes, not a model
    hf_chat.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    hf_chat.context, hf_chat.max_new_tokens = CONTEXT, toy_chat.max_new_tokens
    hf_chat.max_token_chars = 2 * max(len(token) for token in hf_chat.tokenizer.get_vocab())
    for messages in (history(300), history(3), [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "the red cat " * 80}]):
        assert hf_chat.prompt_ids(messages) == toy_chat.prompt_ids(messages)
    with pytest.raises(PromptTooLong):
        hf_chat.prompt_ids(history(300), trim=False)


def test_the_interactive_chat_survives_a_system_message_too_long(toy_chat, monkeypatch, capsys):
    from inference.inference import interactive
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/system Be brief.\nhello\n/quit\n"))
    interactive(toy_chat, "the cat sat " * 100)
    out = capsys.readouterr().out
    assert "(not answered: the system message with the template's markers is" in out and out.count("etude> ") == 2


# ---- the request body ------------------------------------------------------------------------

def refused(raw: bytes, limits: Limits = Limits()) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_request(decode_json(raw), NAME, limits)
    return caught.value


@pytest.mark.parametrize("raw,code,param", [
    (b'{"\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}', "unsupported_parameter", "\\ud800"),
    (b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", "invalid_json", None),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json", None),
    (b'{"messages": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001, "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}', "invalid_value", "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-300}', "invalid_value", "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-40}', "invalid_value",
     "repetition_penalty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "truncation": "middle"}', "invalid_value", "truncation"),
    (b'{"messages": [{"role": "\\udfff", "content": "hi"}]}', None, "messages[0].role"),
    (b"\xff\xfe{", "invalid_json", None),
])
def test_bodies_that_used_to_give_500_are_400(raw, code, param):
    error = refused(raw)
    assert (error.status, error.code, error.param) == (400, code, param)
    json.dumps(error.body(), ensure_ascii=True).encode("ascii")  # always renderable
    assert len(error.message) < 600


def test_message_count_and_character_limits():
    limits = Limits(max_messages=3, max_chars=20)
    body = lambda messages: json.dumps({"messages": messages}).encode()  # noqa: E731
    assert refused(body(history(4, None)), limits).code == "array_above_max_length"
    assert refused(body([{"role": "user", "content": "x" * 21}]), limits).code == "string_above_max_length"
    assert parse_request(decode_json(body(history(3, None))), NAME, limits).messages == history(3, None)
    # the count is checked before any message is looked at
    assert refused(body([None] * 4), limits).code == "array_above_max_length"


def test_context_length_exceeded_by_default_and_trimmed_on_request(toy_chat):
    long = history(200)
    with pytest.raises(RequestError) as caught:
        prepare_prompt(toy_chat, Settings(messages=long))
    error = caught.value
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
    assert f"{CONTEXT}-token context" in error.message and '"truncation": "auto"' in error.message
    ids, note = prepare_prompt(toy_chat, Settings(messages=long, truncation="auto"))
    assert "oldest" in note and (ids, note) == prepare_prompt(toy_chat, Settings(messages=long), truncation="auto")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
FIELDS = st.sampled_from(["messages", "model", "stream", "stream_options", "temperature", "top_p", "top_k",
                          "repetition_penalty", "max_tokens", "max_completion_tokens", "stop", "seed", "n",
                          "ignore_eos", "truncation", "logprobs", "presence_penalty", "tools", "\ud800"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant",
                                                                     "tool", "\udc80"]) | JSON_VALUES,
                                           "content": st.text(max_size=30) | JSON_VALUES}), max_size=5)
BODIES = st.dictionaries(FIELDS, JSON_VALUES, max_size=6).flatmap(
    lambda body: st.just(body) | MESSAGES.map(lambda messages: {**body, "messages": messages}))
RAW = (BODIES.map(lambda body: json.dumps(body).encode()) | st.binary(max_size=200)
       | JSON_VALUES.map(lambda value: json.dumps(value).encode()))


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 300)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=RAW)
def test_fuzz_the_request_parser(toy_chat, raw):
    """Any bytes: Settings whose prompt can be prepared, or a 4xx RequestError that renders as ASCII JSON."""
    try:
        parsed = parse_request(decode_json(raw), NAME)
        prepare_prompt(toy_chat, parsed, "auto")
    except RequestError as error:
        assert 400 <= error.status < 500
        json.dumps(error.body(), ensure_ascii=True).encode("ascii")


# ---- over HTTP, in process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_factory(toy_chat):
    clients = []

    def make(**kwargs):
        kwargs = {"limits": Limits(max_body_bytes=64 << 10), **kwargs}
        client = starlette_testclient.TestClient(create_app(toy_chat, NAME, **kwargs), base_url="http://127.0.0.1:8000",
                                                 raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_only_json_bodies_are_read(app_factory):
    client = app_factory()
    body = json.dumps({"messages": HI, "max_tokens": 2})
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Content-Type": "multipart/form-data; boundary=x"}, {}):
        reply = client.post("/v1/chat/completions", content=body, headers=headers)
        assert reply.status_code == 415 and reply.json()["error"]["code"] == "unsupported_media_type"
    reply = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 2


def test_bodies_over_the_limit_are_413_declared_or_streamed(app_factory):
    client = app_factory()
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (70 << 10) + b'"}]}'
    reply = client.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    assert reply.headers["connection"] == "close"
    chunks = (big[i:i + 4096] for i in range(0, len(big), 4096))  # chunked: no Content-Length to go by
    reply = client.post("/v1/chat/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413


def test_api_key_guards_every_v1_route_only(app_factory):
    client = app_factory(api_key="s3cret")
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer s3cret2"}):
            reply = client.request(method, path, headers={"Content-Type": "application/json", **headers},
                                   content=json.dumps({"messages": HI}))
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", (path, headers)
            assert reply.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_host_header_must_name_this_machine_when_bound_to_loopback(app_factory):
    client = app_factory(check_host=True)
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:8000", "127.0.0.1.evil.example", "", "10.0.0.1:8000"):
        reply = client.get("/v1/models", headers={"Host": host})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_host", host
    assert app_factory().get("/health", headers={"Host": "evil.example"}).status_code == 200  # not checked off loopback


def test_cors_is_off_unless_origins_are_allowed(app_factory):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = app_factory()
    assert "access-control-allow-origin" not in closed.options("/v1/chat/completions", headers=preflight).headers
    assert "access-control-allow-origin" not in closed.get("/v1/models", headers={"Origin": "https://app.example"}).headers
    opened = app_factory(allowed_origins=("https://app.example",), api_key="k")
    reply = opened.options("/v1/chat/completions", headers=preflight)
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "https://app.example"
    reply = opened.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert reply.headers["access-control-allow-origin"] == "https://app.example"
    other = opened.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_http_errors_are_json_and_context_overflow_is_400_or_trimmed(app_factory):
    client = app_factory()
    post = lambda body: client.post("/v1/chat/completions", content=body,  # noqa: E731
                                    headers={"Content-Type": "application/json"})
    for raw in (b"[" * 50_000, b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"1" * 5000 + b"}",
                b'{"\\udc00": 0}', b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300}'):
        reply = post(raw)
        assert reply.status_code == 400 and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    long = {"messages": history(200), "max_tokens": 2}
    reply = post(json.dumps(long))
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    reply = post(json.dumps({**long, "truncation": "auto"}))
    assert reply.status_code == 200 and "oldest" in reply.headers["x-etude-note"]
    assert app_factory(truncation="auto").post("/v1/chat/completions", content=json.dumps(long),
                                               headers={"Content-Type": "application/json"}).status_code == 200
    assert client.get("/health").json()["waiting"] == 0  # refused requests gave their places back


@pytest.fixture(scope="module")
def plain_client(app_factory):
    return app_factory()


@settings(max_examples=int(os.environ.get("FUZZ_HTTP_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=RAW)
def test_fuzz_over_http_never_500(plain_client, raw):
    reply = plain_client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code in (200, 400, 404), reply.text
    if reply.status_code != 200:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("ETUDE_API_KEY", raising=False)
    assert resolve_api_key(None, None) is None
    monkeypatch.setenv("ETUDE_API_KEY", "from-env")
    assert resolve_api_key(None, None) == "from-env" and resolve_api_key("flag", None) == "flag"
    (tmp_path / "key").write_text("from-file\n")
    assert resolve_api_key(None, str(tmp_path / "key")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    for args, message in (((None, str(tmp_path / "empty")), "empty"), (("a", str(tmp_path / "key")), "not both"),
                          (("has space", None), "without spaces"), ((None, str(tmp_path / "none")), "cannot read")):
        with pytest.raises(ValueError, match=message):
            resolve_api_key(*args)


# ---- a real server process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(toy_chat, tmp_path_factory, tiny_tokenizer_dir):
    from model.checkpoint import save_model_folder
    from tests.test_server import start_server
    folder = save_model_folder(toy_chat.model, tmp_path_factory.mktemp("guard") / NAME, tokenizer_dir=tiny_tokenizer_dir)
    process, port = start_server(folder, "--header-timeout", "1", "--body-timeout", "2", "--max-queue", "2")
    yield {"port": port, "process": process, "folder": folder}
    process.terminate()
    process.wait(timeout=10)


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def health_latency(port: int) -> float:
    started = time.perf_counter()
    reply = raw_request(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    return time.perf_counter() - started


def post_raw(port: int, body: bytes) -> tuple[int, dict]:
    reply = raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), 60)
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_slow_headers_and_bodies_are_dropped(served):
    port = served["port"]
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    started = time.monotonic()
    for _ in range(12):  # 4 bytes a second each, never finishing the headers
        for sock in sockets:
            try:
                sock.send(b"X-a:")
            except OSError:
                pass
        assert health_latency(port) < 1
        time.sleep(0.25)
    closed = 0
    for sock in sockets:
        sock.settimeout(1)
        try:
            data = sock.recv(4096)
            closed += data.startswith(b"HTTP/1.1 408") or data == b""
        except OSError:
            closed += 1
        sock.close()
    assert closed == len(sockets) and time.monotonic() - started < 6
    with socket.create_connection(("127.0.0.1", port)) as sock:  # a body that never completes
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("what", ["2001 messages", "100000 messages", "5 MB message"])
def test_huge_requests_are_answered_fast_and_health_stays_responsive(served, what):
    count = int(what.split()[0]) if "messages" in what else 1
    messages = history(count - 1) if count > 1 else [{"role": "user", "content": "word " * 1_000_000}]
    results, latencies = {}, []

    def send(body):
        started = time.perf_counter()
        results[body.get("truncation")] = (*post_raw(served["port"], json.dumps(body).encode()),
                                           time.perf_counter() - started)

    for truncation in (None, "auto"):
        worker = threading.Thread(target=send, args=({"messages": messages, "max_tokens": 1,
                                                      **({"truncation": truncation} if truncation else {})},))
        worker.start()
        while worker.is_alive():
            latencies.append(health_latency(served["port"]))
        worker.join()
    (status, reply, seconds), (trim_status, _, trim_seconds) = results[None], results["auto"]
    # the defaults: 2,001 messages fit the limits and are too long (400, or trimmed); 100,000 messages
    # pass --max-messages or --max-body-bytes, and 5 MB --max-body-bytes (refused before any tokenizing)
    expected = {"2001 messages": [(400, "context_length_exceeded", 200)],
                "100000 messages": [(400, "array_above_max_length", 400), (413, "request_too_large", 413)],
                "5 MB message": [(413, "request_too_large", 413)]}[what]
    assert (status, reply["error"]["code"], trim_status) in expected
    assert seconds < 3 and trim_seconds < 3 and max(latencies) < 1  # generous: the machine is shared


@pytest.fixture(scope="module")
def served_with_key(served):
    from tests.test_server import start_server
    process, port = start_server(served["folder"], "--api-key", "page-key")
    yield {"port": port}
    process.terminate()
    process.wait(timeout=10)


def test_the_chat_page_asks_for_the_key(served_with_key, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"http://127.0.0.1:{served_with_key['port']}/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    WebDriverWait(browser, 20).until(lambda d: "refused" in d.find_element(By.ID, "model-name").text)
    browser.find_element(By.ID, "api-key").send_keys("page-key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    WebDriverWait(browser, 20).until(lambda d: NAME in d.find_element(By.ID, "model-name").text)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    browser.find_element(By.ID, "input").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    done = ".message.assistant[data-state='done']"
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
    assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")
