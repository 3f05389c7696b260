"""Reliability and security of the real server (`cupyllm serve`, demo model, loopback): limits with clear
errors, a bounded waiting queue, KV exhaustion through preemption, disconnects at random points with RSS
measured, faults inside a step, graceful shutdown on SIGTERM, API-key coverage, the chat-template
sandbox end to end, no file paths from requests, and no prompts in the logs.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time

import aiohttp
import numpy as np
import pytest

from tests.server_process import launch_server, stop_process, wait_until
from tests.test_server import Server, parse_sse

KEY = "sk-rel-" + os.urandom(8).hex()
VOCAB = 1024  # the demo model's


_DEFAULT = object()


class KeyedServer(Server):
    """test_server's Server, with this server's own API key sent unless a test says otherwise."""

    def __init__(self, port: int, proc: subprocess.Popen, log_path: str, key: str | None):
        super().__init__(port, proc, log_path)
        self.key = key

    def request(self, method: str, path: str, body=None, key=_DEFAULT, headers: dict | None = None):
        return super().request(method, path, body, self.key if key is _DEFAULT else key, headers)


def start_server(tmp_dir, *flags: str, key: str | None = KEY, name: str = "demo", extra_env: dict | None = None,
                 timeout: float = 60) -> KeyedServer:
    """`cupyllm serve` on an ephemeral port with `flags`; returns once its "ready" line names the port."""
    log_path = os.path.join(str(tmp_dir), f"server-{os.urandom(3).hex()}.log")
    env = {**os.environ, "NO_PROXY": "127.0.0.1", **(extra_env or {})}
    env.pop("CUPYLLM_API_KEY", None)
    env.pop("VLLM_API_KEY", None)
    if key is not None:
        env["CUPYLLM_API_KEY"] = key
    proc, port = launch_server(["--device", "numpy", "--served-model-name", name, *flags], log_path, env, timeout)
    return KeyedServer(port, proc, log_path, key)


def stop_server(srv: Server, allow_tracebacks: bool = False) -> None:
    if not stop_process(srv.proc, 15):
        pytest.fail("the server did not exit within 15 s of SIGTERM")
    if not allow_tracebacks:
        assert "Traceback" not in srv.log(), srv.log()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


def error_of(status: int, raw: bytes) -> dict:
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    return err


# limits
@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("limited"), "--max-model-len", "128", "--max-request-body-bytes",
                       "65536", "--max-waiting-requests", "8", "--max-num-seqs", "2", "--log-level", "debug")
    yield srv
    stop_server(srv)


LIMITS = [
    ({"prompt": "x" * 70000}, 413, "Request"),
    ({"prompt": [5] * 128, "max_tokens": 1}, 400,
     "This model's maximum context length is 128 tokens. However, you requested 129 tokens (128 in the messages, "
     "1 in the completion)"),
    ({"prompt": [5] * 100, "max_tokens": 29}, 400, "However, you requested 129 tokens (100 in the messages, 29 in"),
    ({"prompt": "x", "n": 129}, 400, "'n' must be in [1, 128], got 129"),
    ({"prompt": "x", "logprobs": 21}, 400, "'logprobs' must be in [0, 20], got 21"),
    ({"prompt": "x", "stop": [f"s{i}" for i in range(65)]}, 400, "stop must hold at most 64 strings, got 65"),
    ({"prompt": ["a", "b", "c"], "n": 3, "temperature": 1}, 400,
     "This request asks for 9 sequences (3 prompts x n=3); the server accepts at most 8 in one request."),
    ({"prompt": [-1]}, 400, "token ids in 'prompt' must be in [0, 1024); got [-1]"),
    ({"prompt": [1024]}, 400, "token ids in 'prompt' must be in [0, 1024); got [1024]"),
    ({"prompt": "x", "logit_bias": {"1024": 1}}, 400,
     "token ids in 'logit_bias' must be in [0, 1024); got [1024] (outside the vocabulary)"),
]


@pytest.mark.parametrize("body,status,message", LIMITS, ids=[m[:30] for _, _, m in LIMITS])
def test_limits_give_clear_errors(limited, body, status, message):
    code, raw = limited.request("POST", "/v1/completions", body)
    assert code == status, raw
    assert message in error_of(status, raw)["message"]


def test_chat_context_limit_and_top_logprobs(limited):
    code, raw = limited.request("POST", "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 4})
    assert code == 400 and "maximum context length is 128 tokens" in error_of(400, raw)["message"]
    code, raw = limited.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                 "logprobs": True, "top_logprobs": 21})
    assert code == 400 and "'top_logprobs' must be in [0, 20]" in error_of(400, raw)["message"]


def test_full_waiting_queue_answers_503_with_retry_after(limited):
    """Two sequences run (--max-num-seqs 2); past 8 waiting ones, a request gets 503 and Retry-After at once,
    and every request that was admitted completes."""
    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            async def one(i):
                async with s.post(limited.base + "/v1/completions",
                                  json={"prompt": f"q{i}", "max_tokens": 24, "ignore_eos": True}) as r:
                    return r.status, r.headers.get("Retry-After"), await r.read(), time.monotonic()
            t0 = time.monotonic()
            return t0, await asyncio.gather(*(one(i) for i in range(40)))
    t0, results = asyncio.run(main())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == 40 and len(ok) >= 8 and refused, [r[0] for r in results]
    for _, retry_after, raw, _ in refused:
        assert retry_after == "1" and "overloaded" in error_of(503, raw)["message"]
    assert all(json.loads(raw)["usage"]["completion_tokens"] == 24 for _, _, raw, _ in ok)
    print(f"40 concurrent requests: {len(ok)} served, {len(refused)} refused with 503; "
          f"slowest refusal after {max(t for *_, t in refused) - t0:.3f} s")
    limited.wait_idle()


# KV exhaustion
def _post_concurrently(srv, bodies: list[dict]) -> list[dict]:
    """POST every body to /v1/completions at once; the JSON answers, in order (each must be a 200)."""
    async def main():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            async def one(body):
                async with s.post(srv.base + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.read()
                    return await r.json()
            return await asyncio.gather(*(one(b) for b in bodies))
    return asyncio.run(main())


ONE_STEP_AHEAD = pytest.mark.parametrize("schedule", ["--no-async-scheduling", "--async-scheduling"])


@ONE_STEP_AHEAD
def test_kv_exhaustion_completes_through_preemption_with_identical_outputs(tmp_path, rng, schedule):
    """16 blocks (256 tokens) for 8 concurrent requests of ~200 tokens each: they preempt each other
    (recompute) many times, and each output equals the same request run alone. Also one step ahead."""
    srv = start_server(tmp_path, "--max-model-len", "256", "--num-gpu-blocks-override", "16", schedule)
    try:
        bodies = [{"prompt": " ".join(rng.choice(["tea", "stone", "river", "light"], 6)), "max_tokens": 190,
                   "temperature": 1.0, "seed": int(rng.integers(2 ** 31)), "ignore_eos": True} for _ in range(8)]
        together = _post_concurrently(srv, bodies)
        m = srv.wait_idle()
        assert m["vllm:num_preemptions_total"] > 0
        alone = [srv.post("/v1/completions", b) for b in bodies]
        for t, a in zip(together, alone):
            assert t["choices"][0]["finish_reason"] == "length" and t["usage"]["completion_tokens"] == 190
            assert t["choices"][0]["text"] == a["choices"][0]["text"]
        print(f"8 requests x 190 tokens in 16 blocks: {m['vllm:num_preemptions_total']:.0f} preemptions, "
              "every output equal to its run alone")
    finally:
        stop_server(srv)


def test_speculation_through_preemption_keeps_outputs_and_counts_in_metrics(tmp_path, rng):
    """Prompt-lookup speculation (K = 4) while 8 requests preempt each other in 16 blocks: every output equals the
    same request alone, the spec-decode counters appear in /metrics under vLLM's names, and no block leaks."""
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    srv = start_server(tmp_path, "--max-model-len", "256", "--num-gpu-blocks-override", "16",
                       "--speculative-config", spec)
    try:
        bodies = [{"prompt": " ".join(rng.choice(["tea", "stone", "river", "light"], 12)), "max_tokens": 150,
                   "temperature": 0.0 if i % 2 else 1.0, "seed": int(rng.integers(2 ** 31)), "ignore_eos": True}
                  for i in range(8)]
        together = _post_concurrently(srv, bodies)
        m = srv.wait_idle()
        assert m["vllm:num_preemptions_total"] > 0 and m["vllm:spec_decode_num_drafts_total"] > 0
        assert m["vllm:spec_decode_num_accepted_tokens_total"] <= m["vllm:spec_decode_num_draft_tokens_total"]
        assert m["cupyllm:spec_decode_verify_seconds_total"] > 0
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        alone = [srv.post("/v1/completions", b) for b in bodies]
        for t, a in zip(together, alone):
            assert t["usage"]["completion_tokens"] == 150
            assert t["choices"][0]["text"] == a["choices"][0]["text"]
        print(f"{m['vllm:num_preemptions_total']:.0f} preemptions, {m['vllm:spec_decode_num_drafts_total']:.0f} "
              f"drafts, {m['vllm:spec_decode_num_accepted_tokens_total']:.0f} of "
              f"{m['vllm:spec_decode_num_draft_tokens_total']:.0f} draft tokens accepted")
    finally:
        stop_server(srv)


