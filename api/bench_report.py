"""Tables of `bench-serve` results: one run's report, and runs side by side (scripts/compare_vllm.sh)
with each one's ratio to the first and the winner of every metric."""
from __future__ import annotations

import json

# (JSON key, row title, True when higher is better)
COMPARED = (
    ("request_throughput", "request throughput (req/s)", True),
    ("output_throughput", "output throughput (tok/s)", True),
    ("total_token_throughput", "total throughput (tok/s)", True),
    ("mean_ttft_ms", "TTFT mean (ms)", False),
    ("median_ttft_ms", "TTFT median (ms)", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", False),
    ("mean_tpot_ms", "TPOT mean (ms)", False),
    ("median_tpot_ms", "TPOT median (ms)", False),
    ("p99_tpot_ms", "TPOT p99 (ms)", False),
    ("median_itl_ms", "ITL median (ms)", False),
    ("p99_itl_ms", "ITL p99 (ms)", False),
    ("median_e2el_ms", "E2E latency median (ms)", False),
    ("p95_e2el_ms", "E2E latency p95 (ms)", False),
    ("p99_e2el_ms", "E2E latency p99 (ms)", False),
    ("p95_spread_e2el_pct", "E2E p95 spread (% of p50)", False),
    ("failed", "failed requests", False),
    ("cold_start_ready_s", "start-up to ready (s)", False),
    ("cold_start_first_token_s", "start-up to first token (s)", False),
    ("server_rss_mib", "CPU RSS under load (MiB)", False),
    ("server_rss_peak_mib", "CPU RSS peak (MiB)", False),
    ("gpu_memory_peak_mib", "GPU memory peak (MiB)", False),
)


def load(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    result["label"] = result.get("label") or path
    return result


def num(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def print_summary(s: dict) -> None:
    c = s["config"]
    cap = f", at most {c['concurrency']} in flight" if c["concurrency"] else ""
    load_ = (f"closed loop, {c['concurrency']} clients" if c["request_rate"] is None else
             f"Poisson {c['request_rate']} req/s{cap}")
    limits = " and ".join(x for x in (c["num_prompts"] and f"{c['num_prompts']} requests",
                                       c["duration"] and f"{c['duration']} s") if x)
    lens = (f"{s['prompt_len_min']}" if s["prompt_len_min"] == s["prompt_len_max"] else
            f"{s['prompt_len_min']}-{s['prompt_len_max']}") if s["prompt_len_min"] is not None else f"~{c['input_len']}"
    rows = [("model", f"{s['model']} at {c['base_url']}{c['endpoint']}"),
            ("load", load_ + (f", {limits}" if limits else "")),
            ("prompts", f"{c['prompt_kind']}, {lens} tokens; max_tokens {c['max_tokens']}"
                        + (", ignore_eos" if c["ignore_eos"] else "")),
            ("successful requests", num(s["completed"])), ("failed requests", num(s["failed"])),
            ("duration (s)", num(s["duration"])),
            ("input tokens", num(s["total_input_tokens"])), ("generated tokens", num(s["total_output_tokens"])),
            ("request throughput (req/s)", num(s["request_throughput"])),
            ("output throughput (tok/s)", num(s["output_throughput"], 1)),
            ("total throughput (tok/s)", num(s["total_token_throughput"], 1))]
    print("=" * 26 + " serving benchmark " + "=" * 26)
    for title, value in rows:
        print(f"{title:<28}{value}")
    if not s["input_len_exact"]:
        print(f"note: {s['input_len_note']}")
    for error, count in sorted(s["errors"].items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {count} x {error}")
    print("-" * 71)
    print(f"{'(ms)':<14}{'mean':>9}{'median':>9}{'p95':>9}{'p99':>9}{'p95-p50':>10}{'% of p50':>10}")
    for key, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        print(f"{title:<14}" + "".join(f"{num(s[f'{stat}_{key}_ms']):>9}" for stat in ("mean", "median", "p95", "p99"))
              + f"{num(s[f'p95_spread_{key}_ms']):>10}{num(s[f'p95_spread_{key}_pct']):>10}")
    if s["server_pid"] is not None:
        print("-" * 71)
        print(f"{'start-up to ready / first token (s)':<40}{num(s['cold_start_ready_s'])} / "
              f"{num(s['cold_start_first_token_s'])}")
        print(f"{'server CPU RSS under load / peak (MiB)':<40}{num(s['server_rss_mib'], 0)} / "
              f"{num(s['server_rss_peak_mib'], 0)}")
        print(f"{'GPU memory peak (MiB)':<40}{num(s['gpu_memory_peak_mib'], 0)}"
              + (f" ({s['gpu_memory_source']})" if s["gpu_memory_source"] else " (no nvidia-smi)"))
    print("=" * 71)


def comparison_rows(results: list[dict]) -> list[list[str]]:
    """[metric, value per run..., ratio of each later run to the first..., winner] per compared metric."""
    labels = [r["label"] for r in results]
    rows = []
    for key, title, higher in COMPARED:
        values = [r.get(key) for r in results]
        ratios = [num(v / values[0]) + "x" if v is not None and values[0] else "n/a" for v in values[1:]]
        known = [(v, label) for v, label in zip(values, labels) if v is not None]
        if len(known) < 2 or len({v for v, _ in known}) == 1:
            winner = "-"
        else:
            winner = (max if higher else min)(known, key=lambda vl: vl[0])[1]
        rows.append([title, *(num(v) for v in values), *ratios, winner])
    return rows


def print_comparison(results: list[dict]) -> None:
    labels = [r["label"] for r in results]
    header = ["metric", *labels, *(f"{label}/{labels[0]}" for label in labels[1:]), "winner"]
    rows = [header] + comparison_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print(row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w in zip(row[1:], widths[1:])))
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    c = results[0]["config"]
    print(f"\nsame load for each: {c['mode']}, concurrency {c['concurrency']}, request rate {c['request_rate']}, "
          f"{c['num_prompts'] or ''} requests, {c['input_len']} prompt tokens, {c['max_tokens']} max tokens; "
          "ratios are each run's value over the first's")


def history_entry(s: dict) -> dict:
    """The headline figures in perf/history.jsonl's form: what identifies the load as strings and ints, the
    figures under names whose suffix says which way is better (tests/test_perf_history.py)."""
    c = s["config"]
    load_ = (f"closed loop x{c['concurrency']}" if c["request_rate"] is None else
             f"poisson {c['request_rate']}/s" + (f" cap {c['concurrency']}" if c["concurrency"] else ""))
    figures = {"req_s": "request_throughput", "output_tok_s": "output_throughput",
               "total_tok_s": "total_token_throughput",
               "median_ttft_ms": "median_ttft_ms", "p99_ttft_ms": "p99_ttft_ms", "median_tpot_ms": "median_tpot_ms",
               "p99_tpot_ms": "p99_tpot_ms", "median_e2el_ms": "median_e2el_ms", "p95_e2el_ms": "p95_e2el_ms",
               "p95_spread_e2el_pct": "p95_spread_e2el_pct", "cold_start_first_token_s": "cold_start_first_token_s",
               "server_rss_mib": "server_rss_mib", "gpu_memory_peak_mib": "gpu_memory_peak_mib"}
    entry = {"bench": "serve", "shape": f"{s['model']} {c['endpoint']} in={c['input_len']} out={c['max_tokens']} "
                                         f"{c['prompt_kind']} {load_}"}
    entry.update({name: round(s[key], 3) for name, key in figures.items() if s.get(key) is not None})
    return entry
