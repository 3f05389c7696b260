"""ctypes binding of cuBLASLt: finds the library, holds the enums, and runs cached row-major GEMM plans.

Pure ctypes, importable without CuPy: callers pass raw device pointers and a stream handle (ops/cuda/linear.py).
"""
from __future__ import annotations

import ctypes
import os
import site
import sys
import weakref
from typing import Callable, NamedTuple

# -- enums: values read from cublasLt.h, cublas_api.h and library_types.h of CUDA 13.0 (../shared/GPU.md);
#    tests/test_cublaslt_cpu.py compares every CUBLAS*/CUDA_R_* name here with the header where one exists.
CUDA_R_32F = 0
CUDA_R_16F = 2
CUDA_R_16BF = 14
CUDA_R_8F_E4M3 = 28
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
CUBLASLT_ORDER_COL = 0
CUBLASLT_MATMUL_DESC_COMPUTE_TYPE = 0
CUBLASLT_MATMUL_DESC_SCALE_TYPE = 1
CUBLASLT_MATMUL_DESC_TRANSA = 3
CUBLASLT_MATMUL_DESC_TRANSB = 4
CUBLASLT_MATMUL_DESC_EPILOGUE = 7
CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8
CUBLASLT_MATMUL_DESC_A_SCALE_POINTER = 17
CUBLASLT_MATMUL_DESC_B_SCALE_POINTER = 18
CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26
CUBLASLT_MATMUL_DESC_A_SCALE_MODE = 31
CUBLASLT_MATMUL_DESC_B_SCALE_MODE = 32
CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F = 0
CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F = 3  # a float32 per row of op(A) / per column of op(B) (cuBLAS >= 12.9)
CUBLASLT_EPILOGUE_DEFAULT = 1
CUBLASLT_EPILOGUE_BIAS = 4
CUBLASLT_MATMUL_PREF_SEARCH_MODE = 0
CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7
CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8

STATUS_NAMES = {0: "CUBLAS_STATUS_SUCCESS", 1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED",
                7: "CUBLAS_STATUS_INVALID_VALUE", 8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR",
                13: "CUBLAS_STATUS_EXECUTION_FAILED", 14: "CUBLAS_STATUS_INTERNAL_ERROR",
                15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR"}
DATA_TYPES = {"float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF, "float32": CUDA_R_32F}
# FP8 plans (PlanKey.scales): "outer", E4M3 operands with a float32 scale per weight row and per token applied by
# cuBLASLt itself; "unit", E4M3 operands unscaled into a float32 out that the caller scales (where "outer" is not
# supported). "" is a plain fp16/bf16 GEMM.
FP8_SCALES = ("outer", "unit")
MAX_ALIGNMENT = 256  # the heuristic assumes 256-byte aligned buffers unless told otherwise


def enum_values() -> dict[str, int]:
    """Every enum constant of this module by its C name (the header test walks this)."""
    return {k: v for k, v in globals().items() if k.startswith(("CUBLAS", "CUDA_R_")) and isinstance(v, int)}


class CublasLtError(RuntimeError):
    def __init__(self, call: str, status: int):
        self.call, self.status = call, status
        self.name = STATUS_NAMES.get(status, f"CUBLAS_STATUS_UNKNOWN_{status}")
        super().__init__(f"{call} failed: {self.name} ({status})")


def check(status: int, call: str) -> None:
    if status != 0:
        raise CublasLtError(call, status)


# -- finding the library -------------------------------------------------------------------------------
LOADER_NAMES = ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so")
# pip wheels by CUDA major: nvidia-cublas (13) ships nvidia/cu13/lib; nvidia-cublas-cu12 ships nvidia/cublas/lib
WHEEL_DIRS = {13: ("nvidia/cu13/lib", "nvidia/cu13/lib64", "nvidia/cublas/lib"), 12: ("nvidia/cublas/lib",)}
TOOLKIT_SUBDIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")


class Candidate(NamedTuple):
    where: str  # what the error message calls this place ("nvidia-cublas wheel", "CUDA_HOME", ...)
    target: str  # an absolute file path, or a bare soname handed to the dynamic loader
    is_file: bool


def site_dirs() -> list[str]:
    """Every directory a wheel could have been installed into: sys.path (venvs, --target), then site's lists."""
    dirs = list(sys.path)
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some embedded interpreters strip these
        pass
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs if d and os.path.isdir(d)))


