"""Benchmark of paged attention: decode as GB/s of K/V bytes read (vs the 2.99 TB/s copy ceiling), prefill as TFLOP/s.

Decode is timed as CUDA-graph replays over rotating block tables that cover more than the 50 MB L2;
prefill by CUDA events around back-to-back launches. `--json PATH` appends one object per line.
"""
from __future__ import annotations

import argparse
import json

import cupy as cp
import numpy as np

from ops.cuda import attention as attn
from ops.metadata import AttentionMetadata

COPY_CEILING_GBPS = 2990.0
MATMUL_CEILING_TFLOPS = 750.0
L2_BYTES = 50 << 20
HEADS = {"qwen2.5-7b": (28, 4, 128), "llama-3-8b": (32, 8, 128)}


def time_us(fn, reps: int = 30, inner: int = 10) -> float:
    """Median over `reps` of the mean time of `inner` back-to-back calls, by CUDA events."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    start, stop, times = cp.cuda.Event(), cp.cuda.Event(), []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1000.0 / inner)
    return float(np.median(times))


def randn(shape):
    return cp.random.standard_normal(shape, dtype=cp.float32).astype(cp.float16)


def random_cache(num_blocks, hkv, d):
    shape = (num_blocks, hkv, 16, d)
    return randn(shape), randn(shape)


def bench_decode(model, batch, context, rng, max_seq_len=None):
    hq, hkv, d = HEADS[model]
    pages = -(-context // 16)
    kv_bytes = batch * context * hkv * d * 2 * 2  # K and V, fp16
    copies = max(1, -(-3 * L2_BYTES // kv_bytes))  # rotate block tables over >= 3x the L2
    k, v = random_cache(copies * batch * pages, hkv, d)
    ids = cp.asarray(rng.permutation(copies * batch * pages).astype(np.int32)).reshape(copies, batch, pages)
    qkv = randn((batch, (hq + 2 * hkv) * d))
    out = cp.empty((batch, hq * d), cp.float16)
    bound = max_seq_len or context
    attn.reserve_decode_workspace(batch, hq, hkv, d, bound)
    metas = [AttentionMetadata(cp.arange(batch + 1, dtype=cp.int32), cp.full(batch, context, cp.int32),
                               ids[c], None, max_query_len=1, max_seq_len=bound) for c in range(copies)]
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()  # the inputs were made on the legacy stream, which `stream` does not wait for
    with stream:
        for m in metas:
            attn.attention(qkv, k, v, m, d ** -0.5, out)
        stream.begin_capture()
        for m in metas:
            attn.attention(qkv, k, v, m, d ** -0.5, out)
        graph = stream.end_capture()
        us = time_us(lambda: graph.launch(stream), inner=max(1, 20 // copies)) / copies
    splits = attn.num_splits(batch, hkv, hq // hkv, bound)
    gbps = kv_bytes / us / 1e3
    name = f"{model} B{batch} ctx{context}" + (f" grid@{bound}" if max_seq_len else "")
    return dict(bench="decode_attention", shape=name, dtype="float16", us=round(us, 2), gbps=round(gbps, 1),
                ceiling=COPY_CEILING_GBPS, splits=splits, min_chunk=attn.MIN_CHUNK,
                warps=attn.DECODE_WARPS, stages=attn.DECODE_STAGES)


def bench_prefill(model, num_seqs, q_len, cached, rng):
    hq, hkv, d = HEADS[model]
    ctx = cached + q_len
    pages = -(-ctx // 16)
    k, v = random_cache(num_seqs * pages, hkv, d)
    tables = cp.asarray(rng.permutation(num_seqs * pages).astype(np.int32)).reshape(num_seqs, pages)
    rows = num_seqs * q_len
    qkv = randn((rows, (hq + 2 * hkv) * d))
    out = cp.empty((rows, hq * d), cp.float16)
    meta = AttentionMetadata(cp.arange(0, rows + 1, q_len, dtype=cp.int32), cp.full(num_seqs, ctx, cp.int32),
                             tables, None, max_query_len=q_len, max_seq_len=ctx)
    us = time_us(lambda: attn.attention(qkv, k, v, meta, d ** -0.5, out), reps=20, inner=5)
    keys_seen = sum(cached + i + 1 for i in range(q_len)) * num_seqs  # causal (query, key) pairs
    flops = 4.0 * keys_seen * hq * d
    tflops = flops / us / 1e6
    name = f"{model} {num_seqs}x{q_len}" + (f" after {cached} cached" if cached else "")
    return dict(bench="prefill_attention", shape=name, dtype="float16", us=round(us, 1), tflops=round(tflops, 1),
                ceiling=MATMUL_CEILING_TFLOPS,
                config=f"mt{attn.PREFILL_MT} bn{attn.PREFILL_KEYS} st{attn.PREFILL_STAGES}")


def bench_torch_sdpa(model, num_seqs, q_len):
    """Yardstick only: torch's causal SDPA on contiguous (not paged) tensors of the same shape."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    hq, hkv, d = HEADS[model]
    q = torch.randn(num_seqs, hq, q_len, d, device="cuda", dtype=torch.float16)
    k = torch.randn(num_seqs, hkv, q_len, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        for _ in range(5):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000.0 / 5)
    us = float(np.median(times))
    flops = 4.0 * num_seqs * q_len * (q_len + 1) / 2 * hq * d
    return dict(bench="prefill_attention_torch_sdpa", shape=f"{model} {num_seqs}x{q_len} (contiguous, yardstick)",
                dtype="float16", us=round(us, 1), tflops=round(flops / us / 1e6, 1), ceiling=MATMUL_CEILING_TFLOPS)


