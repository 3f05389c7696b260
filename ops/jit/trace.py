"""Tracing: a kernel body is a Python function over refs; running it on tracer objects records the KernelIR.

The body sees one ref per operand (ref[...] loads its block as a tile, ref[...] = v stores one), tiles support
arithmetic, comparisons, casts and reductions along the last axis, and program_id/num_programs give the grid
position. Index maps of the BlockSpecs are traced the same way, as scalar expressions.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable

from ops.jit import dtypes
from ops.jit.ir import COMPARE, KernelIR, Node, Operand, broadcast_shapes

_state = threading.local()


@dataclass(frozen=True)
class BlockSpec:
    """block_shape: one entry per array dim, None for a squeezed dim (size 1, absent from the tile); at most two
    non-None entries, the last of them on the array's last dim. index_map(*program_ids, *prefetch_refs) gives the
    block index per dim; a block starts at index * block size (squeezed dims: at the index itself)."""
    block_shape: tuple
    index_map: Callable


def _ir() -> KernelIR:
    ir = getattr(_state, "ir", None)
    if ir is None:
        raise RuntimeError("jit functions (program_id, exp, sum, ...) are used inside a kernel body while tracing")
    return ir


@contextlib.contextmanager
def tracing(ir: KernelIR):
    previous = getattr(_state, "ir", None)
    _state.ir, _state.pids = ir, {}
    try:
        yield
    finally:
        _state.ir = previous


def _node(op, args=(), dtype=dtypes.float32, shape=(), **attrs) -> "Value":
    return Value(_ir().add(Node(op, tuple(a.node for a in args), dtype, shape, attrs)))


def const(value, dtype=None) -> "Value":
    if isinstance(value, Value):
        return value
    if isinstance(value, bool):
        return _node("const", dtype=dtypes.bool_, value=value)
    if isinstance(value, int):
        return _node("const", dtype=dtype or dtypes.int32, value=value)
    if isinstance(value, float):
        return _node("const", dtype=dtypes.float32, value=value)
    raise TypeError(f"a jit kernel takes Python int/float/bool constants and traced values, got {type(value).__name__}")


class Value:
    """A traced scalar or tile. Arithmetic follows numpy broadcasting; floats compute in float32 registers."""
    __array_priority__ = 1000

    def __init__(self, node: Node):
        self.node = node

    dtype = property(lambda self: self.node.dtype)
    shape = property(lambda self: self.node.shape)

    def _binary(self, fn, other, reverse=False):
        a, b = (const(other), self) if reverse else (self, const(other))
        shape = broadcast_shapes(a.shape, b.shape)
        if fn in COMPARE or fn in ("and", "or"):
            dtype = dtypes.bool_
        elif fn == "truediv":
            dtype = dtypes.float32
        else:
            dtype = dtypes.promote(a.dtype, b.dtype)
        return _node("binary", (a, b), dtype, shape, fn=fn)

    __add__ = lambda s, o: s._binary("add", o)  # noqa: E731
    __radd__ = lambda s, o: s._binary("add", o, True)  # noqa: E731
    __sub__ = lambda s, o: s._binary("sub", o)  # noqa: E731
    __rsub__ = lambda s, o: s._binary("sub", o, True)  # noqa: E731
    __mul__ = lambda s, o: s._binary("mul", o)  # noqa: E731
    __rmul__ = lambda s, o: s._binary("mul", o, True)  # noqa: E731
    __truediv__ = lambda s, o: s._binary("truediv", o)  # noqa: E731
    __rtruediv__ = lambda s, o: s._binary("truediv", o, True)  # noqa: E731
    __floordiv__ = lambda s, o: s._binary("floordiv", o)  # noqa: E731
    __rfloordiv__ = lambda s, o: s._binary("floordiv", o, True)  # noqa: E731
    __mod__ = lambda s, o: s._binary("mod", o)  # noqa: E731
    __rmod__ = lambda s, o: s._binary("mod", o, True)  # noqa: E731
    __pow__ = lambda s, o: s._binary("pow", o)  # noqa: E731
    __lt__ = lambda s, o: s._binary("lt", o)  # noqa: E731
    __le__ = lambda s, o: s._binary("le", o)  # noqa: E731
    __gt__ = lambda s, o: s._binary("gt", o)  # noqa: E731
    __ge__ = lambda s, o: s._binary("ge", o)  # noqa: E731
    __eq__ = lambda s, o: s._binary("eq", o)  # noqa: E731
    __ne__ = lambda s, o: s._binary("ne", o)  # noqa: E731
    __and__ = lambda s, o: s._binary("and", o)  # noqa: E731
    __or__ = lambda s, o: s._binary("or", o)  # noqa: E731
    __hash__ = object.__hash__

    def __neg__(self):
        return _unary("neg", self)

    def __invert__(self):
        return _unary("not", self)

    def __bool__(self):
        raise TypeError("a traced value has no truth value while tracing: use jit.where(cond, a, b) or a mask")

    def astype(self, dtype) -> "Value":
        """Round to `dtype` (registers stay float32 for floats: the value is what a store/load pair would give)."""
        return _node("cast", (self,), dtypes.get(dtype), self.shape, to=dtypes.get(dtype).name)

    def sum(self, axis=-1, keepdims=True):
        return reduce("sum", self, axis)

    def max(self, axis=-1, keepdims=True):
        return reduce("max", self, axis)

    def min(self, axis=-1, keepdims=True):
        return reduce("min", self, axis)

    def mean(self, axis=-1, keepdims=True):
        return reduce("sum", self, axis) * (1.0 / self.shape[-1])


def _unary(fn, x) -> Value:
    x = const(x)
    dtype = dtypes.bool_ if fn == "not" else x.dtype if fn in ("neg", "abs") else dtypes.float32
    return _node("unary", (x,), dtype, x.shape, fn=fn)


def exp(x): return _unary("exp", x)
def log(x): return _unary("log", x)
def sqrt(x): return _unary("sqrt", x)
def rsqrt(x): return _unary("rsqrt", x)
def tanh(x): return _unary("tanh", x)
def sigmoid(x): return _unary("sigmoid", x)
def abs(x): return _unary("abs", x)  # noqa: A001
def maximum(a, b): return const(a)._binary("max", b)
def minimum(a, b): return const(a)._binary("min", b)


def where(cond, a, b) -> Value:
    cond, a, b = const(cond), const(a), const(b)
    shape = broadcast_shapes(broadcast_shapes(cond.shape, a.shape), b.shape)
    return _node("where", (cond, a, b), dtypes.promote(a.dtype, b.dtype), shape)


def reduce(fn, x, axis=-1) -> Value:
    """Reduce along the tile's last axis (the only one): (R, C) -> (R, 1); keepdims always."""
    if axis not in (-1, 1):
        raise ValueError(f"jit reductions run along the last axis of a tile (axis=-1), got axis={axis}")
    if x.shape == () or x.shape[1] == 1:
        return x
    return _node("reduce", (x,), x.dtype, (x.shape[0], 1), fn=fn)


