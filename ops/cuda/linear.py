"""The linear op on the GPU: out[M,N] = x[M,K] @ W[N,K]^T (+ bias[N]) through cuBLASLt, fp16/bf16, fp32 accumulation.

Owns the cuBLASLt handle, one workspace and one plan per shape; uses autotuned algorithms from the disk cache.
"""
from __future__ import annotations

import warnings

import cupy as cp
import numpy as np

from ops import autotune
from ops.cublaslt import MAX_ALIGNMENT, CublasLt, CublasLtError, Plan, PlanKey, pointer_alignment

WORKSPACE_BYTES = 32 * 2**20  # what cuBLAS asks for on Hopper; split-K and stream-K algorithms use it
_DTYPE_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.uint16): "bfloat16"}  # bf16 travels as uint16 bits


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
            algo = self.tuned.get(autotune.tune_key(key.dtype, key.m, key.n, key.k, key.bias))
        if algo is not None:
            try:
                if self.lt.check_algo(plan, algo) <= self.workspace_bytes:
                    plan.algo, plan.algo_source = algo, "autotune"
                    return
            except CublasLtError as e:
                warnings.warn(f"cached cuBLASLt algorithm for {tuple(key)} rejected ({e.name}); using the heuristic")
        plan.algo = self.lt.heuristic(plan, self.workspace_bytes, 1)[0].algo
        plan.algo_source = "heuristic"

    def tune(self, shapes, dtype="float16", force: bool = False) -> dict[str, dict]:
        """Autotune each (m, n, k, bias) not yet in the disk cache (all of them if `force`); returns the records.

        `dtype`: "float16", "bfloat16" or a storage dtype (np.float16, np.uint16 for bf16). Tuning allocates
        random buffers of each shape (weights rotated past L2) and frees them afterwards.
        """
        self._ensure()
        dtype = dtype if isinstance(dtype, str) and dtype in ("float16", "bfloat16") else _DTYPE_NAMES[np.dtype(dtype)]
        records = {}
        for m, n, k, bias in shapes:
            tkey = autotune.tune_key(dtype, m, n, k, bias)
            if tkey in self.tuned.entries and not force:
                records[tkey] = {**self.tuned.entries[tkey], "cached": True}
                continue
            plan = self.plan(PlanKey(dtype, m, n, k, bool(bias), k, n))
            algo, record = autotune.tune_plan(self.lt, plan, self.workspace)
            self.tuned.put(tkey, algo, **record)
            plan.algo, plan.algo_source = algo, "autotune"
            records[tkey] = {**record, "cached": False}
        if not all(r["cached"] for r in records.values()):
            self.tuned.save()
        # plans of the same shape built earlier with other strides or alignment keep their heuristic choice
        return records

    def close(self) -> None:
        for plan in self.plans.values():
            plan.close()
        self.plans.clear()
        if self.lt is not None:
            self.lt.close()
            self.lt = None
