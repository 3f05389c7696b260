"""GPU tests of the sampler (ops/cuda/sampling.py) against the numpy oracle ops.sampling.sample.

Fresh random logits and parameters per run (seed printed), outputs poisoned first; same seeded tokens, logprobs and
top-N within 1e-4, a CUDA graph replayed after load(), the scratch buffer left all zeros.
"""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

import ops.sampling as oracle
from engine.sampling_params import SamplingParams
from ops.cuda import sampling as gpu
from ops.cuda import to_storage
from ops.sampling_types import SamplingTensors
from tests import sampling_cases
from tests.sampling_cases import MAX_FLIPS, build, check, flat_logits, lm_logits

VOCABS = {"qwen2.5-7b": 152064, "llama-3-8b": 128256}
BATCHES = (1, 64)


def run_gpu(stored: np.ndarray, t: SamplingTensors, ids_dtype=np.int64):
    return sampling_cases.run(gpu, cp, stored, t, ids_dtype)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", VOCABS)
def test_greedy_matches_numpy_with_logprobs(model, batch, rng):
    logits = lm_logits(rng, batch, VOCABS[model])
    logits[0, [7, 11]] = logits[0].max() + 1  # a tie for the top: the lowest id wins
    t = build(rng, logits, "greedy", logprobs=20)
    paths = check(logits, t, run_gpu(logits, t), 0)
    assert (paths == 0).all()


@pytest.mark.parametrize("shape", ["lm", "flat"])
@pytest.mark.parametrize("kind", ["temperature", "top_k", "top_p", "min_p", "mixed"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", VOCABS)
def test_seeded_sampling_matches_numpy(model, batch, kind, shape, rng):
    make = lm_logits if shape == "lm" else flat_logits
    logits = make(rng, batch, VOCABS[model])
    t = build(rng, logits, kind, logprobs=int(rng.integers(0, 6)) if kind != "mixed" else 3)
    paths = check(logits, t, run_gpu(logits, t), MAX_FLIPS)
    print(f"paths (0 greedy, 1 whole vocab, 2 candidates, 3 radix): {np.bincount(paths, minlength=4)}")


def test_every_path_is_taken_and_matches(rng):
    logits, t, want = sampling_cases.every_path_case(rng)
    np.testing.assert_array_equal(check(logits, t, run_gpu(logits, t), MAX_FLIPS), want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_logits_match_numpy_on_their_float32_values(dtype, rng):
    # Conversion to float32 is exact, so the tokens are numpy's on the widened values; these logits tie often.
    vocab = VOCABS["llama-3-8b"]
    stored = to_storage(lm_logits(rng, 64, vocab), dtype)
    logits = stored.astype(np.float32) if dtype == "float16" else (stored.astype(np.uint32) << 16).view(np.float32)
    for kind in ("greedy", "mixed", "top_k"):
        t = build(rng, logits, kind, logprobs=4)
        check(logits, t, run_gpu(stored, t, ids_dtype=np.int32), MAX_FLIPS)


def test_constant_rows_and_odd_vocab(rng):
    for vocab in (1001, 4096):
        logits, t = sampling_cases.constant_rows_case(rng, vocab)
        got = run_gpu(logits, t)
        check(logits, t, got, MAX_FLIPS)
        assert got[0][0] == 0  # greedy over a constant row: the lowest id


def test_graph_replay_follows_each_load(rng):
    # Capture once at 8 rows; each load() then changes parameters, table widths and the live batch, and the
    # replayed kernel must follow (rows past the live batch are padding: zeros). Capture also proves no sync.
    vocab, max_batch = VOCABS["qwen2.5-7b"], 8
    buffers = gpu.SamplingBuffers(max_batch, vocab, max_history=256, max_bias=16)
    logits_dev = cp.empty((max_batch, vocab), np.float32)
    ids = cp.empty(max_batch, np.int32)
    logprobs = cp.empty(max_batch, np.float32)
    top_ids, top_logprobs = cp.empty((max_batch, 4), np.int32), cp.empty((max_batch, 4), np.float32)
    outs = (ids, logprobs, top_ids, top_logprobs)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        first = lm_logits(rng, max_batch, vocab)
        logits_dev.set(first)
        buffers.load(build(rng, first, "mixed", logprobs=4))
        gpu.sample(logits_dev, buffers, *outs)  # eager first: modules load outside the capture
        stream.synchronize()
        stream.begin_capture()
        gpu.sample(logits_dev, buffers, *outs)
        graph = stream.end_capture()
        for live, kind in ((8, "mixed"), (5, "top_p"), (3, "mixed"), (8, "greedy")):
            logits = lm_logits(rng, live, vocab)
            t = build(rng, logits, kind, logprobs=4, history=int(rng.integers(1, 120)))
            logits_dev[:live].set(logits)
            buffers.load(t)
            for out, poison in zip(outs, (-7, np.nan, -7, np.nan)):
                out.fill(poison)
            graph.launch(stream)
            stream.synchronize()
            host = [cp.asnumpy(a) for a in outs]
            check(logits, t, (host[0][:live], host[1][:live], host[2][:live], host[3][:live],
                              np.zeros((live, 4), np.float32)), MAX_FLIPS)
            assert not host[0][live:].any() and not host[1][live:].any() and not host[2][live:].any()
    assert not buffers.scratch.any()


def test_backend_entry_point_returns_host_arrays(rng):
    vocab = 32000
    logits = lm_logits(rng, 16, vocab)
    t = build(rng, logits, "mixed", logprobs=2)
    out = gpu.sample(cp.asarray(logits), t)
    want = oracle.sample(logits.copy(), t)
    assert out.token_ids.dtype == np.int64 and out.top_ids.dtype == np.int32
    assert (out.token_ids != want.token_ids).sum() <= MAX_FLIPS
    t.num_logprobs = -1
    out = gpu.sample(cp.asarray(logits), t)
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_bad_arguments_raise_clear_errors(rng):
    vocab = 1000
    buffers = gpu.SamplingBuffers(4, vocab, max_history=8, max_bias=2)
    logits = cp.zeros((4, vocab), np.float32)
    ids = cp.zeros(4, np.int64)
    rows = lambda n, **kw: [(SamplingParams(**kw), [], [], 0, []) for _ in range(n)]  # noqa: E731
    with pytest.raises(ValueError, match="at most 4"):
        buffers.load(SamplingTensors.build(rows(5), vocab))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        buffers.load(SamplingTensors.build(rows(1, logit_bias={vocab: 1.0}), vocab))
    with pytest.raises(ValueError, match="max_bias"):
        buffers.load(SamplingTensors.build(rows(1, logit_bias={1: 1.0, 2: 1.0, 3: 1.0}), vocab))
    with pytest.raises(ValueError, match="logits has shape"):
        gpu.sample(cp.zeros((4, vocab + 1), np.float32), buffers, ids)
    with pytest.raises(ValueError, match="out_ids has dtype"):
        gpu.sample(logits, buffers, cp.zeros(4, np.float32))
    with pytest.raises(ValueError, match="together"):
        gpu.sample(logits, buffers, ids, None, cp.zeros((4, 2), np.int32))
