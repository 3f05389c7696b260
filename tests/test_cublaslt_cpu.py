"""The pure-Python half of the cuBLASLt binding, on the CPU: library search, enums, the row-major trick,
plan keys, the descriptor calls (against a fake library) and the autotune cache file."""
from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from ops import autotune, cublaslt
from ops.cublaslt import CublasLt, CublasLtError, Layout, MatmulAlgo, PlanKey, row_major_gemm


@pytest.fixture(autouse=True)
def _no_shipped_tables(monkeypatch, tmp_path_factory):
    """The caches here start empty: the package's shipped tables (ops/tuned) stay out of these tests."""
    monkeypatch.setattr(autotune, "SHIPPED_DIR", tmp_path_factory.mktemp("no-shipped"))


# -- library search ---------------------------------------------------------------------------------------
def touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


class Loader:
    """Stands in for ctypes.CDLL: records what was tried, loads only `accept`."""

    def __init__(self, accept=()):
        self.accept, self.tried = set(accept), []

    def __call__(self, target):
        self.tried.append(target)
        if target not in self.accept:
            raise OSError(f"cannot open {target}")
        return f"lib:{target}"


@pytest.fixture
def tree(tmp_path):
    """Two site-packages (one per wheel) and a toolkit, each with its libcublasLt."""
    site12, site13, cuda = tmp_path / "site12", tmp_path / "site13", tmp_path / "cuda-13.0"
    return {
        "dirs": [str(site12), str(site13)],
        "cu12": touch(site12 / "nvidia/cublas/lib/libcublasLt.so.12"),
        "cu13": touch(site13 / "nvidia/cu13/lib/libcublasLt.so.13"),
        "toolkit": touch(cuda / "lib64/libcublasLt.so.13"),
        "env": {"CUDA_HOME": str(cuda)},
    }


def test_cuda13_wheel_first_without_cupy_preference(tree):
    loader = Loader(accept={tree["cu12"], tree["cu13"], tree["toolkit"]})
    lib, path = cublaslt.find_library(tree["env"], tree["dirs"], prefer=0, loader=loader)
    assert path == tree["cu13"] and lib == f"lib:{tree['cu13']}"


def test_cupy_cuda12_prefers_the_cu12_wheel(tree):
    loader = Loader(accept={tree["cu12"], tree["cu13"], tree["toolkit"]})
    assert cublaslt.find_library(tree["env"], tree["dirs"], prefer=12, loader=loader)[1] == tree["cu12"]


def test_toolkit_after_wheels_then_loader_path(tree):
    loader = Loader(accept={tree["toolkit"], "libcublasLt.so.12"})
    assert cublaslt.find_library(tree["env"], tree["dirs"], prefer=0, loader=loader)[1] == tree["toolkit"]
    assert loader.tried == [tree["cu13"], tree["cu12"], tree["toolkit"]]  # missing files are never dlopened
    loader = Loader(accept={"libcublasLt.so.12"})
    assert cublaslt.find_library({}, [], prefer=0, loader=loader)[1] == "libcublasLt.so.12"
    assert loader.tried[-2:] == ["libcublasLt.so.13", "libcublasLt.so.12"]


def test_other_cuda13_wheel_layouts_and_override(tmp_path, tree):
    alt = touch(tmp_path / "alt/nvidia/cublas/lib/libcublasLt.so.13")
    assert cublaslt.find_library({}, [str(tmp_path / "alt")], 0, Loader({alt}))[1] == alt
    lib64 = touch(tmp_path / "alt64/nvidia/cu13/lib64/libcublasLt.so.13")
    assert cublaslt.find_library({}, [str(tmp_path / "alt64")], 0, Loader({lib64}))[1] == lib64
    own = touch(tmp_path / "mine/libcublasLt.so")
    env = {**tree["env"], "CUPYLLM_CUBLASLT": own}
    assert cublaslt.find_library(env, tree["dirs"], 0, Loader({own, tree["cu13"]}))[1] == own


