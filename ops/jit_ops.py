"""The model's elementwise and row-reduction ops written in the JIT language (ops/jit): embedding, RMSNorm,
add + RMSNorm (both composed by the fusion pass, ops/fusion.py), SiLU-and-mul, RoPE (+ Qwen3's q/k norm) with the
KV-cache write. One generated kernel each.

Each takes numpy or CuPy arrays (the interpreter or the GPU runs the same definition) with the argument lists of
ops/reference.py. Attention's tensor-core loops and the sampler's sort stay hand CUDA (ops/kernels/): the
language has no matrix-multiply or cross-program primitives.
"""
from __future__ import annotations

import functools

import numpy as np

from ops import fusion, jit
from ops.jit import BlockSpec, lower

_INT32 = np.dtype(np.int32)
SILU_CONFIGS = [dict(block=b) for b in (1024, 512, 2048, 4096)]
# Each op's pallas_call is built once per static shape (functools.cache) and kept: a kept call only looks up its
# trace per launch, which holds the eager (prefill) cost of a launch near that of a hand-written launcher.
_kept = functools.cache


def _rows(*arrays):
    return (arrays[0].shape[0],)


def _row(h):
    return BlockSpec((None, h), lambda i, *_: (i, 0))


def _embedding(ids, table_ref, out_ref):
    out_ref[...] = table_ref[...]


def embedding(ids, table, out) -> None:
    """out[t] = table[ids[t]]; an id outside [0, V) gives a zero row (a masked load), never a fault. Rows move as
    int32 words where they can: a bit-exact copy (a float round trip would quieten NaN payloads)."""
    if table.itemsize == 2 and table.shape[1] % 2 == 0 and out.dtype == table.dtype:
        table, out = table.view(_INT32), out.view(_INT32)
    _embedding_call(table.shape[1])(ids, table, out)


@_kept
def _embedding_call(h):
    return jit.pallas_call(_embedding, grid=_rows, num_scalar_prefetch=1,
                           in_specs=[BlockSpec((None, h), lambda i, ids: (ids[i], 0))], out_specs=[_row(h)],
                           name="embedding")


def rms_norm(x, weight, eps: float, out) -> None:
    _norm_call(x.shape[1])(x, weight, out, eps0=float(eps))


def add_rms_norm(x, residual, weight, eps: float, out) -> None:
    """residual += x (rounded to its dtype, in place); out = rms_norm(residual)."""
    _add_norm_call(x.shape[1])(x, residual, weight, out, eps0=float(eps))


@_kept
def _norm_call(h):  # the fusion pass's kernel for [rms_norm]
    return fusion.row_kernel((fusion.rms_norm("x", "w", "out", h),), frozenset({"w"}), ("out",))


@_kept
def _add_norm_call(h):  # ... and for [add, rms_norm] (the residual is stored: it outlives the kernel)
    return fusion.row_kernel((fusion.add("x", "residual", "residual", h), fusion.rms_norm("residual", "w", "out", h)),
                             frozenset({"w"}), ("residual", "out"))


def rms_norm_fp8(x, weight, eps: float, codes, scale) -> None:
    """rms_norm with its output quantized per token for an FP8 GEMM, in one kernel: codes [T, H] uint8 (E4M3),
    scale [T, 1] float32. The norm is rounded to the model dtype first, as a stored rms_norm output would be, and
    never written: the GEMM reads only the codes."""
    _norm_fp8_call(x.shape[1])(x, weight, codes, scale, eps0=float(eps))


def add_rms_norm_fp8(x, residual, weight, eps: float, codes, scale) -> None:
    """add_rms_norm (residual += x in place) with the normed row quantized as rms_norm_fp8 does: one kernel."""
    _add_norm_fp8_call(x.shape[1])(x, residual, weight, codes, scale, eps0=float(eps))


def quantize_fp8(x, codes, scale) -> None:
    """Rows of x [R, C] to E4M3 codes with a float32 scale per row [R, 1] (ops/quant.quantize_rows on the GPU):
    activations per token, or a weight per output channel at load."""
    _quantize_call(x.shape[1])(x, codes, scale)


