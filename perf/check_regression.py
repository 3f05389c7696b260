"""CI's performance regression check: run the CPU hot-path benchmarks (perf/bench_*.py) and compare each
median with perf/baseline_cpu.json; exit 1 when one is slower than its margin allows, in 3 runs in a row.

    python perf/check_regression.py                  # check (CI, about 30 s)
    python perf/check_regression.py --save --runs 10 # measure: medians and each benchmark's margin

Times are CPU time of the benchmark process (pytest-benchmark's timer = time.process_time), so time spent
waiting for a core that other work holds does not count; extra work a change adds does. A core that runs
slower (a busy SMT sibling, a slower host clock) does count: perf/speed_probe times a fixed workload before
and after each benchmark, and a benchmark's ratio is divided by how much slower than beside its baseline the
probe ran (never by less than 1). How the margins were chosen from measured spread: docs/performance.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "perf" / "baseline_cpu.json"
MIN_MARGIN = 0.25  # no benchmark may lose more than this unnoticed
ATTEMPTS = 3  # the first run of the whole suite, then re-runs of the flagged benchmarks only


def margin_from_spread(ratios: list[float]) -> float:
    """A benchmark's allowed slowdown: twice the excess of its 90th-percentile run over the baseline median,
    at least MIN_MARGIN, rounded up to 0.05. Stable benchmarks (most, within 5%) get 0.25; memory-bound
    ones whose runs wander by a third get about 0.65."""
    q90 = sorted(ratios)[max(0, math.ceil(0.9 * len(ratios)) - 1)]
    return max(MIN_MARGIN, math.ceil(20 * 2 * (q90 - 1) - 1e-9) / 20)


class Run(NamedTuple):
    medians: dict[str, float]  # CPU seconds per benchmark (pytest node id)
    probes: dict[str, float]  # perf/speed_probe's seconds around each benchmark (mean of before and after)
    foreign: float  # how many cores other processes kept busy meanwhile, on average (the noise it saw)


def run_suite(node_ids: list[str] | None = None) -> Run:
    """One pytest-benchmark run of the suites (or of `node_ids`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, probe_out = os.path.join(tmp, "bench.json"), os.path.join(tmp, "probe.json")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-enable",
               f"--benchmark-json={out}", "--benchmark-max-time=0.5", "--benchmark-min-rounds=7",
               "--benchmark-timer=time.process_time", *(node_ids or ["perf"])]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",  # one thread, as served
               "CUPYLLM_SPEED_PROBE": probe_out}  # perf/conftest.py
        t0, busy0, own0 = time.perf_counter(), busy_seconds(), children_cpu_seconds()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        foreign = (busy_seconds() - busy0 - (children_cpu_seconds() - own0)) / (time.perf_counter() - t0)
        if proc.returncode != 0 or not os.path.exists(out):
            sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"benchmark run failed (pytest exit status {proc.returncode})")
        with open(out) as f:
            data = json.load(f)
        with open(probe_out) as f:
            probes = {name: statistics.mean(around) for name, around in json.load(f).items()}
    medians = {b["fullname"]: b["stats"]["median"] for b in data["benchmarks"]}
    return Run(medians, {name: probes[name] for name in medians}, max(0.0, foreign))


def busy_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat's `cpu` line without idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import numpy
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__}


def slowdowns(run: Run, medians: dict[str, float], probes: dict[str, float]) -> dict[str, float]:
    """Per benchmark of `run` with a baseline: its median over the baseline's, divided by how much slower the
    machine ran beside it than beside the baseline (the probe's ratio, at least 1: a faster moment tightens
    nothing). A baseline without probes (written before them) divides by 1."""
    out = {}
    for name, seconds in run.medians.items():
        if name in medians:
            machine_factor = run.probes[name] / probes[name] if name in probes else 1.0
            out[name] = seconds / medians[name] / max(1.0, machine_factor)
    return out


def baseline_from_runs(runs: list[Run], note: str) -> dict:
    """The baseline file's content: per benchmark the median of the runs' medians, the median of the probes
    beside it, and its margin from the spread of the runs' slowdowns."""
    names = sorted({name for run in runs for name in run.medians})
    medians = {n: statistics.median(run.medians[n] for run in runs if n in run.medians) for n in names}
    probes = {n: statistics.median(run.probes[n] for run in runs if n in run.probes) for n in names}
    ratios = [slowdowns(run, medians, probes) for run in runs]
    margins = {n: margin_from_spread([r[n] for r in ratios if n in r]) for n in names}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"note": note, "date": datetime.date.today().isoformat(), "commit": commit, "machine": machine(),
            "medians": {n: float(f"{v:.4g}") for n, v in medians.items()},
            "probes": {n: float(f"{v:.4g}") for n, v in probes.items()}, "margins": margins}