def preferred_major() -> int | None:
    """The CUDA major of CuPy's runtime when CuPy is already imported (never imports it)."""
    cupy = sys.modules.get("cupy")
    try:
        return cupy.cuda.runtime.runtimeGetVersion() // 1000 if cupy else None
    except Exception:  # a broken CuPy must not stop the search
        return None


def candidates(env=None, dirs: list[str] | None = None, prefer: int | None = None) -> list[Candidate]:
    """Where to look, in order: $CUPYLLM_CUBLASLT, pip wheels (CuPy's CUDA major first), the toolkit, the loader."""
    env = os.environ if env is None else env
    dirs = site_dirs() if dirs is None else dirs
    found: list[Candidate] = []
    if env.get("CUPYLLM_CUBLASLT"):
        found.append(Candidate("CUPYLLM_CUBLASLT", env["CUPYLLM_CUBLASLT"], True))
    majors = sorted(WHEEL_DIRS, key=lambda major: (major != prefer, -major))
    for major in majors:
        wheel = "nvidia-cublas wheel" if major == 13 else f"nvidia-cublas-cu{major} wheel"
        for d in dirs:
            for sub in WHEEL_DIRS[major]:
                found.append(Candidate(wheel, os.path.join(d, sub, f"libcublasLt.so.{major}"), True))
    roots = [("CUDA_HOME", env.get("CUDA_HOME")), ("CUDA_PATH", env.get("CUDA_PATH")),
             ("/usr/local/cuda", "/usr/local/cuda")]
    for label, root in roots:
        if root:
            for sub in TOOLKIT_SUBDIRS:
                for name in LOADER_NAMES:
                    found.append(Candidate(label, os.path.join(root, sub, name), True))
    found += [Candidate("dynamic loader path", name, False) for name in LOADER_NAMES]
    return list(dict.fromkeys(found))  # a root named twice (CUDA_HOME=/usr/local/cuda) is tried once


def find_library(env=None, dirs: list[str] | None = None, prefer: int | None = None,
                 loader: Callable[[str], object] = ctypes.CDLL) -> tuple[object, str]:
    """(loaded library, where it came from); raises OSError listing every place looked at when none loads."""
    tried = []
    for cand in candidates(env, dirs, preferred_major() if prefer is None else prefer):
        if cand.is_file and not os.path.isfile(cand.target):
            tried.append(f"{cand.target} ({cand.where}): no such file")
            continue
        try:
            return loader(cand.target), cand.target
        except OSError as e:
            tried.append(f"{cand.target} ({cand.where}): {e}")
    raise OSError("cuBLASLt not found. Install it with `pip install nvidia-cublas` (CUDA 13) or "
                  "`pip install nvidia-cublas-cu12` (CUDA 12), set CUDA_HOME to a CUDA toolkit, or point "
                  "CUPYLLM_CUBLASLT at libcublasLt.so. Looked at:\n  " + "\n  ".join(tried))


# -- the row-major trick ---------------------------------------------------------------------------------
class Layout(NamedTuple):
    rows: int
    cols: int
    ld: int


class GemmShape(NamedTuple):
    """out[M,N] = x[M,K] @ W[N,K]^T in cuBLASLt's column-major terms: D[N,M] = op(A)[N,K] @ op(B)[K,M]."""
    transa: int
    transb: int
    a: Layout  # the weight: row-major [N,K] with row stride K is column-major [K,N], ld K; transposed by op(A)
    b: Layout  # x: row-major [M,K] is column-major [K,M], ld = x's row stride
    d: Layout  # out: row-major [M,N] is column-major [N,M], ld = out's row stride; the bias runs along its N rows


def row_major_gemm(m: int, n: int, k: int, ldx: int | None = None, ldout: int | None = None) -> GemmShape:
    ldx, ldout = ldx or k, ldout or n
    if ldx < k or ldout < n:
        raise ValueError(f"row strides must cover a row: ldx {ldx} < k {k} or ldout {ldout} < n {n}")
    return GemmShape(CUBLAS_OP_T, CUBLAS_OP_N, Layout(k, n, k), Layout(k, m, ldx), Layout(n, m, ldout))


