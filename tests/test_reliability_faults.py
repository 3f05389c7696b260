"""Faults inside the engine, with the app served in this process around an engine the tests break on
purpose: a failed step fails only its requests (500, in-band for streams) and leaks nothing, the prefix
cache forgets what the failed step wrote, repeated or fatal faults stop the engine (503), and clients
that vanish leave no stream, request or block behind.
"""
from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import numpy as np
import pytest

from api.server import create_app
from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.errors import FatalEngineError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.server_process import wait_until
from tests.test_server import parse_sse
from tests.test_server_app import ThreadedServer

CONFIG = dict(device="numpy", max_model_len=256, max_num_seqs=2)


@pytest.fixture
def engine():
    e = AsyncLLMEngine(LLMEngine(EngineConfig(**CONFIG)))
    yield e
    e.shutdown()


@pytest.fixture
def srv(engine):
    s = ThreadedServer(create_app(engine, ["m"]))
    yield s
    s.stop()


def assert_clean(engine) -> None:
    """No request, stream or block left: every reference count back to 0."""
    llm = engine.engine
    wait_until(lambda: not llm.requests and not engine._streams, 10, "the engine to forget every request")
    bm = llm.block_manager
    assert not llm.scheduler.running and not llm.scheduler.waiting
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def error_of(status: int, raw: bytes) -> dict:
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    return err


def test_failed_step_fails_its_requests_only_and_the_cache_forgets_its_blocks(engine, srv, rng):
    """B streams; A joins it (max_num_seqs=2) while C waits. The step that first runs A writes garbage into
    A's blocks and raises: A gets a 500, B an in-band 500 after its first chunks, C (same prompt and seed as A)
    then runs and matches a clean offline run, which it could not if it had adopted A's cached blocks."""
    llm = engine.engine
    prompt = [int(t) for t in rng.integers(3, 1000, 48)]  # three full blocks a cache could hand to C
    params = dict(max_tokens=40, temperature=1.0, seed=int(rng.integers(2 ** 31)), ignore_eos=True)
    reference = LLMEngine(EngineConfig(**CONFIG)).generate([prompt], SamplingParams(**params))[0].outputs[0].text
    real_execute, fired = llm.runner.execute, threading.Event()

    def execute(sched, tensors, **kw):
        seqs = [s.seq for s in sched.scheduled]
        a_runs = any(s.prompt_token_ids == prompt for s in seqs)
        c_waits = any(s.prompt_token_ids == prompt for s in llm.scheduler.waiting)
        if a_runs and c_waits and not fired.is_set():
            fired.set()
            real_execute(sched, tensors, **kw)  # K/V written, then spoiled: a fault that left half-written blocks
            for s in seqs:
                llm.runner.kv_cache[:, :, s.block_table] = rng.standard_normal(1).astype(np.float32) * 1e3
            raise RuntimeError("injected fault")
        return real_execute(sched, tensors, **kw)
    llm.runner.execute = execute

    async def main():
        async with aiohttp.ClientSession() as s:
            url = srv.base + "/v1/completions"
            b = await s.post(url, json={"prompt": "b stream", "max_tokens": 200, "ignore_eos": True, "stream": True})
            first = await b.content.readline()
            assert b.status == 200 and first.startswith(b"data: {")
            a = asyncio.create_task(s.post(url, json={"prompt": prompt, **params}))
            await asyncio.to_thread(wait_until, lambda: len(llm.scheduler.running) == 2, 10, "A to run")
            c = await s.post(url, json={"prompt": prompt, **params})
            a = await a
            return (a.status, await a.read()), first + await b.read(), (c.status, await c.read())
    (a_status, a_raw), b_raw, (c_status, c_raw) = asyncio.run(main())
    assert fired.is_set()
    err = error_of(500, a_raw)
    assert a_status == 500 and err["type"] == "InternalServerError" and "injected fault" in err["message"]
    *chunks, b_err = parse_sse(b_raw)
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert b_err["error"]["code"] == 500 and "injected fault" in b_err["error"]["message"]
    assert c_status == 200, c_raw
    assert json.loads(c_raw)["choices"][0]["text"] == reference
    assert engine.failed_steps == 1 and not engine.is_dead
    assert srv.request("GET", "/health", key=None)[0] == 200
    assert_clean(engine)