def save(runs: int, path: Path) -> None:
    results = []
    for i in range(runs):
        results.append(run_suite())
        print(f"run {i + 1}/{runs} done; other processes kept {results[-1].foreign:.2f} cores busy")
    baseline = baseline_from_runs(results, f"medians of {runs} runs (CPU seconds) and margins from their "
                                           "spread; written by perf/check_regression.py --save")
    path.write_text(json.dumps(baseline, indent=1) + "\n")
    print(f"wrote {len(baseline['medians'])} baselines to {path}")


def compare(baseline: dict[str, float], margins: dict[str, float], current: dict[str, float],
            ratios: dict[str, float]) -> list[str]:
    """Print one line per benchmark (`ratios`: its slowdown, the machine's taken out); return the names whose
    slowdown is over 1 + margin."""
    slow = []
    width = max(len(name.split("/")[-1]) for name in current | baseline)
    print(f"{'benchmark':<{width}} {'baseline':>9} {'now':>9} {'ratio':>6} {'machine':>7} {'slowdown':>8} "
          f"{'allowed':>7}")
    for name in sorted(current | baseline):
        short = name.split("/")[-1]
        if name not in current:
            print(f"{short:<{width}} {fmt(baseline[name]):>9} {'not run':>9}   benchmark gone or renamed?")
        elif name not in baseline:
            print(f"{short:<{width}} {'none':>9} {fmt(current[name]):>9}   no baseline yet: add it with --save")
        else:
            ratio, allowed = current[name] / baseline[name], 1 + margins[name]
            flag = "  SLOWER" if ratios[name] > allowed else ""
            print(f"{short:<{width}} {fmt(baseline[name]):>9} {fmt(current[name]):>9} {ratio:6.2f} "
                  f"{ratio / ratios[name]:7.2f} {ratios[name]:8.2f} {allowed:7.2f}{flag}")
            if flag:
                slow.append(name)
    return slow


def fmt(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def check(path: Path, min_margin: float, attempts: int) -> int:
    if not path.exists():
        print(f"no baseline at {path}: nothing to compare (write one with --save)")
        return 0
    saved = json.loads(path.read_text())
    baseline, probes = saved["medians"], saved.get("probes", {})
    margins = {n: max(min_margin, saved.get("margins", {}).get(n, min_margin)) for n in baseline}
    if saved.get("machine") != machine():
        print(f"note: the baseline was measured on {saved.get('machine')}; this is {machine()}")
    t0 = time.perf_counter()
    run = run_suite()
    print(f"other processes kept {run.foreign:.2f} cores busy during the run")
    current, ratios = run.medians, slowdowns(run, baseline, probes)
    slow = compare(baseline, margins, current, ratios)
    for _ in range(attempts - 1):
        if not slow:
            break
        # A neighbour slows a run down for a while; a second and third look at the flagged cases, keeping
        # each one's fastest median, separates that from a change that made the code slower.
        print(f"\n{len(slow)} over the margin; running them again")
        again = run_suite(slow)
        print(f"other processes kept {again.foreign:.2f} cores busy during the re-run")
        again_ratios = slowdowns(again, baseline, probes)
        for name in slow:  # each benchmark's best attempt counts
            if again_ratios.get(name, math.inf) < ratios[name]:
                ratios[name], current[name] = again_ratios[name], again.medians[name]
        current, ratios = {name: current[name] for name in slow}, {name: ratios[name] for name in slow}
        slow = compare({name: baseline[name] for name in slow}, margins, current, ratios)
    took = time.perf_counter() - t0
    if slow:
        print(f"\nFAIL ({took:.0f} s): {len(slow)} benchmark(s) slower than {path.name} allows, in {attempts} runs:"
              "\n  " + "\n  ".join(slow) +
              "\nIf the slowdown is intended, measure again: python perf/check_regression.py --save --runs 10")
        return 1
    print(f"\nOK ({took:.0f} s): every benchmark within its margin of the baseline")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save", action="store_true", help="measure and write the baseline")
    ap.add_argument("--runs", type=int, default=10, help="runs --save measures (default 10)")
    ap.add_argument("--baseline", type=Path, default=BASELINE, help="default: perf/baseline_cpu.json")
    ap.add_argument("--min-margin", type=float, default=MIN_MARGIN,
                    help=f"allowed slowdown of every benchmark at least (default {MIN_MARGIN})")
    ap.add_argument("--attempts", type=int, default=ATTEMPTS,
                    help=f"runs a benchmark must be slow in to fail (default {ATTEMPTS})")
    args = ap.parse_args()
    if args.save:
        save(args.runs, args.baseline)
        return 0
    return check(args.baseline, args.min_margin, args.attempts)


if __name__ == "__main__":
    sys.exit(main())