def test_not_found_error_lists_every_place(tmp_path, tree):
    with pytest.raises(OSError) as err:
        cublaslt.find_library({"CUDA_HOME": str(tmp_path / "nowhere")}, tree["dirs"], 0, Loader())
    text = str(err.value)
    assert "pip install nvidia-cublas" in text and "nvidia-cublas-cu12" in text and "CUDA_HOME" in text
    for cand in cublaslt.candidates({"CUDA_HOME": str(tmp_path / "nowhere")}, tree["dirs"], 0):
        assert cand.target in text
    for expected in (tree["cu12"] + " (nvidia-cublas-cu12 wheel): cannot open",
                     str(tmp_path / "nowhere/lib64/libcublasLt.so.13") + " (CUDA_HOME): no such file",
                     "/usr/local/cuda/lib64/libcublasLt.so.13", "libcublasLt.so (dynamic loader path)"):
        assert expected in text


def test_default_search_covers_sys_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    targets = [c.target for c in cublaslt.candidates({}, None, None)]
    assert str(tmp_path / "nvidia/cu13/lib/libcublasLt.so.13") in targets
    assert str(tmp_path / "nvidia/cublas/lib/libcublasLt.so.12") in targets
    assert len(targets) == len(set(targets))


# -- enums -------------------------------------------------------------------------------------------------
GPU_MD_VALUES = {  # ../shared/GPU.md, read on the H100 machine's CUDA 13 headers
    "CUBLASLT_MATMUL_DESC_COMPUTE_TYPE": 0, "CUBLASLT_MATMUL_DESC_SCALE_TYPE": 1, "CUBLASLT_MATMUL_DESC_TRANSA": 3,
    "CUBLASLT_MATMUL_DESC_TRANSB": 4, "CUBLASLT_MATMUL_DESC_EPILOGUE": 7, "CUBLASLT_MATMUL_DESC_BIAS_POINTER": 8,
    "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE": 26, "CUBLASLT_ORDER_COL": 0, "CUBLASLT_EPILOGUE_DEFAULT": 1,
    "CUBLASLT_EPILOGUE_BIAS": 4, "CUBLASLT_MATMUL_PREF_SEARCH_MODE": 0, "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES": 1,
    "CUDA_R_32F": 0, "CUDA_R_16F": 2, "CUDA_R_16BF": 14, "CUBLAS_COMPUTE_32F": 68,
}


def test_enum_values_match_gpu_md():
    values = cublaslt.enum_values()
    assert {k: values[k] for k in GPU_MD_VALUES} == GPU_MD_VALUES
    assert (values["CUBLAS_OP_N"], values["CUBLAS_OP_T"]) == (0, 1)
    assert cublaslt.DATA_TYPES == {"float16": 2, "bfloat16": 14, "float32": 0}


def _header_values() -> dict[str, int]:
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    found = {}
    for root in filter(None, roots):
        for name in ("cublasLt.h", "cublas_api.h", "library_types.h"):
            path = Path(root, "include", name)
            if path.is_file():
                for sym, val in re.findall(r"\b((?:CUBLAS|CUDA_R_)\w*)\s*=\s*(0x[0-9a-fA-F]+|\d+)\b", path.read_text()):
                    found.setdefault(sym, int(val, 0))
    return found


def test_enum_values_match_installed_headers():
    header = _header_values()
    if "CUBLASLT_MATMUL_DESC_TRANSA" not in header:
        pytest.skip("no CUDA headers with cublasLt.h here")
    ours = {**cublaslt.enum_values(), **{name: code for code, name in cublaslt.STATUS_NAMES.items()}}
    assert {k: header.get(k) for k in ours} == ours


def test_struct_sizes():
    assert ctypes.sizeof(MatmulAlgo) == 64
    assert ctypes.sizeof(cublaslt.HeuristicResult) == 96  # algo first, as the header lays it out


def test_errors_name_the_status():
    err = CublasLtError("cublasLtMatmul", 15)
    assert err.name == "CUBLAS_STATUS_NOT_SUPPORTED" and "CUBLAS_STATUS_NOT_SUPPORTED" in str(err)
    with pytest.raises(CublasLtError, match="cublasLtCreate failed: CUBLAS_STATUS_NOT_INITIALIZED"):
        cublaslt.check(1, "cublasLtCreate")
    assert CublasLtError("f", 99).name == "CUBLAS_STATUS_UNKNOWN_99"
    cublaslt.check(0, "fine")


