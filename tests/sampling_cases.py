"""Sampler test cases (ops/cuda/sampling.py against the numpy oracle ops.sampling.sample), on any device:
tests/gpu/test_sampling.py runs them on a GPU, tests/test_sampling_host.py on the CPU emulator (tests/host_mma.py).
`run` drives a sampling module (the real one, or ops/cuda/sampling.py loaded against the CuPy stand-in) on
poisoned outputs; `check` compares with numpy."""
from __future__ import annotations

import numpy as np

import ops.sampling as oracle
from engine.sampling_params import SamplingParams
from ops.philox import neg_exponentials, philox_words
from ops.sampling_types import SamplingTensors

LOGPROB_ATOL = 1e-4
# Seeded rows may differ from numpy only where float rounding can flip a choice. Every step is the oracle's
# float32 step (explicit roundings, no FMA) except expf/log1pf, which differ from numpy's by <= 2 ulp. A flip
# then needs the two best race scores within ~4 ulp (relative 5e-7; the gap of the top two Gumbel-perturbed
# scores has a density of order 1, so P ~ 1e-6 per row), or the top-p mass target landing within ~1e-7 M of
# a cumulative step and the one boundary token, moved in or out, winning the race (P < 1e-6 per row). A case
# has <= 64 rows, so expected flips are < 1e-4; one is allowed, and a real bug mismatches many rows.
MAX_FLIPS = 1


def lm_logits(rng, batch, vocab):
    """A broad N(0, 1.5) floor with 40 plausible tokens 5-12 above it per row: a chat model's shape."""
    logits = rng.standard_normal((batch, vocab), dtype=np.float32) * np.float32(1.5)
    for row in logits:
        row[rng.choice(vocab, 40, replace=False)] += rng.uniform(5, 12, 40).astype(np.float32)
    return logits


def flat_logits(rng, batch, vocab):
    """N(0, 1): top-p keeps tens of thousands of tokens, past the candidate buffer (the radix-select path)."""
    return rng.standard_normal((batch, vocab), dtype=np.float32)


def row_params(rng, kind: str, logprobs: int | None) -> SamplingParams:
    temperature = float(rng.uniform(0.5, 1.5))
    pick = lambda values: values[int(rng.integers(len(values)))]  # noqa: E731
    if kind == "greedy":
        return SamplingParams(temperature=0.0, logprobs=logprobs)
    if kind == "temperature":
        return SamplingParams(temperature=temperature, logprobs=logprobs)
    if kind == "top_k":
        return SamplingParams(temperature=temperature, top_k=pick([1, 2, 20, 50, 1000, 3000]), logprobs=logprobs)
    if kind == "top_p":
        return SamplingParams(temperature=temperature, top_p=pick([0.3, 0.8, 0.9, 0.95]), logprobs=logprobs)
    if kind == "min_p":
        return SamplingParams(temperature=temperature, min_p=pick([0.005, 0.05, 0.2]), logprobs=logprobs)
    assert kind == "mixed"
    if rng.random() < 0.15:
        temperature = 0.0
    return SamplingParams(temperature=temperature, top_k=pick([0, 0, 5, 50, 2000]), top_p=pick([1.0, 0.9, 0.6]),
                          min_p=pick([0.0, 0.0, 0.02]), repetition_penalty=pick([1.0, 1.3, 0.8]),
                          frequency_penalty=pick([0.0, 0.5, -0.3]), presence_penalty=pick([0.0, 0.7]),
                          logprobs=logprobs)


def build(rng, logits, kind: str, logprobs: int | None = 5, history: int = 64) -> SamplingTensors:
    """Rows of one kind; 'mixed' rows also get histories, biases and bans on their likely tokens."""
    batch, vocab = logits.shape
    rows = []
    for row in logits:
        params = row_params(rng, kind, logprobs)
        likely = np.argpartition(row, -30)[-30:]
        pool = np.concatenate([likely, rng.integers(0, vocab, 30)])
        prompt = rng.choice(pool, int(rng.integers(0, history))).tolist()
        output = rng.choice(pool, int(rng.integers(0, history))).tolist()  # repeats: counts above 1
        banned = []
        if kind == "mixed":
            if rng.random() < 0.5:
                params.logit_bias = {int(i): float(rng.uniform(-5, 5)) for i in rng.choice(pool, 6, replace=False)}
            if rng.random() < 0.3:
                banned = [int(row.argmax())] + rng.integers(0, vocab, 2).tolist()
        rows.append((params, prompt, output, int(rng.integers(0, 2**64, dtype=np.uint64)), banned))
    return SamplingTensors.build(rows, vocab)


_BUFFERS: dict = {}  # (sampling module, vocab) -> its SamplingBuffers


def run(gpu, xp, stored: np.ndarray, t: SamplingTensors, ids_dtype=np.int64):
    """The device API of sampling module `gpu` (arrays made by `xp`: cupy or the stand-in) on poisoned outputs;
    returns (ids, logprobs, top_ids, top_logprobs, stats) on the host."""
    batch, vocab = stored.shape
    buffers = _BUFFERS.get((gpu, vocab))
    if buffers is None or not buffers.fits(t):
        buffers = _BUFFERS[(gpu, vocab)] = gpu.SamplingBuffers(64, vocab, max_history=512, max_bias=32)
    num_top = max(t.num_logprobs, 0)
    ids = xp.full(batch, -7, ids_dtype)
    logprobs = xp.full(batch, np.nan, np.float32) if t.num_logprobs >= 0 else None
    top_ids = xp.full((batch, num_top), -7, np.int32) if num_top else None
    top_logprobs = xp.full((batch, num_top), np.nan, np.float32) if num_top else None
    stats = xp.full((batch, 4), np.nan, np.float32)
    buffers.load(t)
    gpu.sample(xp.asarray(stored), buffers, ids, logprobs, top_ids, top_logprobs, stats)
    assert not buffers.scratch.any(), "the kernel must leave its scratch all zeros"
    host = lambda a: None if a is None else xp.asnumpy(a)  # noqa: E731
    return tuple(host(a) for a in (ids, logprobs, top_ids, top_logprobs, stats))


