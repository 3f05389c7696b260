"""perf/history.jsonl, where scripts/record_history.py appends the GPU benchmark figures, parses; and the
newest figure of every benchmark on a card is at most 10% worse than that card's best earlier one,
unless the newest entry carries a "reason".

A benchmark is `bench` plus every field that is not bookkeeping (date, commit, card, command, reason,
note), not a figure and not a float (shape, dtype, tokens, ...). Figures are known by name: throughput
(tok_s, gbps, tflops, req_s, ...throughput) is better higher; time and memory (us, ms, s, us_eager,
..._mib, latency, spread) better lower. Other floats (pct_ceiling, ...) are neither key nor checked.
"10% worse" means 10% less performance: a throughput below 0.9x the best, a time above best / 0.9.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

HISTORY = Path(__file__).resolve().parent.parent / "perf" / "history.jsonl"
ALLOWED_LOSS = 0.10
BOOKKEEPING = {"date", "commit", "card", "command", "reason", "note"}
HIGHER_BETTER = ("tok_s", "tokens_per_s", "req_s", "gbps", "tflops", "throughput")
LOWER_BETTER = ("us", "ms", "s", "mib", "mb", "gib", "gb")


def direction(name: str) -> int:
    """+1 when a higher figure is better, -1 when lower is better, 0 when `name` is no figure."""
    n = name.lower()
    if n in HIGHER_BETTER or n.endswith(tuple("_" + h for h in HIGHER_BETTER)) or "throughput" in n:
        return 1
    if (n in LOWER_BETTER or n.endswith(tuple("_" + low for low in LOWER_BETTER))
            or n.startswith(("us_", "ms_")) or "latency" in n or "spread" in n):
        return -1
    return 0


def is_figure(name: str, value) -> bool:
    return (direction(name) != 0 and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def benchmark_key(entry: dict) -> str:
    return json.dumps({k: v for k, v in entry.items()
                       if k not in BOOKKEEPING and not is_figure(k, v) and not isinstance(v, float)}, sort_keys=True)


def parse(text: str) -> list[dict]:
    """The entries of a history file; a line that is no valid entry raises ValueError naming it."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise ValueError(f"line {number}: not JSON: {e}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"line {number}: not a JSON object")
        missing = [k for k in ("bench", "card", "date", "commit") if not entry.get(k)]
        if missing:
            raise ValueError(f"line {number}: no {', '.join(missing)}")
        if not any(is_figure(k, v) for k, v in entry.items()):
            raise ValueError(f"line {number}: no figure (a number named like {HIGHER_BETTER + LOWER_BETTER})")
        entries.append(entry)
    return entries


def regressions(entries: list[dict]) -> list[str]:
    """One line per figure whose newest entry is more than ALLOWED_LOSS worse than the best earlier one."""
    series: dict[tuple[str, str], list[dict]] = {}
    for entry in entries:  # file order is time order: record_history.py only appends
        series.setdefault((entry["card"], benchmark_key(entry)), []).append(entry)
    found = []
    for (card, key), runs in series.items():
        *earlier, newest = runs
        if not earlier or newest.get("reason"):
            continue
        for name, value in newest.items():
            if not is_figure(name, value):
                continue
            past = [e[name] for e in earlier if is_figure(name, e.get(name))]
            if not past:
                continue
            if direction(name) > 0:
                best, worse = max(past), value < max(past) * (1 - ALLOWED_LOSS)
            else:
                best, worse = min(past), value > min(past) / (1 - ALLOWED_LOSS)
            if worse:
                found.append(f"{card}: {key} {name} = {value} at {newest['commit']} ({newest['date']}), "
                             f"best earlier {best}; fix it or record the run with --reason")
    return found


def test_history_parses():
    assert HISTORY.exists(), f"{HISTORY} is missing: it is part of the repository (empty until GPU runs)"
    parse(HISTORY.read_text())


def test_newest_gpu_figures_within_10_percent_of_best():
    found = regressions(parse(HISTORY.read_text()))
    assert not found, "\n".join(found)


def entry(commit: str, card: str = "NVIDIA H100 80GB HBM3", **fields) -> dict:
    return {"bench": "rms_norm", "shape": [4096, 4096], "dtype": "float16", "date": "2026-01-01",
            "commit": commit, "card": card, "command": "scripts/gpu_check.sh bench", **fields}


def test_checker_flags_only_real_regressions():
    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    history = [entry("a", us=10.0, gbps=800.0, pct_ceiling=26.7), entry("b", us=9.0, gbps=900.0, pct_ceiling=30.1),
               entry("c", us=11.0, gbps=790.0, pct_ceiling=26.4),   # 22% slower than the best (b): flagged
               entry("a", h200, us=7.0, gbps=1200.0), entry("b", h200, us=7.7, gbps=1100.0),  # within 10%
               entry("a", bench="decode", tok_s=1000.0), entry("b", bench="decode", tok_s=850.0, reason="fp8 off"),
               entry("a", bench="prefill", ms=20.0), entry("b", bench="prefill", ms=30.0),
               entry("c", bench="prefill", ms=19.0),                  # recovered: only the newest counts
               entry("a", shape=[1, 4096], us=1.0), entry("b", shape=[1, 4096], us=5.0),  # another benchmark
               entry("a", bench="serve", output_tok_s=5000.0, p95_e2el_ms=100.0),
               entry("b", bench="serve", output_tok_s=4400.0, p95_e2el_ms=100.0)]
    found = regressions(parse("\n".join(json.dumps(e) for e in history)))
    assert len(found) == 4, "\n".join(found)
    flagged = "\n".join(found)
    assert flagged.count(h100) == 4 and h200 not in flagged
    assert '"bench": "rms_norm", "dtype": "float16", "shape": [4096, 4096]} us = 11.0' in flagged
    assert "gbps = 790.0" in flagged and "best earlier 900.0" in flagged
    assert "[1, 4096]" in flagged and "output_tok_s = 4400.0" in flagged and "p95_e2el_ms" not in flagged
    assert "decode" not in flagged and "prefill" not in flagged


def test_direction_of_figure_names():
    assert [direction(n) for n in ("tok_s", "output_tok_s", "gbps", "tflops", "request_throughput")] == [1] * 5
    assert [direction(n) for n in ("us", "us_eager", "ms", "median_ttft_ms", "cold_start_first_token_s",
                                   "server_rss_mib", "p95_spread_e2el_pct")] == [-1] * 7
    assert [direction(n) for n in ("bench", "tokens", "shape", "dtype", "pct_ceiling", "bytes")] == [0] * 6


@pytest.mark.parametrize("line, message", [
    ("{", "not JSON"), ("[1]", "not a JSON object"), ('{"bench": "x", "us": 1}', "no card, date, commit"),
    ('{"bench": "x", "card": "c", "date": "d", "commit": "e", "batch": 1}', "no figure")])
def test_bad_lines_are_named(line, message):
    with pytest.raises(ValueError, match=f"line 2: {message}"):
        parse('{"bench": "ok", "card": "c", "date": "d", "commit": "e", "us": 1}\n' + line)