# -- the row-major trick, checked by running column-major GEMM semantics in numpy -----------------------------
def colmajor(buf: np.ndarray, layout: Layout) -> np.ndarray:
    """The [rows, cols] column-major matrix with leading dimension ld that cuBLASLt reads from a flat buffer."""
    return np.lib.stride_tricks.as_strided(buf, (layout.rows, layout.cols), (buf.itemsize, layout.ld * buf.itemsize))


def emulate(shape, w_flat, x_flat, out_flat, bias):
    op = {cublaslt.CUBLAS_OP_N: lambda a: a, cublaslt.CUBLAS_OP_T: lambda a: a.T}
    a, b = op[shape.transa](colmajor(w_flat, shape.a)), op[shape.transb](colmajor(x_flat, shape.b))
    d = colmajor(out_flat, shape.d)
    assert a.shape[1] == b.shape[0] and d.shape == (a.shape[0], b.shape[1])
    d[...] = a @ b + (bias[:, None] if bias is not None else 0)  # BIAS epilogue: one value per row of D


@pytest.mark.parametrize("m,n,k,ldx,ldout", [(1, 8, 4, None, None), (5, 12, 7, None, None), (3, 6, 4, 9, 10)])
def test_row_major_layouts_compute_x_times_w_transposed(rng, m, n, k, ldx, ldout):
    shape = row_major_gemm(m, n, k, ldx, ldout)
    ldx, ldout = ldx or k, ldout or n
    x_rows = rng.standard_normal((m, ldx))  # x: [M, ldx], its first K columns are the input
    w = rng.standard_normal((n, k))  # w: [N, K] as in a checkpoint
    bias = rng.standard_normal(n)
    out_rows = np.full((m, ldout), np.nan)
    emulate(shape, w.reshape(-1), x_rows.reshape(-1), out_rows.reshape(-1), bias)
    np.testing.assert_allclose(out_rows[:, :n], x_rows[:, :k] @ w.T + bias, rtol=1e-12, atol=1e-12)
    assert np.isnan(out_rows[:, n:]).all()  # the row padding past N is never written


def test_layout_numbers_and_bad_strides():
    shape = row_major_gemm(16, 4608, 3584)
    assert (shape.transa, shape.transb) == (cublaslt.CUBLAS_OP_T, cublaslt.CUBLAS_OP_N)
    assert (shape.a, shape.b, shape.d) == ((3584, 4608, 3584), (3584, 16, 3584), (4608, 16, 4608))
    with pytest.raises(ValueError, match="ldx 100 < k 128"):
        row_major_gemm(4, 64, 128, ldx=100)


# -- plan keys ---------------------------------------------------------------------------------------------
def test_plan_keys():
    base = PlanKey("float16", 16, 4608, 3584, True, 3584, 4608)
    assert base.align == 256 and base == PlanKey("float16", 16, 4608, 3584, True, 3584, 4608, 256)
    variants = [base._replace(dtype="bfloat16"), base._replace(m=17), base._replace(bias=False),
                base._replace(ldx=4096), base._replace(align=16)]
    assert len({base, *variants}) == 6  # each field makes its own plan
    assert cublaslt.pointer_alignment(0x7F0000001000, 0x7F0000000200, 0) == 256
    assert cublaslt.pointer_alignment(0x7F0000001000, 0x7F0000000010) == 16
    assert cublaslt.pointer_alignment() == 256


