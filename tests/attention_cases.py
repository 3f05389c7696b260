"""Paged-attention test cases for ops/cuda/attention.attention against the numpy oracle ops/reference.attention,
on any device: tests/gpu/test_attention.py runs them on a GPU, tests/test_attention_host.py on the CPU emulator.

Stale cache slots, unused blocks and this step's K/V columns are NaN: the kernels must read the cache only, and
only what the context holds. A subclass of Case names the device (xp: asarray, asnumpy, empty, attention).
"""
from __future__ import annotations

import numpy as np

from ops import quant, reference
from ops.jit import dtypes
from ops.metadata import AttentionMetadata

# Bound on |got - ref| <= atol + rtol * |ref|: P is rounded to the storage type before P.V, and
# the output is rounded once (fp16 2^-11, bf16 2^-8 relative), |ref| stays below about 4.
TOLERANCE = {"float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2)}


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

    xp = None  # the device: asarray, asnumpy, empty and attention (ops.cuda.attention's); a subclass sets it

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
        self.qkv, self.k_cache, self.v_cache = (self.xp.asarray(a) for a in (qkv, self.k_host, self.v_host))
        self.out = self.xp.empty((rows, hq * d), dtype=qkv.dtype)

    def meta(self, max_seq_len=None, max_query_len=None, device=True) -> AttentionMetadata:
        put = self.xp.asarray if device else np.asarray
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
        self.xp.attention(self.qkv, self.k_cache, self.v_cache, self.meta(**sizing), self.scale, self.out,
                          window=window)
        return to_float32(self.xp.asnumpy(self.out))

    def release_before_window(self, window: int) -> None:
        """As the block manager does for a sliding-window model: pages wholly before the first query's window
        get table entry -1 (the kernels must never read them) and their contents turn NaN."""
        q_lens = np.diff(self.query_start_loc)
        for b, (q_len, seq_len) in enumerate(zip(q_lens, self.seq_lens)):
            gone = max(0, int(seq_len) - int(q_len) - window + 1) // 16
            for cache in (self.k_host, self.v_host):
                cache[self.block_tables[b, :gone]] = nan_of(self.dtype)
            self.block_tables[b, :gone] = -1
        self.k_cache, self.v_cache = self.xp.asarray(self.k_host), self.xp.asarray(self.v_host)


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
        self.k_cache, self.v_cache = (self.xp.asarray(c) for c in self.codes)
        self.k_scale, self.v_scale = (self.xp.asarray(s) for s in self.scales)

    def reference(self) -> np.ndarray:
        out = np.empty((self.qkv_host.shape[0], self.hq * self.d), np.float32)
        k, v = (quant.Fp8Cache(c, s) for c, s in zip(self.codes, self.scales))
        reference.attention(to_float32(self.qkv_host), k, v, self.meta(device=False), self.scale, out)
        return out

    def run(self, **sizing) -> np.ndarray:
        self.out.fill(nan_of(self.dtype))
        self.xp.attention(self.qkv, self.k_cache, self.v_cache, self.meta(**sizing), self.scale, self.out,
                          k_scale=self.k_scale, v_scale=self.v_scale)
        return to_float32(self.xp.asnumpy(self.out))