# disconnects
async def _client(port: int, rng: np.random.Generator, i: int) -> str:
    """One client on a raw socket that leaves at a random point: before any answer, after a few SSE
    events, or never (it reads to the end and checks the answer). Returns what it did."""
    stream = bool(rng.integers(2))
    chat = bool(rng.integers(2))
    common = {"max_tokens": int(rng.integers(8, 120)), "temperature": 1.0, "seed": i, "ignore_eos": True,
              "stream": stream}
    body = {**common, "messages": [{"role": "user", "content": f"client {i}"}]} if chat else \
        {**common, "prompt": f"client {i} " * int(rng.integers(1, 30))}
    data = json.dumps(body).encode()
    path = "/v1/chat/completions" if chat else "/v1/completions"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    mode = rng.choice(["before", "events", "end"], p=[0.35, 0.5, 0.15])
    try:
        if mode == "before":
            await asyncio.sleep(float(rng.uniform(0, 0.05)))
        elif mode == "events" and stream:
            want, got = int(rng.integers(1, 40)), b""
            while got.count(b"data: ") < want and not got.endswith(b"data: [DONE]\n\n"):
                chunk = await reader.read(4096)
                if not chunk:
                    break
                got += chunk
        else:
            raw = await reader.read()
            head, _, payload = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), raw[:300]
            if stream:
                if b"chunked" in head.lower():  # de-chunk: size line, data, CRLF
                    out, rest = b"", payload
                    while rest:
                        size_line, _, rest = rest.partition(b"\r\n")
                        size = int(size_line, 16)
                        if size == 0:
                            break
                        out, rest = out + rest[:size], rest[size + 2:]
                    payload = out
                assert payload.endswith(b"data: [DONE]\n\n") and b'"error"' not in payload
            else:
                assert json.loads(payload)["usage"]["completion_tokens"] == common["max_tokens"]
            mode = "end"
    finally:
        writer.close()  # leaving: the server sees the connection drop
    return str(mode)


