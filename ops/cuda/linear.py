"""The linear op on the GPU: out[M,N] = x[M,K] @ W[N,K]^T (+ bias[N]) through cuBLASLt, fp16/bf16, fp32 accumulation.

Owns the cuBLASLt handle, one workspace and one plan per shape; uses autotuned algorithms from the disk cache.
An FP8 weight (ops/quant.Fp8Weight: E4M3 codes, a float32 scale per output row) takes an Fp8Activation x (E4M3
codes, a float32 scale per token, made by the kernel that produced x): cuBLASLt multiplies the codes on Hopper's
FP8 tensor cores and applies both scale vectors itself (outer-vector scaling, cuBLAS >= 12.9); where it cannot,
the codes go unscaled into a float32 scratch that a generated kernel scales (and biases) into out.
"""
from __future__ import annotations

import warnings

import cupy as cp
import numpy as np
from tqdm import tqdm

from ops import autotune, jit_ops, quant
from ops.cublaslt import MAX_ALIGNMENT, CublasLt, CublasLtError, Plan, PlanKey, pointer_alignment
from ops.cuda.gemv import gemv_fp8
from ops.quant import Fp8Activation, Fp8Weight
from ops.storage import HALF_NAMES as _DTYPE_NAMES  # storage -> "float16" / "bfloat16" (bf16 travels as uint16 bits)

WORKSPACE_BYTES = 32 * 2**20  # what cuBLAS asks for on Hopper; split-K and stream-K algorithms use it


