"""Paged attention on the GPU (ops/cuda/attention.py) against the numpy oracle ops/reference.attention.

Fresh random inputs per run (seed printed); stale cache slots, unused blocks and K/V columns are NaN.
The FP8 cache (E4M3 codes, a scale per KV head) against the same oracle reading ops/quant.Fp8Cache.
"""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from ops import quant, reference
from ops.cuda.attention import attention, reserve_decode_workspace
from ops.jit import dtypes
from ops.metadata import AttentionMetadata

# Bound on |got - ref| <= atol + rtol * |ref|: P is rounded to the storage type before P.V, and
# the output is rounded once (fp16 2^-11, bf16 2^-8 relative), |ref| stays below about 4.
TOLERANCE = {"float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2)}
QWEN, LLAMA = (28, 4, 128), (32, 8, 128)  # (Hq, Hkv, D)
ODD_HEADS = [(4, 2, 16), (4, 2, 32), (14, 2, 64), (40, 2, 128),  # tiny test models, 0.5B, group 20 > 16
             (8, 8, 80), (16, 4, 96), (6, 2, 112)]  # head sizes off the powers of two (Phi-2 80, Phi-3 96)
MAX_MODEL_LEN = 32768


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return x.astype(np.float16)
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def to_float32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x.astype(np.float32)


def nan_of(dtype: str):
    return np.float16(np.nan) if dtype == "float16" else np.uint16(0x7FC0)


class Case:
    """Random qkv and paged cache for sequences with (q_len, seq_len) spans, on host and device."""

    def __init__(self, rng, heads, dtype, spans, spare_blocks=5):
        hq, hkv, d = heads
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        q_lens = np.array([q for q, _ in spans], np.int32)
        seq_lens = np.array([s for _, s in spans], np.int32)
        pages = -(-seq_lens // 16)
        num_blocks = int(pages.sum()) + spare_blocks
        max_blocks = int(pages.max()) + 3  # table padding past each sequence's pages is 0
        ids = rng.permutation(num_blocks).astype(np.int32)  # shuffled, non-contiguous block ids
        tables = np.zeros((len(spans), max_blocks), np.int32)
        at = 0
        for b, n in enumerate(pages):
            tables[b, :n] = ids[at:at + n]
            at += n
        nan = nan_of(dtype)
        caches = []
        for _ in range(2):
            c = to_storage(rng.standard_normal((num_blocks, hkv, 16, d), dtype=np.float32), dtype)
            c[ids[at:]] = nan  # unused blocks
            for b, n in enumerate(pages):
                if n and seq_lens[b] % 16:
                    c[tables[b, n - 1], :, seq_lens[b] % 16:] = nan  # stale slots past the context
            caches.append(c)
        self.k_host, self.v_host = caches
        rows = int(q_lens.sum())
        qkv = to_storage(rng.standard_normal((rows, (hq + 2 * hkv) * d), dtype=np.float32), dtype)
        qkv[:, hq * d:] = nan  # this step's K/V columns: the kernels must read the cache only
        self.qkv_host = qkv
        self.query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        self.seq_lens, self.block_tables = seq_lens, tables
        self.max_query_len, self.max_seq_len = int(q_lens.max()), int(seq_lens.max())
        self.scale = 1.0 / np.sqrt(d)
        self.qkv, self.k_cache, self.v_cache = (cp.asarray(a) for a in (qkv, self.k_host, self.v_host))
        self.out = cp.empty((rows, hq * d), dtype=qkv.dtype)

    def meta(self, max_seq_len=None, max_query_len=None, device=True) -> AttentionMetadata:
        put = cp.asarray if device else np.asarray
        return AttentionMetadata(
            query_start_loc=put(self.query_start_loc), seq_lens=put(self.seq_lens),
            block_tables=put(self.block_tables), slot_mapping=None,
            max_query_len=max_query_len or self.max_query_len, max_seq_len=max_seq_len or self.max_seq_len)

    def reference(self, window: int = 0) -> np.ndarray:
        out = np.empty((self.qkv_host.shape[0], self.hq * self.d), np.float32)
        reference.attention(to_float32(self.qkv_host), to_float32(self.k_host), to_float32(self.v_host),
                            self.meta(device=False), self.scale, out, window)
        return out

    def run(self, window: int = 0, **sizing) -> np.ndarray:
        self.out.fill(nan_of(self.dtype))  # poison: every element must be written
        attention(self.qkv, self.k_cache, self.v_cache, self.meta(**sizing), self.scale, self.out, window=window)
        return to_float32(cp.asnumpy(self.out))

    def release_before_window(self, window: int) -> None:
        """As the block manager does for a sliding-window model: pages wholly before the first query's window
        get table entry -1 (the kernels must never read them) and their contents turn NaN."""
        q_lens = np.diff(self.query_start_loc)
        for b, (q_len, seq_len) in enumerate(zip(q_lens, self.seq_lens)):
            gone = max(0, int(seq_len) - int(q_len) - window + 1) // 16
            for cache in (self.k_host, self.v_host):
                cache[self.block_tables[b, :gone]] = nan_of(self.dtype)
            self.block_tables[b, :gone] = -1
        self.k_cache, self.v_cache = cp.asarray(self.k_host), cp.asarray(self.v_host)


def check(got: np.ndarray, ref: np.ndarray, dtype: str, what: str) -> None:
    bad = ~np.isfinite(got)
    assert not bad.any(), f"{what}: {bad.sum()} outputs not written or not finite (first at {np.argwhere(bad)[0]})"
    atol, rtol = TOLERANCE[dtype]
    err = np.abs(got - ref)
    excess = err - (atol + rtol * np.abs(ref))
    i = np.unravel_index(excess.argmax(), excess.shape)
    print(f"{what}: max abs err {err.max():.3e}")
    assert excess[i] <= 0, f"{what}: err {err[i]:.3e} at {i} (got {got[i]:.5f}, ref {ref[i]:.5f}) over the bound"


def decode_spans(rng, batch: int, padding: int):
    contexts = [1, 15, 16, 17, 1000, 4097]
    lens = [contexts[i] if i < len(contexts) else int(rng.integers(1, 1200)) for i in range(batch - padding)]
    return [(1, s) for s in lens] + [(1, 0)] * padding


@pytest.mark.parametrize("context", [1, 15, 16, 17, 1000, 4097])
def test_decode_single_sequence(rng, context):
    case = Case(rng, QWEN, "float16", [(1, context)])
    ref = case.reference()
    check(case.run(), ref, "float16", f"decode ctx {context}")
    check(case.run(max_seq_len=MAX_MODEL_LEN), ref, "float16", f"decode ctx {context}, graph-sized grid")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", [QWEN, LLAMA], ids=["qwen2.5-7b", "llama-3-8b"])
@pytest.mark.parametrize("batch", [2, 13, 64])
def test_decode_batch(rng, heads, dtype, batch):
    case = Case(rng, heads, dtype, decode_spans(rng, batch, padding=1 if batch > 2 else 0))
    ref = case.reference()
    check(case.run(), ref, dtype, f"decode {heads} x{batch}")
    check(case.run(max_seq_len=MAX_MODEL_LEN), ref, dtype, f"decode {heads} x{batch}, graph-sized grid")


@pytest.mark.parametrize("heads", ODD_HEADS, ids=lambda h: "x".join(map(str, h)))
def test_decode_odd_heads(rng, heads):
    case = Case(rng, heads, "bfloat16", decode_spans(rng, 9, padding=2))
    check(case.run(), case.reference(), "bfloat16", f"decode {heads}")


def test_decode_graph_replay(rng):
    """One graph captured at a max_model_len-sized grid replays correctly for other contexts."""
    batch, max_blocks = 8, 300
    cases = [Case(rng, QWEN, "float16", decode_spans(rng, batch, padding=2)) for _ in range(2)]
    stream = cp.cuda.Stream(non_blocking=True)
    reserve_decode_workspace(batch, 28, 4, 128, MAX_MODEL_LEN)
    # static buffers the graph is captured on, refilled before each replay
    qsl, lens = cp.arange(batch + 1, dtype=cp.int32), cp.ones(batch, cp.int32)
    tables = cp.zeros((batch, max_blocks), cp.int32)
    k = cp.empty((max(c.k_cache.shape[0] for c in cases),) + cases[0].k_cache.shape[1:], cp.float16)
    v, qkv, out = cp.empty_like(k), cp.empty_like(cases[0].qkv), cp.empty_like(cases[0].out)
    meta = AttentionMetadata(qsl, lens, tables, None, max_query_len=1, max_seq_len=MAX_MODEL_LEN)
    cp.cuda.Device().synchronize()  # `stream` does not wait for the legacy stream that filled the buffers
    with stream:
        attention(qkv, k, v, meta, cases[0].scale, out)  # eager once: compile before capture
        stream.begin_capture()
        attention(qkv, k, v, meta, cases[0].scale, out)
        graph = stream.end_capture()
        for i, case in enumerate(cases):
            n = case.k_cache.shape[0]
            k[:n], v[:n], qkv[...] = case.k_cache, case.v_cache, case.qkv
            lens[...] = cp.asarray(case.seq_lens)
            tables[...] = 0
            tables[:, : case.block_tables.shape[1]] = cp.asarray(case.block_tables)
            out.fill(nan_of("float16"))
            graph.launch(stream)
            stream.synchronize()
            check(to_float32(cp.asnumpy(out)), case.reference(), "float16", f"graph replay {i}")


PREFILL_SPANS = [  # (q_len, seq_len): fresh prompts, chunked prefill over cached context, 1-token rows
    (1, 1), (1, 200), (17, 17), (64, 64), (100, 137), (300, 1300), (5, 21), (3, 0), (129, 1000)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", [QWEN, LLAMA], ids=["qwen2.5-7b", "llama-3-8b"])
def test_prefill(rng, heads, dtype):
    spans = [PREFILL_SPANS[i] for i in rng.permutation(len(PREFILL_SPANS))]
    case = Case(rng, heads, dtype, spans)
    ref = case.reference()
    check(case.run(), ref, dtype, f"prefill {heads}")
    check(case.run(max_query_len=512, max_seq_len=MAX_MODEL_LEN), ref, dtype, f"prefill {heads}, oversized grid")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("window", [1, 16, 37, 4096])
def test_sliding_window(rng, dtype, window):
    """Decode (split-KV, graph-sized grid too) and prefill with a window shorter and longer than the contexts;
    the blocks before each window are gone (table -1, NaN contents)."""
    for what, spans in (("decode", decode_spans(rng, 13, padding=1)), ("prefill", PREFILL_SPANS)):
        case = Case(rng, QWEN, dtype, spans)
        case.release_before_window(window)
        ref = case.reference(window)
        check(case.run(window), ref, dtype, f"{what} window {window}")
        oversized = dict(max_seq_len=MAX_MODEL_LEN, **({"max_query_len": 512} if what == "prefill" else {}))
        check(case.run(window, **oversized), ref, dtype, f"{what} window {window}, oversized grid")


@pytest.mark.parametrize("heads", ODD_HEADS, ids=lambda h: "x".join(map(str, h)))
def test_prefill_odd_heads(rng, heads):
    case = Case(rng, heads, "float16", PREFILL_SPANS)
    check(case.run(), case.reference(), "float16", f"prefill {heads}")


# (m-tiles per warp, keys per tile, stages): the default first, then the other compiled shapes
PREFILL_CONFIGS = [(1, 64, 2), (1, 64, 3), (2, 32, 3)]


@pytest.fixture(params=PREFILL_CONFIGS, ids=lambda c: "mt%d-bn%d-st%d" % c)
def prefill_config(request, monkeypatch):
    import ops.cuda.attention as module
    for name, value in zip(("PREFILL_MT", "PREFILL_KEYS", "PREFILL_STAGES"), request.param):
        monkeypatch.setattr(module, name, value)
    return request.param


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_prefill_config(rng, prefill_config, dtype):
    case = Case(rng, QWEN, dtype, [(512, 512), (384, 1900)] + PREFILL_SPANS)
    check(case.run(), case.reference(), dtype, f"prefill 512 + 384 after 1516 cached + mixed spans {prefill_config}")
    odd = Case(rng, (4, 2, 16), dtype, PREFILL_SPANS)
    check(odd.run(), odd.reference(), dtype, f"prefill (4, 2, 16) {prefill_config}")


def test_rejects_bad_layout(rng):
    case = Case(rng, QWEN, "float16", [(1, 20)])
    meta = case.meta()
    with pytest.raises(TypeError, match="dtype"):
        attention(case.qkv, case.k_cache.view(cp.uint16), case.v_cache, meta, case.scale, case.out)
    with pytest.raises(ValueError, match="block size"):
        k = case.k_cache.reshape(case.k_cache.shape[0], 4, 32, 64)
        attention(case.qkv, k, k, meta, case.scale, case.out)
    with pytest.raises(TypeError, match="int32"):
        meta.seq_lens = meta.seq_lens.astype(cp.int64)
        attention(case.qkv, case.k_cache, case.v_cache, meta, case.scale, case.out)


class Fp8Case(Case):
    """Case with the cache as E4M3 codes of its values over a random scale per KV head; NaN slots (stale, unused)
    hold the NaN code 0x7f, which the kernels must never read."""

    def __init__(self, rng, heads, dtype, spans):
        super().__init__(rng, heads, dtype, spans)
        self.scales = rng.uniform(0.01, 0.03, (2, self.hkv)).astype(np.float32)  # |value| < 4.4 fits 448 codes
        self.codes = []
        for cache, s in zip((self.k_host, self.v_host), self.scales):
            values = to_float32(cache)
            codes = dtypes.float32_to_e4m3_bits(np.nan_to_num(values) / s[None, :, None, None])
            codes[np.isnan(values)] = 0x7F
            self.codes.append(codes)
        self.k_cache, self.v_cache = (cp.asarray(c) for c in self.codes)
        self.k_scale, self.v_scale = (cp.asarray(s) for s in self.scales)

    def reference(self) -> np.ndarray:
        out = np.empty((self.qkv_host.shape[0], self.hq * self.d), np.float32)
        k, v = (quant.Fp8Cache(c, s) for c, s in zip(self.codes, self.scales))
        reference.attention(to_float32(self.qkv_host), k, v, self.meta(device=False), self.scale, out)
        return out

    def run(self, **sizing) -> np.ndarray:
        self.out.fill(nan_of(self.dtype))
        attention(self.qkv, self.k_cache, self.v_cache, self.meta(**sizing), self.scale, self.out,
                  k_scale=self.k_scale, v_scale=self.v_scale)
        return to_float32(cp.asnumpy(self.out))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", [QWEN, LLAMA] + ODD_HEADS, ids=lambda h: "x".join(map(str, h)))
def test_fp8_cache_decode(rng, heads, dtype):
    case = Fp8Case(rng, heads, dtype, decode_spans(rng, 13, padding=1))
    ref = case.reference()
    check(case.run(), ref, dtype, f"fp8 cache decode {heads}")
    check(case.run(max_seq_len=MAX_MODEL_LEN), ref, dtype, f"fp8 cache decode {heads}, graph-sized grid")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads", [QWEN, LLAMA] + ODD_HEADS, ids=lambda h: "x".join(map(str, h)))
def test_fp8_cache_prefill(rng, heads, dtype):
    case = Fp8Case(rng, heads, dtype, PREFILL_SPANS)
    check(case.run(), case.reference(), dtype, f"fp8 cache prefill {heads}")


def test_fp8_cache_needs_its_scales(rng):
    case = Fp8Case(rng, QWEN, "float16", [(1, 20)])
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        attention(case.qkv, case.k_cache, case.v_cache, case.meta(), case.scale, case.out)
    with pytest.raises(TypeError, match=r"k_scale must be .*\[Hkv=4\]"):
        attention(case.qkv, case.k_cache, case.v_cache, case.meta(), case.scale, case.out,
                  k_scale=case.k_scale[:2], v_scale=case.v_scale)