@ONE_STEP_AHEAD
def test_hundreds_of_random_disconnects_leave_nothing_behind(tmp_path, rng, schedule):
    """3 rounds of 200 clients (64 at a time, 16 sequences running, the rest queued) leaving at random points.
    After each round nothing runs or waits and the KV cache is empty; RSS after the last round is within a
    few MB of RSS after the first (the first round warms allocator pools and caches)."""
    srv = start_server(tmp_path, "--max-model-len", "512", "--max-num-seqs", "16", schedule)
    try:
        async def round_(r: int) -> dict:
            gate = asyncio.Semaphore(64)

            async def gated(i):
                async with gate:
                    return await _client(srv.port, rng, r * 1000 + i)
            modes = await asyncio.gather(*(gated(i) for i in range(200)))
            return {m: modes.count(m) for m in set(modes)}
        rss = []
        for r in range(3):
            counts = asyncio.run(round_(r))
            m = srv.wait_idle(timeout=30)
            rss.append(rss_bytes(srv.proc.pid))
            aborted = m['vllm:request_success_total{finished_reason="abort"}']
            print(f"round {r}: {counts}, RSS {rss[-1] / 2 ** 20:.1f} MiB, aborted so far {aborted:.0f}")
        growth = rss[-1] - rss[0]
        print(f"RSS after round 0: {rss[0] / 2 ** 20:.1f} MiB, after round 2: {rss[-1] / 2 ** 20:.1f} MiB "
              f"({growth / 2 ** 20:+.1f} MiB)")
        assert growth < 8 * 2 ** 20, rss
        assert srv.post("/v1/completions", {"prompt": "still there", "max_tokens": 3})["usage"]["completion_tokens"]
    finally:
        stop_server(srv)


