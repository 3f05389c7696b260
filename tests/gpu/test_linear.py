"""The cuBLASLt linear op against numpy (float64 on the same rounded inputs) at the projection shapes of
Qwen2.5-7B and Llama-3-8B, inside a CUDA graph, with odd strides and alignment, and with autotuning."""
from __future__ import annotations

import ctypes
import json

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from ops import autotune, cublaslt
from ops.cuda.linear import Linear

MODELS = {  # hidden, query heads, kv heads, head dim, intermediate, vocab, qkv bias
    "qwen2.5-7b": (3584, 28, 4, 128, 18944, 152064, True),
    "llama-3-8b": (4096, 32, 8, 128, 14336, 128256, False),
}
PROJECTIONS = ("qkv", "o_proj", "gate_up", "down", "lm_head")
M_VALUES = (1, 16, 64, 128, 1000)
# The only rounding after fp32 accumulation is the final one to the output dtype (half an ulp, 2^-11 for fp16,
# 2^-8 for bf16); the bound allows twice that, relative to |out| + |bias| in case the bias is added after a
# rounding, plus 2^-14 of the output's rms for fp32 accumulation-order differences near zero.
RTOL = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
STORAGE = {"float16": cp.float16, "bfloat16": cp.uint16}
COLUMNS_CHECKED = 1024  # output columns compared with numpy (all columns are checked for being written)


def projection(model: str, name: str) -> tuple[int, int, bool]:
    """(N, K, bias) of one projection; gate and up are merged at load, as are q, k and v."""
    hidden, hq, hkv, d, inter, vocab, qkv_bias = MODELS[model]
    return {"qkv": ((hq + 2 * hkv) * d, hidden, qkv_bias), "o_proj": (hidden, hq * d, False),
            "gate_up": (2 * inter, hidden, False), "down": (hidden, inter, False),
            "lm_head": (vocab, hidden, False)}[name]


def to_storage(a32, dtype: str):
    """float32 device array -> fp16, or bf16 bits rounded to nearest even."""
    if dtype == "float16":
        return a32.astype(cp.float16)
    bits = a32.view(cp.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)


