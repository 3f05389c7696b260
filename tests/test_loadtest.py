"""The load test (scripts/loadtest.py, `cupyllm bench-serve`) and scripts/compare_vllm.sh against the demo
model on loopback: short runs whose JSON is checked field by field, and against each other.

Every figure is checked against what the load asked for (request and token counts) and against the
others (percentile order, spreads, throughputs over the duration, latency = TTFT + (n - 1) * TPOT).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import test_perf_history as history
from tests.server_process import REPO, launch_server, stop_process

KEY = "sk-load-" + os.urandom(6).hex()
LATENCY_KEYS = [f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
                for stat in ("mean", "median", "p95", "p99", "p95_spread")] + \
               [f"p95_spread_{m}_pct" for m in ("ttft", "tpot", "itl", "e2el")]
EXPECTED_KEYS = {
    "label", "model", "config", "input_len_exact", "input_len_note", "prompt_len_min", "prompt_len_max",
    "completed", "failed", "errors", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput", *LATENCY_KEYS,
    "server_pid", "server_command", "cold_start_ready_s", "cold_start_first_token_s", "server_rss_mib",
    "server_rss_peak_mib", "gpu_memory_peak_mib", "gpu_memory_source"}
CONFIG_KEYS = {"base_url", "endpoint", "concurrency", "request_rate", "num_prompts", "duration", "warmup",
               "input_len", "prompt_kind", "max_tokens", "ignore_eos", "temperature", "seed", "launch", "mode"}


def check_result(r: dict, *, requests: int | None, input_len: int, max_tokens: int, launched: bool) -> None:
    assert set(r) == EXPECTED_KEYS, set(r) ^ EXPECTED_KEYS
    assert set(r["config"]) == CONFIG_KEYS, set(r["config"]) ^ CONFIG_KEYS
    n = r["completed"]
    assert r["failed"] == 0 and r["errors"] == {} and n > 0
    if requests is not None:
        assert n == requests
    assert r["input_len_exact"] is True and r["prompt_len_min"] == r["prompt_len_max"] == input_len
    assert r["total_input_tokens"] == n * input_len  # the server's usage agrees with the prompts' length
    assert r["total_output_tokens"] == n * max_tokens  # ignore_eos: every request runs to max_tokens
    d = r["duration"]
    assert d > 0
    assert r["request_throughput"] == pytest.approx(n / d)
    assert r["output_throughput"] == pytest.approx(n * max_tokens / d)
    assert r["total_token_throughput"] == pytest.approx(n * (input_len + max_tokens) / d)
    for m in ("ttft", "tpot", "itl", "e2el"):
        mean, p50, p95, p99 = (r[f"{s}_{m}_ms"] for s in ("mean", "median", "p95", "p99"))
        assert 0 < p50 <= p95 <= p99 and mean > 0, m
        assert r[f"p95_spread_{m}_ms"] == pytest.approx(p95 - p50)
        assert r[f"p95_spread_{m}_pct"] == pytest.approx(100 * (p95 - p50) / p50)
    # Every request has max_tokens tokens, so mean latency = mean TTFT + (max_tokens - 1) * mean TPOT exactly.
    assert r["mean_e2el_ms"] == pytest.approx(r["mean_ttft_ms"] + (max_tokens - 1) * r["mean_tpot_ms"])
    assert r["mean_ttft_ms"] < r["mean_e2el_ms"] and r["p99_e2el_ms"] < 60_000
    assert isinstance(r["server_pid"], int) and 20 < r["server_rss_mib"] <= r["server_rss_peak_mib"] * 1.01
    if launched:
        assert 0 < r["cold_start_ready_s"] <= r["cold_start_first_token_s"] < 120
        assert r["server_command"] == r["config"]["launch"]
    else:
        assert r["cold_start_ready_s"] is None and r["cold_start_first_token_s"] is None
    if shutil.which("nvidia-smi") is None:
        assert r["gpu_memory_peak_mib"] is None and r["gpu_memory_source"] is None
    else:
        assert r["gpu_memory_peak_mib"] >= 0 and r["gpu_memory_source"] in ("process", "device")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo model behind an API key on an ephemeral port: (base URL, pid)."""
    log_path = tmp_path_factory.mktemp("loadtest") / "server.log"
    proc, port = launch_server(["--device", "numpy", "--api-key", KEY], log_path)
    yield f"http://127.0.0.1:{port}", proc.pid
    stop_process(proc, 30)