class _Results(list):
    """Prints each row of the table as it arrives (a crash still leaves the rows before it)."""

    def append(self, r) -> None:
        if r is None:
            return
        if not self:
            print(f"{'bench':<30} {'shape':<44} {'us':>9} {'figure':>14} {'of ceiling':>10}", flush=True)
        if "gbps" in r:
            fig, frac = f"{r['gbps']:.0f} GB/s", r["gbps"] / r["ceiling"]
            extra = f"  splits {r['splits']} chunk>={r['min_chunk']} warps {r['warps']} stages {r['stages']}"
        else:
            fig, frac = f"{r['tflops']:.1f} TFLOP/s", r["tflops"] / r["ceiling"]
            extra = f"  {r.get('config', '')}"
        print(f"{r['bench']:<30} {r['shape']:<44} {r['us']:>9.2f} {fig:>14} {frac:>9.0%}{extra}", flush=True)
        super().append(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="append one JSON object per result to this file")
    parser.add_argument("--sweep", action="store_true", help="also try other split policies for decode")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch SDPA yardstick")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cp.random.seed(0)
    results = _Results()
    for model in HEADS:
        for batch, context in ((64, 1024), (1, 4096), (128, 512), (16, 2048)):
            results.append(bench_decode(model, batch, context, rng))
    results.append(bench_decode("qwen2.5-7b", 1, 4096, rng, max_seq_len=32768))
    results.append(bench_decode("qwen2.5-7b", 64, 1024, rng, max_seq_len=32768))
    if args.sweep:  # other compiled shapes of the prefill kernel, then one other decode split policy
        default = (attn.PREFILL_MT, attn.PREFILL_KEYS, attn.PREFILL_STAGES)
        for attn.PREFILL_MT, attn.PREFILL_KEYS, attn.PREFILL_STAGES in ((1, 64, 3), (2, 32, 3), (1, 32, 3)):
            for cached in (0, 3072):
                results.append(dict(bench_prefill("qwen2.5-7b", 4, 1024, cached, rng),
                                    config=f"mt{attn.PREFILL_MT} bn{attn.PREFILL_KEYS} st{attn.PREFILL_STAGES}"))
        attn.PREFILL_MT, attn.PREFILL_KEYS, attn.PREFILL_STAGES = default
        attn.MIN_CHUNK = 256
        for batch, context in ((1, 4096), (16, 2048)):
            results.append(bench_decode("qwen2.5-7b", batch, context, rng))
        attn.MIN_CHUNK = 128
    for model in HEADS:
        results.append(bench_prefill(model, 4, 1024, 0, rng))
    results.append(bench_prefill("qwen2.5-7b", 4, 1024, 3072, rng))
    results.append(bench_prefill("qwen2.5-7b", 1, 4096, 0, rng))
    if not args.no_torch:
        results.append(bench_torch_sdpa("qwen2.5-7b", 4, 1024))
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