def to_float64(a) -> np.ndarray:
    host = cp.asnumpy(a)
    if host.dtype == np.uint16:
        return (host.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return host.astype(np.float64)


def poisoned(shape, dtype: str):
    out = cp.empty(shape, STORAGE[dtype])
    out.view(cp.uint16).fill(0x7E00 if dtype == "float16" else 0x7FC0)  # quiet NaN in either format
    return out


def all_finite(out, dtype: str) -> bool:
    as32 = out.astype(cp.float32) if dtype == "float16" else (out.astype(cp.uint32) << 16).view(cp.float32)
    return bool(cp.isfinite(as32).all())


def random_inputs(rs, dtype: str, m: int, n: int, k: int, bias: bool):
    """x ~ U(-1, 1), W ~ N(0, 1/K) so outputs are O(1), bias ~ N(0, 0.5^2); already rounded to `dtype`."""
    x = to_storage(rs.uniform(-1, 1, (m, k), dtype=cp.float32), dtype)  # [M, K]
    w = to_storage(rs.standard_normal((n, k), dtype=cp.float32) * np.float32(k ** -0.5), dtype)  # [N, K]
    b = to_storage(rs.standard_normal((n,), dtype=cp.float32) * np.float32(0.5), dtype) if bias else None  # [N]
    return x, w, b


def check_close(out, x, w, b, dtype: str, rng, label: str) -> float:
    """Compare a random subset of output columns with numpy; returns max |error| / bound (must be <= 1)."""
    n = w.shape[0]
    assert all_finite(out, dtype), f"{label}: unwritten (NaN) or infinite outputs"
    cols = np.sort(rng.choice(n, min(n, COLUMNS_CHECKED), replace=False))
    cols_dev = cp.asarray(cols)
    bias = to_float64(b[cols_dev]) if b is not None else np.zeros(len(cols))
    ref = to_float64(x) @ to_float64(w[cols_dev]).T + bias  # [M, cols]
    got = to_float64(out[:, cols_dev])
    rms = float(np.sqrt(np.mean(ref ** 2)))
    bound = RTOL[dtype] * (np.abs(ref) + np.abs(bias)) + 2.0**-14 * rms
    ratio = float(np.max(np.abs(got - ref) / bound))
    assert ratio <= 1.0, f"{label}: max |error| is {ratio:.2f}x the bound"
    return ratio


@pytest.fixture(scope="module")
def linear():
    lin = Linear(use_autotune=False)  # the heuristic's first choice everywhere in the shape tests
    yield lin
    lin.close()


def test_library_and_version(linear):
    rs = cp.random.RandomState(0)
    x, w, b = random_inputs(rs, "float16", 2, 64, 64, True)
    linear(x, w, b, cp.empty((2, 64), cp.float16))
    print(f"cuBLASLt {linear.lt.version} from {linear.lt.path}")
    assert linear.lt.version >= 120000


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", PROJECTIONS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_projection_shapes(linear, rng, model, name, dtype):
    n, k, bias = projection(model, name)
    rs = cp.random.RandomState(int(rng.integers(2**31)))
    _, w, b = random_inputs(rs, dtype, 1, n, k, bias)
    worst = []
    for m in M_VALUES:
        x = random_inputs(rs, dtype, m, 1, k, False)[0]
        out = poisoned((m, n), dtype)
        linear(x, w, b, out)
        worst.append(check_close(out, x, w, b, dtype, rng, f"{model} {name} {dtype} m={m} n={n} k={k}"))
    print(f"{model} {name} {dtype} n={n} k={k} bias={bias}: max error/bound per m {dict(zip(M_VALUES, worst))}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_graph_replays_with_new_inputs(linear, rng, dtype, monkeypatch):
    """Two layers of one shape (one plan, two biases) in one graph; new inputs copied into the same buffers."""
    n, k, _ = projection("qwen2.5-7b", "qkv")
    m = 16
    rs = cp.random.RandomState(int(rng.integers(2**31)))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        layers = [random_inputs(rs, dtype, m, n, k, True) for _ in range(2)]
        x = layers[0][0].copy()  # the static input buffer
        outs = [poisoned((m, n), dtype) for _ in layers]
        for (_, w, b), out in zip(layers, outs):
            linear(x, w, b, out)  # eager first: builds the plan, loads the kernels
        stream.synchronize()
        plans = len(linear.plans)

        def refuse(*args):
            raise AssertionError("cuBLASLt queried during capture")
        monkeypatch.setattr(linear.lt, "heuristic", refuse)
        monkeypatch.setattr(linear.lt, "plan", refuse)
        stream.begin_capture()
        try:
            for (_, w, b), out in zip(layers, outs):
                linear(x, w, b, out)
        finally:
            graph = stream.end_capture()
        assert len(linear.plans) == plans
        for trial in range(2):
            x[...] = random_inputs(rs, dtype, m, 1, k, False)[0]
            for out in outs:
                out.view(cp.uint16).fill(0x7E00 if dtype == "float16" else 0x7FC0)
            graph.launch(stream)
            stream.synchronize()
            for (_, w, b), out in zip(layers, outs):
                check_close(out, x, w, b, dtype, rng, f"graph replay {trial} {dtype}")


def test_row_strides_and_weak_alignment(linear, rng):
    """x and out as column slices of wider buffers, then x at a 2-byte offset: other plans, same answers."""
    dtype, m, n, k = "float16", 64, 3584, 3584
    rs = cp.random.RandomState(int(rng.integers(2**31)))
    _, w, b = random_inputs(rs, dtype, 1, n, k, True)
    x_wide = random_inputs(rs, dtype, m, 1, k + 64, False)[0]  # [M, K+64], the first K columns used
    out_wide = poisoned((m, n + 128), dtype)
    linear(x_wide[:, :k], w, b, out_wide[:, :n])
    check_close(out_wide[:, :n], x_wide[:, :k], w, b, dtype, rng, "strided")
    assert not all_finite(out_wide[:, n:], dtype)  # the padding columns stay untouched
    flat = random_inputs(rs, dtype, 1, 1, m * k + 1, False)[0].reshape(-1)
    x_odd = flat[1:].reshape(m, k)  # 2-byte aligned
    out = poisoned((m, n), dtype)
    linear(x_odd, w, b, out)
    check_close(out, x_odd, w, b, dtype, rng, "2-byte aligned x")
    aligns = {key.align for key in linear.plans if (key.m, key.n, key.k) == (m, n, k)}
    assert 2 in aligns and 256 in aligns


def test_bad_arguments_are_refused(linear):
    x, w = cp.zeros((4, 64), cp.float16), cp.zeros((32, 64), cp.float16)
    with pytest.raises(TypeError, match="one dtype"):
        linear(x, w.astype(cp.float32), None, cp.empty((4, 32), cp.float16))
    with pytest.raises(ValueError, match="want \\[4, 32\\]"):
        linear(x, w, None, cp.empty((4, 31), cp.float16))
    with pytest.raises(ValueError, match="contiguous"):
        linear(x, cp.zeros((64, 32), cp.float16).T, None, cp.empty((4, 32), cp.float16))
    plan = linear.plan(cublaslt.PlanKey("float16", 4, 32, 64, False, 64, 32))
    with pytest.raises(cublaslt.CublasLtError, match=r"set 9999 failed: CUBLAS_STATUS_[A-Z_]+ \(\d+\)"):
        cublaslt._set(linear.lt.lib.cublasLtMatmulDescSetAttribute, plan.desc, 9999, ctypes.c_int32(0), "set 9999")


def test_autotune_persists_and_is_reused(tmp_path, rng, monkeypatch):
    shapes = [(16, 4608, 3584, True), (1, 3584, 3584, False)]
    first = Linear(cache_dir=tmp_path)
    records = first.tune(shapes, dtype=np.float16)
    records.update(first.tune([(64, 3584, 18944, False)], dtype="bfloat16"))
    for key, rec in records.items():
        print(f"{key}: tuned {rec['us']} us, heuristic's first {rec['heuristic_us']} us, "
              f"{rec['candidates']} candidates ({rec['failed']} failed), picked #{rec['index']}, {rec['tune_s']} s")
        assert not rec["cached"] and rec["us"] <= rec["heuristic_us"] and rec["candidates"] >= 1
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and str(first.lt.version) in files[0].name
    assert set(json.loads(files[0].read_text())["entries"]) == set(records)

    def refuse(*args, **kwargs):
        raise AssertionError("tuned again although the choice is on disk")
    monkeypatch.setattr(autotune, "tune_plan", refuse)
    monkeypatch.setattr(autotune, "time_algo", refuse)
    second = Linear(cache_dir=tmp_path)
    assert all(rec["cached"] for rec in second.tune(shapes, dtype=np.float16).values())
    rs = cp.random.RandomState(int(rng.integers(2**31)))
    for m, n, k, bias in shapes:
        x, w, b = random_inputs(rs, "float16", m, n, k, bias)
        out = poisoned((m, n), "float16")
        second(x, w, b, out)
        check_close(out, x, w, b, "float16", rng, f"tuned m={m} n={n} k={k}")
        key = cublaslt.PlanKey("float16", m, n, k, bias, k, n)
        assert second.plans[key].algo_source == "autotune"
        assert bytes(second.plans[key].algo) == bytes(first.plans[key].algo)


def test_rejected_cached_algorithm_falls_back_to_the_heuristic(tmp_path, rng, monkeypatch):
    m, n, k = 16, 3584, 3584
    tuned = Linear(cache_dir=tmp_path)
    tuned.tune([(m, n, k, False)])
    fresh = Linear(cache_dir=tmp_path)
    fresh._ensure()

    def reject(plan, algo):
        raise cublaslt.CublasLtError("cublasLtMatmulAlgoCheck", 15)
    monkeypatch.setattr(fresh.lt, "check_algo", reject)
    x, w, _ = random_inputs(cp.random.RandomState(int(rng.integers(2**31))), "float16", m, n, k, False)
    out = poisoned((m, n), "float16")
    with pytest.warns(UserWarning, match="CUBLAS_STATUS_NOT_SUPPORTED"):
        fresh(x, w, None, out)
    check_close(out, x, w, None, "float16", rng, "fallback")
    assert fresh.plans[cublaslt.PlanKey("float16", m, n, k, False, k, n)].algo_source == "heuristic"