def sum(x, axis=-1): return reduce("sum", x, axis)  # noqa: A001
def max(x, axis=-1): return reduce("max", x, axis)  # noqa: A001
def min(x, axis=-1): return reduce("min", x, axis)  # noqa: A001
def mean(x, axis=-1): return const(x).mean(axis)


def program_id(axis: int) -> Value:
    ir = _ir()
    if not 0 <= axis < ir.grid_rank:
        raise ValueError(f"program_id({axis}): the grid has {ir.grid_rank} axes")
    pids = _state.pids
    if axis not in pids:
        pids[axis] = _node("pid", dtype=dtypes.int32, axis=axis)
    return pids[axis]


def num_programs(axis: int) -> Value:
    return _node("nprog", dtype=dtypes.int32, axis=axis)


def iota(axis: int) -> Value:
    """Each element's index inside the tile along `axis` (0: rows, 1: columns), int32."""
    r, c = _ir().tile
    shape = (r, 1) if axis == 0 else (1, c)
    return _node("iota", dtype=dtypes.int32, shape=shape, axis=axis)


def dim(ref, axis: int) -> Value:
    """The runtime size of the ref's array along `axis` (for masks on ragged edges)."""
    return _node("dim", dtype=dtypes.int32, operand=ref.operand.index, axis=axis)


class PrefetchRef:
    """A scalar-prefetch operand: ref[i] (or ref[i, j]) reads one element; out of bounds reads 0."""

    def __init__(self, operand: Operand):
        self.operand = operand

    dtype = property(lambda self: self.operand.dtype)

    def __getitem__(self, index) -> Value:
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != self.operand.ndim:
            raise IndexError(f"operand {self.operand.index} has {self.operand.ndim} dims, indexed with {len(index)}")
        return _node("sload", tuple(const(i) for i in index), self.operand.dtype, (), operand=self.operand.index)


class BlockRef:
    """The block of one operand at this program: ref[...] loads it, ref[...] = v stores it."""

    def __init__(self, operand: Operand, block_index: tuple[Value, ...]):
        self.operand, self.block_index = operand, block_index

    dtype = property(lambda self: self.operand.dtype)
    shape = property(lambda self: self.operand.tile_shape())

    def _mask(self, mask):
        mask = const(mask)
        if mask.shape not in ((), *_shapes_under(self.shape)):
            raise ValueError(f"a {mask.shape} mask does not fit operand {self.operand.index}'s {self.shape} block")
        return mask

    def load(self, mask=None, other=0.0) -> Value:
        args = self.block_index + ((self._mask(mask),) if mask is not None else ())
        return _node("load", args, self.operand.dtype, self.shape, operand=self.operand.index,
                     masked=mask is not None, other=float(other))

    def store(self, value, mask=None) -> None:
        value = const(value)
        if value.shape not in ((), *_shapes_under(self.shape)):
            raise ValueError(f"storing a {value.shape} tile into operand {self.operand.index}'s {self.shape} block")
        if value.shape != self.shape:
            value = _node("broadcast", (value,), value.dtype, self.shape)
        args = self.block_index + (value,) + ((self._mask(mask),) if mask is not None else ())
        _ir().written.add(self.operand.index)
        _node("store", args, self.operand.dtype, (), operand=self.operand.index, masked=mask is not None)

    def __getitem__(self, index):
        if index is not Ellipsis and index != slice(None):
            raise IndexError("a block ref is read whole: ref[...] (or ref.load(mask=...))")
        return self.load()

    def __setitem__(self, index, value):
        if index is not Ellipsis and index != slice(None):
            raise IndexError("a block ref is written whole: ref[...] = value (or ref.store(value, mask=...))")
        self.store(value)


def _shapes_under(shape):
    r, c = shape
    return {(r, c), (1, c), (r, 1), (1, 1)}
