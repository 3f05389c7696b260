"""CPU benchmarks of the numpy sampler: sample() at vocab 32K and 152K, penalties, SamplingTensors.build.

Run with `pytest perf/bench_sampling.py --benchmark-enable`; without it each case runs once as a plain test.
"""
import functools

import numpy as np
import pytest

from engine.sampling_params import SamplingParams
from ops.sampling import apply_penalties, sample
from ops.sampling_types import SamplingTensors

VOCABS = {"32k": 32000, "152k": 152064}  # Llama-2 / Mistral, Qwen2.5
BATCHES = (1, 64)


@functools.cache
def lm_like_logits(batch: int, vocab_size: int) -> np.ndarray:
    """A broad N(0, 1.5) floor with 20 plausible tokens 6-12 above it per row, roughly a chat model's shape."""
    rng = np.random.default_rng(batch * vocab_size)
    logits = rng.standard_normal((batch, vocab_size), dtype=np.float32) * np.float32(1.5)
    for row in logits:
        row[rng.choice(vocab_size, 20, replace=False)] += rng.uniform(6, 12, 20).astype(np.float32)
    logits.flags.writeable = False  # shared between cases; sample() must leave it as it was anyway
    return logits


def tensors(params: SamplingParams, batch: int, vocab_size: int, history: int = 0) -> SamplingTensors:
    rng = np.random.default_rng(history + batch)
    rows = [(params, rng.integers(0, vocab_size, history // 2).tolist(),
             rng.integers(0, vocab_size, history // 2).tolist(), int(rng.integers(0, 2**63)), [])
            for _ in range(batch)]
    return SamplingTensors.build(rows, vocab_size)


def run_sample(benchmark, params: SamplingParams, batch: int, vocab: str):
    logits = lm_like_logits(batch, VOCABS[vocab]).copy()
    t = tensors(params, batch, VOCABS[vocab])
    benchmark.extra_info["logits_MB"] = logits.nbytes / 1e6
    out = benchmark(sample, logits, t)
    assert out.token_ids.shape == (batch,)
    return out


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch", BATCHES)
def test_sample_greedy(benchmark, batch, vocab):
    out = run_sample(benchmark, SamplingParams(temperature=0.0), batch, vocab)
    np.testing.assert_array_equal(out.token_ids, lm_like_logits(batch, VOCABS[vocab]).argmax(axis=1))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch", BATCHES)
def test_sample_top_k_top_p_temperature(benchmark, batch, vocab):
    run_sample(benchmark, SamplingParams(temperature=0.8, top_k=50, top_p=0.9), batch, vocab)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch", BATCHES)
def test_sample_temperature_only_whole_vocab(benchmark, batch, vocab):
    # OpenAI's defaults (temperature 1, top_p 1): every token can win, so every row draws V words.
    run_sample(benchmark, SamplingParams(temperature=1.0), batch, vocab)


@pytest.mark.parametrize("batch", BATCHES)
def test_sample_top_p_with_logprobs_152k(benchmark, batch):
    out = run_sample(benchmark, SamplingParams(temperature=0.7, top_p=0.95, logprobs=5), batch, "152k")
    assert out.top_ids.shape == (batch, 5)


@pytest.mark.parametrize("batch", BATCHES)
def test_apply_penalties_2k_history_152k(benchmark, batch):
    params = SamplingParams(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2)
    t = tensors(params, batch, VOCABS["152k"], history=2048)
    logits = lm_like_logits(batch, VOCABS["152k"])
    benchmark.pedantic(apply_penalties, setup=lambda: ((logits.copy(), t), {}), rounds=20, warmup_rounds=1)


@pytest.mark.parametrize("batch", BATCHES)
def test_sample_greedy_with_penalties_2k_history_152k(benchmark, batch):
    params = SamplingParams(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2)
    t = tensors(params, batch, VOCABS["152k"], history=2048)
    benchmark(sample, lm_like_logits(batch, VOCABS["152k"]).copy(), t)


@pytest.mark.parametrize("history", [0, 2048])
def test_build_sampling_tensors_64_rows(benchmark, history):
    # What the engine does every step; with history, half of it prompt, rows carry penalties and a logit bias.
    rng = np.random.default_rng(history)
    params = SamplingParams(temperature=0.8, top_p=0.9, **(dict(
        repetition_penalty=1.1, frequency_penalty=0.3, logit_bias={11: 2.0, 13: -5.0}) if history else {}))
    rows = [(params, rng.integers(0, 152064, history // 2).tolist(), rng.integers(0, 152064, history // 2).tolist(),
             int(rng.integers(0, 2**63)), [151643] if history else []) for _ in range(64)]
    t = benchmark(SamplingTensors.build, rows, 152064)
    assert t.steps.tolist() == [history // 2] * 64
