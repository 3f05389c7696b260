"""The app from create_app around an engine this process controls, served by Sanic on a background
thread: what happens when the engine dies, and gauges read through a custom stats hook.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading

import pytest

from api.server import create_app
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.llm_engine import EngineStats, LLMEngine
from tests.test_server import Server, parse_metrics, parse_sse


class ThreadedServer(Server):
    """A Sanic app on 127.0.0.1 in its own event loop on a daemon thread (Sanic's low-level server API)."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # an ephemeral port, bound here: no window for another process to take it
        super().__init__(sock.getsockname()[1], None, "")
        app.config.TOUCHUP = False  # Sanic's TouchUp rewrites shared classes once per process, not once per app
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(app.create_server(sock=sock, return_asyncio_server=True))
            for stage in (server.startup, server.before_start, server.after_start):
                self.loop.run_until_complete(stage())
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(server.before_stop())
            server.close()
            self.loop.run_until_complete(server.wait_closed())
            self.loop.run_until_complete(server.after_stop())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30), "server did not start"

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def engine():
    e = AsyncLLMEngine(LLMEngine(EngineConfig(device="numpy", max_model_len=256)))
    yield e
    e.shutdown()


@pytest.fixture
def serve():
    servers = []

    def start(app) -> ThreadedServer:
        servers.append(ThreadedServer(app))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


def test_engine_death_goes_in_band_then_health_and_new_requests_get_503(engine, serve):
    srv = serve(create_app(engine, ["m"]))
    assert srv.request("GET", "/health", key=None)[0] == 200
    real_step, steps = engine.engine.step, itertools.count()

    def failing_step():  # the fifth step raises, after the stream below has started
        if next(steps) == 4:
            raise RuntimeError("injected fault")
        return real_step()
    engine.engine.step = failing_step
    status, raw = srv.request("POST", "/v1/completions",
                              {"prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}, key=None)
    assert status == 200
    *chunks, error = parse_sse(raw)
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert error["error"]["code"] == 503 and "injected fault" in error["error"]["message"]
    status, raw = srv.request("GET", "/health", key=None)
    assert status == 503 and "injected fault" in json.loads(raw)["error"]["message"]
    status, raw = srv.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                              key=None)
    assert status == 503 and json.loads(raw)["error"]["type"] == "ServiceUnavailableError"


def test_stats_hook_feeds_the_gauges(engine, serve):
    srv = serve(create_app(engine, ["m"], stats=lambda: EngineStats(running=3, waiting=2, kv_usage=0.25,
                                                                     preemptions=7)))
    status, raw = srv.request("GET", "/metrics", key=None)
    m = parse_metrics(raw.decode())
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"],
            m["vllm:num_preemptions_total"]) == (3, 2, 0.25, 7)
