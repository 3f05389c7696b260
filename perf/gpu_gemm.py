"""GEMM benchmark: autotuned cuBLASLt vs the heuristic's first choice vs torch (the yardstick, imported only here)
at the Qwen2.5-7B projections, each timed as CUDA-graph replays with weights rotating past L2."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cupy as cp
import numpy as np

from ops import autotune
from ops.cublaslt import PlanKey
from ops.cuda.linear import Linear

COPY_GBPS, MATMUL_TFLOPS = 2990.0, 750.0  # measured on this H100 (../shared/GPU.md)
CONFIG = Path(__file__).resolve().parent / "configs" / "qwen2.5-7b" / "config.json"


def projections(config: dict) -> dict[str, tuple[int, int, bool]]:
    """name -> (N, K, bias) of the merged projections of one decoder layer, and the LM head."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    hq, hkv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or hidden // hq
    qkv_bias = config.get("attention_bias", config.get("model_type") == "qwen2")
    return {"qkv": ((hq + 2 * hkv) * d, hidden, qkv_bias), "o_proj": (hidden, hq * d, False),
            "gate_up": (2 * inter, hidden, False), "down": (hidden, inter, False),
            "lm_head": (config["vocab_size"], hidden, False)}


def time_torch(bufs: autotune.GemmBuffers, dtype: str, reps: int = 10, min_launches: int = 6) -> float:
    """torch.nn.functional.linear (cuBLAS underneath) on the same buffers, replayed in a torch CUDA graph."""
    import torch
    import torch.nn.functional as F

    def tensor(a):
        t = torch.from_dlpack(a)
        return t.view(torch.bfloat16) if dtype == "bfloat16" else t

    weights = [tensor(w) for w in bufs.weights]
    x, bias = tensor(bufs.x), (tensor(bufs.bias) if bufs.bias is not None else None)
    launches = len(weights) * -(-min_launches // len(weights))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch's docs ask
        for i in range(2):
            F.linear(x, weights[i % len(weights)], bias)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            F.linear(x, weights[i % len(weights)], bias)
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1000.0 / launches


def figures(us: float, m: int, n: int, k: int, bias: bool) -> dict:
    moved = 2 * (n * k + m * k + m * n + (n if bias else 0))  # bytes read and written, once each
    return {"us": round(us, 2), "gbps": round(moved / us / 1e3, 1), "tflops": round(2 * m * n * k / us / 1e6, 2)}


def host_overhead(linear, dtype: str, card: str, calls: int = 2000) -> dict:
    """CPU microseconds per eager call (argument checks, plan lookup, ctypes); graphs replay without it."""
    store = cp.float16 if dtype == "float16" else cp.uint16
    x, w, b, out = cp.zeros((1, 64), store), cp.zeros((64, 64), store), cp.zeros(64, store), cp.empty((1, 64), store)
    linear(x, w, b, out)
    cp.cuda.get_current_stream().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        linear(x, w, b, out)
    us = (time.perf_counter() - start) / calls * 1e6
    cp.cuda.get_current_stream().synchronize()
    return {"bench": "linear_host_overhead", "shape": "m=1 n=64 k=64 +bias", "dtype": dtype, "us": round(us, 2),
            "card": card}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,16,64,128", help="token counts, comma-separated")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--json", default=None, help="append one JSON object per case to this file")
    ap.add_argument("--retune", action="store_true", help="tune even shapes already in the autotune cache")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    storage = np.float16 if args.dtype == "float16" else np.uint16
    card = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    card = card.decode() if isinstance(card, bytes) else str(card)
    config = json.loads(Path(args.config).read_text())
    shapes = projections(config)

    linear = Linear()
    records = linear.tune([(m, n, k, bias) for m in ms for n, k, bias in shapes.values()], storage, args.retune)
    lt, stream = linear.lt, cp.cuda.Stream(non_blocking=True)
    print(f"{card}, cuBLASLt {lt.version} ({lt.path}); tuning: "
          f"{sum(not r['cached'] for r in records.values())} shapes tuned, "
          f"{sum(r['cached'] for r in records.values())} from {linear.tuned.path}")
    print(f"{'proj':<8} {'m':>4} {'n':>6} {'k':>6} | {'tuned us':>9} {'GB/s':>6} {'TFLOP/s':>7} | "
          f"{'heur us':>8} {'GB/s':>6} | {'torch us':>8} {'GB/s':>6} | picked")
    rows, step = [], {}
    for m in ms:
        for name, (n, k, bias) in shapes.items():
            plan = linear.plan(PlanKey(args.dtype, m, n, k, bias, k, n))
            bufs = autotune.GemmBuffers(args.dtype, m, n, k, bias, seed=m)
            first = lt.heuristic(plan, linear.workspace_bytes, 1)[0].algo
            times = {"gemm_tuned": autotune.time_algo(lt, plan, plan.algo, bufs, linear.workspace, stream),
                     "gemm_heuristic": autotune.time_algo(lt, plan, first, bufs, linear.workspace, stream)}
            if not args.no_torch:
                times["gemm_torch"] = time_torch(bufs, args.dtype)
            rec = records[autotune.tune_key(args.dtype, m, n, k, bias)]
            shape = f"{name} m={m} n={n} k={k}{' +bias' if bias else ''}"
            for bench, us in times.items():
                layers = 1 if name == "lm_head" else config["num_hidden_layers"]
                step[m, bench] = step.get((m, bench), 0.0) + layers * us
                rows.append({"bench": bench, "shape": shape, "dtype": args.dtype, **figures(us, m, n, k, bias),
                             "ceiling": COPY_GBPS, "ceiling_tflops": MATMUL_TFLOPS, "card": card,
                             "cublaslt": lt.version, "candidates": rec["candidates"], "picked": rec["index"]})
            f = {b: figures(us, m, n, k, bias) for b, us in times.items()}
            torch_cols = (f"{f['gemm_torch']['us']:>8.1f} {f['gemm_torch']['gbps']:>6.0f}" if "gemm_torch" in f
                          else f"{'-':>8} {'-':>6}")
            print(f"{name:<8} {m:>4} {n:>6} {k:>6} | {f['gemm_tuned']['us']:>9.1f} {f['gemm_tuned']['gbps']:>6.0f} "
                  f"{f['gemm_tuned']['tflops']:>7.1f} | {f['gemm_heuristic']['us']:>8.1f} "
                  f"{f['gemm_heuristic']['gbps']:>6.0f} | {torch_cols} | #{rec['index']} of {rec['candidates']}")
            del bufs
        print(f"  m={m}: GEMMs of one decode step ({config['num_hidden_layers']} layers + lm_head): "
              + ", ".join(f"{b[5:]} {us / 1e3:.2f} ms" for (mm, b), us in step.items() if mm == m))
    rows.append(host_overhead(linear, args.dtype, card))
    print(f"host time per eager linear() call (qkv, m=1, plan cached): {rows[-1]['us']:.1f} us")
    if args.json:
        with open(args.json, "a") as out:
            out.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
