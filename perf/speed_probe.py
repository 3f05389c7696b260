"""How fast this machine runs right now: a fixed workload that no cupyllm code is in, timed in CPU seconds.

The CPU-time timer of the regression check does not count waiting for a core, but it does count a core that
runs slower: a busy SMT sibling or a host that moves the guest to a slower clock (neither shows in the guest's
/proc/stat). Timing the same probe beside each benchmark and dividing by the probe's time on the baseline
machine separates a slower machine from slower code (perf/check_regression.py)."""
from __future__ import annotations

import statistics
import time


def _workload() -> None:
    # interpreter work: objects, dicts, sorting, strings. (A numpy part was tried too: its memory-bound time
    # wanders on its own and made the probe follow the benchmarks worse: perf/speed_probe's numbers in
    # docs/performance.md.)
    rows = [(i * 7919 % 1000, str(i)) for i in range(4000)]
    table = {key: value for key, value in rows}
    rows.sort()
    "".join(table[k] for k in range(0, 1000, 3))


def probe(repeats: int = 11) -> float:
    """Median CPU seconds of the workload over `repeats` runs (about 1.4 ms each on the CI machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        _workload()
        times.append(time.process_time() - t0)
    return statistics.median(times)