def run(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_PROXY": "127.0.0.1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_compare_script_launches_the_demo_model_and_reports_every_field(tmp_path):
    env_vllm = run([sys.executable, "-c", "import vllm"]).returncode == 0 or shutil.which("vllm")
    out = tmp_path / "compare"
    proc = subprocess.run(["bash", "scripts/compare_vllm.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), "CONCURRENCY": "4",
                               "NUM_PROMPTS": "16", "INPUT_LEN": "40", "OUTPUT_LEN": "12",
                               "VLLM": "skip" if env_vllm else "auto"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert ("VLLM=skip" if env_vllm else "vLLM is not installed") in text and "measuring cupyllm alone" in text
    r = json.loads((out / "cupyllm.json").read_text())
    check_result(r, requests=16, input_len=40, max_tokens=12, launched=True)
    assert r["label"] == "cupyllm" and r["model"] == "bench" and r["config"]["concurrency"] == 4
    for title in ("output throughput (tok/s)", "TTFT p99 (ms)", "TPOT median (ms)", "E2E p95 spread (% of p50)",
                  "start-up to first token (s)", "CPU RSS under load (MiB)", "GPU memory peak (MiB)"):
        assert re.search(rf"^{re.escape(title)} +\S+ +-$", text, re.M), title
    assert re.search(r"python environment .*: \d+ MiB on disk", text)
    assert not os.path.exists(f"/proc/{r['server_pid']}"), "the launched server was left running"


def test_open_loop_chat_through_cupyllm_bench_serve(server, tmp_path):
    url, pid = server
    path = tmp_path / "chat.json"
    proc = run([sys.executable, "-m", "api.cli", "bench-serve", "--base-url", url, "--api-key", KEY,
                "--endpoint", "/v1/chat/completions", "--request-rate", "30", "--concurrency", "8",
                "--duration", "1.5", "--input-len", "60", "--max-tokens", "10", "--ignore-eos", "--seed", "7",
                "--server-pid", str(pid), "--label", "chat", "--json", str(path),
                "--bench-jsonl", str(tmp_path / "bench.jsonl")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(path.read_text())
    check_result(r, requests=None, input_len=60, max_tokens=10, launched=False)
    assert r["config"]["mode"] == "open loop (Poisson)" and r["config"]["request_rate"] == 30
    assert 15 <= r["completed"] <= 90  # about 45 Poisson arrivals in 1.5 s
    assert r["server_pid"] == pid and "p95-p50" in proc.stdout and "% of p50" in proc.stdout

    # The line for perf/history.jsonl: every figure named so that the history check knows its direction.
    line = json.loads((tmp_path / "bench.jsonl").read_text())
    [entry] = history.parse(json.dumps({**line, "card": "cpu", "date": "2026-01-01", "commit": "abc"}))
    figures = {k for k in entry if k not in ("bench", "shape", "card", "date", "commit")}
    assert {"output_tok_s", "median_ttft_ms", "p95_e2el_ms", "p95_spread_e2el_pct", "server_rss_mib"} <= figures
    assert all(history.direction(k) != 0 for k in figures) and entry["output_tok_s"] == pytest.approx(
        r["output_throughput"], abs=1e-3)

    # The two runs side by side: ratios to the first and a winner per row.
    first = tmp_path / "fixed.json"
    proc = run([sys.executable, "scripts/loadtest.py", "--base-url", url, "--api-key", KEY, "--prompt-kind", "fixed",
                "--num-prompts", "12", "--concurrency", "3", "--input-len", "60", "--max-tokens", "10",
                "--ignore-eos", "--server-pid", str(pid), "--label", "fixed", "--json", str(first)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_result(json.loads(first.read_text()), requests=12, input_len=60, max_tokens=10, launched=False)
    table = run([sys.executable, "scripts/loadtest.py", "--compare", str(first), str(path)]).stdout
    assert re.search(r"^metric +fixed +chat +chat/fixed +winner$", table, re.M), table
    assert re.search(r"^output throughput \(tok/s\) +[\d,.]+ +[\d,.]+ +[\d.]+x +(fixed|chat)$", table, re.M), table


def test_failed_requests_are_counted_and_shown(server, tmp_path):
    url, _ = server
    path = tmp_path / "bad.json"
    proc = run([sys.executable, "scripts/loadtest.py", "--base-url", url, "--api-key", KEY, "--model", "no-such-model",
                "--warmup", "0", "--num-prompts", "5", "--max-tokens", "4", "--json", str(path)])
    assert proc.returncode == 1  # nothing succeeded
    r = json.loads(path.read_text())
    assert r["completed"] == 0 and r["failed"] == 5 and r["median_ttft_ms"] is None
    [(error, count)] = r["errors"].items()
    assert count == 5 and error.startswith("HTTP 404") and "no-such-model" in error
    assert "5 x HTTP 404" in proc.stdout and r["input_len_exact"] is False and "approximate" in r["input_len_note"]

    proc = run([sys.executable, "scripts/loadtest.py", "--base-url", url, "--warmup", "0", "--num-prompts", "2"])
    assert proc.returncode == 1 and "401" in proc.stdout + proc.stderr  # no key: every request refused