# graceful shutdown
def _read_stream(srv: Server, body: dict, out: list) -> None:
    out.append(srv.request("POST", "/v1/completions", {**body, "stream": True}))


def _streams_started(srv: Server, count: int) -> None:
    wait_until(lambda: srv.metrics()["vllm:generation_tokens_total"] > 0
               and srv.metrics()["vllm:num_requests_running"] == count, 20, f"{count} streams to run")


def test_sigterm_drains_running_streams_and_refuses_new_requests(tmp_path):
    srv = start_server(tmp_path, "--max-model-len", "1024", "--shutdown-timeout", "60")
    results: list = []
    body = {"prompt": "drain me", "max_tokens": 900, "ignore_eos": True}
    threads = [threading.Thread(target=_read_stream, args=(srv, body, results)) for _ in range(4)]
    for t in threads:
        t.start()
    _streams_started(srv, 4)
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: srv.request("GET", "/health", key=None)[0] == 503, 10, "/health to turn 503")
    status, raw = srv.request("POST", "/v1/completions", {"prompt": "new", "max_tokens": 2})
    assert status == 503 and "shutting down" in error_of(503, raw)["message"]
    for t in threads:
        t.join(60)
    for status, raw in results:  # every running stream finished normally
        events = parse_sse(raw)
        assert status == 200 and events[-1]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in e for e in events)
    assert srv.proc.wait(15) == 0
    assert "drained: stopping" in srv.log() and "Traceback" not in srv.log()


def test_sigterm_drain_timeout_cuts_streams_short_in_band(tmp_path):
    srv = start_server(tmp_path, "--max-model-len", "2048", "--shutdown-timeout", "1")
    results: list = []
    body = {"prompt": "too long to drain", "max_tokens": 2000, "ignore_eos": True, "n": 8}
    threads = [threading.Thread(target=_read_stream, args=(srv, body, results)) for _ in range(4)]
    for t in threads:
        t.start()
    _streams_started(srv, 32)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    waited = time.monotonic() - t0
    for t in threads:
        t.join(10)
    assert len(results) == 4
    for status, raw in results:
        *chunks, err = parse_sse(raw)
        assert status == 200 and chunks and err["error"]["code"] == 503
        assert "shutting down" in err["error"]["message"]
    print(f"drain timeout 1 s: the server exited {waited:.2f} s after SIGTERM")
    assert waited < 10 and "drain timed out with 4 requests running" in srv.log()


# security
V1_ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("GET", "/v1/no-such-route"), ("DELETE", "/v1/models")]
BYPASSES = ["//v1/models", "/v1//models", "/v1/./models", "/v1/../v1/models", "/%76%31/models", "/v1%2fmodels",
            "/v1/models/", "/v1/models?x=1", "/v1/models#x", "/V1/models", "/v1/models%00", " /v1/models"]


def test_api_key_guards_every_v1_route(limited):
    for key, message in [(None, "Missing API key"), ("wrong", "Incorrect API key provided."), ("", "Missing")]:
        for method, path in V1_ROUTES:
            status, raw = limited.request(method, path, {"prompt": "x"}, key=key)
            assert status == 401 and message in error_of(401, raw)["message"], (method, path, raw)
    for path in BYPASSES:  # no spelling of a /v1 path reaches a handler without the key
        try:
            status, raw = limited.request("GET", path, key=None)
        except Exception:  # http.client refuses some spellings itself
            continue
        assert status in (400, 401, 404), (path, status, raw)
        assert b'"object":"list"' not in raw, path
    assert limited.request("GET", "/v1/models")[0] == 200
    # A CORS preflight carries no key by the browser's rules: it is answered (no body) without reaching a handler.
    assert limited.request("OPTIONS", "/v1/models", key=None) == (204, b"")
    for path in ("/health", "/metrics", "/version"):
        assert limited.request("GET", path, key=None)[0] == 200


