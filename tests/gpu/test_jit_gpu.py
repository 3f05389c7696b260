"""Every generated kernel on the GPU against the interpreter running the same definition on the same stored
inputs (ops/jit_ops.py at the shapes of the supported model families, fp16 and bf16, ragged edges, padding
slots); and a second process on the GPU compiles nothing (NVRTC cubins from the disk cache).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from ops import jit_ops, reference
from ops.jit import dtypes

STORAGE = {"float16": np.float16, "bfloat16": np.uint16}
SHAPES = {  # H, I, Hq, Hkv, D
    "qwen2.5-7b": (3584, 18944, 28, 4, 128), "llama-3-8b": (4096, 14336, 32, 8, 128),
    "qwen2.5-0.5b": (896, 4864, 14, 2, 64), "d80": (2560, 1000, 32, 8, 80), "d96": (3072, 3000, 24, 8, 96),
    "d256-mqa": (2048, 8192, 8, 1, 256),
}
TOKENS = (1, 5, 130)


def stored(rng, shape, dtype):
    values = rng.standard_normal(shape).astype(np.float32)
    return dtypes.from_float32(values, dtypes.get(dtype))


def both(host_arrays, fn):
    """Run fn on numpy copies (the interpreter) and on device copies (generated CUDA); return both results."""
    cpu = [a.copy() for a in host_arrays]
    gpu = [cp.asarray(a) for a in host_arrays]
    fn(*cpu)
    fn(*gpu)
    cp.cuda.get_current_stream().synchronize()
    return cpu, [cp.asnumpy(a) for a in gpu]


def assert_match(cpu, gpu, dtype, what, ulps=1):
    """Equal but for `ulps` units in the last place of the storage dtype (rsqrtf/expf are not numpy's)."""
    a = dtypes.to_float32(cpu, dtypes.get(dtype))
    b = dtypes.to_float32(gpu, dtypes.get(dtype))
    assert np.array_equal(np.isnan(a), np.isnan(b)), what + ": NaNs differ"
    ulp = np.float32(2.0 ** (-10 if dtype == "float16" else -7)) * np.maximum(np.abs(a), np.float32(2.0 ** -14))
    bad = ~(np.abs(a - b) <= ulps * ulp) & ~np.isnan(a)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} elements differ, max {np.abs(a - b)[bad].max()}"


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("model", list(SHAPES))
def test_generated_kernels_equal_the_interpreter(model, dtype):
    h, inter, hq, hkv, d = SHAPES[model]
    rng = np.random.default_rng(hash(model) % 2**32)
    for t in TOKENS:
        x, res, w = stored(rng, (t, h), dtype), stored(rng, (t, h), dtype), stored(rng, (h,), dtype)
        out = np.zeros((t, h), STORAGE[dtype])
        cpu, gpu = both([x, w, out], lambda x, w, o: jit_ops.rms_norm(x, w, 1e-6, o))
        assert_match(cpu[2], gpu[2], dtype, f"rms_norm T={t}")
        cpu, gpu = both([x, res, w, out], lambda x, r, w, o: jit_ops.add_rms_norm(x, r, w, 1e-6, o))
        assert_match(cpu[1], gpu[1], dtype, f"add_rms_norm residual T={t}", ulps=0)
        assert_match(cpu[3], gpu[3], dtype, f"add_rms_norm out T={t}")
        gu = stored(rng, (t, 2 * inter), dtype)
        for config in jit_ops.SILU_CONFIGS:
            cpu, gpu = both([gu, np.zeros((t, inter), STORAGE[dtype])],
                            lambda x, o: jit_ops._silu_launch.__wrapped__(x, o, **config))
            assert_match(cpu[1], gpu[1], dtype, f"silu_and_mul T={t} {config}")
        table = stored(rng, (1000, h), dtype)
        ids = rng.integers(-3, 1003, t).astype(np.int32)
        cpu, gpu = both([ids, table, out], jit_ops.embedding)
        assert_match(cpu[2], gpu[2], dtype, f"embedding T={t}", ulps=0)
        nb = -(-t // 16) + 2
        slots = rng.permutation(nb * 16)[:t].astype(np.int32)
        slots[:: 3] = -1
        positions = rng.integers(0, 4096, t).astype(np.int32)
        cos_sin = reference.rope_cos_sin(d, 4096, 1e6)
        for norm in (False, True):
            qn, kn = (stored(rng, (d,), dtype) for _ in range(2)) if norm else (None, None)
            qkv = stored(rng, (t, (hq + 2 * hkv) * d), dtype)
            caches = [np.zeros((nb, hkv, 16, d), STORAGE[dtype]) for _ in range(2)]
            arrays = [qkv, positions, slots, *caches, cos_sin] + ([qn, kn] if norm else [])
            cpu, gpu = both(arrays, lambda *a: jit_ops.rope_and_cache(*a[:6], *(a[6:] or (None, None)), eps=1e-6))
            for i, what in ((0, "qkv"), (3, "k_cache"), (4, "v_cache")):
                assert_match(cpu[i], gpu[i], dtype, f"rope_cache norm={norm} T={t} {what}", ulps=1 + norm)


_CHILD = textwrap.dedent("""
    import json, time
    import cupy as cp, numpy as np
    from ops import jit, jit_ops
    t0 = time.perf_counter()
    x = cp.zeros((3, 3584), cp.float16)
    jit_ops.add_rms_norm(x, x.copy(), cp.zeros(3584, cp.float16), 1e-6, x.copy())
    jit_ops.rope_and_cache(cp.zeros((3, 36 * 128), cp.float16), cp.zeros(3, cp.int32), cp.zeros(3, cp.int32),
                           cp.zeros((2, 4, 16, 128), cp.float16), cp.zeros((2, 4, 16, 128), cp.float16),
                           cp.zeros((8, 128), cp.float32))
    cp.cuda.Device().synchronize()
    c = jit.kernel_cache()
    print(json.dumps({"hits": c.hits, "misses": c.misses, "compile_s": c.compile_seconds,
                      "total_s": time.perf_counter() - t0}))
""")


def test_second_process_compiles_nothing(tmp_path):
    env = {**os.environ, "CUPYLLM_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("first process", runs[0], "second", runs[1])
    assert runs[0]["misses"] == 2 and runs[0]["hits"] == 0
    assert runs[1]["misses"] == 0 and runs[1]["hits"] == 2
