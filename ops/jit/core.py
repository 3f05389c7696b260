"""pallas_call: a traced kernel specialised per (dtypes, ranks, block shapes, alignment), run by the numpy
interpreter on numpy arrays or as generated CUDA (NVRTC, disk-cached) on CuPy arrays, on the current stream.

The grid and every array dim are runtime arguments of the generated kernel: one compile serves every batch size.
Block shapes, dtypes and the thread count are compile-time.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ops.jit import dtypes, interpret, lower
from ops.jit.cache import KernelCache
from ops.jit.ir import KernelIR, Node, Operand
from ops.jit.trace import BlockRef, BlockSpec, PrefetchRef, tracing

_TRACES: dict[tuple, tuple[KernelIR, int]] = {}
_FUNCTIONS: dict[tuple, object] = {}
_cache: KernelCache | None = None


def kernel_cache() -> KernelCache:
    global _cache
    if _cache is None:
        _cache = KernelCache()
    return _cache


def set_kernel_cache(cache: KernelCache | None) -> None:
    """Use another cache (tests point it at a temporary directory); None: the default one again."""
    global _cache
    _cache = cache
    _FUNCTIONS.clear()


def _fn_key(f: Callable):
    """What makes two index maps or bodies the same: code, closure values and defaults (lambdas made per call)."""
    if isinstance(f, functools.partial):
        return (_fn_key(f.func), f.args, tuple(sorted(f.keywords.items())))
    cells = tuple(c.cell_contents for c in f.__closure__ or ())
    return (f.__code__, cells, f.__defaults__)


def _is_device(array) -> bool:
    return type(array).__module__.split(".")[0] == "cupy"


class PallasCall:
    """A kernel body with its specs; call it with the arrays (inputs and outputs, written in place) and scalars."""

    def __init__(self, body: Callable, *, grid, in_specs: Sequence[BlockSpec], out_specs: Sequence[BlockSpec] = (),
                 num_scalar_prefetch: int = 0, name: str | None = None, num_threads: int | None = None):
        self.body, self.grid = body, tuple(grid) if not callable(grid) else grid
        self.specs = list(in_specs) + list(out_specs)
        self.num_scalar_prefetch = num_scalar_prefetch
        self.name = name or getattr(body, "__name__", "kernel").strip("_")
        self.num_threads = num_threads
        # what does not depend on the arrays, worked out once: a call made once and kept launches cheaply
        self.tile = _kernel_tile(self.specs, self.name)
        self._chunk = lower.chunk_elems(self.tile[1])
        # blocks that span the kernel tile's columns: their arrays may move as vectors (if aligned, per call)
        self._full_width = [s.block_shape[-1] == self.tile[1] and self.tile[1] > 1 for s in self.specs]
        self._static_key = (_fn_key(body), self.name, num_scalar_prefetch,
                            tuple((s.block_shape, _fn_key(s.index_map)) for s in self.specs), num_threads)

    def __call__(self, *arrays, **scalars):
        grid = self.grid(*arrays) if callable(self.grid) else self.grid
        ir, nt = self.specialize(arrays, scalars, len(grid))
        for log in _recorders:
            log.append(Launch(ir, nt, tuple(grid), tuple(a.shape for a in arrays)))
        (_launch if _is_device(arrays[0]) else _interpret)(ir, nt, arrays, grid, scalars)

    def specialize(self, arrays, scalars: dict, grid_rank: int) -> tuple[KernelIR, int]:
        npf = self.num_scalar_prefetch
        if len(arrays) != npf + len(self.specs):
            raise TypeError(f"{self.name}: takes {npf} prefetch arrays and {len(self.specs)} blocked arrays, "
                            f"got {len(arrays)} arrays")
        types = [dtypes.of_array(a) for a in arrays]
        for i, a in enumerate(arrays):
            if not a.flags.c_contiguous:
                raise ValueError(f"{self.name}: array {i} (shape {a.shape}) must be C-contiguous")
        device, e = _is_device(arrays[0]), self._chunk
        vec = tuple(full and _aligned(a, t.itemsize * e, e, device)
                    for a, t, full in zip(arrays[npf:], types[npf:], self._full_width))
        scalar_types = tuple((k, dtypes.float32 if isinstance(v, float) else dtypes.int32)
                             for k, v in sorted(scalars.items()))
        key = (self._static_key, tuple(t.name for t in types), tuple(a.ndim for a in arrays), vec, scalar_types,
               grid_rank)
        hit = _TRACES.get(key)
        if hit is None:
            hit = _TRACES[key] = self._trace(arrays, types, vec, scalar_types, grid_rank, self.tile)
        return hit

    def _trace(self, arrays, types, vec, scalar_types, grid_rank, tile):
        npf = self.num_scalar_prefetch
        operands = [Operand(i, types[i], arrays[i].ndim, None, False) for i in range(npf)]
        for j, spec in enumerate(self.specs):
            i = npf + j
            if len(spec.block_shape) != arrays[i].ndim:
                raise ValueError(f"{self.name}: array {i} has {arrays[i].ndim} dims but its block shape is "
                                 f"{spec.block_shape}")
            operands.append(Operand(i, types[i], arrays[i].ndim, tuple(spec.block_shape), vec[j]))
        ir = KernelIR(self.name, operands, list(scalar_types), grid_rank, tile=tile)
        from ops.jit import trace as t
        with tracing(ir):
            pids = [t.program_id(a) for a in range(grid_rank)]
            prefetch = [PrefetchRef(op) for op in operands[:npf]]
            refs = []
            for op, spec in zip(operands[npf:], self.specs):
                index = spec.index_map(*pids, *prefetch)
                index = index if isinstance(index, tuple) else (index,)
                if len(index) != op.ndim:
                    raise ValueError(f"{self.name}: the index map of array {op.index} gives {len(index)} indices "
                                     f"for {op.ndim} dims")
                refs.append(BlockRef(op, tuple(t.const(x) for x in index)))
            params = {name: t.Value(ir.add(Node("param", (), dt, (), {"name": name}))) for name, dt in scalar_types}
            self.body(*prefetch, *refs, **params)
        nt = self.num_threads or lower.default_threads(tile)
        lower.layout(tile, nt)  # a bad thread count fails here, on the CPU too
        return ir, nt

    def source(self, *arrays, grid_rank=None, **scalars) -> str:
        """The CUDA C this call generates for these arrays (numpy or cupy), without compiling it."""
        rank = grid_rank if grid_rank is not None else len(self.grid(*arrays) if callable(self.grid) else self.grid)
        ir, nt = self.specialize(arrays, scalars, rank)
        return lower.generate(ir, nt)


@dataclass(frozen=True)
class Launch:
    """One kernel run, as recorded: what `cupyllm plan` and the compile tests read."""
    ir: KernelIR
    num_threads: int
    grid: tuple
    shapes: tuple

    def source(self) -> str:
        return lower.generate(self.ir, self.num_threads)

    def bytes_moved(self) -> int:
        """HBM bytes: each array's loaded and stored tiles over the grid, at most the array once per direction."""
        programs = math.prod(self.grid)
        total = 0
        for n in self.ir.nodes:
            if n.op in ("load", "store", "sload"):
                op = self.ir.operands[n.attrs["operand"]]
                size = math.prod(self.shapes[op.index]) * op.dtype.itemsize
                tile = op.dtype.itemsize * (1 if op.block is None else math.prod(op.tile_shape()))
                total += min(size, programs * tile)
        return total


