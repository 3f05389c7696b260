"""GPU benchmark of the sampler (ops/cuda/sampling.py) at Qwen2.5-7B's vocab: greedy, top-k + top-p and more.

`us` is the per-launch time inside a CUDA graph with the logits rotated over 2x L2 (as decode runs it, cold);
`us_l2` repeats one set (the LM head just wrote it); `us_eager` is one eager launch between events; `load_us`
is the host cost of SamplingBuffers.load. GB/s counts one read of the logits against the 2.99 TB/s copy
ceiling. `--json PATH` appends one JSON object per case.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import cupy as cp
import numpy as np

from engine.sampling_params import SamplingParams
from ops.cuda import sampling as gpu
from ops.sampling_types import SamplingTensors

from cuda_timing import time_eager, time_graph

CEILING_GBPS = 2990.0  # device-to-device copy on the H100 (../shared/GPU.md)
L2_BYTES = 50e6
VOCAB = 152064  # Qwen2.5-7B
BATCHES = (1, 64, 128)
MAX_SETS = 128
MIN_LAUNCHES = 16
CASES = {  # name -> (SamplingParams, logits shape)
    "greedy": (SamplingParams(temperature=0.0), "lm"),
    "greedy_logprobs20": (SamplingParams(temperature=0.0, logprobs=20), "lm"),
    "top_k50_top_p0.9": (SamplingParams(temperature=0.8, top_k=50, top_p=0.9), "lm"),
    "top_p0.9": (SamplingParams(temperature=0.8, top_p=0.9), "lm"),
    "temperature_only": (SamplingParams(temperature=0.8), "lm"),
    "top_p0.9_flat": (SamplingParams(temperature=1.0, top_p=0.9), "flat"),
    "penalties_top_k50": (SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.2,
                                         frequency_penalty=0.5, presence_penalty=0.5), "lm"),
}
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def random_logits(batch: int, shape: str, dtype: str):
    """lm: N(0, 1.5) floor plus 40 tokens 5-12 above it per row (a chat model's shape); flat: N(0, 1)."""
    logits = cp.random.standard_normal((batch, VOCAB), dtype=cp.float32)
    if shape == "lm":
        logits *= 1.5
        rows = cp.repeat(cp.arange(batch), 40)
        logits[rows, cp.random.randint(0, VOCAB, batch * 40)] += cp.random.uniform(5, 12, batch * 40, cp.float32)
    if dtype == "bfloat16":
        return (logits.view(cp.uint32) >> 16).astype(cp.uint16)
    return logits.astype(STORAGE[dtype])


def tensors(params: SamplingParams, batch: int, rng) -> SamplingTensors:
    history = 512 if params.repetition_penalty != 1 else 0  # a long chat's worth of penalised tokens
    rows = [(params, rng.integers(0, VOCAB, history).tolist(), rng.integers(0, VOCAB, history // 2).tolist(),
             int(rng.integers(0, 2**63)), []) for _ in range(batch)]
    return SamplingTensors.build(rows, VOCAB)


def run_case(name: str, batch: int, dtype: str, buffers, stream, reps: int, rng) -> dict:
    params, shape = CASES[name]
    t = tensors(params, batch, rng)
    set_bytes = batch * VOCAB * np.dtype(STORAGE[dtype]).itemsize
    n_sets = max(1, min(MAX_SETS, math.ceil(2 * L2_BYTES / set_bytes)))
    sets = [random_logits(batch, shape, dtype) for _ in range(n_sets)]
    num_top = max(t.num_logprobs, 0)
    ids = cp.empty(batch, cp.int32)
    logprobs = cp.empty(batch, cp.float32) if t.num_logprobs >= 0 else None
    top = (cp.empty((batch, num_top), cp.int32), cp.empty((batch, num_top), cp.float32)) if num_top else (None, None)
    stats = cp.empty((batch, 4), cp.float32)
    start = time.perf_counter()
    for _ in range(20):
        buffers.load(t)
    load_us = (time.perf_counter() - start) / 20 * 1e6
    launches = [lambda x=x: gpu.sample(x, buffers, ids, logprobs, *top) for x in sets]
    gpu.sample(sets[0], buffers, ids, logprobs, *top, stats)  # compile, load the module; paths for the table
    stream.synchronize()
    paths = np.bincount(cp.asnumpy(stats[:, 3]).astype(int), minlength=4).tolist()
    us = time_graph([launches[k % n_sets] for k in range(max(n_sets, MIN_LAUNCHES))], stream, reps)
    us_l2 = time_graph([launches[0]] * MIN_LAUNCHES, stream, reps)
    us_eager = time_eager(launches[:1], stream, 3 * reps)
    gbps = set_bytes / us / 1e3
    return {"bench": f"sample_{name}", "shape": f"B={batch},V={VOCAB}", "batch": batch, "dtype": dtype,
            "us": round(us, 2), "us_l2": round(us_l2, 2), "us_eager": round(us_eager, 2),
            "load_us": round(load_us, 1), "gbps": round(gbps, 1), "ceiling": CEILING_GBPS,
            "pct_ceiling": round(100 * gbps / CEILING_GBPS, 1), "paths": paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="append one JSON object per case to this file")
    parser.add_argument("--dtype", default="float32", choices=sorted(STORAGE))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cp.random.seed(0)
    buffers = gpu.SamplingBuffers(max(BATCHES), VOCAB, max_history=1024, max_bias=16)
    stream = cp.cuda.Stream(non_blocking=True)
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, V={VOCAB}, {args.dtype} logits")
    print(f"{'case':<22}{'B':>5}{'us':>10}{'us_l2':>10}{'us_eager':>10}{'load_us':>9}{'GB/s':>9}"
          "  paths greedy/all/cand/radix")
    with stream:
        for name in args.cases.split(","):
            for batch in map(int, args.batches.split(",")):
                r = run_case(name, batch, args.dtype, buffers, stream, args.reps, rng)
                print(f"{name:<22}{batch:>5}{r['us']:>10.2f}{r['us_l2']:>10.2f}{r['us_eager']:>10.2f}"
                      f"{r['load_us']:>9.1f}{r['gbps']:>9.1f}  {r['paths']}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
