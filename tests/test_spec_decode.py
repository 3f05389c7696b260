"""Speculative decoding (n-gram prompt lookup) on the numpy backend: the proposer, the config, output identical to
plain decoding (greedy and seeded sampling with penalties and logprobs), the KV cache rolled back without leaks, and
a chi-square test that the emitted tokens follow the target distribution (which fails for a wrong residual rule)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.config import ConfigError, EngineConfig, SpeculativeConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.spec_decode import AcceptanceGate, NgramProposer, OracleProposer, Speculator
from ops.sampling_types import DeferredSample
from tests.conftest import VOCAB
from tests.test_parity import _all_logits

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def test_ngram_proposes_what_followed_the_latest_longest_match():
    p = NgramProposer(3, prompt_lookup_max=3, prompt_lookup_min=1)
    assert p.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3]) == [7, 1, 2]  # the later of two 3-gram matches
    assert p.propose([5, 6, 7, 8, 6]) == [7, 8, 6]  # no 3- or 2-gram match: the 1-gram [6]
    assert p.propose([5, 6, 7, 8, 6], k=1) == [7]
    assert p.propose([1, 2, 3, 4]) == []  # nothing repeats
    assert p.propose([4, 4]) == [4]
    assert NgramProposer(3, 3, 2).propose([5, 6, 7, 8, 6]) == []  # below prompt_lookup_min


@pytest.mark.parametrize("raw,match", [
    ('{"method": "ngram"', "not valid JSON"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of ngram"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs model"),
    ({"method": "self_draft", "num_speculative_tokens": 2}, "needs draft_layers"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "larger than"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown keys"),
])
def test_bad_speculative_config_is_refused_by_name(raw, match):
    with pytest.raises(ConfigError, match=match):
        SpeculativeConfig.parse(raw)


def test_acceptance_gate_pauses_a_failing_sequence_then_retries():
    gate = AcceptanceGate(floor=0.2, weight=0.5, pause=10)
    for step in range(3):
        gate.update(1, step, 4, 0)
    assert not gate.allows(1, 5) and gate.allows(1, 12)
    assert gate.allows(2, 5)


def _engines(path, **kw):
    kw = dict(model=path, device="numpy", max_model_len=256, max_num_seqs=8, **kw)
    return LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(speculative_config=NGRAM, **kw))


def _prompts(rng):
    """Prompts that repeat themselves (so prompt lookup proposes) and one that does not."""
    motif = rng.integers(0, VOCAB, 6).tolist()
    return [motif * 4, (motif[:3] + rng.integers(0, VOCAB, 2).tolist()) * 5, rng.integers(0, VOCAB, 11).tolist()]


def _outputs(engine, prompts, params):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in engine.generate(prompts, params)]


def assert_same_outputs(got, want):
    """Same tokens and logprob alternatives; logprob values to float32 rounding (a verify step computes K + 1
    rows in one matmul, a plain step one: the sums round differently)."""
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert tokens == want_tokens
        if want_logprobs is None:
            assert logprobs is None
            continue
        for (t, lp, top), (wt, wlp, wtop) in zip(logprobs, want_logprobs, strict=True):
            assert t == wt and [i for i, _ in top] == [i for i, _ in wtop]
            np.testing.assert_allclose([lp] + [v for _, v in top], [wlp] + [v for _, v in wtop], atol=1e-4)


PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_tokens=40, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, seed=3,
                   min_p=0.02, max_tokens=40, ignore_eos=True, min_tokens=5),
]
PARAM_IDS = ["greedy", "seeded-top-k-p-logprobs", "seeded-penalties"]


def _no_leaks(engine):
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every block back: rejected proposals leaked none
    assert all(c == 0 for c in bm.ref_counts)


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_output_identical_with_and_without_ngram_speculation(checkpoint, rng, params):
    path, _ = checkpoint("qwen2_untied")
    plain, spec = _engines(path)
    prompts = _prompts(rng)
    assert_same_outputs(_outputs(spec, prompts, params), _outputs(plain, prompts, params))
    stats = spec.spec_stats
    print(f"{stats.num_drafts} drafts, {stats.num_draft_tokens} tokens, acceptance {stats.acceptance_rate:.2f}")
    _no_leaks(spec)


class KnownContinuation:
    """Offers each prompt's known continuation, each token right with probability `rate` (else off by one):
    drafts every step, some accepted, some rejected, at every position."""

    def __init__(self, outputs: dict, rate: float, seed: int):
        self.outputs, self.rate, self.rng = outputs, rate, np.random.default_rng(seed)

    def propose(self, token_ids, k=None):
        for prompt, continuation in self.outputs.items():
            if tuple(token_ids[:len(prompt)]) == prompt:
                true = continuation[len(token_ids) - len(prompt):][:k]
                return [t if self.rng.random() < self.rate else (t + 1) % VOCAB for t in true]
        return []


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_one_step_ahead_with_speculation_gives_the_same_output(checkpoint, rng, params):
    """Speculation keeps one step ahead: a step whose sequences all have their proposals paused (the gate, here
    after a proposer that is right 20% of the time) runs ahead; one that may propose lands the step in flight
    first. Output identical to plain decoding; with greedy sampling (nothing that needs the ids on the host) some
    steps ran ahead."""
    path, _ = checkpoint("qwen2_untied")
    plain, sync = _engines(path)
    spec = LLMEngine(EngineConfig(model=path, device="numpy", max_model_len=256, max_num_seqs=8,
                                  speculative_config=NGRAM, async_scheduling=True))
    prompts = _prompts(rng)
    want = _outputs(plain, prompts, params)
    known = {tuple(p): w[0] for p, w in zip(prompts, want)}
    for engine in (spec, sync):
        engine.enable_speculation(engine.spec, KnownContinuation(known, 0.2, 1))
    _outputs(sync, prompts, params)
    deferred, execute = [], spec.runner.execute

    def spy(*args, **kwargs):
        out = execute(*args, **kwargs)
        deferred.append(isinstance(out, DeferredSample))
        return out
    spec.runner.execute = spy
    assert_same_outputs(_outputs(spec, prompts, params), want)
    # it proposed at the same steps as the synchronous engine (running ahead never cost a proposal)
    assert spec.spec_stats.num_drafts == sync.spec_stats.num_drafts > 0
    if params.temperature == 0:
        assert any(deferred), "no step ran one step ahead"
    _no_leaks(spec)


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_output_identical_when_proposals_are_partly_right(checkpoint, rng, params):
    """Every step verifies 4 proposals, 60% of them right: penalties, min_tokens, top-k/p, seeds and logprobs mean
    what they mean without speculation."""
    path, _ = checkpoint("qwen2_untied")
    plain, spec = _engines(path)
    prompts = _prompts(rng)
    want = _outputs(plain, prompts, params)
    spec.enable_speculation(spec.spec, KnownContinuation({tuple(p): w[0] for p, w in zip(prompts, want)}, 0.6,
                                                         int(rng.integers(1000))))
    assert_same_outputs(_outputs(spec, prompts, params), want)
    stats = spec.spec_stats
    print(f"{stats.num_drafts} drafts, acceptance {stats.acceptance_rate:.2f}, per position {stats.accepted_per_pos}")
    assert stats.num_drafts > 10 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    _no_leaks(spec)


def test_accepted_proposals_emit_several_tokens_a_step(checkpoint):
    """A model that repeats its prompt's cycle (greedy, tiny random models fall into loops) accepts proposals:
    fewer steps than tokens, and the prefix cache, filled by accepted tokens, serves the same request again."""
    path, _ = checkpoint("qwen2_untied")
    plain, spec = _engines(path)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6] * 3]
    want = _outputs(plain, prompt, params)
    spec.add_request("r", prompt[0], params)
    steps = 0
    while spec.has_unfinished_requests():
        spec.step()
        steps += 1
    stats = spec.spec_stats
    print(f"{steps} steps for 64 tokens; acceptance {stats.acceptance_rate:.2f}, "
          f"mean accepted length {stats.mean_accepted_length:.2f}")
    if stats.num_accepted_tokens == 0:
        pytest.skip("this random checkpoint never repeats itself: nothing to accept")
    assert steps < 64 and stats.mean_accepted_length > 1
    assert _outputs(spec, prompt, params) == want
    longer = prompt[0] + want[0][0][:40]  # its blocks past the prompt were filled by accepted proposals
    assert spec.generate([longer], SamplingParams(max_tokens=1))[0].num_cached_tokens == 48


@pytest.mark.parametrize("acceptance", [0.0, 0.5, 0.9])
def test_oracle_proposer_accepts_at_its_rate(checkpoint, acceptance):
    """The benchmark's OracleProposer: each proposal right with probability a, the first wrong one ends the run of
    accepted ones, so a verify of K accepts sum_{j=1..K} a^j on average; every requested token still comes out, and
    no block leaks."""
    path, _ = checkpoint("qwen2_untied")
    _, spec = _engines(path)
    k = NGRAM["num_speculative_tokens"]
    spec.enable_speculation(spec.spec, OracleProposer(acceptance, VOCAB, seed=5), AcceptanceGate(enabled=False))
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    outs = spec.generate([[3, 1, 4, 1, 5], [9, 2, 6, 5]], params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [120, 120]
    stats = spec.spec_stats
    expected = sum(acceptance ** j for j in range(1, k + 1)) / k
    print(f"a={acceptance}: {stats.num_drafts} verifies, acceptance {stats.acceptance_rate:.3f} "
          f"(expected {expected:.3f})")
    assert stats.num_drafts >= 40
    assert abs(stats.acceptance_rate - expected) < 0.1
    _no_leaks(spec)


class FixedProposer:
    """Always proposes `token`: the rule's accept and reject paths both run at every verify step."""

    def __init__(self, token):
        self.token = token

    def propose(self, token_ids, k=None):
        return [self.token][:k]