_recorders: list[list] = []


@contextlib.contextmanager
def record():
    """Collect every kernel run inside the block (a list of Launch), numpy or GPU."""
    log: list[Launch] = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def pallas_call(body: Callable, **kwargs) -> PallasCall:
    return PallasCall(body, **kwargs)


def _kernel_tile(specs, name) -> tuple[int, int]:
    r = c = 1
    shapes = []
    for spec in specs:
        dims = [b for b in spec.block_shape if b is not None]
        if len(dims) > 2:
            raise ValueError(f"{name}: a block has at most two non-squeezed dims (rows, columns), got "
                             f"{spec.block_shape}; squeeze the others with None")
        if dims and spec.block_shape[-1] is None:
            raise ValueError(f"{name}: the columns of a block are the array's last dim; block {spec.block_shape} "
                             "squeezes it")
        shape = (1, 1) if not dims else (1, dims[0]) if len(dims) == 1 else tuple(dims)
        shapes.append(shape)
        r, c = max(r, shape[0]), max(c, shape[1])
    for shape in shapes:
        if shape[0] not in (1, r) or shape[1] not in (1, c):
            raise ValueError(f"{name}: block tiles {sorted(set(shapes))} do not share one (rows, columns) shape; "
                             f"each tile must be (R|1, C|1) of the kernel's ({r}, {c})")
    return r, c


def _aligned(array, nbytes: int, e: int, device: bool) -> bool:
    """Whole e-element chunks (nbytes each) of this array can move as vectors: rows and the pointer are aligned."""
    if nbytes < 4 or array.shape[-1] % e:
        return False
    ptr = array.data.ptr if device else array.__array_interface__["data"][0]
    return ptr % min(16, nbytes) == 0


def _interpret(ir: KernelIR, nt: int, arrays, grid, scalars) -> None:
    interpret.run(ir, list(arrays), grid, scalars)


def kernel_args(ir: KernelIR, arrays, grid, scalars) -> list:
    """The generated kernel's arguments in order: each array then its dims (int32), the scalars, the grid dims."""
    args = []
    for a in arrays:
        args.append(a)
        args += _dims(a.shape)
    for name, t in ir.scalars:
        args.append(np.float32(scalars[name]) if t is dtypes.float32 else np.int32(scalars[name]))
    return args + [np.int32(g) for g in grid]


@functools.lru_cache(maxsize=4096)
def _dims(shape: tuple) -> tuple:
    return tuple(np.int32(d) for d in shape)


def _launch(ir: KernelIR, nt: int, arrays, grid, scalars) -> None:
    import cupy as cp
    blocks = math.prod(grid)
    if blocks == 0:
        return
    if blocks >= 2**31:
        raise ValueError(f"{ir.name}: a grid of {blocks} programs is over 2^31; split the call")
    fn = _function(ir, nt)
    fn((blocks,), (nt,), tuple(kernel_args(ir, arrays, grid, scalars)), stream=cp.cuda.get_current_stream())


def _function(ir: KernelIR, nt: int):
    key = (id(ir), nt)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        import cupy as cp
        source = lower.generate(ir, nt)
        arch = "sm_" + cp.cuda.Device().compute_capability
        binary = kernel_cache().get(source, ir.name, arch, ("-std=c++17",))
        module = cp.cuda.function.Module()
        module.load(binary)
        fn = _FUNCTIONS[key] = (module, module.get_function(ir.name))
    return fn[1]
