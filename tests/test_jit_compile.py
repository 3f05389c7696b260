"""The CUDA C the JIT generates for every model op compiles with nvcc for sm_90a and sm_80 without register spills
(skipped where nvcc is not installed), and the disk cache makes a second process compile nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ops import jit, jit_ops, reference

NVCC = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
ROOT = Path(__file__).resolve().parent.parent


def model_launches():
    """Every kernel one layer of each supported shape family runs, recorded on the interpreter (tiny row counts)."""
    launches = []
    for storage in (np.float16, np.uint16):  # fp16, and bf16 bits
        for h, inter, hq, hkv, d in ((3584, 18944, 28, 4, 128), (4096, 14336, 32, 8, 128), (896, 4864, 14, 2, 64),
                                     (2560, 9728, 32, 8, 80), (3072, 8192, 24, 8, 96), (2048, 8192, 8, 1, 256)):
            with jit.record() as log:
                x = np.zeros((2, h), storage)
                jit_ops.rms_norm(x, np.zeros(h, storage), 1e-6, x.copy())
                jit_ops.add_rms_norm(x, x.copy(), np.zeros(h, storage), 1e-6, x.copy())
                codes, scale = np.zeros((2, h), np.uint8), np.zeros((2, 1), np.float32)
                jit_ops.rms_norm_fp8(x, np.zeros(h, storage), 1e-6, codes, scale)
                jit_ops.add_rms_norm_fp8(x, x.copy(), np.zeros(h, storage), 1e-6, codes, scale)
                jit_ops.quantize_fp8(x, codes, scale)
                jit_ops.silu_and_mul_fp8(np.zeros((2, 2 * inter), storage), np.zeros((2, inter), np.uint8), scale)
                jit_ops.silu_and_mul(np.zeros((2, 2 * inter), storage), np.zeros((2, inter), storage))
                jit_ops.embedding(np.zeros(2, np.int32), np.zeros((4, h), storage), x.copy())
                for norm in (None, np.zeros(d, storage)):
                    cache = np.zeros((2, hkv, 16, d), storage)
                    jit_ops.rope_and_cache(np.zeros((2, (hq + 2 * hkv) * d), storage), np.zeros(2, np.int32),
                                           np.zeros(2, np.int32), cache, cache.copy(),
                                           reference.rope_cos_sin(d, 4, 1e4), norm, norm)
                    fp8 = np.zeros((2, hkv, 16, d), np.uint8)
                    jit_ops.rope_and_cache(np.zeros((2, (hq + 2 * hkv) * d), storage), np.zeros(2, np.int32),
                                           np.zeros(2, np.int32), fp8, fp8.copy(), reference.rope_cos_sin(d, 4, 1e4),
                                           norm, norm, kv_scale=np.ones((2, hkv), np.float32))
            launches += log
    unique = {launch.source(): launch for launch in launches}
    return list(unique.values())


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_generated_kernels_compile_without_spills(arch, tmp_path):
    launches = model_launches()
    assert len(launches) >= 20
    for i, launch in enumerate(launches):
        path = tmp_path / f"{launch.ir.name}_{i}.cu"
        path.write_text(launch.source())
        proc = subprocess.run([NVCC, f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-cubin", "-o", "/dev/null",
                               str(path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{path.name}:\n{proc.stderr[-3000:]}"
        assert " 0 bytes spill stores" in proc.stderr, f"{path.name} spills on {arch}:\n{proc.stderr}"


def test_generated_source_is_self_contained():
    """No #include: NVRTC needs no include path (pip-only CUDA installs have no headers)."""
    for launch in model_launches()[:4]:
        assert "#include" not in launch.source()
        assert 'extern "C" __global__' in launch.source()


_CHILD = textwrap.dedent("""
    import json, shutil, subprocess, sys
    import numpy as np
    from ops import jit, jit_ops
    from ops.jit.cache import KernelCache

    def nvcc(source, name, arch, options):
        src = sys.argv[1] + "/" + name + ".cu"
        open(src, "w").write(source)
        subprocess.run([shutil.which("nvcc"), "-arch=sm_80", "-cubin", "-o", src + ".cubin", src], check=True)
        return open(src + ".cubin", "rb").read()

    def text(source, name, arch, options):  # where there is no nvcc: the cache's bookkeeping alone
        return source.encode()

    cache = KernelCache(sys.argv[2], nvcc if shutil.which("nvcc") else text)
    with jit.record() as log:
        x = np.zeros((3, 896), np.float16)
        jit_ops.add_rms_norm(x, x.copy(), np.zeros(896, np.float16), 1e-6, x.copy())
        jit_ops.silu_and_mul(np.zeros((3, 2000), np.float16), np.zeros((3, 1000), np.float16))
    binaries = [cache.get(l.source(), l.ir.name, "sm_80", ("-std=c++17",)) for l in log]
    print(json.dumps({"hits": cache.hits, "misses": cache.misses, "sizes": [len(b) for b in binaries]}))
""")


def test_second_process_hits_the_disk_cache(tmp_path):
    import json
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(tmp_path / "cache")],
                              capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"hits": 0, "misses": 2, "sizes": runs[0]["sizes"]}
    assert runs[1] == {"hits": 2, "misses": 0, "sizes": runs[0]["sizes"]}  # same binaries, nothing compiled
    from ops.jit.cache import KernelCache
    entries = KernelCache(tmp_path / "cache").entries()
    assert sorted(e["name"] for e in entries) == ["add_rms_norm", "silu_and_mul"]
    assert all(e["complete"] for e in entries)
    assert KernelCache(tmp_path / "cache").clear() == 2 and not KernelCache(tmp_path / "cache").entries()
