"""CPU and kernel time, and minor page faults, of one numpy sample() call: 64 rows x 152,064, temperature 1 (the
dense whole-vocabulary path; --top-p < 1: the top-p path without top-k). Page faults are kernel time the regression
check's timer counts, at a price that differs between VMs (docs/performance.md).
Usage (repository root): python -m perf.sampler_faults [--calls 20] [--top-p 0.9]"""
from __future__ import annotations

import argparse
import resource

from engine.sampling_params import SamplingParams
from ops.sampling import sample
from perf.bench_sampling import lm_like_logits, tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    calls = args.calls
    logits = lm_like_logits(64, 152064).copy()
    t = tensors(SamplingParams(temperature=1.0, top_p=args.top_p), 64, 152064)
    sample(logits, t)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        sample(logits, t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = (r1.ru_utime - r0.ru_utime) / calls * 1e3, (r1.ru_stime - r0.ru_stime) / calls * 1e3
    print(f"user {user:.1f} ms, system {system:.1f} ms, faults {(r1.ru_minflt - r0.ru_minflt) / calls:.0f} a call")


if __name__ == "__main__":
    main()
