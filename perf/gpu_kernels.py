"""GPU benchmark of the basic ops (RMSNorm, add+RMSNorm, SiLU-and-mul, RoPE + KV write, embedding) at Qwen2.5-7B shapes.

Prints achieved GB/s (bytes read + written) against the H100's 2.99 TB/s copy ceiling and this card's measured
copy; `--json PATH` appends one JSON object per case. `us`: per launch inside a CUDA graph (how decode runs them),
inputs rotated over 2x L2; `us_l2`: the same on one input set (L2-resident below 50 MB, as in a decode step);
`cpu_us`: host time of one eager launcher call (checks + launch). `%copy` is against cudaMemcpy / CuPy's copy
kernel timed here (2.43 TB/s on the H100, which the read-heavier kernels beat): a cross-card yardstick only.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import cupy as cp
import numpy as np

from ops import reference
from ops.cuda import basic, basic_hand

from cuda_timing import time_eager, time_graph

IMPLS = {"jit": basic, "hand": basic_hand}

CEILING_GBPS = 2990.0  # device-to-device copy on the H100 (../shared/GPU.md)
L2_BYTES = 50e6
QWEN = dict(H=3584, Hq=28, Hkv=4, D=128, I=18944, V=152064)  # Qwen2.5-7B
TOKENS = (1, 64, 128, 256, 4096)
BLOCK = 16
MAX_SETS = 256  # distinct input sets per graph: a footprint of 2x L2 where that many sets reach it
MIN_LAUNCHES = 32  # launches per graph, cycling the sets, so per-node overheads average out
STORAGE = {"float16": np.float16, "bfloat16": np.uint16}


def random_act(shape, dtype: str):
    """Random activations in the storage dtype (bf16 as the top half of float32 bits: values, not junk)."""
    values = cp.random.standard_normal(shape, dtype=cp.float32)
    if dtype == "bfloat16":
        return (values.view(cp.uint32) >> 16).astype(cp.uint16)
    return values.astype(cp.float16)


def make_rms_norm(t, dtype, m):
    x, out, w = random_act((t, m["H"]), dtype), random_act((t, m["H"]), dtype), random_act((m["H"],), dtype)
    return lambda: basic.rms_norm(x, w, 1e-6, out)


def make_add_rms_norm(t, dtype, m):
    x, res, out = (random_act((t, m["H"]), dtype) for _ in range(3))
    w = random_act((m["H"],), dtype)
    return lambda: basic.add_rms_norm(x, res, w, 1e-6, out)


def make_silu_and_mul(t, dtype, m):
    x, out = random_act((t, 2 * m["I"]), dtype), random_act((t, m["I"]), dtype)
    return lambda: basic.silu_and_mul(x, out)


_COS_SIN = {}


def make_rope_and_cache(t, dtype, m):
    if m["D"] not in _COS_SIN:
        _COS_SIN[m["D"]] = cp.asarray(reference.rope_cos_sin(m["D"], 4096, 1e6))
    qkv = random_act((t, (m["Hq"] + 2 * m["Hkv"]) * m["D"]), dtype)
    num_blocks = -(-t // BLOCK) + 1
    k_cache, v_cache = (cp.zeros((num_blocks, m["Hkv"], BLOCK, m["D"]), STORAGE[dtype]) for _ in range(2))
    positions = cp.random.randint(0, 4000, t, dtype=cp.int32)
    slots = cp.random.permutation(num_blocks * BLOCK)[:t].astype(cp.int32)
    return lambda: basic.rope_and_cache(qkv, positions, slots, k_cache, v_cache, _COS_SIN[m["D"]])


_TABLES = {}


def make_embedding(t, dtype, m):
    if dtype not in _TABLES:
        _TABLES.clear()  # one 1 GB table at a time
        _TABLES[dtype] = random_act((m["V"], m["H"]), dtype)
    ids = cp.random.randint(0, m["V"], t, dtype=cp.int32)
    out = random_act((t, m["H"]), dtype)
    return lambda: basic.embedding(ids, _TABLES[dtype], out)


def bytes_moved(op: str, t: int, m) -> tuple[int, int]:
    """(bytes read + written per launch, bytes of one input set) for 2-byte dtypes."""
    e, h, i, d = 2, m["H"], m["I"], m["D"]
    heads = m["Hq"] + 2 * m["Hkv"]
    if op == "rms_norm":
        return 2 * t * h * e + h * e, 2 * t * h * e
    if op == "add_rms_norm":
        return 4 * t * h * e + h * e, 3 * t * h * e
    if op == "silu_and_mul":
        return 3 * t * i * e, 3 * t * i * e
    if op == "rope_and_cache":
        moved = t * heads * d * e + t * (m["Hq"] + m["Hkv"]) * d * e + 2 * t * m["Hkv"] * d * e + t * d * 4 + 8 * t
        return moved, t * heads * d * e + 2 * (-(-t // BLOCK) + 1) * BLOCK * m["Hkv"] * d * e
    if op == "embedding":
        return 2 * t * h * e + 4 * t, t * h * e
    raise ValueError(op)


MAKERS = {"rms_norm": make_rms_norm, "add_rms_norm": make_add_rms_norm, "silu_and_mul": make_silu_and_mul,
          "rope_and_cache": make_rope_and_cache, "embedding": make_embedding}


def cpu_cost(launch, stream, calls: int = 200) -> float:
    """Host microseconds of one eager call (argument checks + launch), the GPU left to drain afterwards."""
    start = time.perf_counter()
    for _ in range(calls):
        launch()
    elapsed = time.perf_counter() - start
    stream.synchronize()
    return elapsed / calls * 1e6


def copy_ceiling(stream, nbytes: int = 1 << 30, reps: int = 20) -> tuple[float, float]:
    """This card's device-to-device copy in GB/s (bytes read + written): (cudaMemcpyAsync, CuPy 16-byte copy kernel)."""
    src, dst = cp.empty(nbytes // 16, cp.complex128), cp.empty(nbytes // 16, cp.complex128)
    memcpy = [lambda: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                                  cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)] * 4
    kernel = [lambda: cp.copyto(dst, src)] * 4
    kernel[0]()  # compile before capture
    return tuple(2 * nbytes / time_graph(launches, stream, reps) / 1e3 for launches in (memcpy, kernel))


