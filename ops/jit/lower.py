"""Lowers a KernelIR to readable CUDA C: one CTA per program, the tile spread over its threads in chunks of E
contiguous columns (16-byte vector loads and stores where the launcher found the arrays aligned), values in
float registers, row reductions by warp shuffles and, across warps, shared memory.

Thread layout for the kernel tile (R, C): CC = C / E chunks per row; TPR threads share a row, RP rows a pass.
A thread holds chunks (row lr + sr*RP, chunk lc + sc*TPR) for sr < SR, sc < SC. A (1, C) tile is every
row's same columns (broadcast), an (R, 1) tile one value per held row, a (1, 1) tile a scalar.
The generated source includes nothing: half/bf16/fp8 conversions are inline PTX or integer code, so NVRTC
needs no include path and compiles it in milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ops.jit import dtypes
from ops.jit.ir import KernelIR, Node, Operand
from ops.jit.prelude import PRELUDE

_DECODE = {"float32": "{}", "float16": "h2f({})", "bfloat16": "bf2f({})", "float8_e4m3": "e4m32f({})",
           "int32": "{}", "bool": "{}"}
_ENCODE = {"float32": "{}", "float16": "f2h({})", "bfloat16": "f2bf({})", "float8_e4m3": "f2e4m3({})",
           "int32": "(int)({})", "bool": "(bool)({})"}
_UNARY = {"neg": "(-{0})", "exp": "expf({0})", "log": "logf({0})", "sqrt": "sqrtf({0})", "rsqrt": "rsqrtf({0})",
          "tanh": "tanhf({0})", "sigmoid": "(1.f / (1.f + expf(-{0})))", "not": "(!{0})"}
_BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "truediv": "((float){0} / (float){1})",
           "pow": "powf({0}, {1})", "lt": "({0} < {1})", "le": "({0} <= {1})", "gt": "({0} > {1})",
           "ge": "({0} >= {1})", "eq": "({0} == {1})", "ne": "({0} != {1})", "and": "({0} && {1})",
           "or": "({0} || {1})"}
_IDENTITY = {"sum": "0.f", "max": "-__int_as_float(0x7f800000)", "min": "__int_as_float(0x7f800000)"}
_COMBINE = {"sum": "({0} + {1})", "max": "fmaxf({0}, {1})", "min": "fminf({0}, {1})"}


@dataclass(frozen=True)
class Layout:
    r: int
    c: int
    e: int      # elements per chunk
    nt: int     # threads per CTA
    tpr: int    # threads per row
    rp: int     # rows per pass
    sr: int     # passes over rows
    sc: int     # chunks per thread along a row

    @property
    def cc(self) -> int:
        return self.c // self.e


def chunk_elems(c: int) -> int:
    return next(e for e in (8, 4, 2, 1) if c % e == 0)


def layout(tile: tuple[int, int], nt: int) -> Layout:
    r, c = tile
    e = chunk_elems(c)
    cc = c // e
    if nt % 32:
        raise ValueError(f"num_threads must be a multiple of 32, got {nt}")
    tpr = 1 << (cc - 1).bit_length()
    tpr = nt if tpr > nt else tpr  # a row wider than the CTA: one row a pass, every warp on it
    if nt % tpr:
        raise ValueError(f"num_threads {nt} is not a multiple of the {tpr} threads a row of {c} columns takes")
    rp = nt // tpr
    return Layout(r, c, e, nt, tpr, rp, -(-r // rp), -(-cc // tpr))


def default_threads(tile: tuple[int, int]) -> int:
    """One chunk per thread: up to 512 threads for a single-row tile, up to 256 (whole rows) for a row-blocked one."""
    r, c = tile
    cc = c // chunk_elems(c)
    if r == 1:
        return min(512, -(-cc // 32) * 32)
    tpr = min(1 << (cc - 1).bit_length(), 256)
    return max(32, min(256, -(-r * tpr // 32) * 32)) if tpr <= 32 else tpr * max(1, min(256 // tpr, r))


class _Emitter:
    def __init__(self, ir: KernelIR, lay: Layout):
        self.ir, self.l = ir, lay
        self.lines: list[str] = []
        self.ind = 1

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.ind + line)

    # value naming by shape class -------------------------------------------------------------------
    def cls(self, shape) -> str:
        if shape == () or shape == (1, 1):
            return "s"
        r, c = shape
        return "rc" if r > 1 and c > 1 else "r" if r > 1 else "c"

    def decl(self, n: Node) -> str:
        t = n.dtype.c_register
        k = self.cls(n.shape)
        dims = {"s": "", "r": f"[{self.l.sr}]", "c": f"[{self.l.sc}][{self.l.e}]",
                "rc": f"[{self.l.sr}][{self.l.sc}][{self.l.e}]"}[k]
        return f"{t} v{n.id}{dims}"

    def ref(self, n: Node, as_float=False) -> str:
        k = self.cls(n.shape)
        name = f"v{n.id}" + {"s": "", "r": "[sr]", "c": "[sc][e]", "rc": "[sr][sc][e]"}[k]
        return f"(float){name}" if as_float and not n.dtype.is_float else name

    def loops(self, shape):
        """Open the loops over a result of `shape`; returns how many to close."""
        k = self.cls(shape)
        opened = 0
        if k in ("r", "rc"):
            self.emit(f"#pragma unroll\n{'    ' * self.ind}for (int sr = 0; sr < {self.l.sr}; ++sr) {{")
            self.ind += 1
            opened += 1
        if k in ("c", "rc"):
            self.emit(f"#pragma unroll\n{'    ' * self.ind}for (int sc = 0; sc < {self.l.sc}; ++sc)")
            self.emit(f"#pragma unroll\n{'    ' * self.ind}for (int e = 0; e < {self.l.e}; ++e) {{")
            self.ind += 1
            opened += 1
        return opened

    def close(self, opened: int) -> None:
        for _ in range(opened):
            self.ind -= 1
            self.emit("}")

    def elementwise(self, n: Node, expr: str) -> None:
        self.emit(f"{self.decl(n)};")
        opened = self.loops(n.shape)
        self.emit(f"{self.ref(n)} = {expr};")
        self.close(opened)


def generate(ir: KernelIR, num_threads: int) -> str:
    """CUDA C source of `ir` with one extern "C" kernel named ir.name."""
    lay = layout(ir.tile, num_threads)
    em = _Emitter(ir, lay)
    params = []
    for op in ir.operands:
        const = "const " if op.index not in ir.written else ""
        params.append(f"{const}{op.dtype.c_storage} *__restrict__ a{op.index}")
        params += [f"int d{op.index}_{ax}" for ax in range(op.ndim)]
    params += [f"{t.c_register} {name}" for name, t in ir.scalars]
    params += [f"int g{ax}" for ax in range(ir.grid_rank)]
    em.emit(f"const int lc = threadIdx.x % {lay.tpr}, lr = threadIdx.x / {lay.tpr};  // column lane, row lane")
    em.emit("i64 flat = blockIdx.x;")
    for ax in reversed(range(ir.grid_rank)):
        em.emit(f"const int pid{ax} = (int)(flat % g{ax}); flat /= g{ax};")
    for op in ir.operands:
        for ax in reversed(range(op.ndim)):
            nxt = "1" if ax == op.ndim - 1 else f"s{op.index}_{ax + 1} * d{op.index}_{ax + 1}"
            em.emit(f"const i64 s{op.index}_{ax} = {nxt};")
    for n in ir.nodes:
        _lower(em, n)
    header = (f"// {ir.name}: generated by ops/jit from a traced kernel; tile {lay.r}x{lay.c}, {lay.nt} threads, "
              f"{lay.e}-element chunks, {lay.tpr} threads a row\n")
    sig = ",\n        ".join(params)
    return (header + PRELUDE + f'\nextern "C" __global__ void __launch_bounds__({lay.nt})\n'
            f'{ir.name}(\n        {sig}) {{\n' + "\n".join(em.lines) + "\n}\n")


def _lit(value, dtype) -> str:
    if dtype is dtypes.bool_:
        return "true" if value else "false"
    if not dtype.is_float:
        return str(int(value))
    if math.isinf(value):
        return ("-" if value < 0 else "") + "__int_as_float(0x7f800000)"
    if math.isnan(value):
        return "__int_as_float(0x7fc00000)"
    return f"((float){value!r})"


def _lower(em: _Emitter, n: Node) -> None:
    op, l = n.op, em.l
    if op == "const":
        em.emit(f"const {n.dtype.c_register} v{n.id} = {_lit(n.attrs['value'], n.dtype)};")
    elif op == "pid":
        em.emit(f"const int v{n.id} = pid{n.attrs['axis']};")
    elif op == "nprog":
        em.emit(f"const int v{n.id} = g{n.attrs['axis']};")
    elif op == "param":
        em.emit(f"const {n.dtype.c_register} v{n.id} = {n.attrs['name']};")
    elif op == "dim":
        em.emit(f"const int v{n.id} = d{n.attrs['operand']}_{n.attrs['axis']};")
    elif op == "sload":
        k = n.attrs["operand"]
        idx = [f"v{a.id}" for a in n.args]
        ok = " && ".join(f"{i} >= 0 && {i} < d{k}_{ax}" for ax, i in enumerate(idx))
        off = " + ".join(f"(i64){i} * s{k}_{ax}" for ax, i in enumerate(idx))
        dec = _DECODE[n.dtype.name].format(f"a{k}[{off}]")
        em.emit(f"const {n.dtype.c_register} v{n.id} = ({ok}) ? {dec} : ({n.dtype.c_register})0;")
    elif op == "unary":
        fn = n.attrs["fn"]
        x = em.ref(n.args[0], as_float=n.dtype.is_float)
        if fn == "abs":
            expr = f"fabsf({x})" if n.dtype.is_float else f"abs({x})"
        else:
            expr = _UNARY[fn].format(x)
        em.elementwise(n, expr)
    elif op == "binary":
        fn = n.attrs["fn"]
        floaty = n.dtype.is_float or any(a.dtype.is_float for a in n.args)
        x, y = (em.ref(a, as_float=floaty) for a in n.args)
        if fn in ("max", "min"):
            expr = f"f{fn}f({x}, {y})" if floaty else f"{fn}({x}, {y})"
        elif fn == "floordiv":
            expr = f"floorf({x} / {y})" if floaty else f"fdiv({x}, {y})"
        elif fn == "mod":
            expr = f"({x} - {y} * floorf({x} / {y}))" if floaty else f"pmod({x}, {y})"
        else:
            expr = _BINARY[fn].format(x, y)
        em.elementwise(n, expr)
    elif op == "where":
        c, a, b = n.args
        fl = n.dtype.is_float
        em.elementwise(n, f"({em.ref(c)} ? {em.ref(a, fl)} : {em.ref(b, fl)})")
    elif op == "cast":
        x, to = n.args[0], n.dtype
        if to is dtypes.bool_:
            expr = f"({em.ref(x)} != 0)"
        elif to is dtypes.int32:
            expr = f"(int)({em.ref(x)})"
        elif to is dtypes.float32:
            expr = f"(float){em.ref(x)}"
        else:
            expr = _DECODE[to.name].format(_ENCODE[to.name].format(em.ref(x, as_float=True)))
        em.elementwise(n, expr)
    elif op == "broadcast":
        em.elementwise(n, em.ref(n.args[0]))
    elif op == "iota":
        expr = f"(lr + sr * {l.rp})" if n.attrs["axis"] == 0 else f"((lc + sc * {l.tpr}) * {l.e} + e)"
        em.elementwise(n, expr)
    elif op == "reduce":
        _reduce(em, n)
    elif op in ("load", "store"):
        _memory(em, n)
    else:
        raise NotImplementedError(f"lowering: no rule for {op}")


def _row_ok(l: Layout) -> str:
    return "true" if l.rp * l.sr == l.r and l.rp == 1 else f"(lr + sr * {l.rp} < {l.r})"


def _col_ok(l: Layout) -> str:
    return "true" if l.tpr * l.sc == l.cc else f"(lc + sc * {l.tpr} < {l.cc})"


def _reduce(em: _Emitter, n: Node) -> None:
    l, x, fn = em.l, n.args[0], n.attrs["fn"]
    has_rows = em.cls(x.shape) == "rc"
    em.emit(f"{em.decl(n)};")
    opened = 0
    if has_rows:
        em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int sr = 0; sr < {l.sr}; ++sr) {{")
        em.ind += 1
        opened = 1
    acc = f"acc{n.id}"
    em.emit(f"float {acc} = {_IDENTITY[fn]};")
    em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int sc = 0; sc < {l.sc}; ++sc)")
    em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int e = 0; e < {l.e}; ++e)")
    em.emit(f"    if ({_col_ok(l)}) {acc} = {_COMBINE[fn].format(acc, em.ref(x, as_float=True))};")
    if l.tpr > 1:
        width = min(l.tpr, 32)
        em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int o = {width // 2}; o > 0; o >>= 1) "
                f"{acc} = {_COMBINE[fn].format(acc, f'__shfl_xor_sync(0xffffffffu, {acc}, o)')};")
    target = f"v{n.id}[sr]" if has_rows else f"v{n.id}"
    if l.tpr > 32:  # rows span warps: per-warp partials through shared memory
        wpr, nw = l.tpr // 32, l.nt // 32
        em.emit(f"__shared__ float red{n.id}[{l.sr}][{nw}];")
        sr = "sr" if has_rows else "0"
        em.emit(f"if ((threadIdx.x & 31) == 0) red{n.id}[{sr}][threadIdx.x >> 5] = {acc};")
        em.emit("__syncthreads();")
        em.emit(f"{acc} = {_IDENTITY[fn]};")
        em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int w = 0; w < {wpr}; ++w) "
                f"{acc} = {_COMBINE[fn].format(acc, f'red{n.id}[{sr}][lr * {wpr} + w]')};")
    em.emit(f"{target} = {acc};")
    em.close(opened)


def _chunk_words(nbytes: int):
    """(C type, words of 32 bits) of one vector access of `nbytes`."""
    return {32: ("uint4", 8), 16: ("uint4", 4), 8: ("uint2", 2), 4: ("unsigned", 1)}[nbytes]


def _memory(em: _Emitter, n: Node) -> None:
    l, ir = em.l, em.ir
    op: Operand = ir.operands[n.attrs["operand"]]
    k, nd, load = op.index, op.ndim, n.op == "load"
    blk = [f"v{a.id}" for a in n.args[:nd]]
    axes = op.tile_axes
    r_t, c_t = op.tile_shape()
    starts, base_ok = [], []
    for ax in range(nd):
        size = op.block[ax]
        start = blk[ax] if size is None else f"(i64){blk[ax]} * {size}"
        starts.append(start)
        if size is None:
            base_ok.append(f"{blk[ax]} >= 0 && {blk[ax]} < d{k}_{ax}")
    base = " + ".join(f"({s}) * s{k}_{ax}" for ax, s in enumerate(starts)) or "0"
    if load:
        em.emit(f"{em.decl(n)};")
    em.emit(f"{{  // {'load' if load else 'store'} operand {k} ({op.dtype}), tile {r_t}x{c_t}")
    em.ind += 1
    em.emit(f"const i64 base = {base};")
    em.emit(f"const bool blk_ok = {' && '.join(base_ok) or 'true'};")
    rows = r_t > 1
    cols = c_t > 1
    row_ax = axes[0] if rows else None
    col_ax = axes[-1] if axes else None
    masked = n.attrs.get("masked")
    value = None if load else n.args[nd]
    mask = n.args[-1] if masked else None
    # per held element: row index r, column index col (tile-local), and the bounds test
    row_expr = f"(lr + sr * {l.rp})" if rows else "0"
    col_chunk = f"(lc + sc * {l.tpr})" if cols else "0"
    opened = 0
    if rows:
        em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int sr = 0; sr < {l.sr}; ++sr) {{")
        em.ind += 1
        opened += 1
    if cols:
        em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int sc = 0; sc < {l.sc}; ++sc) {{")
        em.ind += 1
        opened += 1
    held = []
    if rows:
        held.append(_row_ok(l))
    if cols:
        held.append(_col_ok(l))
    if not load:  # broadcast copies are written by one lane only
        if not rows and l.rp > 1:  # every lane-row holds the one row: lane-row 0 writes it
            held.append("lr == 0")
        if not cols and l.tpr > 1:
            held.append("lc == 0")
    em.emit(f"const bool held = {' && '.join(held) or 'true'};")
    row_off = f"(i64){row_expr} * s{k}_{row_ax}" if rows else "0"
    row_bound = (f"(({starts[row_ax]}) + {row_expr} >= 0 && ({starts[row_ax]}) + {row_expr} < d{k}_{row_ax})"
                 if rows else "true")
    e = l.e if cols else 1
    # a mask that varies along columns needs per-element stores; a per-row or scalar mask keeps vectors
    # (the mask is then one value per row or per program: part of the chunk's guard)
    whole_chunk_mask = masked and em.cls(mask.shape) in ("s", "r")
    vector = op.vector and cols and e * op.dtype.itemsize >= 4 and (load or not masked or whole_chunk_mask)
    col_start = f"({starts[col_ax]})" if col_ax is not None else "0"
    if vector:
        nbytes = e * op.dtype.itemsize
        vt, words = _chunk_words(nbytes)
        em.emit(f"const i64 col0 = {col_start} + (i64){col_chunk} * {e};")
        guard = f" && {em.ref(mask)}" if masked and not load else ""
        em.emit(f"const bool ok = held && blk_ok && {row_bound} && col0 >= 0 && col0 + {e} <= d{k}_{col_ax}{guard};")
        em.emit(f"const i64 off = base + {row_off} + (i64){col_chunk} * {e};")
        per_word = 4 // op.dtype.itemsize
        bits = 8 * op.dtype.itemsize
        lanes = "xyzw"
        if load:
            em.emit(f"unsigned w[{words}] = {{{', '.join('0u' for _ in range(words))}}};")
            em.emit("if (ok) {")
            parts = 2 if nbytes == 32 else 1
            for p in range(parts):
                # the read-only cache path only for arrays nothing in the kernel writes
                ld = "__ldg(" if k not in ir.written else "*("
                em.emit(f"    const {vt} q{p} = {ld}reinterpret_cast<const {vt} *>(a{k} + off) + {p});")
                if vt == "unsigned":
                    em.emit(f"    w[{p}] = q{p};")
                else:
                    n_l = 4 if vt == "uint4" else 2
                    for i in range(n_l):
                        em.emit(f"    w[{p * n_l + i}] = q{p}.{lanes[i]};")
            em.emit("}")
            dst = em.ref(n).replace("[e]", "[j]")
            em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int j = 0; j < {e}; ++j) {{")
            raw = ("__uint_as_float(w[j])" if op.dtype is dtypes.float32 else "(int)w[j]" if op.dtype is dtypes.int32
                   else f"(w[j / {per_word}] >> ({bits} * (j % {per_word}))) & {(1 << bits) - 1}u")
            em.emit(f"    {dst} = {_DECODE[op.dtype.name].format(raw)};")
            if masked:
                mref = em.ref(mask).replace("[e]", "[j]")
                em.emit(f"    if (!({mref})) {dst} = {_lit(n.attrs['other'], n.dtype)};")
            em.emit("}")
        else:
            src = em.ref(value, as_float=op.dtype.is_float).replace("[e]", "[j]")
            em.emit(f"unsigned w[{words}] = {{{', '.join('0u' for _ in range(words))}}};")
            em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int j = 0; j < {e}; ++j) {{")
            enc = _ENCODE[op.dtype.name].format(src)
            if op.dtype is dtypes.float32:
                em.emit(f"    w[j] = __float_as_uint({enc});")
            elif op.dtype is dtypes.int32:
                em.emit(f"    w[j] = (unsigned)({enc});")
            else:
                em.emit(f"    w[j / {per_word}] |= (unsigned)({enc}) << ({bits} * (j % {per_word}));")
            em.emit("}")
            em.emit("if (ok) {")
            parts = 2 if nbytes == 32 else 1
            for p in range(parts):
                if vt == "unsigned":
                    em.emit(f"    reinterpret_cast<unsigned *>(a{k} + off)[{p}] = w[{p}];")
                else:
                    n_l = 4 if vt == "uint4" else 2
                    ws = ", ".join(f"w[{p * n_l + i}]" for i in range(n_l))
                    em.emit(f"    reinterpret_cast<{vt} *>(a{k} + off)[{p}] = make_{vt}({ws});")
            em.emit("}")
    else:
        em.emit(f"#pragma unroll\n{'    ' * em.ind}for (int j = 0; j < {e}; ++j) {{")
        em.ind += 1
        col = f"{col_start} + (i64){col_chunk} * {e} + j" if cols else col_start
        col_bound = f"({col}) >= 0 && ({col}) < d{k}_{col_ax}" if col_ax is not None else "true"
        mref = em.ref(mask).replace("[e]", "[j]") if masked else "true"
        em.emit(f"const bool ok = held && blk_ok && {row_bound} && {col_bound} && {mref};")
        em.emit(f"const i64 off = base + {row_off} + (i64){col_chunk} * {e} + j;" if cols else
                f"const i64 off = base + {row_off};")
        if load:
            dst = em.ref(n).replace("[e]", "[j]")
            em.emit(f"{dst} = ok ? {_DECODE[op.dtype.name].format(f'a{k}[off]')} : {_lit(n.attrs['other'], n.dtype)};")
        else:
            src = em.ref(value, as_float=op.dtype.is_float).replace("[e]", "[j]")
            em.emit(f"if (ok) a{k}[off] = {_ENCODE[op.dtype.name].format(src)};")
        em.ind -= 1
        em.emit("}")
    em.close(opened)
    em.ind -= 1
    em.emit("}")
