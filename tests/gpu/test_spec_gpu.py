"""Speculative decoding on the GPU (issue #14), tiny checkpoint: the output equals the plain GPU run's (greedy and
seeded), with prompt lookup and with a proposer that knows the plain continuation; when it is always right,
nearly every proposal is accepted (the verify step computes what plain decoding computes)."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from tests.test_spec_decode import (
    NGRAM,
    PARAM_IDS,
    PARAMS,
    SELF_DRAFT,
    KnownContinuation,
    _no_leaks,
    _outputs,
    _prompts,
)


def _gpu_engines(path):
    kw = dict(model=path, device="cuda", dtype="float16", max_model_len=256, max_num_seqs=8)
    return LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(speculative_config=NGRAM, **kw))


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_gpu_output_identical_with_and_without_speculation(checkpoint, rng, params):
    path, _ = checkpoint("qwen2_untied")
    plain, spec = _gpu_engines(path)
    prompts = _prompts(rng)
    want = _outputs(plain, prompts, params)
    got = _outputs(spec, prompts, params)
    print(f"ngram: {spec.spec_stats.num_drafts} drafts, acceptance {spec.spec_stats.acceptance_rate:.2f}")
    assert [t for t, _ in got] == [t for t, _ in want]
    for rate in (1.0, 0.6):
        spec.enable_speculation(spec.spec, KnownContinuation({tuple(p): w[0] for p, w in zip(prompts, want)}, rate, 0))
        got = _outputs(spec, prompts, params)
        stats = spec.spec_stats
        print(f"known continuation, {rate:.0%} right: {stats.num_drafts} drafts, "
              f"acceptance {stats.acceptance_rate:.2f}")
        assert [t for t, _ in got] == [t for t, _ in want]
        if rate == 1.0:
            assert stats.acceptance_rate > 0.9


def test_gpu_self_draft_output_identical(checkpoint, rng):
    path, _ = checkpoint("qwen2_untied")
    kw = dict(model=path, device="cuda", dtype="float16", max_model_len=256, max_num_seqs=8)
    plain, spec = LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(speculative_config=SELF_DRAFT, **kw))
    prompts = _prompts(rng)
    for params in PARAMS:
        assert [t for t, _ in _outputs(spec, prompts, params)] == [t for t, _ in _outputs(plain, prompts, params)]
    print(f"self-draft: {spec.spec_stats.num_drafts} drafts, acceptance {spec.spec_stats.acceptance_rate:.2f}")
    _no_leaks(spec)