def run_case(op: str, t: int, dtype: str, stream, reps: int, make=None) -> dict:
    moved, set_bytes = bytes_moved(op, t, QWEN)
    n_sets = max(1, min(MAX_SETS, math.ceil(2 * L2_BYTES / set_bytes)))
    sets = [(make or MAKERS[op])(t, dtype, QWEN) for _ in range(n_sets)]
    for launch in sets:  # compile and load every kernel before capture
        launch()
    stream.synchronize()
    us = time_graph([sets[k % n_sets] for k in range(max(n_sets, MIN_LAUNCHES))], stream, reps)
    us_l2 = time_graph([sets[0]] * MIN_LAUNCHES, stream, reps)
    us_eager = time_eager(sets, stream, 3 * reps)
    gbps = moved / us / 1e3
    return {"bench": op, "shape": f"T={t},H={QWEN['H']},I={QWEN['I']},Hq={QWEN['Hq']},Hkv={QWEN['Hkv']},D={QWEN['D']}",
            "tokens": t, "dtype": dtype, "us": round(us, 3), "us_l2": round(us_l2, 3), "us_eager": round(us_eager, 3),
            "cpu_us": round(cpu_cost(sets[0], stream), 2), "bytes": moved, "gbps": round(gbps, 1),
            "ceiling": CEILING_GBPS, "pct_ceiling": round(100 * gbps / CEILING_GBPS, 1),
            "footprint_mb": round(n_sets * set_bytes / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="append one JSON object per case to this file")
    parser.add_argument("--dtype", choices=list(STORAGE), action="append", help="default: float16")
    parser.add_argument("--ops", default=",".join(MAKERS), help="comma-separated subset of " + ",".join(MAKERS))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--impl", default="jit", help="jit (ops/jit_ops.py, what the engine runs), hand (the "
                        "hand-written kernels they replaced, ops/cuda/basic_hand.py) or both, comma-separated")
    args = parser.parse_args()
    cp.random.seed(0)
    card = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    stream = cp.cuda.Stream(non_blocking=True)
    rows = []
    with stream:
        memcpy_gbps, kernel_gbps = copy_ceiling(stream)
        copy_gbps = max(memcpy_gbps, kernel_gbps)
        print(f"{card}: copy measured here {memcpy_gbps:.0f} GB/s (cudaMemcpy), {kernel_gbps:.0f} GB/s (copy kernel); "
              f"H100 ceiling {CEILING_GBPS:.0f} GB/s; Qwen2.5-7B shapes")
        print(f"{'impl':<5} {'op':<15} {'T':>5} {'dtype':<9} {'us':>8} {'us_l2':>8} {'eager':>8} {'cpu_us':>7} "
              f"{'GB/s':>7} {'%2.99T':>7} {'%copy':>6}")
        global basic
        for dtype in args.dtype or ["float16"]:
            for op in args.ops.split(","):
                for t, impl in ((t, impl) for t in map(int, args.tokens.split(",")) for impl in args.impl.split(",")):
                    basic = IMPLS[impl]  # the launches look `basic` up when they run, inside run_case
                    r = run_case(op, t, dtype, stream, args.reps)
                    r.update(card=card, copy_gbps_here=round(copy_gbps, 1), impl=impl,
                             pct_copy_here=round(100 * r["gbps"] / copy_gbps, 1))
                    rows.append(r)
                    print(f"{impl:<5} {op:<15} {t:>5} {dtype:<9} {r['us']:>8.2f} {r['us_l2']:>8.2f} "
                          f"{r['us_eager']:>8.2f} {r['cpu_us']:>7.1f} {r['gbps']:>7.0f} {r['pct_ceiling']:>6.1f}% "
                          f"{r['pct_copy_here']:>5.1f}%", flush=True)
                _TABLES.clear()
                cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