def _chi_square_p_value(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test over bins of expected count >= 5 (the rest pooled); Wilson-Hilferty for the chi2 tail."""
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


# A target distribution with weight on a few tokens (a random tiny model's is nearly flat): p(10) ~ 0.7.
BIAS = {10: 8.0, 11: 7.5, 12: 7.0, 13: 6.5}
PROMPT = [5, 17, 99, 3, 250, 42]


def _second_tokens(engine, seeds):
    """(first, second) output token of one request per seed; the second is the one a verify step emits."""
    params = [SamplingParams(temperature=1.0, seed=int(s), max_tokens=3, ignore_eos=True, logit_bias=BIAS)
              for s in seeds]
    return [tuple(o.outputs[0].token_ids[:2]) for o in engine.generate([PROMPT] * len(seeds), params)]


def test_emitted_tokens_follow_the_target_distribution(checkpoint, monkeypatch):
    """600 seeds, a proposer that always offers token 10 (the likeliest): the histogram of the token each verify
    step emits against the target's probabilities given the token before it passes Pearson's chi-square; with the
    residual rule broken (a rejection redraws from the whole distribution, the proposal included) it fails."""
    path, _ = checkpoint("qwen2_untied")
    plain, spec = _engines(path)
    cache = {}

    def target(first: int) -> np.ndarray:  # p(second | prompt, first): softmax of the biased logits
        if first not in cache:
            logits = _all_logits(plain, PROMPT + [first])[-1].astype(np.float64)
            for token, bias in BIAS.items():
                logits[token] += bias
            probs = np.exp(logits - logits.max())
            cache[first] = probs / probs.sum()
        return cache[first]

    def p_value(engine) -> float:
        pairs = _second_tokens(engine, np.arange(600))
        counts = np.bincount([second for _, second in pairs], minlength=VOCAB)
        expected = sum(target(first) for first, _ in pairs)
        return _chi_square_p_value(counts, expected)

    spec.enable_speculation(spec.spec, FixedProposer(10))
    good = p_value(spec)
    stats = spec.spec_stats
    print(f"chi-square p-value {good:.3f}; {stats.num_drafts} drafts, acceptance {stats.acceptance_rate:.3f}")
    assert stats.num_drafts == 600 and 0.2 < stats.acceptance_rate < 0.9  # both paths taken often
    assert good > 1e-3

    # The broken rule: on rejection, emit a fresh draw from p (which may be the rejected proposal again).
    wrong_rng = np.random.default_rng(0)
    real_verify = Speculator.verify

    def wrong_verify(self, seq, sampled, first, append):
        real_verify(self, seq, sampled, first, append)
        at = seq.num_prompt_tokens + 1
        if seq.token_ids[at] != 10:  # rejected: the right rule keeps the draw, this one redraws
            seq.token_ids[at] = int(wrong_rng.choice(VOCAB, p=target(seq.token_ids[at - 1])))

    monkeypatch.setattr(Speculator, "verify", wrong_verify)
    _, broken = _engines(path)
    broken.enable_speculation(broken.spec, FixedProposer(10))
    bad = p_value(broken)
    print(f"broken rule: chi-square p-value {bad:.2e}")
    assert bad < 1e-3


SELF_DRAFT = {"method": "self_draft", "num_speculative_tokens": 3, "draft_layers": 1}


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_output_identical_with_a_self_draft(checkpoint, rng, params):
    """The target's first layer drafts 3 tokens a step, writing its K/V into the target's own cache: the output is
    the plain output, and the cache gives every block back."""
    path, _ = checkpoint("qwen2_untied")
    kw = dict(model=path, device="numpy", max_model_len=256, max_num_seqs=8)
    plain = LLMEngine(EngineConfig(**kw))
    spec = LLMEngine(EngineConfig(speculative_config=SELF_DRAFT, **kw))
    prompts = _prompts(rng)
    assert_same_outputs(_outputs(spec, prompts, params), _outputs(plain, prompts, params))
    stats = spec.spec_stats
    print(f"self-draft: {stats.num_drafts} drafts, acceptance {stats.acceptance_rate:.2f}")
    assert stats.num_drafts > 10
    _no_leaks(spec)


def test_self_draft_needs_fewer_layers_than_the_model(checkpoint):
    path, _ = checkpoint("qwen2_untied")
    with pytest.raises(ConfigError, match="draft_layers 9 must be fewer than the model's"):
        LLMEngine(EngineConfig(model=path, device="numpy", max_model_len=256,
                               speculative_config=dict(SELF_DRAFT, draft_layers=9)))


@pytest.mark.parametrize("draft", ["qwen2_untied", "qwen2_tied"], ids=["draft-is-target", "other-draft"])
@pytest.mark.parametrize("params", PARAMS[:2], ids=PARAM_IDS[:2])
def test_output_identical_with_a_draft_model(checkpoint, rng, draft, params):
    """A draft model with its own KV cache (the target's block tables index it): output identical to plain decoding;
    a draft that is the target itself has its proposals accepted (its cache kept in step through rejections)."""
    path, _ = checkpoint("qwen2_untied")
    draft_path, _ = checkpoint(draft)
    kw = dict(model=path, device="numpy", max_model_len=256, max_num_seqs=8)
    plain = LLMEngine(EngineConfig(**kw))
    spec = LLMEngine(EngineConfig(speculative_config={"method": "draft_model", "model": draft_path,
                                                      "num_speculative_tokens": 3}, **kw))
    prompts = _prompts(rng)
    assert_same_outputs(_outputs(spec, prompts, params), _outputs(plain, prompts, params))
    stats = spec.spec_stats
    print(f"draft {draft}: {stats.num_drafts} drafts, acceptance {stats.acceptance_rate:.2f}")
    assert stats.num_drafts > 10
    if draft == "qwen2_untied" and params.temperature == 0:
        assert stats.acceptance_rate > 0.95  # the draft is the target: only float rounding can disagree
    _no_leaks(spec)


def test_draft_model_through_preemption(checkpoint, rng):
    """8 requests in 24 blocks preempt each other; with a draft model the outputs are those of plain decoding."""
    path, _ = checkpoint("qwen2_untied")
    draft_path, _ = checkpoint("qwen2_tied")
    kw = dict(model=path, device="numpy", max_model_len=256, max_num_seqs=8, num_kv_blocks=24)
    plain = LLMEngine(EngineConfig(**kw))
    spec = LLMEngine(EngineConfig(speculative_config={"method": "draft_model", "model": draft_path,
                                                      "num_speculative_tokens": 4}, **kw))
    prompts = [rng.integers(0, VOCAB, 20).tolist() for _ in range(8)]
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=60, ignore_eos=True)
    assert_same_outputs(_outputs(spec, prompts, params), _outputs(plain, prompts, params))
    assert spec.scheduler.num_preemptions > 0 and spec.spec_stats.num_drafts > 0
    _no_leaks(spec)


def test_draft_model_vocabulary_must_match(checkpoint, tmp_path):
    import json
    import shutil
    path, _ = checkpoint("qwen2_untied")
    other = tmp_path / "draft"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = VOCAB * 2
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="a draft must share the target's tokenizer"):
        LLMEngine(EngineConfig(model=path, device="numpy", max_model_len=256, load_format="dummy",
                               speculative_config={"method": "draft_model", "model": str(other),
                                                   "num_speculative_tokens": 2}))