class PlanKey(NamedTuple):
    """What a plan depends on; `align` is the weakest pointer alignment, capped at 256 bytes."""
    dtype: str  # "float16" or "bfloat16" for x, W, bias and out alike (FP8 plans: out and bias; "float32": unit)
    m: int
    n: int
    k: int
    bias: bool
    ldx: int
    ldout: int
    align: int = MAX_ALIGNMENT
    scales: str = ""  # "": x and W in `dtype`; "outer" / "unit": x and W as E4M3 codes (FP8_SCALES)


def pointer_alignment(*pointers: int) -> int:
    """The largest power of two up to 256 that divides every non-null pointer."""
    align = MAX_ALIGNMENT
    for p in pointers:
        if p:
            align = min(align, p & -p)
    return align


# -- structs and prototypes ----------------------------------------------------------------------------
class MatmulAlgo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]  # opaque; 64 bytes that can be saved and restored as they are


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", MatmulAlgo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_P, _I, _Z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_PROTOTYPES = {
    "cublasLtCreate": [ctypes.POINTER(_P)], "cublasLtDestroy": [_P], "cublasLtGetVersion": [],
    "cublasLtMatmulDescCreate": [ctypes.POINTER(_P), _I, _I], "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatmulDescSetAttribute": [_P, _I, _P, _Z],
    "cublasLtMatrixLayoutCreate": [ctypes.POINTER(_P), _I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(_P)], "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I, _P, _Z],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _I, ctypes.POINTER(HeuristicResult),
                                       ctypes.POINTER(_I)],
    "cublasLtMatmulAlgoCheck": [_P, _P, _P, _P, _P, _P, ctypes.POINTER(MatmulAlgo),
                                ctypes.POINTER(HeuristicResult)],
    # handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo, workspace, bytes, stream
    "cublasLtMatmul": [_P] * 12 + [_P, _P, _Z, _P],
}


def _declare(lib) -> None:
    for name, argtypes in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_size_t if name == "cublasLtGetVersion" else ctypes.c_int


def _set(setter, obj, attr: int, value: ctypes._SimpleCData, call: str) -> None:
    check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), call)


class Plan:
    """Descriptors and layouts of one PlanKey, plus the algorithm to run; nothing is created per call."""

    def __init__(self, lt: "CublasLt", key: PlanKey):
        self.key = key
        shape = row_major_gemm(key.m, key.n, key.k, key.ldx, key.ldout)
        lib, dtype = lt.lib, DATA_TYPES[key.dtype]
        operand = CUDA_R_8F_E4M3 if key.scales else dtype
        if key.scales and key.scales not in FP8_SCALES:
            raise ValueError(f"PlanKey.scales must be '' or one of {FP8_SCALES}, got {key.scales!r}")
        self.desc, self.layouts = _P(), []
        self._finalizer = weakref.finalize(self, _destroy, lib, self.desc, self.layouts)
        check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
              "cublasLtMatmulDescCreate")
        setter = lib.cublasLtMatmulDescSetAttribute
        _set(setter, self.desc, CUBLASLT_MATMUL_DESC_TRANSA, ctypes.c_int32(shape.transa), "set TRANSA")
        _set(setter, self.desc, CUBLASLT_MATMUL_DESC_TRANSB, ctypes.c_int32(shape.transb), "set TRANSB")
        if key.bias:
            _set(setter, self.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, ctypes.c_uint32(CUBLASLT_EPILOGUE_BIAS),
                 "set EPILOGUE")
            _set(setter, self.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, ctypes.c_int32(dtype), "set BIAS_DATA_TYPE")
        if key.scales == "outer":  # A is the weight [N rows of op(A)], B is x [M columns of op(B)]
            for attr in (CUBLASLT_MATMUL_DESC_A_SCALE_MODE, CUBLASLT_MATMUL_DESC_B_SCALE_MODE):
                _set(setter, self.desc, attr, ctypes.c_int32(CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F),
                     "set SCALE_MODE")
        for layout, kind in ((shape.a, operand), (shape.b, operand), (shape.d, dtype)):
            handle = _P()
            check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(handle), kind, *layout), "cublasLtMatrixLayoutCreate")
            self.layouts.append(handle)
        self.a, self.b, self.d = (h.value for h in self.layouts)
        self.algo = MatmulAlgo()
        self.algo_source = None  # "heuristic" or "autotune"
        self._bias_ptr = ctypes.c_void_p(0)  # reused so that setting the bias pointer allocates nothing
        self._scale_ptrs = (ctypes.c_void_p(0), ctypes.c_void_p(0))  # "outer": the weight's and x's scale vectors

    def close(self) -> None:
        self._finalizer()


