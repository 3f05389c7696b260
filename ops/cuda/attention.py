"""Paged attention launchers: decode (GQA-packed tensor cores, split-KV + combine) and prefill (flash-style, causal).

`attention` is ops/reference.attention on the GPU; kernels in ops/kernels/attention_{decode,prefill}.cu.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ops.cuda.compile import cuda_type, get_kernel
from ops.cuda_shapes import head_dim_problem
from ops.metadata import AttentionMetadata

BLOCK_SIZE = 16                  # tokens per cache block; the kernels are written for it
DECODE_WARPS, DECODE_STAGES = 4, 2
# Prefill CTA shape: PREFILL_MT 16-row m-tiles per warp (4 warps), key tiles of PREFILL_KEYS, a ring
# of PREFILL_STAGES key tiles. Variants are compile-time defines of attention_prefill.cu.
PREFILL_MT, PREFILL_KEYS, PREFILL_STAGES = 1, 64, 2  # fastest on the H100 (perf/gpu_attention.py --sweep)
# Split-KV policy. The host fixes the grid's split count from (batch, heads, a context bound); each
# sequence then splits its actual length on the device into chunks of at least MIN_CHUNK tokens.
MIN_CHUNK = 128
CTAS_PER_SM = 1                  # split only until the decode grid holds about this many CTAs per SM
MAX_SPLITS = 256                 # the combine kernel's shared weight array holds this many
COMBINE_THREADS = 128


def attention(qkv, k_cache, v_cache, meta: AttentionMetadata, scale: float, out, workspace=None,
              k_scale=None, v_scale=None, window: int = 0) -> None:
    """Causal attention of the query rows of `qkv` over the paged cache, written to `out`.

    qkv: [T, >= Hq*D] (query heads first, row stride free); k_cache, v_cache: [num_blocks, Hkv, 16, D];
    out: [T, Hq*D]. meta.max_query_len == 1 selects the decode kernel, else prefill. meta.max_seq_len
    and max_query_len only size grids: any bound at or above the true maxima gives the same result.
    `workspace`: float32 buffer for decode split partials (see decode_workspace_size); None uses a
    module-level buffer that grows outside graph capture (call reserve_decode_workspace first).
    An FP8 cache: k_cache, v_cache hold E4M3 codes (uint8), k_scale and v_scale the float32 scale of each KV head
    [Hkv] (value = code * scale); the kernels decode the codes on the fly.
    window > 0: sliding-window attention, query position p sees keys p - window + 1 .. p (ops.reference.attention).
    """
    hkv, d, group = _check(qkv, k_cache, v_cache, meta, out, k_scale, v_scale)
    if meta.max_query_len <= 0:
        return
    ints = dict(q_stride=np.int32(qkv.strides[0] // qkv.itemsize), out_stride=np.int32(out.strides[0] // out.itemsize),
                max_blocks=np.int32(meta.block_tables.shape[1]))
    scale_log2 = np.float32(scale * np.log2(np.e))  # kernels use exp2
    # The fp16/bf16 kernels never read the scale pointers: any device pointer will do.
    scales = (k_scale, v_scale) if k_scale is not None else (meta.seq_lens, meta.seq_lens)
    ints["window"] = np.int32(max(int(window), 0))
    if meta.max_query_len == 1:
        _decode(qkv, k_cache, v_cache, scales, meta, out, hkv, d, group, ints, scale_log2, workspace)
    else:
        _prefill(qkv, k_cache, v_cache, scales, meta, out, hkv, d, group, ints, scale_log2)


def num_splits(num_seqs: int, num_kv_heads: int, group: int, max_seq_len: int) -> int:
    """Grid splits for a decode call: enough CTAs to fill the GPU, no more than the bound's chunks."""
    ctas = num_seqs * num_kv_heads * -(-group // 16)
    by_len = -(-max(max_seq_len, 1) // MIN_CHUNK)
    by_fill = -(-CTAS_PER_SM * _num_sms() // ctas)
    return max(1, min(by_len, by_fill, MAX_SPLITS))


def decode_workspace_size(num_seqs: int, num_q_heads: int, head_dim: int, splits: int) -> int:
    """float32 elements of split partials: O [B, Hq, S, D] then (max, sum) [B, Hq, S, 2]."""
    return num_seqs * num_q_heads * splits * (head_dim + 2) if splits > 1 else 0


def reserve_decode_workspace(max_num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                             max_model_len: int):
    """Grow the module workspace for every batch size up to max_num_seqs; call before graph capture.

    The graph path captures decode with meta.max_seq_len = max_model_len, so the split count of each
    captured batch size is fixed and this buffer (never freed) is what the graphs point at.
    """
    group = num_q_heads // num_kv_heads
    size = max(decode_workspace_size(n, num_q_heads, head_dim, num_splits(n, num_kv_heads, group, max_model_len))
               for n in range(1, max_num_seqs + 1))
    return _module_workspace(size)


_workspaces: dict[int, cp.ndarray] = {}
_retired: list[cp.ndarray] = []  # outgrown buffers stay alive: captured graphs may still use them


def _module_workspace(size: int) -> cp.ndarray:
    dev = cp.cuda.Device().id
    buf = _workspaces.get(dev)
    if buf is None or buf.size < size:
        if _capturing():
            raise RuntimeError(
                f"decode attention needs a {size * 4} byte workspace while a CUDA graph is being captured; "
                "call ops.cuda.attention.reserve_decode_workspace(...) (or run the largest batch eagerly) first")
        if buf is not None:
            _retired.append(buf)
        buf = _workspaces[dev] = cp.empty(max(size, 1), dtype=cp.float32)
    return buf


def _capturing() -> bool:
    stream = cp.cuda.get_current_stream()
    return bool(getattr(stream, "is_capturing", lambda: False)())


@functools.cache
def _num_sms() -> int:
    return cp.cuda.Device().attributes["MultiProcessorCount"]


def _decode(qkv, k_cache, v_cache, scales, meta, out, hkv, d, group, ints, scale_log2, workspace):
    num_seqs = meta.seq_lens.shape[0]
    splits = num_splits(num_seqs, hkv, group, meta.max_seq_len)
    hq = hkv * group
    need = decode_workspace_size(num_seqs, hq, d, splits)
    if need == 0:
        partial_o = partial_ml = out  # never touched with one split: any pointer will do
    else:
        ws = workspace if workspace is not None else _module_workspace(need)
        if ws.dtype != cp.float32 or ws.size < need or not ws.flags.c_contiguous:
            raise ValueError(f"decode workspace must be a contiguous float32 array of >= {need} elements, "
                             f"got {ws.dtype} of {ws.size}")
        partial_o = ws[: num_seqs * hq * splits * d]
        partial_ml = ws[num_seqs * hq * splits * d: need]
    ctype = cuda_type(qkv.dtype)
    kernel, smem = _decode_kernel(ctype, d, DECODE_WARPS, DECODE_STAGES, _fp8(k_cache), bool(ints["window"]))
    grid = (splits, hkv * -(-group // 16), num_seqs)
    kernel(grid, (DECODE_WARPS * 32,), (
        qkv, ints["q_stride"], k_cache, v_cache, *scales, meta.block_tables, ints["max_blocks"], meta.seq_lens,
        meta.query_start_loc, out, ints["out_stride"], partial_o, partial_ml, np.int32(hkv), np.int32(group),
        np.int32(splits), np.int32(MIN_CHUNK), scale_log2, ints["window"]), shared_mem=smem)
    if splits > 1:
        combine = get_kernel("attention_decode.cu", "paged_attention_combine", T=ctype, HEAD_DIM=d,
                             NUM_WARPS=DECODE_WARPS, STAGES=DECODE_STAGES)
        combine((hq, num_seqs), (COMBINE_THREADS,), (partial_o, partial_ml, meta.seq_lens, meta.query_start_loc, out,
                                      ints["out_stride"], np.int32(splits), np.int32(MIN_CHUNK), ints["window"]))


def _prefill(qkv, k_cache, v_cache, scales, meta, out, hkv, d, group, ints, scale_log2):
    mt, keys, stages, fp8 = PREFILL_MT, PREFILL_KEYS, PREFILL_STAGES, _fp8(k_cache)
    if _prefill_smem(d, mt, keys, stages, fp8) > _max_smem():
        stages = 2  # sm_86/sm_89 give a block 99 KB
    kernel, smem = _prefill_kernel(cuda_type(qkv.dtype), d, mt, keys, stages, fp8)
    num_seqs = meta.seq_lens.shape[0]
    grid = (-(-meta.max_query_len * group // (64 * mt)), hkv, num_seqs)
    kernel(grid, (128,), (
        qkv, ints["q_stride"], k_cache, v_cache, *scales, meta.block_tables, ints["max_blocks"], meta.seq_lens,
        meta.query_start_loc, out, ints["out_stride"], np.int32(hkv), np.int32(group), scale_log2, ints["window"]),
        shared_mem=smem)


def _fp8(cache) -> bool:
    return cache.dtype == np.uint8


def _fp8_define(fp8: bool) -> dict:
    return {"KV_FP8": 1} if fp8 else {}  # the fp16/bf16 variants keep their compiled names (and cache entries)


@functools.cache
def _decode_kernel(ctype: str, d: int, warps: int, stages: int, fp8: bool = False, sliding: bool = False):
    kernel = get_kernel("attention_decode.cu", "paged_attention_decode", T=ctype, HEAD_DIM=d,
                        NUM_WARPS=warps, STAGES=stages, **_fp8_define(fp8), **({"SLIDING": 1} if sliding else {}))
    page = BLOCK_SIZE * d * 2  # one page of K or V as fp16/bf16
    # per warp: `stages` pages of K and V; FP8: the pages' codes (half the bytes) and one decoded K and V page
    ring = warps * (stages * page + 2 * page if fp8 else stages * 2 * page)
    merge = (warps * 32 + 32 + warps * 16 * (d + 8)) * 4
    smem = max(ring, merge)
    kernel.max_dynamic_shared_size_bytes = smem
    return kernel, smem


@functools.cache
def _prefill_kernel(ctype: str, d: int, mt: int, keys: int, stages: int, fp8: bool = False):
    kernel = get_kernel("attention_prefill.cu", "paged_attention_prefill", T=ctype, HEAD_DIM=d, MT=mt, BN=keys,
                        STAGES=stages, **_fp8_define(fp8))
    smem = _prefill_smem(d, mt, keys, stages, fp8)
    kernel.max_dynamic_shared_size_bytes = smem
    return kernel, smem


def _prefill_smem(d: int, mt: int, keys: int, stages: int, fp8: bool = False) -> int:
    if fp8:  # Q tile + `stages` K and V tiles of codes + one decoded K and V tile
        return (64 * mt + 2 * keys) * d * 2 + stages * 2 * keys * d
    return (64 * mt + stages * 2 * keys) * d * 2  # Q tile + `stages` K and V tiles


@functools.cache
def _max_smem() -> int:
    return cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]


def _check(qkv, k_cache, v_cache, meta, out, k_scale, v_scale):
    """Validate shapes, dtypes and layouts; return (Hkv, D, group)."""
    if qkv.dtype not in (np.float16, np.uint16):
        raise TypeError(f"attention runs float16 or bfloat16 (uint16 bits), got qkv {qkv.dtype}")
    fp8 = k_cache.dtype == np.uint8
    if out.dtype != qkv.dtype:
        raise TypeError(f"out dtype {out.dtype} differs from qkv dtype {qkv.dtype}")
    for name, a in (("k_cache", k_cache), ("v_cache", v_cache)):
        if a.dtype != (np.uint8 if fp8 else qkv.dtype):
            raise TypeError(f"{name} dtype {a.dtype}: the caches are both qkv's dtype {qkv.dtype}, or both uint8 "
                            "(E4M3 codes, with k_scale and v_scale)")
    if fp8 != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("an E4M3 (uint8) cache takes k_scale and v_scale (float32 [Hkv]); an fp16/bf16 one neither")
    if fp8:
        for name, a in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not isinstance(a, cp.ndarray) or a.dtype != np.float32 or a.shape != (k_cache.shape[1],) \
                    or not a.flags.c_contiguous:
                raise TypeError(f"{name} must be a contiguous float32 CuPy array [Hkv={k_cache.shape[1]}], "
                                f"got {type(a).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}")
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [num_blocks, Hkv, 16, D] alike, got {k_cache.shape} {v_cache.shape}")
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise ValueError("k_cache and v_cache must be C-contiguous")
    _, hkv, block_size, d = k_cache.shape
    if block_size != BLOCK_SIZE:
        raise ValueError(f"cache block size must be {BLOCK_SIZE}, got {block_size}")
    problem = head_dim_problem(d)
    if problem:
        raise ValueError(problem)
    if qkv.ndim != 2 or out.ndim != 2 or qkv.shape[0] != out.shape[0]:
        raise ValueError(f"qkv [T, cols] and out [T, Hq*D] must be 2-D with equal rows, got {qkv.shape} {out.shape}")
    if out.shape[1] % d or (out.shape[1] // d) % hkv:
        raise ValueError(f"out width {out.shape[1]} is not Hq*D with Hq a multiple of Hkv={hkv}, D={d}")
    if qkv.shape[1] < out.shape[1]:
        raise ValueError(f"qkv has {qkv.shape[1]} columns, fewer than the {out.shape[1]} query columns")
    for name, a in (("qkv", qkv), ("out", out)):
        if a.strides[1] != a.itemsize or a.strides[0] % 16 or a.data.ptr % 16:
            raise ValueError(f"{name} rows must be contiguous, 16-byte aligned, with a 16-byte multiple row stride")
    for name in ("query_start_loc", "seq_lens", "block_tables"):
        a = getattr(meta, name)
        if not isinstance(a, cp.ndarray) or a.dtype != np.int32 or not a.flags.c_contiguous:
            raise TypeError(f"meta.{name} must be a contiguous int32 CuPy array, got {type(a).__name__} "
                            f"{getattr(a, 'dtype', '')}")
    num_seqs = meta.seq_lens.shape[0]
    if (meta.query_start_loc.shape != (num_seqs + 1,) or meta.block_tables.ndim != 2
            or meta.block_tables.shape[0] != num_seqs):
        raise ValueError(f"meta shapes disagree: query_start_loc {meta.query_start_loc.shape}, seq_lens "
                         f"{meta.seq_lens.shape}, block_tables {meta.block_tables.shape}")
    return hkv, d, out.shape[1] // d // hkv
