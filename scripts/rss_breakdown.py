"""Where a process's resident memory sits: /proc/PID/smaps summed per mapped file (anonymous memory as
one line), largest first. With --engine, builds an engine in this process first (dummy weights, the config
given) and runs a few decode steps, so the figure is the engine's without the HTTP server.
Usage: python scripts/rss_breakdown.py [--pid PID | --engine perf/configs/qwen2.5-7b] [--top 12]
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path


def breakdown(pid: int | str) -> tuple[Counter, int]:
    """kB resident per mapping (path, or [anon] / [heap] / [stack]) and the total, from smaps."""
    per, name = Counter(), "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            name = fields[5] if len(fields) >= 6 else "[anon]"
            if name.startswith("/dev/") or name.startswith("[anon:"):
                name = "[anon]" if name.startswith("[anon:") else name
        elif fields and fields[0] == "Rss:":
            per[name] += int(fields[1])
    return per, sum(per.values())


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_engine(config_dir: str, enforce_eager: bool) -> None:
    """Build and run an engine, printing the resident size after each stage."""
    import ctypes
    import gc

    import numpy as np

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    print(f"imports: {rss_mib():.0f} MiB")
    import cupy as cp
    cp.zeros(1)
    print(f"+ CUDA context: {rss_mib():.0f} MiB")
    engine = LLMEngine(EngineConfig(model=config_dir, load_format="dummy", dtype="float16", max_model_len=1024,
                                    skip_tokenizer_init=True, enforce_eager=enforce_eager))
    print(f"+ engine ({', '.join(f'{k} {v:.2f} s' for k, v in engine.stage_times.items())}): {rss_mib():.0f} MiB")
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine.generate([rng.integers(0, engine.model_config.vocab_size, 64).tolist() for _ in range(16)], params)
    print(f"+ 16 requests: {rss_mib():.0f} MiB")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"after gc and malloc_trim: {rss_mib():.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pid", default="self")
    ap.add_argument("--engine", default=None, help="config dir to build a dummy-weight engine from first")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if args.engine:
        run_engine(args.engine, args.enforce_eager)
    per, total = breakdown(os.getpid() if args.pid == "self" else args.pid)
    print(f"resident: {total / 1024:.1f} MiB in {len(per)} mappings; largest:")
    for name, kb in per.most_common(args.top):
        print(f"  {kb / 1024:8.1f} MiB  {name}")


if __name__ == "__main__":
    main()