@_kept
def _norm_fp8_call(h):
    return fusion.row_kernel((fusion.rms_norm("x", "w", "out", h), fusion.quantize_fp8("out", "codes", "scale", h)),
                             frozenset({"w"}), ("codes", "scale"))


@_kept
def _add_norm_fp8_call(h):
    return fusion.row_kernel((fusion.add("x", "residual", "residual", h), fusion.rms_norm("residual", "w", "out", h),
                              fusion.quantize_fp8("out", "codes", "scale", h)),
                             frozenset({"w"}), ("residual", "codes", "scale"))


@_kept
def _quantize_call(c):
    return fusion.row_kernel((fusion.quantize_fp8("x", "codes", "scale", c),), frozenset(), ("codes", "scale"))


def _wide_row_threads(width: int) -> int:
    """Threads for a whole-row kernel holding three rows' worth of values: 1024 (ptxas caps them at 64 registers)
    while a thread holds at most 2 chunks a row, else 512 (128 registers). Measured with nvcc -Xptxas -v on the
    widths of tests/test_jit_compile.py: either other choice spills at some width, fp16 or bf16."""
    chunks = width // lower.chunk_elems(width)
    return 1024 if chunks <= 2 * 1024 else 512


class _Loads(dict):
    """Tiles loaded where the body first reads them, so a wide row's operands are not all held at once (up is
    loaded after silu(gate) is made: at I = 18944 both rows up front would spill)."""

    def __init__(self, **refs):
        super().__init__()
        self.refs = refs

    def __missing__(self, name):
        value = self[name] = self.refs[name][...]
        return value


def silu_and_mul_fp8(x, codes, scale) -> None:
    """silu_and_mul with its output quantized per token, in one kernel: x = [gate | up] [T, 2I] -> codes [T, I]
    (E4M3) and scale [T, 1]. The product is rounded to x's dtype first, as silu_and_mul would store it."""
    t, inter = codes.shape
    if x.shape != (t, 2 * inter):
        raise ValueError(f"silu_and_mul_fp8: x has shape {x.shape}, expected (T, 2*I) = {(t, 2 * inter)}")
    _silu_fp8_call(inter)(*(x.reshape(t, 2, inter),) * 2, codes, scale)


@_kept
def _silu_fp8_call(inter):
    ops = (fusion.silu_mul("gate", "up", "act", inter), fusion.quantize_fp8("act", "codes", "scale", inter))

    def body(gate_ref, up_ref, codes_ref, scale_ref):  # the fusion pass's tile functions, on gate/up halves
        v = _Loads(gate=gate_ref, up=up_ref)
        v.update({k: a.astype(gate_ref.dtype) for k, a in fusion.TILE_FNS["silu_mul"](v, ops[0]).items()})
        q = fusion.TILE_FNS["quantize_fp8"](v, ops[1])
        codes_ref[...], scale_ref[...] = q["codes"], q["scale"]

    return jit.pallas_call(body, grid=lambda x, up, codes, scale: (codes.shape[0],),
                           in_specs=[BlockSpec((None, None, inter), lambda i: (i, 0, 0)),
                                     BlockSpec((None, None, inter), lambda i: (i, 1, 0))],
                           out_specs=[_row(inter), BlockSpec((None, 1), lambda i: (i, 0))],
                           name="silu_mul_quantize_fp8", num_threads=_wide_row_threads(inter))


def _silu_and_mul(gate_ref, up_ref, out_ref):
    g = gate_ref[...]
    out_ref[...] = g / (1.0 + jit.exp(-g)) * up_ref[...]


def _silu_key(x, out):
    """Tuned per width, dtype and token count rounded up to a power of two (at most 512): a prefill of a new
    length reuses its bucket's choice instead of timing the configs again."""
    return out.shape[1], str(out.dtype), 1 << (min(out.shape[0], 512) - 1).bit_length()