def describe(logits, t, row, got, want, stats) -> str:
    """Why row may differ: both tokens' processed s and race scores, as numpy computes them."""
    x = logits[row:row + 1].copy()
    sub = SamplingTensors(*(getattr(t, name)[row:row + 1] for name in (
        "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
        "seeds", "steps", "prompt_token_ids", "output_token_ids", "logit_bias_ids", "logit_bias_values")))
    oracle.apply_logit_bias(x, sub)
    oracle.apply_penalties(x, sub)
    temperature = max(float(t.temperature[row]), 1e-30)
    s = (x[0] - x[0].max()) / np.float32(temperature)
    scores = {tok: float(np.exp(s[tok]) / neg_exponentials(philox_words(t.seeds[row], t.steps[row], tok)))
              for tok in (int(got), int(want))}
    return (f"row {row}: T={t.temperature[row]} k={t.top_k[row]} p={t.top_p[row]} min_p={t.min_p[row]} "
            f"gpu {got} numpy {want}; s {s[int(got)]} / {s[int(want)]}; scores {scores}; "
            f"gpu tau, mass, candidates, path = {stats[row]}")


def check(logits, t, got, max_flips: int) -> np.ndarray:
    """Compare one run with ops.sampling.sample on the float32 logits; returns the path of each row."""
    ids, logprobs, top_ids, top_logprobs, stats = got
    vocab = logits.shape[1]
    assert ((ids >= 0) & (ids < vocab)).all(), f"ids not all written: {ids}"
    want = oracle.sample(np.ascontiguousarray(logits), t)
    flips = np.flatnonzero(ids != want.token_ids)
    report = "\n".join(describe(logits, t, r, ids[r], want.token_ids[r], stats) for r in flips)
    allowed = 0 if t.all_greedy else max_flips
    assert len(flips) <= allowed, f"{len(flips)} of {len(ids)} rows differ from numpy:\n{report}"
    if len(flips):
        print(f"tolerated near-tie flip(s):\n{report}")
    same = ids == want.token_ids
    if want.logprobs is not None:
        assert not np.isnan(logprobs).any()
        np.testing.assert_allclose(logprobs[same], want.logprobs[same], rtol=0, atol=LOGPROB_ATOL)
    if want.top_ids is not None:
        assert not np.isnan(top_logprobs).any() and (top_ids >= 0).all()
        np.testing.assert_allclose(top_logprobs, want.top_logprobs, rtol=0, atol=LOGPROB_ATOL)
        values = np.take_along_axis(logits, top_ids.astype(np.int64), 1)
        np.testing.assert_array_equal(values, np.take_along_axis(logits, want.top_ids.astype(np.int64), 1))
        # tokens tied in value (in the whole row) may be listed in either order; the others must match exactly
        unique = np.array([[np.count_nonzero(row == v) == 1 for v in vals] for row, vals in zip(logits, values)])
        np.testing.assert_array_equal(top_ids[unique], want.top_ids[unique])
    return stats[:, 3].astype(int)


def every_path_case(rng):
    """Rows chosen so that each way of finding tau runs, at a 152K vocabulary (the bounds that choose among them
    depend on it): greedy, the whole-vocab race, the candidate list, the radix select. Returns (logits, tensors,
    the path each row takes)."""
    vocab = 152064
    logits = np.concatenate([lm_logits(rng, 4, vocab), flat_logits(rng, 3, vocab)])
    logits[3, int(rng.integers(vocab))] += 25  # one dominant token: top-p's bound from the thread maxima holds
    # 3000 near-equal tokens far above the rest: more than the 2048 thread values, so that bound fails, but
    # the fixed floor s >= -2 holds them all and they fit the candidate buffer
    wide = flat_logits(rng, 1, vocab)
    wide[0, rng.choice(vocab, 3000, replace=False)] = 12 + 0.3 * rng.standard_normal(3000, dtype=np.float32)
    logits = np.concatenate([logits, wide])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9), SamplingParams(top_k=50, top_p=0.9),
              SamplingParams(top_p=0.9, temperature=0.7), SamplingParams(top_p=0.9), SamplingParams(top_k=3000),
              SamplingParams(top_k=5000, top_p=0.5, min_p=0.01), SamplingParams(top_p=0.9)]
    t = SamplingTensors.build([(p, [], [], int(rng.integers(0, 2**63)), []) for p in params], vocab)
    return logits, t, [0, 1, 2, 2, 3, 3, 3, 2]


def constant_rows_case(rng, vocab: int):
    """Every token tied in rows 0-2 (the top-N candidates overflow: N argmax passes), random rows 3-5; a vocab
    that is not whole vectors where it is 1001. Row 0 is greedy: over a constant row it must pick id 0."""
    logits = np.zeros((6, vocab), np.float32)
    logits[3:] = rng.standard_normal((3, vocab), dtype=np.float32)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(top_k=5, logprobs=3),
              SamplingParams(top_p=0.5, logprobs=3), SamplingParams(min_p=0.5, logprobs=3),
              SamplingParams(temperature=0.0, logprobs=3), SamplingParams(top_k=10, top_p=0.9, logprobs=3)]
    return logits, SamplingTensors.build([(p, [], [], int(rng.integers(0, 2**63)), []) for p in params], vocab)
