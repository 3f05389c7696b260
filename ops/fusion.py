"""The fusion pass: a layer written as a list of ops over named buffers is grouped into kernels, and each chain of
row ops becomes one generated JIT kernel whose body composes the ops' tile functions.

Kinds of op and what they fuse with:
  row        elementwise / row-reduction ops on [T, width] rows (residual add, RMSNorm, SiLU x mul, cast): a
             maximal run of them at one width is one kernel (`row_kernel`), loading each outside input once and
             storing only the buffers read later (or kept: the residual). Every intermediate is rounded to the
             storage dtype where the unfused sequence would have stored it, so fusing changes no result.
  head       per-head ops on qkv (q/k RMSNorm, RoPE, KV-cache write): programs over (token, head group) with q/k/v
             roles, a block structure rows do not share; a run of them is the one template jit_ops._rope_cache.
  gemm       cuBLASLt; a following `bias` op is absorbed by its epilogue (CUBLASLT_EPILOGUE_BIAS).
  attention  the hand tensor-core kernel (ops/kernels/attention.cu).
  moe        a sparse layer's MLP (ops/cuda/moe.py): router GEMM, routing, grouped GEMMs, combine, one op here (8
             launches on the GPU, 12 with Qwen2-MoE's shared expert); its experts' bytes are those of the experts
             T tokens are expected to touch, and it moves its expert rows (gate/up, activation, output) twice.
A GEMM/attention ends a group: the language has no matrix-multiply primitive, and fusing a norm into a GEMV
prologue did not beat cuBLASLt when measured (docs/jit.md).

`plan(ops)` is what `cupyllm plan --model` prints; tests check it against the launches LlamaModel.forward makes.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from ops import jit
from ops.jit import BlockSpec

ROW, HEAD, GEMM, ATTENTION, BIAS, MOE = "row", "head", "gemm", "attention", "bias", "moe"


@dataclass(frozen=True)
class Buffer:
    """A tensor the layer reads or writes: `width` elements per token (activations), a weight of `rows` x `width`
    (1 row: a vector), or the paged KV cache (written a row per token, read `context` rows per sequence)."""
    name: str
    width: int
    weight: bool = False
    rows: int = 1
    kept: bool = False  # outlives the layer (the residual, the KV cache): always stored
    cache: bool = False
    itemsize: int = 0  # 0: the model's dtype
    experts: int = 0  # > 0: `experts` stacked weights of rows x width, each token reading `picks` of them
    picks: int = 0

    def nbytes(self, tokens: int, itemsize: int, context: int = 1) -> int:
        size = self.itemsize or itemsize
        if self.weight and self.experts:  # the experts T tokens touch, on average, routed uniformly
            touched = self.experts * (1 - (1 - self.picks / self.experts) ** tokens)
            return round(touched * self.rows * self.width * size)
        if self.weight:
            return self.rows * self.width * size
        return (context if self.cache else 1) * tokens * self.width * size


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    inputs: tuple
    outputs: tuple
    width: int = 0  # row ops: the row width they work on (a run at one width fuses)


@dataclass
class Kernel:
    """One launch of the plan: the ops it runs, and the HBM bytes it moves at T tokens (see bytes_moved)."""
    kind: str
    ops: list

    @property
    def name(self) -> str:
        if self.kind == GEMM:
            return "gemm" + ("+bias" if any(o.kind == BIAS for o in self.ops) else "")
        return "+".join(o.name for o in self.ops)

    def reads(self) -> list[str]:
        made, out = set(), []
        for o in self.ops:
            out += [b for b in o.inputs if b not in made and b not in out]
            made.update(o.outputs)
        return out

    def writes(self) -> list[str]:
        out = []
        for o in self.ops:
            out += [b for b in o.outputs if b not in out]
        return out


def plan(ops: list[Op], fuse: bool = True) -> list[Kernel]:
    """Group the op list into kernels: runs of row ops at one width, runs of head ops, a GEMM with the bias after
    it; attention alone. fuse=False: one kernel per op (the plan before the pass)."""
    kernels: list[Kernel] = []
    for op in ops:
        last = kernels[-1] if kernels else None
        if fuse and last is not None and _joins(last, op):
            last.ops.append(op)
        else:
            kernels.append(Kernel(op.kind, [op]))
    return kernels


def _joins(k: Kernel, op: Op) -> bool:
    if op.kind == BIAS:
        return k.kind == GEMM and k.ops[-1].kind == GEMM
    if op.kind == ROW:
        return k.kind == ROW and k.ops[-1].width == op.width
    return op.kind == HEAD and k.kind == HEAD


def stored(kernels: list[Kernel], buffers: dict[str, Buffer]) -> list[list[str]]:
    """Per kernel, the buffers it must write: those another kernel reads (a later one, or one of the next layer's:
    the list repeats), and kept ones; the rest stay in registers."""
    out = []
    for i, k in enumerate(kernels):
        later = {b for k2 in kernels[i + 1:] + kernels[:i] for b in k2.reads()}
        out.append([b for b in k.writes() if b in later or buffers[b].kept])
    return out


def bytes_moved(k: Kernel, writes: list[str], buffers: dict[str, Buffer], tokens: int, itemsize: int,
                context: int = 1) -> int:
    """HBM bytes of one launch at `tokens` rows (decode: one sequence per token): every outside input read once,
    every stored output written once, a GEMM's whole weight, and attention's `context` cached tokens of K and V."""
    reads = sum(buffers[b].nbytes(tokens, itemsize, context if k.kind == ATTENTION else 1) for b in k.reads())
    return reads + sum(buffers[b].nbytes(tokens, itemsize) for b in writes)


# --- row ops: their tile functions, and the kernel a run of them becomes -----------------------------------------

def _add(v, op):
    a, b = op.inputs
    return {op.outputs[0]: v[a] + v[b]}


def _rms_norm(v, op, eps):
    x, w = op.inputs
    return {op.outputs[0]: v[x] * jit.rsqrt(jit.mean(v[x] * v[x]) + eps) * v[w]}


def _silu_mul(v, op):
    g, u = op.inputs
    return {op.outputs[0]: v[g] / (1.0 + jit.exp(-v[g])) * v[u]}


def _quantize_fp8(v, op):
    """Per row (token): scale = amax / 448 (1 for an all-zero row), codes = x / scale, rounded to E4M3 by their
    store. The arithmetic of ops/quant.quantize_rows, so the two agree bit for bit."""
    (x,), (codes, scale) = op.inputs, op.outputs
    amax = jit.max(jit.abs(v[x]))
    s = jit.where(amax > 0.0, amax / 448.0, 1.0)
    return {codes: v[x] / s, scale: s}


TILE_FNS: dict[str, Callable] = {"add": _add, "rms_norm": _rms_norm, "silu_mul": _silu_mul,
                                 "quantize_fp8": _quantize_fp8}
# (SiLU x mul runs as jit_ops.silu_and_mul, which reads gate and up as halves of one row in autotuned column blocks.)
REDUCES = {"rms_norm", "quantize_fp8"}  # need the whole row in one block
EPS = {"rms_norm"}  # take a runtime eps


def add(a: str, b: str, out: str, width: int) -> Op:
    return Op("add", ROW, (a, b), (out,), width)


def rms_norm(x: str, weight: str, out: str, width: int) -> Op:
    return Op("rms_norm", ROW, (x, weight), (out,), width)


def silu_mul(gate: str, up: str, out: str, width: int) -> Op:
    return Op("silu_mul", ROW, (gate, up), (out,), width)


def quantize_fp8(x: str, codes: str, scale: str, width: int) -> Op:
    """x [T, width] -> E4M3 codes [T, width] (uint8) and a float32 scale per row [T, 1]."""
    return Op("quantize_fp8", ROW, (x,), (codes, scale), width)


@functools.cache
def row_kernel(ops: tuple[Op, ...], weights: frozenset, stores: tuple[str, ...]):
    """One pallas_call for a run of row ops (all one width, the whole row a block). Call it with the arrays of
    `operands(ops, stores)` in order (activations [T, width], weights [width]) and eps0, eps1, ... for its norms."""
    width = ops[0].width
    names = tuple(operands(ops, stores))
    reads = tuple(Kernel(ROW, list(ops)).reads())
    norms = tuple(i for i, o in enumerate(ops) if o.name in EPS)
    rows_of = next(i for i, n in enumerate(names) if n not in weights)  # an activation: its rows are the grid

    def body(*refs, **scalars):
        ref = dict(zip(names, refs))
        dtype = ref[names[rows_of]].dtype  # activations share the storage dtype
        v = {n: ref[n][...] for n in reads}
        for i, o in enumerate(ops):
            extra = (scalars[f"eps{norms.index(i)}"],) if i in norms else ()
            for n, value in TILE_FNS[o.name](v, o, *extra).items():
                # a value a later op reads is rounded as its store would round it; a stored one, by the store
                v[n] = value.astype(dtype) if any(n in later.inputs for later in ops[i + 1:]) else value
        for n in stores:
            ref[n][...] = v[n]

    row = BlockSpec((None, width), lambda i: (i, 0))
    whole = BlockSpec((width,), lambda i: (0,))
    per_row = BlockSpec((None, 1), lambda i: (i, 0))  # a [T, 1] value per row: a quantization scale
    scales = {o.outputs[1] for o in ops if o.name == "quantize_fp8"}
    specs = [whole if n in weights else per_row if n in scales else row for n in names]
    return jit.pallas_call(body, grid=lambda *a: (a[rows_of].shape[0],), in_specs=specs,
                           name="_".join(o.name for o in ops))


def operands(ops, stores) -> list[str]:
    """The fused kernel's arrays: its outside inputs, then the stored buffers it does not also read."""
    reads = Kernel(ROW, list(ops)).reads()
    return reads + [n for n in stores if n not in reads]


def describe(kernels: list[Kernel], buffers: dict[str, Buffer], tokens: int, itemsize: int, context: int) -> list[dict]:
    """The rows `cupyllm plan` prints: per kernel its ops, what it stores and the bytes it moves."""
    rows = []
    for k, writes in zip(kernels, stored(kernels, buffers)):
        rows.append({"kernel": k.name, "kind": k.kind, "ops": [o.name for o in k.ops], "stores": writes,
                     "bytes": bytes_moved(k, writes, buffers, tokens, itemsize, context)})
    return rows


def totals(rows: list[dict]) -> tuple[int, int]:
    return len(rows), sum(r["bytes"] for r in rows)


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{3 if unit == 'GB' else 2}f} {unit}"
    return f"{n} B"
