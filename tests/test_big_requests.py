"""Big and hostile requests against the real server (demo model, issue #18). By default a 20 MB body is refused with a
413 from its Content-Length, before it is read. Under a limit raised past it, the 20 MB prompt is refused with the
context-length 400 without being tokenized, completions and chat alike. Either way /health keeps answering and the
server's memory comes back. The figures (refusal time, worst /health latency, RSS before/after) are printed."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.test_reliability import rss_bytes, start_server, stop_server

MB = 1 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("big"), "--max-model-len", "128", "--max-request-bytes",
                          str(64 * MB), key=None)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def default_srv(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("big_default"), "--max-model-len", "128", key=None)
    yield server
    stop_server(server)


def _poll_health_while(port: int, worker: threading.Thread) -> list[float]:
    worker.start()
    health = []
    while worker.is_alive():
        health.append(_health_ms(port))
        time.sleep(0.005)
    worker.join()
    return health + [_health_ms(port)]


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def _health_ms(port: int) -> float:
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    return (time.perf_counter() - t) * 1e3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions (text parts)"])
def test_a_20_mb_prompt_is_refused_at_once_and_health_keeps_answering(srv, path):
    text, label = "hello world " * (20 * MB // 12), path
    body = {"model": "demo", "max_tokens": 4}
    if path == "/v1/completions":
        body["prompt"] = text
    else:  # the chat template renders a long message on a worker thread (api/serving.chat_prompt_ids)
        parts = path.endswith("(text parts)")
        content = [{"type": "text", "text": text[:MB]}, {"type": "text", "text": text[MB:]}] if parts else text
        body["messages"] = [{"role": "user", "content": content}]
        path = "/v1/chat/completions"
    raw = json.dumps(body).encode()
    before = rss_bytes(srv.proc.pid)
    result = {}

    def send():
        t = time.perf_counter()
        result["response"] = _post(srv.port, path, raw)
        result["seconds"] = time.perf_counter() - t
    health = _poll_health_while(srv.port, threading.Thread(target=send))
    status, err = result["response"]
    assert status == 400 and "maximum context length is 128 tokens" in err["error"]["message"]
    assert "at least" in err["error"]["message"]  # counted by the bound, not by tokenizing
    after = rss_bytes(srv.proc.pid)
    print(f"{label}: 400 in {result['seconds'] * 1e3:.0f} ms; /health worst {max(health):.1f} ms over "
          f"{len(health)} polls; RSS {before / MB:.0f} -> {after / MB:.0f} MiB")
    assert max(health) < 1000  # a behaviour bound (20 s before the length bound), not a timing target
    assert after - before < 200 * MB  # nothing of the 20 MB body's size kept, no ids computed


def test_a_long_prompt_within_the_bound_still_gets_the_exact_count(srv):
    """Under the bound's reach the prompt is tokenized (off the event loop) and the 400 names its token count."""
    status, err = _post(srv.port, "/v1/completions",
                         json.dumps({"model": "demo", "prompt": "ab " * 200, "max_tokens": 4}).encode())
    assert status == 400 and "However, you requested" in err["error"]["message"]


def test_a_client_that_never_reads_is_aborted_after_the_stream_timeout(tmp_path_factory):
    """A streaming client that sends its request and never reads: once the socket buffers are full the server
    waits --stream-timeout, aborts the request (its KV blocks back) and closes the connection, while the client
    still holds it open."""
    import socket

    server = start_server(tmp_path_factory.mktemp("slow"), "--stream-timeout", "1", key=None)
    try:
        body = json.dumps({"model": "demo", "prompt": "tell me everything", "max_tokens": 2000, "n": 16,
                           "stream": True, "ignore_eos": True}).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: the server's send fills up
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        t = time.perf_counter()
        deadline = t + 60
        while "accepted nothing for 1 s" not in server.log() and time.perf_counter() < deadline:
            time.sleep(0.05)
        aborted = time.perf_counter() - t
        assert "accepted nothing for 1 s; aborting its stream" in server.log()
        server.wait_idle(timeout=10)  # nothing running, every KV block back
        print(f"aborted {aborted:.1f} s after the request was sent")
        sock.settimeout(10)
        received = 0
        while chunk := sock.recv(1 << 16):  # what the buffers held, then the server's close
            received += len(chunk)
        assert received < 16 * 2000 * 150, "the whole stream arrived: the client was never stalled"
        sock.close()
        assert _health_ms(server.port) < 1000
    finally:
        stop_server(server)


def _send_headers_then_wait(port: int, path: str, declared: int, sent: bytes) -> tuple[int, dict]:
    """A client that declares `declared` body bytes, sends only `sent` of them and waits for the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode() + sent)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


@pytest.mark.parametrize("client", ["sends 64 KiB, waits", "sends it all"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_by_default_a_body_larger_than_the_context_can_hold_is_refused_before_it_is_read(default_srv, path, client):
    """The default limit is 1 MiB + 64 bytes a token of --max-model-len (1,056,768 bytes here): a 20 MB body gets the
    413 from its Content-Length alone, and the server serves on. A client that waits for the answer after 64 KiB gets
    it then; one that sends the whole body first (as HTTP client libraries do) reads it after, not a reset socket."""
    declared = 20 * MB
    before = rss_bytes(default_srv.proc.pid)
    result = {}
    body = b'{"model": "demo", "prompt": "' + b"a" * (declared - 32) + b'"}'

    def send():
        t = time.perf_counter()
        if client == "sends it all":
            result["response"] = _post(default_srv.port, path, body)
        else:
            result["response"] = _send_headers_then_wait(default_srv.port, path, len(body), body[:65536])
        result["seconds"] = time.perf_counter() - t
    health = _poll_health_while(default_srv.port, threading.Thread(target=send))
    status, err = result["response"]
    message = err["error"]["message"]
    assert status == 413 and "size limit of 1056768 bytes" in message and "--max-request-bytes" in message
    after = rss_bytes(default_srv.proc.pid)
    print(f"{path} (default limit, client {client}): 413 in {result['seconds'] * 1e3:.1f} ms for a "
          f"{declared / MB:.0f} MB body; /health worst {max(health):.1f} ms over {len(health)} polls; "
          f"RSS {before / MB:.0f} -> {after / MB:.0f} MiB")
    assert max(health) < 1000 and after - before < 50 * MB
    # a body within the limit is read and answered as before
    status, out = _post(default_srv.port, "/v1/completions",
                        json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 2}).encode())
    assert status == 200 and out["usage"]["completion_tokens"] == 2
