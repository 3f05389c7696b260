"""LLMEngine on the demo model: stop conditions, n > 1, prefix caching, seeds, aborts, bad input."""
from __future__ import annotations

import json

import pytest

from engine.config import UNIMPLEMENTED_FIELDS, ConfigError, EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog near the old river bank."
# The demo model's greedy output repeats one token; seeded sampling gives varied, reproducible text.
SEEDED = dict(temperature=1.0, seed=3)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(device="numpy", max_model_len=512, seed=1))


def _one(engine, prompt, **kw):
    return engine.generate([prompt], SamplingParams(**kw))[0].outputs[0]


def test_greedy_is_deterministic_and_stops_at_max_tokens(engine):
    a = _one(engine, PROMPT, temperature=0.0, max_tokens=20, ignore_eos=True)
    b = _one(engine, PROMPT, temperature=0.0, max_tokens=20, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    assert a.finish_reason == "length" and a.stop_reason is None
    assert a.text == engine.tokenizer.decode(a.token_ids)


def test_stop_string_across_token_boundaries(engine):
    full = _one(engine, PROMPT, **SEEDED, max_tokens=40, ignore_eos=True)
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [engine.tokenizer.decode([t]) for t in full.token_ids]
    k = next(i for i in range(3, len(pieces) - 2) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    before = "".join(pieces[:k])
    stop = pieces[k][1:] + pieces[k + 1]
    assert before + pieces[k][:1] + stop in full.text
    cut = full.text.index(stop)
    out = _one(engine, PROMPT, **SEEDED, max_tokens=40, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:cut]
    kept = _one(engine, PROMPT, **SEEDED, max_tokens=40, ignore_eos=True, stop=[stop],
                include_stop_str_in_output=True)
    assert kept.text == full.text[:cut + len(stop)]


def test_stop_token_ids_and_min_tokens(engine):
    full = _one(engine, PROMPT, **SEEDED, max_tokens=30, ignore_eos=True)
    target = full.token_ids[6]
    first = full.token_ids.index(target)
    out = _one(engine, PROMPT, **SEEDED, max_tokens=30, ignore_eos=True, stop_token_ids=[target])
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    # A logit bias that makes EOS certain: min_tokens holds it off for exactly 5 tokens.
    eos = engine.tokenizer.eos_token_id
    out = _one(engine, PROMPT, temperature=0.0, max_tokens=30, min_tokens=5, logit_bias={eos: 100.0})
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]
    assert out.finish_reason == "stop" and out.stop_reason is None
    ignored = _one(engine, PROMPT, temperature=0.0, max_tokens=8, logit_bias={eos: 100.0}, ignore_eos=True)
    assert ignored.token_ids == [eos] * 8 and ignored.finish_reason == "length"


def _fresh(**kw) -> LLMEngine:
    """An engine with an empty prefix cache, for tests that count computed tokens."""
    return LLMEngine(EngineConfig(device="numpy", max_model_len=512, **kw))


def test_n_choices_share_the_prompt_blocks():
    engine = _fresh()
    ids = engine.tokenizer.encode(PROMPT * 3)[:40]  # 2 full blocks + 8 tokens
    before = engine.runner.num_computed_tokens_total
    out = engine.generate([ids], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))[0]
    computed = engine.runner.num_computed_tokens_total - before
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 10 for o in out.outputs)
    # First choice computes the prompt; the others only the 8-token tail, then 9 decodes each.
    assert computed == 40 + 2 * 8 + 3 * 9
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "different seeds per choice"