def _destroy(lib, desc, layouts) -> None:
    for handle in layouts:
        lib.cublasLtMatrixLayoutDestroy(handle)
    if desc.value:
        lib.cublasLtMatmulDescDestroy(desc)


class CublasLt:
    """A cuBLASLt handle on the loaded library: builds plans, queries the heuristic, launches matmuls."""

    def __init__(self, lib=None, path: str | None = None):
        if lib is None:
            lib, path = find_library()
        _declare(lib)
        self.lib, self.path = lib, path
        self.version = int(lib.cublasLtGetVersion())
        self.handle = _P()
        check(lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self._finalizer = weakref.finalize(self, lib.cublasLtDestroy, self.handle)
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)  # host scalars, read at launch
        self._alpha_ptr, self._beta_ptr = ctypes.addressof(self._alpha), ctypes.addressof(self._beta)

    def close(self) -> None:
        self._finalizer()

    def plan(self, key: PlanKey) -> Plan:
        return Plan(self, key)

    def heuristic(self, plan: Plan, workspace_bytes: int, count: int = 1) -> list[HeuristicResult]:
        """Up to `count` algorithms, the heuristic's best first; raises if there is none."""
        lib, pref = self.lib, _P()
        check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        try:
            setter = lib.cublasLtMatmulPreferenceSetAttribute
            _set(setter, pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(workspace_bytes),
                 "set MAX_WORKSPACE_BYTES")
            for attr in (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                         CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES):
                _set(setter, pref, attr, ctypes.c_uint32(plan.key.align), "set MIN_ALIGNMENT")
            results, returned = (HeuristicResult * count)(), ctypes.c_int(0)
            check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref,
                                                     count, results, ctypes.byref(returned)),
                  "cublasLtMatmulAlgoGetHeuristic")
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        found = [r for r in results[:returned.value] if r.state == 0]
        if not found:
            raise CublasLtError(f"cublasLtMatmulAlgoGetHeuristic{tuple(plan.key)}", 15)
        return found

    def check_algo(self, plan: Plan, algo: MatmulAlgo) -> int:
        """The workspace bytes `algo` needs for this plan; raises CublasLtError if it cannot run it."""
        result = HeuristicResult()
        check(self.lib.cublasLtMatmulAlgoCheck(self.handle, plan.desc, plan.a, plan.b, plan.d, plan.d,
                                               ctypes.byref(algo), ctypes.byref(result)), "cublasLtMatmulAlgoCheck")
        return int(result.workspace_size)

    def matmul(self, plan: Plan, weight_ptr: int, x_ptr: int, out_ptr: int, bias_ptr: int,
               workspace_ptr: int, workspace_bytes: int, stream_ptr: int, algo: MatmulAlgo | None = None,
               scale_ptrs: tuple[int, int] = (0, 0)) -> None:
        """out = x @ W^T (+ bias) on `stream_ptr`; host-side only besides the launch, so it can be captured.
        An "outer" FP8 plan takes scale_ptrs = (the weight's float32 [N], x's float32 [M]) device pointers."""
        lib = self.lib
        setter = lib.cublasLtMatmulDescSetAttribute
        if plan.key.bias:  # the bias pointer lives in the descriptor: setting it is a host-side store
            plan._bias_ptr.value = bias_ptr
            _set(setter, plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, plan._bias_ptr, "set BIAS_POINTER")
        if plan.key.scales == "outer":
            if not all(scale_ptrs):
                raise ValueError("an FP8 GEMM with outer-vector scales needs the weight's and x's scale pointers")
            for holder, ptr, attr in zip(plan._scale_ptrs, scale_ptrs, (CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                                      CUBLASLT_MATMUL_DESC_B_SCALE_POINTER)):
                holder.value = ptr
                _set(setter, plan.desc, attr, holder, "set SCALE_POINTER")
        check(lib.cublasLtMatmul(self.handle, plan.desc, self._alpha_ptr, weight_ptr, plan.a, x_ptr, plan.b,
                                 self._beta_ptr, out_ptr, plan.d, out_ptr, plan.d,
                                 ctypes.addressof(algo if algo is not None else plan.algo),
                                 workspace_ptr, workspace_bytes, stream_ptr), "cublasLtMatmul")
