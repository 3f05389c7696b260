"""The typed IR a traced kernel becomes: a list of nodes in program order (each used only after it is made),
shapes 2-D tiles (R, C) or () scalars, read by both the numpy interpreter and the CUDA lowering.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ops.jit import dtypes
from ops.jit.dtypes import DType

# elementwise ops and what they mean; the interpreter and the lowering each implement every name here
UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "tanh", "abs", "sigmoid", "not")
BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "max", "min", "pow",
          "lt", "le", "gt", "ge", "eq", "ne", "and", "or")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
REDUCE = ("sum", "max", "min")


@dataclass(eq=False)
class Node:
    """One SSA value (or a store). op is one of:
    const(value) | pid(axis) | nprog(axis) | param(name) | dim(operand, axis) | sload(operand; args = index)
    | load(operand; args = block index [+ mask]) | store(operand; args = block index + value [+ mask])
    | unary(fn) | binary(fn) | where | cast(to) | reduce(fn) | iota(axis) | broadcast."""
    op: str
    args: tuple = ()
    dtype: DType = dtypes.float32
    shape: tuple = ()
    attrs: dict = field(default_factory=dict)
    id: int = -1

    @property
    def is_scalar(self) -> bool:
        return self.shape == ()


@dataclass(frozen=True)
class Operand:
    """An array argument: its type, rank, block shape (None = squeezed dim) and whether it is a scalar-prefetch
    ref (read with scalar loads, e.g. by index maps) rather than a blocked one."""
    index: int
    dtype: DType
    ndim: int
    block: tuple | None  # None for scalar-prefetch operands
    vector: bool         # 16-byte-friendly: whole chunks may be loaded as vectors (the launcher checked)

    @property
    def tile_axes(self) -> tuple[int, ...]:
        """The array axes a tile spans (the block's non-squeezed dims): (col,) or (row, col)."""
        return tuple(i for i, b in enumerate(self.block) if b is not None)

    def tile_shape(self) -> tuple[int, int]:
        sizes = [self.block[i] for i in self.tile_axes]
        return (1, 1) if not sizes else (1, sizes[0]) if len(sizes) == 1 else tuple(sizes)


@dataclass
class KernelIR:
    name: str
    operands: list[Operand]
    scalars: list[tuple[str, DType]]  # runtime scalar arguments, in order
    grid_rank: int
    nodes: list[Node] = field(default_factory=list)
    tile: tuple[int, int] = (1, 1)    # the kernel's (R, C): every tile is (R|1, C|1)
    written: set = field(default_factory=set)  # operand indices stored to

    def add(self, node: Node) -> Node:
        node.id = len(self.nodes)
        self.nodes.append(node)
        return node

    def describe(self) -> str:
        """One line per node: what the tracer produced (for docs/jit.md and debugging)."""
        lines = []
        for n in self.nodes:
            args = ", ".join(f"%{a.id}" for a in n.args)
            extra = ", ".join(f"{k}={v}" for k, v in n.attrs.items())
            shape = "x".join(map(str, n.shape)) or "scalar"
            lines.append(f"%{n.id} = {n.op}({args}{'; ' if args and extra else ''}{extra}) : {n.dtype} {shape}")
        return "\n".join(lines)


def broadcast_shapes(a: tuple, b: tuple) -> tuple:
    """numpy broadcasting of tile shapes; () is a scalar."""
    if a == ():
        return b
    if b == ():
        return a
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"tile shapes {a} and {b} do not broadcast")
        out.append(max(x, y))
    return tuple(out)