# -- the binding's calls, against a fake libcublasLt --------------------------------------------------------
class FakeLib:
    """Records every call; hands out handles, one heuristic result and a version, like the real library."""

    def __init__(self):
        self.calls, self.next_handle = [], 0x1000

    def __getattr__(self, name):
        def fn(*args):
            if name.endswith("SetAttribute"):  # the binding reuses its value objects: keep the value of this call
                args = (args[0], args[1], args[2]._obj.value, args[3])
            self.calls.append((name, args))
            if name == "cublasLtGetVersion":
                return 130100
            if name.endswith("Create"):
                self.next_handle += 16
                args[0]._obj.value = self.next_handle  # byref(c_void_p) -> the new handle
            if name == "cublasLtMatmulAlgoGetHeuristic":
                args[8][0].algo.data[0], args[8][0].state = 42, 0
                args[9]._obj.value = 1
            return 0
        setattr(self, name, fn)
        return fn

    def named(self, name):
        return [args for n, args in self.calls if n == name]

    def attributes(self, name="cublasLtMatmulDescSetAttribute"):
        return [(args[1], args[2]) for args in self.named(name)]


def test_plan_descriptors_are_built_once_and_reused():
    lib = FakeLib()
    lt = CublasLt(lib=lib, path="fake")
    assert lt.version == 130100
    plan = lt.plan(PlanKey("bfloat16", 16, 4608, 3584, True, 3584, 4608))
    assert lib.named("cublasLtMatmulDescCreate")[0][1:] == (cublaslt.CUBLAS_COMPUTE_32F, cublaslt.CUDA_R_32F)
    assert [args[1:] for args in lib.named("cublasLtMatrixLayoutCreate")] == [
        (14, 3584, 4608, 3584), (14, 3584, 16, 3584), (14, 4608, 16, 4608)]
    assert lib.attributes() == [(3, 1), (4, 0), (7, cublaslt.CUBLASLT_EPILOGUE_BIAS), (26, 14)]
    algo = lt.heuristic(plan, 32 << 20, 32)[0].algo
    assert algo.data[0] == 42
    prefs = dict(lib.attributes("cublasLtMatmulPreferenceSetAttribute"))
    assert prefs[cublaslt.CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES] == 32 << 20
    assert prefs[cublaslt.CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES] == 256
    plan.algo = algo
    creates = sum(1 for n, _ in lib.calls if n.endswith("Create"))
    for bias_ptr in (0xB1A5000, 0xB1A6000):
        lt.matmul(plan, 0xA000, 0xB000, 0xD000, bias_ptr, 0xE000, 32 << 20, 7)
    assert sum(1 for n, _ in lib.calls if n.endswith("Create")) == creates  # nothing built per call
    assert [a for a in lib.attributes() if a[0] == cublaslt.CUBLASLT_MATMUL_DESC_BIAS_POINTER] == [
        (8, 0xB1A5000), (8, 0xB1A6000)]
    call = lib.named("cublasLtMatmul")[-1]
    assert (call[3], call[5], call[7], call[8], call[10]) == (0xA000, 0xB000, lt._beta_ptr, 0xD000, 0xD000)
    assert call[9] == call[11] == plan.d  # C = D = out, one layout
    assert call[12] == ctypes.addressof(plan.algo) and call[13:] == (0xE000, 32 << 20, 7)
    plan.close()
    assert len(lib.named("cublasLtMatrixLayoutDestroy")) == 3 and len(lib.named("cublasLtMatmulDescDestroy")) == 1


def test_no_bias_plan_leaves_the_default_epilogue():
    lib = FakeLib()
    CublasLt(lib=lib, path="fake").plan(PlanKey("float16", 1, 3584, 3584, False, 3584, 3584))
    assert lib.attributes() == [(3, 1), (4, 0)]


# -- autotune cache ---------------------------------------------------------------------------------------
def random_algo(rng) -> MatmulAlgo:
    return MatmulAlgo.from_buffer_copy(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())


def test_cache_dir_from_env(monkeypatch, tmp_path):
    assert autotune.cache_dir({"CUPYLLM_CACHE": str(tmp_path)}) == tmp_path / "autotune"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_dir({}) == tmp_path / "home/.cache/cupyllm/autotune"