def _row_stride(a, name: str) -> int:
    """Elements between rows of a 2-D array whose rows are contiguous; cuBLASLt takes it as the leading dimension."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize) or a.strides[0] % a.itemsize or (
            a.shape[0] > 1 and a.strides[0] < a.shape[1] * a.itemsize):
        raise ValueError(f"{name} must be 2-D with contiguous, non-overlapping rows, got shape {a.shape} "
                         f"strides {a.strides}")
    return a.strides[0] // a.itemsize if a.shape[0] > 1 else a.shape[1]


class Linear:
    """Callable as linear(x, weight, bias, out) on the current CuPy stream; safe to capture once a shape has run."""

    def __init__(self, workspace_bytes: int = WORKSPACE_BYTES, cache_dir=None, use_autotune: bool = True):
        self.workspace_bytes = workspace_bytes
        self.cache_dir, self.use_autotune = cache_dir, use_autotune
        self.lt: CublasLt | None = None
        self.workspace = None
        self.tuned: autotune.AutotuneCache | None = None
        self.plans: dict[PlanKey, Plan] = {}
        self.device_id: int | None = None
        # FP8 GEMMs with / without a bias epilogue (True / False) that cuBLASLt would not scale by outer vectors:
        # those run "unit" (float32 out, scaled by a generated kernel)
        self.fp8_unit: set[bool] = set()

    def _ensure(self) -> None:
        """Created at first use, not in __init__: the backend is built before the device is chosen."""
        if self.lt is not None:
            if cp.cuda.Device().id != self.device_id:
                raise RuntimeError(f"this Linear belongs to GPU {self.device_id}, called on {cp.cuda.Device().id}")
            return
        self.device_id = cp.cuda.Device().id
        self.lt = CublasLt()
        self.workspace = cp.empty(self.workspace_bytes, dtype=cp.uint8)
        name = cp.cuda.runtime.getDeviceProperties(self.device_id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        self.tuned = autotune.AutotuneCache.for_device(name, self.lt.version, self.cache_dir)

    def __call__(self, x, weight, bias, out) -> None:
        # x: [M, K], weight: [N, K] as stored in checkpoints, bias: [N] or None, out: [M, N]; one dtype throughout
        if isinstance(weight, Fp8Weight):
            self._fp8(x, weight, bias, out)
            return
        if x.ndim != 2 or weight.ndim != 2 or out.ndim != 2:
            raise ValueError(f"linear takes 2-D x, weight and out, got {x.shape}, {weight.shape}, {out.shape}")
        m, k = x.shape
        n = weight.shape[0]
        dtype = _DTYPE_NAMES.get(x.dtype)
        if dtype is None or weight.dtype != x.dtype or out.dtype != x.dtype or (
                bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"linear takes float16 or bfloat16 (uint16) arrays of one dtype, got x {x.dtype}, "
                            f"weight {weight.dtype}, out {out.dtype}, bias {None if bias is None else bias.dtype}")
        if weight.shape != (n, k) or out.shape != (m, n) or (bias is not None and bias.shape != (n,)):
            raise ValueError(f"linear shapes: x {x.shape}, weight {weight.shape} (want [{n}, {k}]), out {out.shape} "
                             f"(want [{m}, {n}]), bias {None if bias is None else bias.shape} (want [{n}])")
        if not weight.flags.c_contiguous or (bias is not None and not bias.flags.c_contiguous):
            raise ValueError("linear needs a C-contiguous weight and bias")
        if m == 0:
            return
        ldx, ldout = _row_stride(x, "x"), _row_stride(out, "out")
        bias_ptr = bias.data.ptr if bias is not None else 0
        align = pointer_alignment(x.data.ptr, weight.data.ptr, out.data.ptr)
        key = PlanKey(dtype, m, n, k, bias is not None, ldx, ldout, align)
        plan = self.plans.get(key) or self.plan(key)
        self.lt.matmul(plan, weight.data.ptr, x.data.ptr, out.data.ptr, bias_ptr, self.workspace.data.ptr,
                       self.workspace_bytes, cp.cuda.get_current_stream().ptr)

    def _fp8(self, x: Fp8Activation, weight: Fp8Weight, bias, out) -> None:
        if not isinstance(x, Fp8Activation) and x.shape[0] <= quant.W8A16_MAX_TOKENS:
            gemv_fp8(x, weight, bias, out)  # W8A16 at a few tokens
            return
        if not isinstance(x, Fp8Activation):
            raise TypeError(f"an FP8 weight takes an Fp8Activation (codes and per-token scales) beyond "
                            f"{quant.W8A16_MAX_TOKENS} tokens, got {type(x).__name__}")
        m, k = x.codes.shape
        n = weight.codes.shape[0]
        dtype = _DTYPE_NAMES.get(out.dtype)
        if dtype is None or (bias is not None and bias.dtype != out.dtype):
            raise TypeError(f"an FP8 linear writes float16 or bfloat16 and takes a bias of that dtype, got out "
                            f"{out.dtype}, bias {None if bias is None else bias.dtype}")
        if x.codes.dtype != np.uint8 or weight.codes.dtype != np.uint8 or weight.codes.shape != (n, k) or \
                out.shape != (m, n) or x.scale.size != m or weight.scale.size != n:
            raise ValueError(f"FP8 linear shapes: x codes {x.codes.shape} {x.codes.dtype} with {x.scale.size} scales, "
                             f"weight codes {weight.codes.shape} {weight.codes.dtype} with {weight.scale.size} scales, "
                             f"out {out.shape}")
        if m == 0:
            return
        if k % 16 or n % 16:
            raise ValueError(f"FP8 GEMMs need K and N multiples of 16 (cuBLASLt), got K {k}, N {n}")
        ldx, ldout = _row_stride(x.codes, "x"), _row_stride(out, "out")
        stream = cp.cuda.get_current_stream().ptr
        align = pointer_alignment(x.codes.data.ptr, weight.codes.data.ptr, out.data.ptr)
        plan = self._outer_plan(PlanKey(dtype, m, n, k, bias is not None, ldx, ldout, align, "outer"))
        if plan is not None:
            self.lt.matmul(plan, weight.codes.data.ptr, x.codes.data.ptr, out.data.ptr,
                           bias.data.ptr if bias is not None else 0, self.workspace.data.ptr,
                           self.workspace_bytes, stream, scale_ptrs=(weight.scale.data.ptr, x.scale.data.ptr))
            return
        acc = cp.empty((m, n), cp.float32)
        align = pointer_alignment(x.codes.data.ptr, weight.codes.data.ptr, acc.data.ptr)
        key = PlanKey("float32", m, n, k, False, ldx, n, align, "unit")
        plan = self.plans.get(key) or self.plan(key)
        self.lt.matmul(plan, weight.codes.data.ptr, x.codes.data.ptr, acc.data.ptr, 0, self.workspace.data.ptr,
                       self.workspace_bytes, stream)
        jit_ops.scale_rows_cols(acc, x.scale.reshape(m, 1), weight.scale.reshape(-1), bias, out)

    def plan(self, key: PlanKey) -> Plan:
        """Build (once) the plan of `key`: descriptors, then the tuned algorithm if cached, else the heuristic's first.

        Call it, or run the shape once, before capturing a graph: this is the only place that queries cuBLASLt.
        """
        self._ensure()
        plan = self.plans.get(key)
        if plan is None:
            plan = self.lt.plan(key)
            self._choose_algo(plan)
            self.plans[key] = plan
        return plan

    def _choose_algo(self, plan: Plan) -> None:
        key = plan.key
        default_layout = key.ldx == key.k and key.ldout == key.n and key.align == MAX_ALIGNMENT
        algo = None
        if self.use_autotune and default_layout:  # tuned with contiguous, 256-byte aligned buffers only
            algo = self.tuned.get(autotune.tune_key(key.dtype, key.m, key.n, key.k, key.bias, key.scales))
        if algo is not None:
            try:
                if self.lt.check_algo(plan, algo) <= self.workspace_bytes:
                    plan.algo, plan.algo_source = algo, "autotune"
                    return
            except CublasLtError as e:
                warnings.warn(f"cached cuBLASLt algorithm for {tuple(key)} rejected ({e.name}); using the heuristic")
        plan.algo = self.lt.heuristic(plan, self.workspace_bytes, 1)[0].algo
        plan.algo_source = "heuristic"

    def tune(self, shapes, dtype="float16", force: bool = False, fp8: bool = False) -> dict[str, dict]:
        """Autotune each (m, n, k, bias) not yet in the disk cache (all of them if `force`); returns the records.

        `dtype`: "float16", "bfloat16" or a storage dtype (np.float16, np.uint16 for bf16). Tuning allocates
        random buffers of each shape (weights rotated past L2) and frees them afterwards. `fp8`: the shapes are
        FP8 GEMMs (E4M3 x and W into `dtype`, scaled as this Linear scales them).
        """
        self._ensure()
        dtype = dtype if isinstance(dtype, str) and dtype in ("float16", "bfloat16") else _DTYPE_NAMES[np.dtype(dtype)]
        records = {}
        # a bar on a terminal only (disable=None: none when stderr is not a TTY), and only past half a second
        for m, n, k, bias in tqdm(shapes, desc="tuning GEMMs", unit="shape", disable=None, leave=False, delay=0.5):
            scales, out_dtype = "", dtype
            if fp8:
                outer = self._outer_plan(PlanKey(dtype, m, n, k, bool(bias), k, n, MAX_ALIGNMENT, "outer"))
                scales, out_dtype, bias = ("outer", dtype, bias) if outer else ("unit", "float32", False)
            tkey = autotune.tune_key(out_dtype, m, n, k, bias, scales)
            if tkey in self.tuned.entries and not force:
                records[tkey] = {**self.tuned.entries[tkey], "cached": True}
                continue
            plan = self.plan(PlanKey(out_dtype, m, n, k, bool(bias), k, n, MAX_ALIGNMENT, scales))
            algo, record = autotune.tune_plan(self.lt, plan, self.workspace)
            self.tuned.put(tkey, algo, **record)
            plan.algo, plan.algo_source = algo, "autotune"
            records[tkey] = {**record, "cached": False}
        if not all(r["cached"] for r in records.values()):
            self.tuned.save()
        # plans of the same shape built earlier with other strides or alignment keep their heuristic choice
        return records

    def _outer_plan(self, key: PlanKey) -> Plan | None:
        """The outer-vector-scaled FP8 plan of `key`, or None once cuBLASLt has refused one with key's epilogue."""
        if key.bias not in self.fp8_unit:
            try:
                return self.plans.get(key) or self.plan(key)
            except CublasLtError as e:  # an older cuBLASLt: no outer-vector scaling (with this epilogue)
                warnings.warn(f"cuBLASLt {self.lt.version} cannot scale FP8 GEMMs {'with' if key.bias else 'without'} "
                              f"a bias per row and token ({e.name}); those write float32 and a separate kernel scales "
                              "them (slower)")
                self.fp8_unit.add(key.bias)
        return None

    def close(self) -> None:
        for plan in self.plans.values():
            plan.close()
        self.plans.clear()
        if self.lt is not None:
            self.lt.close()
            self.lt = None
