"""Soak: a real server on loopback under a steady mix of streaming and non-streaming completions and chats,
seeds, stop strings, n > 1, logprobs, a KV cache small enough to preempt, and clients that leave early.
Every response is checked; a request repeated with the same seed (streamed or not) must give the same text.

The normal suite runs it for a few seconds; `CUPYLLM_SOAK_SECONDS=120 pytest tests/test_soak.py -s` is the
run whose figures docs/reliability.md records.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import numpy as np

from tests.test_reliability import KEY, rss_bytes, start_server, stop_server
from tests.test_server import parse_sse

SECONDS = float(os.environ.get("CUPYLLM_SOAK_SECONDS", "6"))
CLIENTS = 16
WORDS = "the quick brown fox jumps over lazy dog river stone light morning tea".split()
STOPS = [None, ["e"], ["th", "o "], ["ing"], [" a", "x", "q"]]


class Soak:
    def __init__(self, base: str, rng: np.random.Generator):
        self.base, self.rng = base, rng
        self.prompts = [" ".join(rng.choice(WORDS, int(rng.integers(2, 40)))) for _ in range(12)]
        self.pool = [self.body() for _ in range(48)]  # each is sent many times, streamed or not
        self.expected: dict[str, str] = {}  # same request (streamed or not) -> the one text it may give
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.counts = {"stream": 0, "whole": 0, "left early": 0, "chat": 0, "completion": 0, "repeats checked": 0}

    def body(self) -> tuple[str, dict]:
        r = self.rng
        chat = bool(r.integers(2))
        body = {"max_tokens": int(r.choice([1, 8, 32, 100])), "temperature": float(r.choice([0.7, 1.0, 1.3])),
                "seed": int(r.integers(6)), "n": int(r.choice([1, 1, 1, 2])), "ignore_eos": bool(r.integers(2))}
        stop = STOPS[int(r.integers(len(STOPS)))]
        if stop:
            body["stop"] = stop
            body["include_stop_str_in_output"] = bool(r.integers(2))
        prompt = self.prompts[int(r.integers(len(self.prompts)))]
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
            if r.integers(3) == 0:
                body.update(logprobs=True, top_logprobs=int(r.integers(0, 4)))
            return "/v1/chat/completions", body
        body["prompt"] = prompt
        if r.integers(3) == 0:
            body["logprobs"] = int(r.integers(0, 4))
        return "/v1/completions", body

    def check(self, path: str, body: dict, choices: list[tuple[str, str, object]], usage: dict | None) -> None:
        """choices: (text, finish_reason, stop_reason) by index."""
        assert len(choices) == body["n"], choices
        stops = body.get("stop") or []
        for text, finish, stop_reason in choices:
            assert finish in ("stop", "length"), finish
            if finish == "stop" and isinstance(stop_reason, str):
                assert stop_reason in stops
                if body.get("include_stop_str_in_output"):
                    assert text.endswith(stop_reason), (text, stop_reason)
            if not body.get("include_stop_str_in_output"):
                assert not any(s in text for s in stops), (text, stops)
            if body["ignore_eos"] and not stops:
                assert finish == "length"
        if usage is not None:
            assert 1 <= usage["completion_tokens"] <= body["n"] * body["max_tokens"], usage
        key = json.dumps([path, body], sort_keys=True)
        texts = json.dumps([c[0] for c in choices])
        if key in self.expected:
            self.counts["repeats checked"] += 1
            assert self.expected[key] == texts, (body, self.expected[key], texts)
        else:
            self.expected[key] = texts

    async def one(self, session: aiohttp.ClientSession) -> None:
        path, body = self.pool[int(self.rng.integers(len(self.pool)))]
        stream = bool(self.rng.integers(2))
        leave_early = stream and self.rng.random() < 0.05
        self.counts["chat" if "chat" in path else "completion"] += 1
        t0 = time.perf_counter()
        payload = {**body, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
        async with session.post(self.base + path, json=payload) as resp:
            assert resp.status == 200, await resp.read()
            if leave_early:
                await resp.content.readline()
                self.counts["left early"] += 1
                return  # closing the response drops the connection mid-stream
            raw = await resp.read()
        self.latencies.append(time.perf_counter() - t0)
        self.counts["stream" if stream else "whole"] += 1
        if not stream:
            data = json.loads(raw)
            choices = [((c["message"]["content"] if "chat" in path else c["text"]), c["finish_reason"],
                        c["stop_reason"]) for c in data["choices"]]
            return self.check(path, body, choices, data["usage"])
        events = parse_sse(raw)
        assert not any("error" in e for e in events), events
        *chunks, last = events
        texts, finish, stop_reason = [""] * body["n"], [None] * body["n"], [None] * body["n"]
        for chunk in chunks:
            for c in chunk["choices"]:
                k = c["index"]
                assert finish[k] is None, "a chunk after its choice finished"
                texts[k] += c["delta"].get("content", "") if "chat" in path else c["text"]
                finish[k], stop_reason[k] = c["finish_reason"], c.get("stop_reason")
        assert last["choices"] == []
        self.check(path, body, list(zip(texts, finish, stop_reason)), last["usage"])

    async def worker(self, deadline: float) -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            while time.monotonic() < deadline:
                try:
                    await self.one(session)
                except Exception as e:  # counted and reported; the soak goes on
                    self.errors.append(f"{type(e).__name__}: {e!s:.300}")


def test_soak(tmp_path, rng):
    srv = start_server(tmp_path, "--max-model-len", "512", "--num-gpu-blocks-override", "64", "--max-num-seqs", "32")
    soak = Soak(srv.base, rng)
    try:
        asyncio.run(soak.worker(time.monotonic() + 1.0))  # warm-up: first requests build caches
        rss_start = rss_bytes(srv.proc.pid)
        soak.latencies.clear()
        soak.counts = dict.fromkeys(soak.counts, 0)
        t0 = time.monotonic()

        async def main():
            await asyncio.gather(*(soak.worker(t0 + SECONDS) for _ in range(CLIENTS)))
        asyncio.run(main())
        elapsed = time.monotonic() - t0
        m = srv.wait_idle(timeout=30)
        rss_end = rss_bytes(srv.proc.pid)
    finally:
        stop_server(srv)
    lat = np.sort(np.array(soak.latencies)) * 1e3
    done = len(lat) + soak.counts["left early"]
    print(f"soak {elapsed:.0f} s, {CLIENTS} clients: {done} requests ({done / elapsed:.1f}/s), "
          f"{len(soak.errors)} errors; {soak.counts}; latency ms p50 {np.percentile(lat, 50):.0f} "
          f"p90 {np.percentile(lat, 90):.0f} p99 {np.percentile(lat, 99):.0f} max {lat[-1]:.0f}; "
          f"preemptions {m['vllm:num_preemptions_total']:.0f}; "
          f"RSS {rss_start / 2 ** 20:.1f} -> {rss_end / 2 ** 20:.1f} MiB")
    assert not soak.errors, soak.errors[:5]
    assert soak.counts["repeats checked"] > 0 and soak.counts["stream"] > 0 and soak.counts["whole"] > 0