def test_cache_keys():
    path = autotune.cache_file(Path("/c"), "NVIDIA H100 80GB HBM3", 130100)
    assert path == Path("/c/NVIDIA-H100-80GB-HBM3_cublaslt130100.json")
    key = autotune.tune_key("bfloat16", 16, 4608, 3584, True)
    assert key == "bfloat16*bfloat16->bfloat16 acc=float32 m=16 n=4608 k=3584 bias=1"
    assert len({key, autotune.tune_key("float16", 16, 4608, 3584, True),
                autotune.tune_key("bfloat16", 16, 4608, 3584, False),
                autotune.tune_key("bfloat16", 1, 4608, 3584, True)}) == 4


def test_cache_round_trip(tmp_path, rng):
    cache = autotune.AutotuneCache.for_device("NVIDIA H100 80GB HBM3", 130100, tmp_path)
    key = autotune.tune_key("float16", 1, 3584, 3584, False)
    algo = random_algo(rng)
    cache.put(key, algo, us=5.5, heuristic_us=6.0)
    cache.save()
    again = autotune.AutotuneCache.for_device("NVIDIA H100 80GB HBM3", 130100, tmp_path)
    assert bytes(again.get(key)) == bytes(algo) and again.entries[key]["us"] == 5.5
    assert again.get(autotune.tune_key("float16", 2, 3584, 3584, False)) is None
    # another GPU or another cuBLASLt version never sees these choices
    assert autotune.AutotuneCache.for_device("NVIDIA A100-SXM4-80GB", 130100, tmp_path).entries == {}
    assert autotune.AutotuneCache.for_device("NVIDIA H100 80GB HBM3", 120900, tmp_path).entries == {}
    data = json.loads(cache.path.read_text())
    assert data["gpu"] == "NVIDIA H100 80GB HBM3" and data["cublaslt_version"] == 130100
    assert list(tmp_path.iterdir()) == [cache.path]  # no temporary file left behind


def test_cache_merges_concurrent_writers_and_survives_garbage(tmp_path, rng):
    first = autotune.AutotuneCache.for_device("gpu", 1, tmp_path)
    second = autotune.AutotuneCache.for_device("gpu", 1, tmp_path)
    first.put("a", random_algo(rng))
    first.save()
    second.put("b", random_algo(rng))
    second.save()
    assert set(autotune.AutotuneCache.for_device("gpu", 1, tmp_path).entries) == {"a", "b"}
    first.path.write_text("{ truncated")
    assert autotune.AutotuneCache.for_device("gpu", 1, tmp_path).entries == {}
    bad = autotune.AutotuneCache.for_device("gpu", 1, tmp_path)
    bad.entries["c"] = {"algo": "abcd"}
    assert bad.get("c") is None  # a wrong-length algorithm is ignored, not trusted
    with pytest.raises(ValueError, match="64 bytes"):
        autotune.decode_algo("00" * 63)


def test_shipped_table_is_the_default_and_local_measurements_override_it(tmp_path, rng, monkeypatch):
    """A table in the package (SHIPPED_DIR) serves a fresh machine of that GPU and cuBLASLt version; what the
    machine measures itself wins; another GPU or version never sees it."""
    shipped_dir = tmp_path / "shipped"
    monkeypatch.setattr(autotune, "SHIPPED_DIR", shipped_dir)
    shipped = autotune.AutotuneCache.for_device("NVIDIA H100 80GB HBM3", 130100, shipped_dir)
    k1, k2 = (autotune.tune_key("float16", m, 3584, 3584, False) for m in (1, 8))
    a1, a2, mine = random_algo(rng), random_algo(rng), random_algo(rng)
    shipped.put(k1, a1)
    shipped.put(k2, a2)
    shipped.save()
    local = autotune.AutotuneCache.for_device("NVIDIA H100 80GB HBM3", 130100, tmp_path / "home")
    assert bytes(local.get(k1)) == bytes(a1) and bytes(local.get(k2)) == bytes(a2)
    local.put(k2, mine)
    local.save()
    again = autotune.AutotuneCache.for_device("NVIDIA H100 80GB HBM3", 130100, tmp_path / "home")
    assert bytes(again.get(k2)) == bytes(mine) and bytes(again.get(k1)) == bytes(a1)
    assert autotune.AutotuneCache.for_device("NVIDIA H200", 130100, tmp_path / "home").entries == {}
    assert autotune.AutotuneCache.for_device("NVIDIA H100 80GB HBM3", 120900, tmp_path / "home").entries == {}