def test_prefix_cache_reuse_skips_work_and_keeps_output():
    engine = _fresh()
    base = engine.tokenizer.encode(PROMPT * 6)
    assert len(base) > 70
    first, second = base[:60], base[:48] + base[10:25]
    engine.generate([first], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    before = engine.runner.num_computed_tokens_total
    out = engine.generate([second], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert out.num_cached_tokens == 48
    assert engine.runner.num_computed_tokens_total - before == len(second) - 48 + 3
    fresh = _fresh(enable_prefix_caching=False)
    ref = fresh.generate([second], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert ref.num_cached_tokens == 0
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_seeded_request_reproduces_inside_different_batches(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = engine.generate([PROMPT], params)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = engine.generate(["Another prompt entirely", PROMPT, "x y z"], [noisy, params, noisy])
    assert batch[1].outputs[0].token_ids == alone


def test_abort_returns_blocks(engine):
    engine.add_request("to-abort", PROMPT, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.block_manager.usage > 0
    engine.abort("to-abort")
    assert engine.block_manager.usage == 0.0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "prompt is empty"),
    ([5, 10 ** 6], SamplingParams(), "token ids in 'prompt' must be in [0,"),
    ([-1], SamplingParams(), "token ids in 'prompt' must be in [0,"),
    ([1] * 600, SamplingParams(), "longer than the maximum model length of 512"),
    ([1, 2], SamplingParams(logit_bias={10 ** 6: 1.0}), "logit_bias"),
    ([1, 2], SamplingParams(stop_token_ids=[10 ** 6]), "stop_token_ids"),
])
def test_bad_requests_are_refused_and_nothing_leaks(engine, prompt, params, message):
    with pytest.raises(ValueError, match=None) as e:
        engine.add_request("bad", prompt, params)
    assert message in str(e.value)
    assert not engine.has_unfinished_requests() and engine.block_manager.usage == 0.0


def test_duplicate_request_id(engine):
    engine.add_request("dup", PROMPT, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", PROMPT, SamplingParams(max_tokens=1))
    engine.abort("dup")


def _config(**overrides):
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("overrides, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported; supported: "
     "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Qwen3ForCausalLM"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported; "
     "supported: llama3, linear"),
    (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads (3)"),
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
])
def test_unsupported_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(_config(**overrides))
    assert message in str(e.value)


# Each field of engine/config.UNIMPLEMENTED_FIELDS with a value that changes the math, and what is refused for it.
MATH_CHANGING = [
    ("hidden_act", "gelu_pytorch_tanh"),
    ("mlp_bias", True),
    ("partial_rotary_factor", 0.5),
    ("attn_logit_softcapping", 50.0),
    ("final_logit_softcapping", 30.0),
    ("no_rope_layers", [1, 0]),
]


@pytest.mark.parametrize("field, value", MATH_CHANGING, ids=[f for f, _ in MATH_CHANGING])
def test_fields_that_change_the_math_are_refused_never_ignored(field, value):
    with pytest.raises(ConfigError, match=f"{field} = .* is not supported for LlamaForCausalLM"):
        ModelConfig.from_dict(_config(**{field: value}))
    neutral = UNIMPLEMENTED_FIELDS[field][0]
    ModelConfig.from_dict(_config(**{field: neutral}))  # the neutral value loads


def test_every_unimplemented_field_has_a_refusal_test():
    assert {f for f, _ in MATH_CHANGING} == set(UNIMPLEMENTED_FIELDS)


def test_partial_rotary_inside_rope_parameters_and_unknown_layer_types_are_refused():
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelConfig.from_dict(_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.25}))
    with pytest.raises(ConfigError, match="layer_types may hold only full_attention, sliding_attention"):
        ModelConfig.from_dict(_config(layer_types=["full_attention", "chunked_attention"]))


@pytest.mark.parametrize("arch, fields, window, layers", [
    ("MistralForCausalLM", dict(sliding_window=4096), 4096, (0, 1, 2, 3)),
    ("MistralForCausalLM", dict(sliding_window=None), 0, ()),
    ("Qwen2ForCausalLM", dict(sliding_window=4096, max_window_layers=2), 0, ()),  # use_sliding_window off
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=64, max_window_layers=3), 64, (3,)),
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"] * 2), 64, (0, 2)),
    ("LlamaForCausalLM", dict(sliding_window=64), 0, ()),  # transformers' Llama has no window
])
def test_sliding_window_is_read_as_transformers_reads_it(arch, fields, window, layers):
    c = ModelConfig.from_dict(_config(architectures=[arch], num_hidden_layers=4, **fields))
    assert (c.sliding_window, c.sliding_layers) == (window, layers)
    assert c.all_layers_slide == (len(layers) == 4)


def test_the_engine_leaves_the_callers_config_as_it_was():
    config = EngineConfig(device="numpy")
    engine = LLMEngine(config)
    assert config.model == "" and config.max_model_len is None and config.scheduler.max_model_len == 4096
    assert engine.config.model and engine.max_model_len == engine.model_config.max_position_embeddings


def test_missing_config_field_and_file(tmp_path):
    raw = _config()
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match="'intermediate_size' is missing for LlamaForCausalLM"):
        ModelConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_config_fields_read_from_real_families(checkpoint):
    path, _ = checkpoint("qwen3")
    c = ModelConfig.from_pretrained(path)
    assert c.qk_norm and c.head_dim == 64 and not c.attention_bias and c.tie_word_embeddings
    path, _ = checkpoint("llama3_scaled")
    c = ModelConfig.from_pretrained(path)
    assert c.rope_scaling.kind == "llama3" and c.rope_scaling.factor == 8.0 and not c.tie_word_embeddings
    path, _ = checkpoint("qwen2_untied")
    assert ModelConfig.from_pretrained(path).attention_bias
    assert json.load(open(f"{path}/config.json"))["architectures"] == ["Qwen2ForCausalLM"]


def test_logprobs_with_top_alternatives(engine):
    out = _one(engine, PROMPT, temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    assert len(out.logprobs) == 6
    for token, logprob, top in zip(out.token_ids, *zip(*[(lp, t) for _, lp, t in out.logprobs])):
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0] == (token, pytest.approx(logprob)), "greedy picks the most likely token"
        assert logprob <= 0.0
    none = _one(engine, PROMPT, temperature=0.0, max_tokens=2, ignore_eos=True)
    assert none.logprobs is None


def test_each_choice_reports_its_finish_exactly_once():
    engine = _fresh()
    params = dict(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    runs = engine.generate([PROMPT], SamplingParams(**params))[0].outputs
    others = set(runs[1].token_ids) | set(runs[2].token_ids)
    stop = next(t for t in runs[0].token_ids[:8] if t not in others)  # ends choice 0 early, only it
    engine.add_request("r", PROMPT, SamplingParams(**params, stop_token_ids=[stop]))
    seen = {0: [], 1: [], 2: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                assert not any(r is not None for r in seen[o.index]), f"choice {o.index} after its finish"
                seen[o.index].append(o.finish_reason)
    assert seen[0][-1] == "stop" and len(seen[0]) < len(seen[1])
    assert seen[1][-1] == seen[2][-1] == "length"