@jit.autotune(SILU_CONFIGS, key=_silu_key, writes=(1,))
def _silu_launch(x, out, *, block):
    t, inter = out.shape
    _silu_call(inter, min(block, 1 << (inter - 1).bit_length()))(*(x.reshape(t, 2, inter),) * 2, out)  # gate | up


@_kept
def _silu_call(inter, block):
    return jit.pallas_call(_silu_and_mul, grid=lambda x, up, out: (out.shape[0], -(-inter // block)),
                           in_specs=[BlockSpec((None, None, block), lambda i, j: (i, 0, j)),
                                     BlockSpec((None, None, block), lambda i, j: (i, 1, j))],
                           out_specs=[BlockSpec((None, block), lambda i, j: (i, j))], name="silu_and_mul")


def silu_and_mul(x, out) -> None:
    """out = silu(gate) * up with x = [gate | up]: [T, 2I] -> [T, I]; column blocks autotuned, ragged edge masked."""
    if x.shape != (out.shape[0], 2 * out.shape[1]):
        raise ValueError(f"silu_and_mul: x has shape {x.shape}, expected (T, 2*I) = {(out.shape[0], 2 * out.shape[1])}")
    _silu_launch(x, out)


def _rope_cache(pos, slots, lo_ref, hi_ref, cos_ref, sin_ref, qn_lo, qn_hi, kn_lo, kn_hi,
                kc_lo, kc_hi, vc_lo, vc_hi, *scales, eps, group, qk_norm, fp8):
    j = jit.program_id(1)  # which heads: q heads j*Hkv.. for j < group, then the k heads, then the v heads
    v1 = x1 = lo_ref[...]
    v2 = x2 = hi_ref[...]
    is_q, is_k, is_v = j < group, j == group, j == group + 1
    if qk_norm:  # a Python flag: traced once per value
        inv = jit.rsqrt((jit.sum(x1 * x1) + jit.sum(x2 * x2)) * (1.0 / (2 * x1.shape[1])) + eps)
        x1 = x1 * inv * jit.where(is_q, qn_lo[...], kn_lo[...])
        x2 = x2 * inv * jit.where(is_q, qn_hi[...], kn_hi[...])
    c, s = cos_ref[...], sin_ref[...]
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    rotate = is_q | is_k
    lo_ref.store(o1, mask=rotate)
    hi_ref.store(o2, mask=rotate)
    if fp8:  # an E4M3 cache holds value / scale, a scale per KV head (one per row of the tile); the store rounds
        ks, vs = scales[0][...], scales[1][...]
        o1, o2, v1, v2 = o1 / ks, o2 / ks, v1 / vs, v2 / vs
    kc_lo.store(o1, mask=is_k)
    kc_hi.store(o2, mask=is_k)
    vc_lo.store(v1, mask=is_v)  # v as it came: no norm, no rotation
    vc_hi.store(v2, mask=is_v)


def rope_and_cache(qkv, positions, slot_mapping, k_cache, v_cache, cos_sin, q_norm=None, k_norm=None,
                   eps: float = 1e-6, kv_scale=None) -> None:
    """ops/reference.rope_and_cache: rotate q, k in place (neox halves), optional per-head RMSNorm first, write k, v
    to the paged cache at slot_mapping (slot -1: not written). Programs: (token, head group of Hkv heads).
    An FP8 cache (uint8 E4M3 codes, as ops/quant.Fp8Cache holds them) takes kv_scale = (k_scale, v_scale), float32
    [Hkv] each (or one [2, Hkv] array): the k and v scale of each KV head."""
    nb, hkv, bs, d = k_cache.shape
    t, width = qkv.shape
    hq = width // d - 2 * hkv
    if width % d or hq <= 0 or hq % hkv:
        raise ValueError(f"rope_and_cache: qkv width {width} is not (Hq + 2 * {hkv}) * {d} with Hq a multiple of {hkv}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("rope_and_cache: q_norm and k_norm go together (both or neither)")
    half = d // 2
    heads = qkv.reshape(t, hq + 2 * hkv, 2, half)
    table = cos_sin.reshape(cos_sin.shape[0], 2, half)
    kc, vc = k_cache.reshape(nb, hkv, bs, 2, half), v_cache.reshape(nb, hkv, bs, 2, half)
    if t == 0:
        return
    norms = (q_norm, k_norm) if q_norm is not None else (qkv[0, :d],) * 2  # stand-ins, never read
    qn, kn = (w.reshape(2, half) for w in norms)
    fp8 = k_cache.dtype == np.uint8
    if fp8 != (kv_scale is not None) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"rope_and_cache: caches {k_cache.dtype}/{v_cache.dtype} with kv_scale "
                         f"{'given' if kv_scale is not None else 'None'}: an E4M3 (uint8) cache pair needs kv_scale "
                         "(k_scale, v_scale [Hkv]), a float16/bfloat16 pair none")
    scales = tuple(kv_scale[i].reshape(hkv, 1) for i in (0, 1)) if fp8 else ()
    _rope_cache_call(hq // hkv, hkv, bs, half, q_norm is not None, fp8)(
        positions, slot_mapping, heads, heads, table, table, qn, qn, kn, kn, kc, kc, vc, vc, *scales, eps=float(eps))


@_kept
def _rope_cache_call(group, hkv, bs, half, qk_norm, fp8=False):
    def block(part):
        return BlockSpec((None, hkv, None, half), lambda i, j, p, s: (i, j, part, 0))

    def trig(part):
        return BlockSpec((None, None, half), lambda i, j, p, s: (p[i], part, 0))

    def weight(part):
        return BlockSpec((None, half), lambda i, j, p, s: (part, 0))

    def cache(part):
        return BlockSpec((None, hkv, None, None, half), lambda i, j, p, s: (s[i] // bs, 0, s[i] % bs, part, 0))

    per_head = [BlockSpec((hkv, 1), lambda i, j, p, s: (0, 0))] * 2 if fp8 else []  # k_scale, v_scale [Hkv, 1]
    return jit.pallas_call(functools.partial(_rope_cache, group=group, qk_norm=qk_norm, fp8=fp8),
                           grid=lambda pos, *_: (pos.shape[0], group + 2), num_scalar_prefetch=2,
                           in_specs=[block(0), block(1), trig(0), trig(1), weight(0), weight(1), weight(0), weight(1)],
                           out_specs=[cache(0), cache(1), cache(0), cache(1)] + per_head,
                           name=f"rope_cache{'_qknorm' if qk_norm else ''}{'_fp8' if fp8 else ''}")


def scale_rows_cols(acc, row_scale, col_scale, bias, out) -> None:
    """out = acc * row_scale * col_scale (+ bias), rounded to out's dtype: the scaling of an FP8 GEMM that cuBLASLt
    ran unscaled into float32 acc [M, N] (row_scale [M, 1] per token, col_scale [N] per weight row)."""
    m, n = acc.shape
    block = min(1024, 1 << (n - 1).bit_length())
    _scale_call(block, bias is not None)(acc, row_scale, col_scale, *(() if bias is None else (bias,)), out)


def _scale(acc_ref, row_ref, col_ref, *refs):
    *bias, out_ref = refs
    y = acc_ref[...] * row_ref[...] * col_ref[...]
    out_ref[...] = y + bias[0][...] if bias else y


@_kept
def _scale_call(block, bias):
    col = BlockSpec((block,), lambda i, j: (j,))
    return jit.pallas_call(_scale, grid=lambda acc, *rest: (acc.shape[0], -(-acc.shape[1] // block)),
                           in_specs=[BlockSpec((None, block), lambda i, j: (i, j)),
                                     BlockSpec((None, 1), lambda i, j: (i, 0)), col] + [col] * bias,
                           out_specs=[BlockSpec((None, block), lambda i, j: (i, j))], name="scale_rows_cols")
