"""FP8 weights at decode batch sizes: the W8A16 GEMV (ops/cuda/gemv.py) against the engine's cuBLASLt FP8 path
(per-token quantizer + FP8 GEMM, float32 out and a scale kernel where cuBLASLt cannot scale) and fp16 cuBLASLt,
at the Qwen2.5-7B projections, T = 1, 2, 4, 8. Each is checked against numpy on the same codes first, then timed
as CUDA-graph replays with the weights rotating past L2. `GB/s`: weight bytes over the GEMV's time."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import cupy as cp
import numpy as np

from ops import jit_ops, quant
from ops.cuda import to_float32
from ops.cuda.gemv import ROWS, gemv_fp8
from ops.cuda.linear import Linear

from cuda_timing import time_graph
from gpu_gemm import CONFIG, projections

L2_FLUSH = 100e6


def fp8_weight(w) -> quant.Fp8Weight:
    codes, scale = cp.empty(w.shape, cp.uint8), cp.empty((w.shape[0], 1), cp.float32)
    jit_ops.quantize_fp8(w, codes, scale)
    return quant.Fp8Weight(codes, scale.reshape(-1))


def check(x, wq, bias, out) -> float:
    """Max error of the GEMV against float64 numpy on the same codes, in units of the output's rms."""
    want = to_float32(x).astype(np.float64) @ quant.dequantize_rows(cp.asnumpy(wq.codes), cp.asnumpy(wq.scale)).T
    if bias is not None:
        want += to_float32(bias)
    got = to_float32(out)
    err = np.abs(got - want) / np.sqrt(np.mean(want ** 2))
    bound = 2.0 ** -10 * (1 + np.abs(want) / np.sqrt(np.mean(want ** 2)))  # one fp16 rounding, fp32 sums
    assert (err <= 4 * bound).all(), f"GEMV off by {err.max():.2e} rms"
    return float(err.max())


def bench_projection(name: str, n: int, k: int, has_bias: bool, tokens, card: str, stream, linear) -> list[dict]:
    """One projection's rows at each T; its weight copies are locals, freed when this returns."""
    rows_out = []
    copies = max(1, math.ceil(L2_FLUSH / (n * k)))
    w16 = [(cp.random.standard_normal((n, k), dtype=cp.float32) * 0.02).astype(cp.float16) for _ in range(copies)]
    wq = [fp8_weight(w) for w in w16]
    bias = (cp.random.standard_normal(n, dtype=cp.float32) * 0.1).astype(cp.float16) if has_bias else None
    for t in tokens:
        x = cp.random.standard_normal((t, k), dtype=cp.float32).astype(cp.float16)
        out = cp.empty((t, n), cp.float16)
        xq = quant.activation(cp, t, k)
        cp.cuda.Device().synchronize()
        gemv_fp8(x, wq[0], bias, out)
        err = check(x, wq[0], bias, out)
        with stream:
            times = {r: time_graph([lambda i=i, r=r: gemv_fp8(x, wq[i], bias, out, r) for i in range(copies)],
                                   stream, 20) for r in ROWS}
            best = min(times, key=times.get)

            def fp8_path(i):
                jit_ops.quantize_fp8(x, xq.codes, xq.scale)
                linear(xq, wq[i], bias, out)
            for i in range(copies):
                fp8_path(i)  # plans the shape before capture
                linear(x, w16[i], bias, out)
            us_fp8 = time_graph([lambda i=i: fp8_path(i) for i in range(copies)], stream, 20)
            us_16 = time_graph([lambda i=i: linear(x, w16[i], bias, out) for i in range(copies)], stream, 20)
        gbps = n * k / (times[best] * 1e-6) / 1e9
        print(f"{name:8s} {t:2d} {times[best]:8.2f} {best:4d} {gbps:6.0f} {us_fp8:12.2f} {us_16:8.2f}  {err:.1e}")
        rows_out.append(dict(bench="gemv_fp8", card=card, proj=name, n=n, k=k, tokens=t, us_gemv=round(times[best], 2),
                             rows_per_warp=best, gemv_gbps=round(gbps), us_fp8_cublaslt=round(us_fp8, 2),
                             us_fp16=round(us_16, 2), err_rms=err,
                             us_by_rows={str(r): round(v, 2) for r, v in times.items()}))
    return rows_out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", default="1,2,4,8")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = json.loads(CONFIG.read_text())
    card = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    stream = cp.cuda.Stream(non_blocking=True)
    linear = Linear()
    rows_out = []
    print(f"{card}: us per launch (graph replays, weights past L2)")
    print(f"{'proj':8s} {'T':>2s} {'gemv':>8s} {'rows':>4s} {'GB/s':>6s} {'fp8 cublasLt':>12s} {'fp16':>8s}  err/rms")
    tokens = [int(v) for v in args.tokens.split(",")]
    for name, (n, k, has_bias) in projections(cfg).items():
        if name == "lm_head":
            continue
        rows_out += bench_projection(name, n, k, has_bias, tokens, card, stream, linear)
        cp.get_default_memory_pool().free_all_blocks()  # the projection's weights, before the next one's
    if args.json:
        with open(args.json, "a") as f:
            for r in rows_out:
                f.write(json.dumps(dict(r, date=time.strftime("%Y-%m-%d"),
                                        command="python perf/gpu_gemv_fp8.py")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
