"""Property-based fuzzing of the real server's HTTP API (hypothesis): JSON of every wrong type, size and
encoding to every endpoint, raw bodies that are not JSON at all, and malformed HTTP on a raw socket.

Property: every answer comes within a timeout, is never a 5xx (nor a 5xx in-band in a stream), and every
4xx carries an OpenAI-shaped error; afterwards the server is idle, serves a normal request, and logged no
traceback. The number of cases tried is printed. CUPYLLM_FUZZ_SCALE=10 runs ten times as many.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_reliability import KEY, start_server, stop_server
from tests.test_server import parse_sse

SCALE = float(os.environ.get("CUPYLLM_FUZZ_SCALE", "1"))
MAX_MODEL_LEN = 64  # keeps every generation a fuzz case can ask for short
MAX_BODY = 64 * 1024
TIMEOUT = 30.0  # an answer slower than this is a hang
COUNTS: dict[str, int] = {}  # cases per test
STATUSES: dict[int, int] = {}  # answers per HTTP status
STARTED = time.monotonic()


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("fuzz"), "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-request-body-bytes", str(MAX_BODY), "--max-num-seqs", "64")
    yield srv
    stop_server(srv)


# values
INTS = st.sampled_from([0, 1, -1, 2, 3, 63, 64, 65, 999, 1023, 1024, 10 ** 6, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1,
                        2 ** 63, 2 ** 64 - 1, 2 ** 64, -2 ** 63, -2 ** 63 - 1, 10 ** 30, -10 ** 30]) | st.integers()
FLOATS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -1.0, -2.5, 1e-320, 5e-324, 1e-6, 2.5e-5, 1e308,
                          -1e308, 1e30]) | st.floats(allow_nan=False, allow_infinity=False)
WORDS = st.sampled_from(["", "x", " ", "\u0000", "\U0001f600", "日本語", "\u202e", "\ufeff", "<|im_start|>",
                         "<|endoftext|>", "<|im_end|>", "{{ 7*7 }}", "{% raw %}", "../../etc/passwd", "/etc/passwd",
                         "null", "NaN", "1e999", "-1", "0x10", "user", "assistant", "system", "tool", "wizard",
                         "text", "image_url", "auto", "none", "json_object", "demo", "\\", "\"", "\n" * 3])
STRINGS = WORDS | st.text(max_size=40)
LEAF = st.none() | st.booleans() | INTS | FLOATS | STRINGS
ANY = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(STRINGS, inner, max_size=5),
                   max_leaves=20)
TOKEN_ID = st.integers(-3, 1030) | INTS
TEXT = STRINGS | st.text(alphabet="the quick brown fox jumps over lazy dog,.!?", max_size=200)
PROMPT = st.one_of(TEXT, st.lists(TEXT, min_size=0, max_size=4), st.lists(TOKEN_ID, max_size=10),
                   st.lists(st.lists(TOKEN_ID, max_size=6), max_size=3), ANY)
PART = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                 st.dictionaries(st.sampled_from(["type", "text", "image_url"]), ANY, max_size=3), ANY)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": TEXT}),
    st.fixed_dictionaries({"role": STRINGS | ANY}, optional={"content": st.one_of(TEXT, st.lists(PART, max_size=3),
                                                                                  ANY), "name": ANY}),
    ANY)
MESSAGES = st.lists(MESSAGE, max_size=4) | ANY

# Plausible values per field: valid ones most of the time, so that the field's own checks are reached.
TYPICAL = {
    "model": st.sampled_from(["demo", "demo", "nope", "/etc/passwd", None]),
    "prompt": PROMPT, "messages": MESSAGES, "tokens": st.lists(TOKEN_ID, max_size=12),
    "max_tokens": st.sampled_from([1, 2, 5, 16, None, 0, -1, 63, 64, 10 ** 9]),
    "max_completion_tokens": st.sampled_from([1, 3, None, 0, 70]),
    "n": st.sampled_from([1, 2, 3, None, 0, -1, 129]),
    "temperature": st.sampled_from([0, 0.0, 1e-6, 2.5e-5, 0.7, 1, 2.0, 100.0, 1e308, -0.1]),
    "top_p": st.sampled_from([1, 0.9, 1e-9, 0, 1.0000001, -1]),
    "top_k": st.sampled_from([0, -1, 1, 5, 10 ** 6, -2, 2 ** 63 - 1]),
    "min_p": st.sampled_from([0, 0.5, 1, 1.5, -0.1]),
    "presence_penalty": st.sampled_from([0, 2, -2, 2.0001]), "frequency_penalty": st.sampled_from([0, 2, -2, 3]),
    "repetition_penalty": st.sampled_from([1, 1e-9, 1e-300, 100, 1e308, 0, -1]),
    "seed": st.sampled_from([0, -1, 42, 2 ** 64 - 1, 2 ** 64, -2 ** 63, -2 ** 63 - 1]),
    "stop": st.one_of(STRINGS, st.lists(STRINGS, max_size=70)),
    "stop_token_ids": st.lists(TOKEN_ID, max_size=5),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-2, 1030).map(str), STRINGS),
                                  st.sampled_from([0, 100, -100, 100.5, 1e308, "x", None]), max_size=4),
    "logprobs": st.sampled_from([0, 1, 5, 20, 21, -1, True, None]),
    "top_logprobs": st.sampled_from([0, 2, 20, 21, -1]),
    "min_tokens": st.sampled_from([0, 1, 5, 64, 1000, -1]),
    "stream": st.booleans(), "echo": st.booleans(), "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | ANY,
                                                          "continuous_usage_stats": st.booleans()}),
    "chat_template_kwargs": st.dictionaries(STRINGS, ANY, max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {}, {"type": None}]),
}
COMMON = ["model", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "logit_bias", "min_tokens",
          "stream", "stream_options", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
          "spaces_between_special_tokens", "user", "best_of", "response_format", "use_beam_search", "guided_json"]
ENDPOINTS = {
    "/v1/completions": ("prompt", COMMON + ["prompt", "echo", "logprobs", "suffix", "prompt_logprobs"]),
    "/v1/chat/completions": ("messages", COMMON + ["messages", "logprobs", "top_logprobs", "max_completion_tokens",
                                                   "tools", "tool_choice", "functions", "chat_template",
                                                   "chat_template_kwargs", "add_generation_prompt",
                                                   "continue_final_message", "echo"]),
    "/tokenize": ("prompt", ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                             "chat_template_kwargs", "return_token_strs"]),
    "/detokenize": ("tokens", ["model", "tokens"]),
}


VALID_MAIN = {"prompt": TEXT, "tokens": st.lists(st.integers(0, 999), max_size=10),
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                          "content": TEXT}), min_size=1, max_size=3)}


def value_of(name: str):
    return st.one_of(TYPICAL.get(name, ANY), ANY)


@st.composite
def api_body(draw, path: str):
    """A request to `path` that starts valid and then has a few fields replaced by anything at all."""
    main, fields = ENDPOINTS[path]
    body = {main: draw(VALID_MAIN[main])}
    if main == "messages" or (path == "/v1/completions"):
        body["max_tokens"] = draw(st.sampled_from([1, 4, 16]))
    for name in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
        body[name] = draw(value_of(name))
    for name, value in draw(st.dictionaries(STRINGS, ANY, max_size=2)).items():  # unknown fields are ignored
        body.setdefault(name, value)
    return body


# the property
def check_answer(status: int, headers: dict, raw: bytes, what) -> None:
    STATUSES[status] = STATUSES.get(status, 0) + 1
    assert status < 500, (status, raw[:500], what)
    if status >= 400:
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, (err, what)
        assert isinstance(err["message"], str) and err["message"], (err, what)
    elif "text/event-stream" in headers.get("content-type", ""):
        for event in parse_sse(raw):
            assert "error" not in event or event["error"]["code"] < 500, (event, what)
    elif raw:
        json.loads(raw)


def send(port: int, method: str, path: str, body: bytes | None, headers: dict, what) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        raw = resp.read()
    except socket.timeout:
        pytest.fail(f"no answer within {TIMEOUT} s to {what!r:.1000}")
    finally:
        conn.close()
    check_answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw, what)


def count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_fuzz_json_bodies(server, path):
    @fuzz_settings(500 if path.startswith("/v1") else 250)
    @given(body=api_body(path), ascii_only=st.booleans())
    def run(body, ascii_only):
        count(path)
        raw = json.dumps(body, ensure_ascii=ascii_only).encode()  # \\u escapes or raw UTF-8
        send(server.port, "POST", path, raw, {**AUTH, "Content-Type": "application/json"}, body)
    run()


CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", "",
                                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=zz",
                                 "application/json; charset=utf-16", "application/octet-stream", "\u00e9/x"])


@st.composite
def raw_body(draw) -> bytes:
    """Bytes that are not (quite) a JSON object: every way a body can be broken."""
    valid = json.dumps(draw(api_body(draw(st.sampled_from(list(ENDPOINTS)))))).encode()
    kind = draw(st.sampled_from(["binary", "truncated", "bad_utf8", "escapes", "nested", "number", "empty", "huge",
                                 "non_object", "utf16", "nan", "bom", "duplicate"]))
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return valid[:draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"])) \
            + valid[at:]
    if kind == "escapes":
        escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\u0000", "\\uZZZZ", "\\x41", "\\",
                                       "\\u00", "\\ud800\\u0041"]))
        return b'{"prompt": "a' + escape.encode() + b'b", "messages": [{"role": "user", "content": "' \
            + escape.encode() + b'"}], "tokens": [1], "max_tokens": 2}'
    if kind == "nested":
        depth = draw(st.integers(100, 3000))
        return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "number":
        digits = draw(st.integers(20, 5000))
        return b'{"prompt": "x", "max_tokens": ' + b"9" * digits + b', "n": 1e' + str(digits).encode() + b"}"
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n", b"{}", b"null", b"\x00"]))
    if kind == "huge":
        return b'{"prompt": "' + b"x" * (MAX_BODY + draw(st.integers(1, 4096))) + b'"}'
    if kind == "non_object":
        return json.dumps(draw(st.one_of(LEAF, st.lists(LEAF, max_size=4)))).encode()
    if kind == "utf16":
        return valid.decode().encode("utf-16")
    if kind == "nan":
        return valid[:-1] + draw(st.sampled_from([b', "temperature": NaN}', b', "top_p": Infinity}',
                                                  b', "max_tokens": -Infinity}', b', "seed": 1e400}']))
    if kind == "bom":
        return b"\xef\xbb\xbf" + valid
    return valid[:-1] + b', "prompt": [1, 2], "prompt": {"a": 1}}'


def test_fuzz_raw_bodies(server):
    @fuzz_settings(600)
    @given(path=st.sampled_from(list(ENDPOINTS)), body=raw_body(), content_type=CONTENT_TYPES)
    def run(path, body, content_type):
        count("raw bodies")
        headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
        send(server.port, "POST", path, body, headers, (path, body[:300], content_type))
    run()


METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO",
                           "get", "G\x00T"])
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version", "/metrics",
                         "/tokenize", "/detokenize", "/", "/v1", "/v1/", "/v1/models/x", "/v1/completions?x=%ff",
                         "/%ff%fe", "/v1/%2e%2e/health", "*", "/" + "a" * 5000, "/v1/models#frag",
                         "http://evil/v1/models", "/v1/chat/completions/../completions"])
HEADER_VALUES = st.one_of(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                          st.sampled_from([b"", b"Bearer", f"Bearer {KEY}".encode(), f"bearer  {KEY}  ".encode(),
                                           b"Basic Zm9vOmJhcg==", f"Bearer {KEY}\xff".encode("latin-1"),
                                           b"Bearer \xff\xfe", b"x" * 9000]))


BEARER_VALUES = st.binary(max_size=30).map(lambda b: b"Bearer " + b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def http_request(draw) -> bytes:
    method = draw(METHODS)
    path = draw(PATHS | st.text(alphabet="/abcv1%.?#&=", min_size=1, max_size=30).map(lambda p: "/" + p))
    body = draw(st.one_of(st.just(b""), raw_body(), api_body("/v1/completions").map(lambda b: json.dumps(b).encode())))
    lines = [f"{method} {path} HTTP/1.1".encode("utf-8", "surrogatepass"), b"Host: 127.0.0.1"]
    if draw(st.booleans()):
        lines.append(b"Authorization: " + draw(HEADER_VALUES | BEARER_VALUES))
    else:
        lines.append(f"Authorization: Bearer {KEY}".encode())
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([b"Content-Type", b"Accept", b"Expect", b"Transfer-Encoding", b"X-\xff",
                                     b"Cookie", b"Content-Encoding", b"Range", b"Upgrade", b"Connection"]))
        lines.append(name + b": " + draw(HEADER_VALUES))
    framing = draw(st.sampled_from(["length", "short_length", "chunked"]))
    if framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        shown = len(body) if framing == "length" else draw(st.integers(0, len(body)))
        lines.append(f"Content-Length: {shown}".encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_fuzz_malformed_http(server):
    @fuzz_settings(300)
    @given(request=http_request())
    def run(request):
        count("raw HTTP")
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer and close before reading a body it refuses
            raw = b""
            try:
                while chunk := sock.recv(65536):
                    raw += chunk
            except ConnectionResetError:
                pass
            except socket.timeout:
                pytest.fail(f"no answer within {TIMEOUT} s to {request[:500]!r}")
        assert raw.startswith(b"HTTP/1.1 "), (raw[:300], request[:300])
        status = int(raw[9:12])
        STATUSES[status] = STATUSES.get(status, 0) + 1
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert status < 500, (raw[:500], request[:500])
        if status >= 400 and payload and b"chunked" not in head.lower():
            assert json.loads(payload)["error"]["code"] == status, (raw[:500], request[:500])
    run()


def test_server_still_serves_after_fuzzing(server):
    m = server.wait_idle(timeout=60)
    generated = sum(v for k, v in m.items() if k.startswith("vllm:request_success_total") and "abort" not in k)
    r = server.post("/v1/completions", {"prompt": "after the storm", "max_tokens": 5, "ignore_eos": True})
    assert r["usage"]["completion_tokens"] == 5
    assert "Traceback" not in server.log(), server.log()[-5000:]
    total = sum(COUNTS.values())
    print(f"fuzz: {total} cases ({', '.join(f'{k}: {v}' for k, v in COUNTS.items())}) in "
          f"{time.monotonic() - STARTED:.1f} s, no 5xx, no hang; answers by status {dict(sorted(STATUSES.items()))}; "
          f"{generated:.0f} engine sequences ran to completion")
    assert total > 0
