"""`cupyllm serve --tensor-parallel-size N` and `cupyllm benchmark -tp N` as real processes on the numpy backend
(issue #15): the demo server with 2 ranks answers greedy completions with the one-rank engine's text and stops on
SIGTERM leaving no process; a rank killed with SIGKILL turns /health into a 503 naming it, and the server exits by
itself with status 1 and the error, leaving no process. Every wait is bounded."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.server_process import REPO, launch_server, stop_process, wait_until
from tests.test_benchmark import TINY
from tests.test_tp_workers import _assert_gone

PIDS = re.compile(r"tensor parallel: (\d+) ranks, rank 0 in this process, ranks 1-\d+ as pids ([\d ]+)")


def _get(port: int, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _serve(tmp_path, world: int) -> tuple[subprocess.Popen, int, list[int], Path]:
    log = tmp_path / "server.log"
    proc, port = launch_server(["--device", "numpy", "-tp", str(world), "--max-model-len", "256"], log, timeout=90)
    found = PIDS.search(log.read_text())
    assert found and int(found.group(1)) == world, log.read_text()[-3000:]
    pids = [int(p) for p in found.group(2).split()]
    assert len(pids) == world - 1 and proc.pid not in pids
    return proc, port, pids, log


def test_served_greedy_text_equals_one_rank_and_sigterm_leaves_nothing(tmp_path):
    prompts = ["The quick brown fox", "Once upon a time, in a land far away,"]
    engine = LLMEngine(EngineConfig(device="numpy", max_model_len=256))  # the demo model, one rank
    want = [o.outputs[0].text for o in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20))]
    proc, port, pids, log = _serve(tmp_path, 2)
    try:
        for prompt, text in zip(prompts, want):
            status, body = _get(port, "/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0})
            assert status == 200, body
            assert json.loads(body)["choices"][0]["text"] == text
        assert _get(port, "/health")[0] == 200
        assert stop_process(proc, 30), "the server did not exit on SIGTERM"
        assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_gone(pids)


def test_a_killed_rank_turns_health_503_then_the_server_exits_leaving_nothing(tmp_path):
    proc, port, pids, log = _serve(tmp_path, 4)
    try:
        assert _get(port, "/v1/completions", {"prompt": "hello", "max_tokens": 4})[0] == 200
        os.kill(pids[0], signal.SIGKILL)  # rank 1, while the engine idles

        def unhealthy():
            try:
                status, body = _get(port, "/health", timeout=5)
            except OSError:  # already gone: the 503 window was missed
                pytest.fail(f"the server exited before /health answered 503:\n{log.read_text()[-3000:]}")
            return status == 503 and body
        body = wait_until(unhealthy, 15, "/health to answer 503")
        assert f"tensor-parallel rank 1 (pid {pids[0]}) stopped with exit code -9" in json.loads(body)["error"][
            "message"]
        status, body = _get(port, "/v1/completions", {"prompt": "hello", "max_tokens": 4})
        assert status == 503, body
        proc.wait(30)
        assert proc.returncode == 1
        text = log.read_text()
        assert f"cupyllm serve: error: tensor-parallel rank 1 (pid {pids[0]}) stopped with exit code -9" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_gone(pids)


def test_benchmark_runs_with_two_ranks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "api.cli", "benchmark", "--model", str(tmp_path), "--load-format", "dummy",
           "--n", "1,3", "--input-len", "9", "--output-len", "7", "--device", "numpy", "-tp", "2", "--json",
           str(out), "--no-history"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in rows] == [1, 3] and all(r["tensor_parallel_size"] == 2 for r in rows)
    assert all(r["output_tokens"] == r["n"] * 7 and "--tensor-parallel-size 2" in r["command"] for r in rows)
