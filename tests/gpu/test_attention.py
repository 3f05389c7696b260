"""Paged attention on the GPU (ops/cuda/attention.py) against the numpy oracle ops/reference.attention.

Fresh random inputs per run (seed printed); stale cache slots, unused blocks and K/V columns are NaN.
The FP8 cache (E4M3 codes, a scale per KV head) against the same oracle reading ops/quant.Fp8Cache.
"""
from __future__ import annotations

import types

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import pytest

from ops.cuda.attention import attention, reserve_decode_workspace
from ops.metadata import AttentionMetadata
from tests import attention_cases
from tests.attention_cases import check, decode_spans, nan_of, to_float32

GPU = types.SimpleNamespace(asarray=cp.asarray, asnumpy=cp.asnumpy, empty=cp.empty, attention=attention)


class Case(attention_cases.Case):
    xp = GPU


QWEN, LLAMA = (28, 4, 128), (32, 8, 128)  # (Hq, Hkv, D)
ODD_HEADS = [(4, 2, 16), (4, 2, 32), (14, 2, 64), (40, 2, 128),  # tiny test models, 0.5B, group 20 > 16
             (8, 8, 80), (16, 4, 96), (6, 2, 112)]  # head sizes off the powers of two (Phi-2 80, Phi-3 96)
MAX_MODEL_LEN = 32768


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


class Fp8Case(attention_cases.Fp8Case):
    xp = GPU


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