def test_repeated_faults_stop_the_engine_then_503(engine, srv):
    def broken(sched, tensors, **kw):
        raise RuntimeError("device on fire")
    engine.engine.runner.execute = broken
    body = {"prompt": "x", "max_tokens": 4}
    for _ in range(3):  # each step fails its one request; the third failure in a row ends the engine
        status, raw = srv.request("POST", "/v1/completions", body, key=None)
        assert status == 500 and "device on fire" in error_of(500, raw)["message"]
    status, raw = srv.request("GET", "/health", key=None)
    assert status == 503 and "3 engine steps failed in a row" in error_of(503, raw)["message"]
    status, raw = srv.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                              key=None)
    assert status == 503 and error_of(503, raw)["type"] == "ServiceUnavailableError"


def test_one_fault_between_successes_keeps_the_engine_up(engine, srv):
    real_execute, calls = engine.engine.runner.execute, []

    def every_other_request(sched, tensors, **kw):
        calls.append(1)
        if len(calls) % 5 == 1:  # each 5-step request below meets a fault on its first step, every second time
            raise RuntimeError("flaky")
        return real_execute(sched, tensors, **kw)
    engine.engine.runner.execute = every_other_request
    statuses = [srv.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 4, "ignore_eos": True},
                            key=None)[0] for _ in range(8)]
    assert 500 in statuses and 200 in statuses and not engine.is_dead, statuses
    assert_clean(engine)


def test_fatal_error_stops_the_engine_at_once(engine, srv):
    def lost(sched, tensors, **kw):
        raise FatalEngineError("device lost")
    engine.engine.runner.execute = lost
    status, raw = srv.request("POST", "/v1/completions", {"prompt": "x"}, key=None)
    assert status == 503 and "device lost" in error_of(503, raw)["message"]
    assert srv.request("GET", "/health", key=None)[0] == 503


def test_unexpected_error_adding_a_request_fails_only_that_request(engine, srv):
    llm, real = engine.engine, engine.engine._validate_prompt

    def validate(ids):
        if ids[0] == 999:
            raise TypeError("a bug this prompt runs into")
        return real(ids)
    llm._validate_prompt = validate
    status, raw = srv.request("POST", "/v1/completions", {"prompt": [999, 5]}, key=None)
    assert status == 500 and "a bug this prompt runs into" in error_of(500, raw)["message"]
    status, raw = srv.request("POST", "/v1/completions", {"prompt": [5, 999], "max_tokens": 3}, key=None)
    assert status == 200 and not engine.is_dead
    assert_clean(engine)


def test_vanishing_clients_leave_no_stream_request_or_block(engine, srv, rng):
    """120 clients on raw sockets leave at random points (queued, prefilling, streaming, reading a body)."""
    async def client(i):
        stream = bool(rng.integers(2))
        data = json.dumps({"prompt": f"v{i} " * int(rng.integers(1, 40)), "max_tokens": int(rng.integers(4, 150)),
                           "ignore_eos": True, "stream": stream, "n": int(rng.integers(1, 3))}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(int(rng.integers(1, 3000))), float(rng.uniform(0.001, 0.2)))
        except asyncio.TimeoutError:
            pass
        writer.close()

    async def main():
        await asyncio.gather(*(client(i) for i in range(120)))
    asyncio.run(main())
    assert_clean(engine)
    status, raw = srv.request("POST", "/v1/completions", {"prompt": "after", "max_tokens": 3}, key=None)
    assert status == 200
