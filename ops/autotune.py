"""Autotuning of cuBLASLt GEMM algorithms: time the heuristic's candidates on the GPU, keep the fastest, and
persist the choice as JSON per GPU and cuBLASLt version (CuPy is imported only by the timing functions)."""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ops.cublaslt import CublasLt, CublasLtError, MatmulAlgo, Plan

MAX_CANDIDATES = 32
L2_FLUSH_BYTES = 2 * 50 * 2**20  # weights rotated through at least twice the H100's 50 MB L2, as in the model


# Tables shipped with the package (files named as cache_file names them), so that a fresh machine with such a GPU and
# cuBLASLt starts without tuning: copied from a machine's cache after `cupyllm benchmark` (scripts/gpu_check.sh).
SHIPPED_DIR = Path(__file__).parent / "tuned"


def cache_dir(env=None) -> Path:
    env = os.environ if env is None else env
    root = env.get("CUPYLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cupyllm")
    return Path(root) / "autotune"


def cache_file(directory: Path, gpu_name: str, version: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-") or "gpu"
    return Path(directory) / f"{slug}_cublaslt{version}.json"


def tune_key(dtype: str, m: int, n: int, k: int, bias: bool, scales: str = "") -> str:
    """x, W, bias and out share `dtype`; accumulation and scale are fp32. An FP8 plan (`scales`, see
    cublaslt.FP8_SCALES) multiplies E4M3 x and W into `dtype`."""
    operand = dtype if not scales else "e4m3"
    return (f"{operand}*{operand}->{dtype} acc=float32 m={m} n={n} k={k} bias={int(bool(bias))}"
            + (f" scales={scales}" if scales else ""))


def encode_algo(algo: MatmulAlgo) -> str:
    return bytes(algo).hex()


def decode_algo(text: str) -> MatmulAlgo:
    raw = bytes.fromhex(text)
    if len(raw) != ctypes.sizeof(MatmulAlgo):
        raise ValueError(f"a cublasLtMatmulAlgo_t is {ctypes.sizeof(MatmulAlgo)} bytes, got {len(raw)}")
    return MatmulAlgo.from_buffer_copy(raw)


class AutotuneCache:
    """The tuned algorithms of one GPU model and cuBLASLt version, keyed by tune_key()."""

    def __init__(self, path: Path, gpu_name: str, version: int):
        self.path, self.gpu_name, self.version = Path(path), gpu_name, version
        self.entries: dict[str, dict] = self._read()

    @classmethod
    def for_device(cls, gpu_name: str, version: int, directory: Path | None = None) -> "AutotuneCache":
        return cls(cache_file(directory or cache_dir(), gpu_name, version), gpu_name, version)

    def _read(self) -> dict[str, dict]:
        """The package's table for this GPU and cuBLASLt version (SHIPPED_DIR, measured on such a GPU), overlaid
        by this machine's own measurements."""
        entries = {}
        for path in (SHIPPED_DIR / self.path.name, self.path):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):  # missing or half-written by a crashed run: tune again
                continue
            if data.get("gpu") == self.gpu_name and data.get("cublaslt_version") == self.version:
                entries.update(data.get("entries", {}))
        return entries

    def get(self, key: str) -> MatmulAlgo | None:
        entry = self.entries.get(key)
        try:
            return decode_algo(entry["algo"]) if entry else None
        except (KeyError, ValueError):
            return None

    def put(self, key: str, algo: MatmulAlgo, **stats) -> None:
        self.entries[key] = {"algo": encode_algo(algo), **stats}

    def save(self) -> None:
        """Merge with what another process may have written meanwhile, then replace the file atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(), **self.entries}
        data = {"gpu": self.gpu_name, "cublaslt_version": self.version, "entries": dict(sorted(merged.items()))}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)
        self.entries = merged


# -- timing on the GPU -----------------------------------------------------------------------------------
def random_fill(array, dtype: str, seed: int) -> None:
    """Fill a uint16-viewable device array with random values of magnitude 1/8..1/2, neither zero nor inf."""
    import cupy as cp
    bits = array.view(cp.uint16).reshape(-1)
    rs = cp.random.RandomState(seed)
    chunk = 1 << 26  # bounded temporaries even for a 1 GB lm_head
    exponent, mantissa = (0x3000, 0x07FF) if dtype == "float16" else (0x3E00, 0x00FF)
    for start in range(0, bits.size, chunk):
        part = bits[start:start + chunk]
        raw = rs.randint(0, 1 << 16, size=part.size, dtype=cp.int32).astype(cp.uint16)
        part[...] = (raw & (0x8000 | mantissa)) | exponent


def random_codes(array, seed: int) -> None:
    """Fill a uint8 device array with random E4M3 codes of magnitude 1/8..1/2 (never NaN)."""
    import cupy as cp
    raw = cp.random.RandomState(seed).randint(0, 256, size=array.size, dtype=cp.int32).astype(cp.uint8)
    array.reshape(-1)[...] = (raw & 0x87) | 0x28  # sign, 3 mantissa bits; exponent 5 or 6 (bias 7)


class GemmBuffers:
    """Random x, bias, out and enough weight copies to stream past L2, so timings see cold weights. An FP8 plan
    (`scales`) gets E4M3 codes for x and the weights, and float32 scale vectors beside them."""

    def __init__(self, dtype: str, m: int, n: int, k: int, bias: bool, seed: int = 0, scales: str = ""):
        import cupy as cp
        store = {"float16": cp.float16, "bfloat16": cp.uint16, "float32": cp.float32}[dtype]
        operand = cp.uint8 if scales else store
        copies = max(1, math.ceil(L2_FLUSH_BYTES / (n * k * np.dtype(operand).itemsize)))
        self.weights = [cp.empty((n, k), operand) for _ in range(copies)]  # each: [N, K]
        self.x = cp.empty((m, k), operand)  # [M, K]
        for i, a in enumerate(self.weights + [self.x]):
            random_codes(a, seed + i) if scales else random_fill(a, dtype, seed + i)
        self.bias = cp.empty((n,), store) if bias else None
        if bias:
            random_fill(self.bias, dtype, seed + copies + 1)
        self.out = cp.empty((m, n), store)  # [M, N]
        self.scale_ptrs = (0, 0)
        if scales == "outer":
            self.scales = (cp.full(n, 1 / 64, cp.float32), cp.full(m, 1 / 64, cp.float32))
            self.scale_ptrs = tuple(s.data.ptr for s in self.scales)
        cp.cuda.get_current_stream().synchronize()  # timing streams do not wait for the fills by themselves


def time_algo(lt: CublasLt, plan: Plan, algo: MatmulAlgo, bufs: GemmBuffers, workspace, stream,
              reps: int = 10, min_launches: int = 6) -> float:
    """Median microseconds of one matmul, from CUDA-graph replays of several launches (weights rotating).

    A graph takes Python's ~5 us per launch out of the timing, which would otherwise hide the difference
    between candidates at small m; the engine replays its GEMMs in graphs too.
    """
    import cupy as cp
    launches = len(bufs.weights) * math.ceil(min_launches / len(bufs.weights))
    bias_ptr = bufs.bias.data.ptr if bufs.bias is not None else 0

    def run(i):
        lt.matmul(plan, bufs.weights[i % len(bufs.weights)].data.ptr, bufs.x.data.ptr, bufs.out.data.ptr, bias_ptr,
                  workspace.data.ptr, workspace.nbytes, stream.ptr, algo, bufs.scale_ptrs)

    for i in range(2):  # eager first: loads the kernel's module, and a failing candidate fails here
        run(i)
    stream.synchronize()
    stream.begin_capture()
    try:
        for i in range(launches):
            run(i)
    finally:
        graph = stream.end_capture()
    graph.launch(stream)
    events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
    for start, end in events:
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
    stream.synchronize()
    return statistics.median(cp.cuda.get_elapsed_time(s, e) for s, e in events) * 1000.0 / launches


def tune_plan(lt: CublasLt, plan: Plan, workspace, candidates: int = MAX_CANDIDATES, margin: float = 0.01,
              bufs: GemmBuffers | None = None) -> tuple[MatmulAlgo, dict]:
    """The fastest of the heuristic's candidates and a record {us, heuristic_us, candidates, ...} to persist.

    The heuristic's first choice is kept unless another beats it by more than `margin`: timing noise
    should not swap algorithms.
    """
    import cupy as cp
    key = plan.key
    started = time.perf_counter()
    results = lt.heuristic(plan, workspace.nbytes, candidates)
    bufs = bufs or GemmBuffers(key.dtype, key.m, key.n, key.k, key.bias, scales=key.scales)
    stream = cp.cuda.Stream(non_blocking=True)
    timings: list[float | None] = []
    for result in results:
        try:
            timings.append(time_algo(lt, plan, result.algo, bufs, workspace, stream))
        except (CublasLtError, cp.cuda.runtime.CUDARuntimeError):
            timings.append(None)  # a candidate that cannot run this problem: skip it
    ok = [(t, i) for i, t in enumerate(timings) if t is not None]
    if not ok:
        raise RuntimeError(f"no cuBLASLt candidate ran for {tuple(key)}")
    best_us, best = min(ok)
    first_us = timings[0]
    if first_us is not None and best_us > first_us * (1.0 - margin):
        best_us, best = first_us, 0
    record = {"us": round(best_us, 3), "heuristic_us": None if first_us is None else round(first_us, 3),
              "index": best, "candidates": len(results), "failed": timings.count(None),
              "tune_s": round(time.perf_counter() - started, 3)}
    return MatmulAlgo.from_buffer_copy(bytes(results[best].algo)), record
