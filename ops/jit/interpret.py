"""Runs a KernelIR on numpy, every program of the grid at once (arrays [G, R, C]): the oracle the generated CUDA
is held to, and a CPU executor of the same kernel definitions (Pallas' interpret mode, vectorised).
"""
from __future__ import annotations

import math

import numpy as np

from ops.jit import dtypes
from ops.jit.ir import KernelIR, Node

_UNARY = {
    "neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh, "abs": np.abs,
    "rsqrt": lambda x: np.float32(1.0) / np.sqrt(x),
    "sigmoid": lambda x: np.float32(1.0) / (np.float32(1.0) + np.exp(-x)),
    "not": np.logical_not,
}
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide, "pow": np.power,
    "floordiv": np.floor_divide, "mod": np.mod, "max": np.maximum, "min": np.minimum,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "eq": np.equal, "ne": np.not_equal,
    "and": np.logical_and, "or": np.logical_or,
}
_REDUCE = {"sum": np.sum, "max": np.max, "min": np.min}


def _register(dtype: dtypes.DType):
    return np.float32 if dtype.is_float else dtype.storage.type


def run(ir: KernelIR, arrays: list[np.ndarray], grid: tuple[int, ...], scalars: dict) -> None:
    """Execute `ir` over `grid` on numpy `arrays` (written in place), with runtime `scalars` by name."""
    g = math.prod(grid)
    if g == 0:
        return
    flat_ids = np.arange(g, dtype=np.int64)
    pids = [a.astype(np.int32).reshape(g, 1, 1) for a in np.unravel_index(flat_ids, grid)]
    env: dict[int, np.ndarray] = {}
    for node in ir.nodes:
        val = _eval(node, env, ir, arrays, grid, pids, scalars)
        if val is not None:
            env[node.id] = val


def _eval(n: Node, env, ir, arrays, grid, pids, scalars):
    a = [env[x.id] for x in n.args]
    op, reg = n.op, _register(n.dtype)
    if op == "const":
        return np.full((1, 1, 1), n.attrs["value"], reg)
    if op == "pid":
        return pids[n.attrs["axis"]]
    if op == "nprog":
        return np.full((1, 1, 1), grid[n.attrs["axis"]], np.int32)
    if op == "param":
        return np.full((1, 1, 1), scalars[n.attrs["name"]], reg)
    if op == "dim":
        return np.full((1, 1, 1), arrays[n.attrs["operand"]].shape[n.attrs["axis"]], np.int32)
    if op == "sload":
        arr = arrays[n.attrs["operand"]]
        flat, ok = _flat_index(arr.shape, [x.astype(np.int64) for x in a])
        return np.where(ok, arr.reshape(-1)[np.where(ok, flat, 0)], 0).astype(reg)
    if op in ("load", "store"):
        return _memory(n, a, ir, arrays)
    if op == "unary":
        with np.errstate(all="ignore"):
            return _UNARY[n.attrs["fn"]](_as(a[0], reg) if n.dtype.is_float else a[0]).astype(reg)
    if op == "binary":
        fn = n.attrs["fn"]
        if n.dtype.is_float or fn == "truediv":
            x, y = a[0].astype(np.float32), a[1].astype(np.float32)
        elif n.dtype is dtypes.bool_ and n.args[0].dtype.is_float != n.args[1].dtype.is_float:
            x, y = a[0].astype(np.float32), a[1].astype(np.float32)  # mixed comparison: in float
        else:
            x, y = a
        with np.errstate(all="ignore"):
            return _BINARY[fn](x, y).astype(reg)
    if op == "where":
        return np.where(a[0], a[1], a[2]).astype(reg)
    if op == "cast":
        return _cast(a[0], n.args[0].dtype, n.dtype)
    if op == "reduce":
        return _REDUCE[n.attrs["fn"]](a[0], axis=2, keepdims=True).astype(reg)
    if op == "iota":
        r, c = n.shape
        return np.arange(r, dtype=np.int32).reshape(1, r, 1) if n.attrs["axis"] == 0 else \
            np.arange(c, dtype=np.int32).reshape(1, 1, c)
    if op == "broadcast":
        return np.broadcast_to(a[0], a[0].shape[:1] + n.shape)
    raise NotImplementedError(f"interpreter: no rule for {op}")


def _as(x, reg):
    return x.astype(reg) if x.dtype != reg else x


def _cast(x, src: dtypes.DType, dst: dtypes.DType):
    if dst is dtypes.bool_:
        return x != 0
    if dst is dtypes.int32:
        with np.errstate(all="ignore"):
            return x.astype(np.int32)  # C truncation
    x = x.astype(np.float32)
    if dst is dtypes.float32:
        return x
    return dtypes.to_float32(dtypes.from_float32(x, dst), dst)  # the rounding a store and a load would give


def _flat_index(shape, index):
    """Row-major element offsets of index arrays, and where every index is in bounds."""
    flat, ok, stride = 0, True, 1
    for size, i in zip(reversed(shape), reversed(index)):
        flat = flat + i * stride
        ok = ok & (i >= 0) & (i < size)
        stride *= size
    return flat, ok


def _memory(n: Node, a, ir: KernelIR, arrays):
    operand = ir.operands[n.attrs["operand"]]
    arr = arrays[operand.index]
    block, axes = operand.block, operand.tile_axes
    nd = operand.ndim
    blk = [x.astype(np.int64) for x in a[:nd]]
    r, c = operand.tile_shape()
    index = []
    for d in range(nd):
        if block[d] is None:
            index.append(blk[d])
        elif d == axes[-1]:
            index.append(blk[d] * block[d] + np.arange(c).reshape(1, 1, c))
        else:
            index.append(blk[d] * block[d] + np.arange(r).reshape(1, r, 1))
    flat, ok = _flat_index(arr.shape, index)
    g = max(x.shape[0] for x in index)
    flat, ok = np.broadcast_to(flat, (g, r, c)), np.broadcast_to(ok, (g, r, c))
    masked = n.attrs.get("masked")
    if n.op == "load":
        if masked:
            ok = ok & np.broadcast_to(a[nd], (g, r, c))
        values = dtypes.to_float32(arr.reshape(-1)[np.where(ok, flat, 0)], operand.dtype)
        other = np.array(n.attrs["other"]).astype(values.dtype)
        return np.where(ok, values, other)
    value = np.broadcast_to(a[nd], (g, r, c))
    if masked:
        ok = ok & np.broadcast_to(a[nd + 1], (g, r, c))
    stored = dtypes.from_float32(value[ok].astype(np.float32) if operand.dtype.is_float else value[ok],
                                 operand.dtype)
    arr.reshape(-1)[flat[ok]] = stored  # reshape of a C-contiguous array is a view: the caller's array changes
    return None