class FakeLt:
    """Stands in for libcublasLt: records descriptor attributes, layouts and matmuls (no GPU)."""

    def __init__(self):
        self.attrs, self.layouts, self.matmuls, self._next = {}, [], [], 1

    def _handle(self, ref):
        ref._obj.value, self._next = self._next, self._next + 1
        return 0

    def __getattr__(self, name):
        def call(*args):
            if name == "cublasLtGetVersion":
                return 130100
            if name in ("cublasLtCreate", "cublasLtMatmulDescCreate"):
                return self._handle(args[0])
            if name == "cublasLtMatrixLayoutCreate":
                self.layouts.append(args[1:])
                return self._handle(args[0])
            if name == "cublasLtMatmulDescSetAttribute":
                self.attrs[args[1]] = args[2]._obj.value
            if name == "cublasLtMatmul":
                self.matmuls.append(dict(self.attrs))
            return 0
        fn = lambda *a: call(*a)  # noqa: E731  (a fresh function: _declare sets argtypes on it)
        setattr(self, name, fn)
        return fn


def test_fp8_plan_asks_for_e4m3_operands_and_outer_vector_scales():
    lib = FakeLt()
    lt = cublaslt.CublasLt(lib, "fake")
    plan = lt.plan(cublaslt.PlanKey("bfloat16", 4, 4608, 3584, True, 3584, 4608, 256, "outer"))
    e4m3, bf16 = cublaslt.CUDA_R_8F_E4M3, cublaslt.CUDA_R_16BF
    # the weight [N, K] (op T) and x [M, K] as E4M3, out [M, N] in bf16: rows, cols, ld of each
    assert lib.layouts == [(e4m3, 3584, 4608, 3584), (e4m3, 3584, 4, 3584), (bf16, 4608, 4, 4608)]
    outer = cublaslt.CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
    assert lib.attrs[cublaslt.CUBLASLT_MATMUL_DESC_A_SCALE_MODE] == outer
    assert lib.attrs[cublaslt.CUBLASLT_MATMUL_DESC_B_SCALE_MODE] == outer
    assert lib.attrs[cublaslt.CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE] == bf16
    with pytest.raises(ValueError, match="scale pointers"):
        lt.matmul(plan, 1, 2, 3, 4, 5, 6, 7)
    lt.matmul(plan, 1, 2, 3, 4, 5, 6, 7, scale_ptrs=(0x1000, 0x2000))
    seen = lib.matmuls[-1]
    assert (seen[cublaslt.CUBLASLT_MATMUL_DESC_A_SCALE_POINTER], seen[cublaslt.CUBLASLT_MATMUL_DESC_B_SCALE_POINTER],
            seen[cublaslt.CUBLASLT_MATMUL_DESC_BIAS_POINTER]) == (0x1000, 0x2000, 4)
    # the fallback: unscaled E4M3 into float32, no scale modes; a plain GEMM keeps its dtype for every operand
    lib.attrs.clear()
    lt.plan(cublaslt.PlanKey("float32", 4, 4608, 3584, False, 3584, 4608, 256, "unit"))
    assert lib.layouts[-3:] == [(e4m3, 3584, 4608, 3584), (e4m3, 3584, 4, 3584), (cublaslt.CUDA_R_32F, 4608, 4, 4608)]
    assert cublaslt.CUBLASLT_MATMUL_DESC_A_SCALE_MODE not in lib.attrs
    lt.plan(cublaslt.PlanKey("float16", 4, 4608, 3584, False, 3584, 4608))
    assert {layout[0] for layout in lib.layouts[-3:]} == {cublaslt.CUDA_R_16F}
    with pytest.raises(ValueError, match="scales must be"):
        lt.plan(cublaslt.PlanKey("float16", 4, 4608, 3584, False, 3584, 4608, 256, "tensor"))
    assert autotune.tune_key("float16", 1, 2, 3, False, "outer") != autotune.tune_key("float16", 1, 2, 3, False)