SANDBOX_TEMPLATE = """{%- set m = messages[0]['content'] -%}
{%- if m == 'globals' -%}{{ cycler.__init__.__globals__.os.system('touch MARKER') }}
{%- elif m == 'mro' -%}{{ ''.__class__.__mro__[1].__subclasses__() }}
{%- elif m == 'format' -%}{{ '{0.__class__.__init__.__globals__}'.format(joiner) }}
{%- elif m == 'lipsum' -%}{{ lipsum.__globals__['os'].popen('cat /etc/passwd').read() }}
{%- elif m == 'attr' -%}{{ (messages | attr('__class__')).__base__.__subclasses__() }}
{%- elif m == 'include' -%}{% include '/etc/passwd' %}
{%- elif m == 'import' -%}{% import 'os' as os %}{{ os }}
{%- elif m == 'mutate' -%}{{ messages.append(1) }}{{ messages.clear() }}
{%- elif m == 'namespace' -%}{{ namespace.__init__.__globals__ }}
{%- else -%}<|im_start|>user\n{{ m }}<|im_end|>\n<|im_start|>assistant\n{%- endif -%}"""
ESCAPES = ["globals", "mro", "format", "lipsum", "attr", "include", "import", "mutate", "namespace"]


def test_chat_template_from_the_command_line_cannot_escape_and_logs_prompts_only_when_asked(tmp_path):
    marker = tmp_path / "escaped"
    template = tmp_path / "evil.jinja"
    template.write_text(SANDBOX_TEMPLATE.replace("MARKER", str(marker)))
    srv = start_server(tmp_path, "--chat-template", str(template), "--max-model-len", "128", "--log-prompts")
    try:
        for attempt in ESCAPES:
            for path in ("/v1/chat/completions", "/tokenize"):
                status, raw = srv.request("POST", path, {"messages": [{"role": "user", "content": attempt}],
                                                         "max_tokens": 2})
                assert status == 400, (attempt, path, raw)
                message = error_of(400, raw)["message"]
                assert "chat template" in message and "root:" not in message, (attempt, message)
        assert not marker.exists()
        marker_prompt = "prompt-" + os.urandom(6).hex()
        r = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": marker_prompt}],
                                              "max_tokens": 2})
        assert r["choices"][0]["finish_reason"] in ("length", "stop")
        assert marker_prompt in srv.log()  # --log-prompts: the operator asked for prompts in the log
    finally:
        stop_server(srv, allow_tracebacks=True)


def test_no_request_names_a_file_the_server_reads(limited):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for model in ("/etc/passwd", "../../../../etc/passwd", "file:///etc/passwd", limited_model_dir()):
        for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", chat),
                           ("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})):
            status, raw = limited.request("POST", path, {**body, "model": model})
            assert status == 404 and "does not exist" in error_of(404, raw)["message"], (model, path)
            assert b"root:" not in raw
    for field, value in (("chat_template", "{% include '/etc/passwd' %}"),
                         ("chat_template", "/etc/passwd")):
        status, raw = limited.request("POST", "/v1/chat/completions", {**chat, field: value})
        assert status == 400 and "not supported" in error_of(400, raw)["message"]
    status, raw = limited.request("POST", "/v1/chat/completions", {
        **chat, "chat_template_kwargs": {"tools": "{% include '/etc/passwd' %}"}})
    assert status == 200 and b"root:" not in raw
    for path in ("/etc/passwd", "/../../etc/passwd", "/static/../../etc/passwd", "/v1/../../../etc/passwd"):
        status, raw = limited.request("GET", path, key=None)
        assert status in (400, 401, 404) and b"root:" not in raw, path


def limited_model_dir() -> str:
    from engine.demo import demo_model_dir
    return demo_model_dir()


def test_logs_never_hold_prompts_unless_asked(limited):
    """Every path a prompt takes (completion, chat, stream, tokenize, a 400 that quotes it, a disconnect),
    at debug level: the marker never reaches the log."""
    marker = "secret-" + os.urandom(6).hex()
    limited.post("/v1/completions", {"prompt": f"{marker} a", "max_tokens": 3, "stop": [marker]})
    limited.post("/v1/chat/completions", {"messages": [{"role": "user", "content": f"{marker} b"}], "max_tokens": 3})
    limited.stream("/v1/completions", {"prompt": f"{marker} c", "max_tokens": 3})
    limited.post("/tokenize", {"prompt": f"{marker} d"})
    limited.request("POST", "/v1/completions", {"prompt": f"{marker} e", "temperature": marker})
    limited.request("POST", "/v1/chat/completions", {"messages": [{"role": marker, "content": "x"}]})
    limited.request("POST", "/v1/completions", {"prompt": f"{marker} " * 300})
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:  # a client that leaves mid-request
        body = json.dumps({"prompt": f"{marker} f", "max_tokens": 100, "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: limited.metrics()["vllm:num_requests_running"] > 0, 10, "the request to run")
    limited.wait_idle()
    log = limited.log()
    assert "DEBUG" in log and marker not in log
