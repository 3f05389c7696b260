"""Structured outputs on the numpy backend: llguidance's masks against a reference computed from the token bytes and
the language itself, the sampler never leaving the mask, and whole generations that always validate (many seeds,
temperature 1), one step ahead or not, n > 1, with no KV block left behind."""
from __future__ import annotations

import re

import jsonschema
import numpy as np
import orjson
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams, StructuredOutputs
from engine.structured import GrammarError
from ops.sampling import apply_token_mask, sample
from ops.sampling_types import SamplingTensors

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["red", "blue"]}}}}


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(device="numpy", max_model_len=256, seed=1))


def _byte_level_decoder() -> dict[str, int]:
    """ByteLevel's printable stand-ins back to bytes: printable Latin-1 bytes stand for themselves, the others are
    numbered from U+0100 in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in kept}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _token_bytes(engine) -> dict[int, bytes]:
    """Bytes of every ordinary (not added/special) token of the demo tokenizer."""
    tok = engine.tokenizer
    decoder = _byte_level_decoder()
    vocab = orjson.loads(tok.backend_json())["model"]["vocab"]
    return {i: bytes(decoder[ch] for ch in piece) for piece, i in vocab.items() if i not in tok.all_special_ids}


def _allowed(mask_row: np.ndarray, vocab_size: int) -> set[int]:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab_size]
    return set(np.flatnonzero(bits).tolist())


def _forced_bytes(prefix: bytes, viable, complete) -> bytes:
    """The bytes every continuation of `prefix` in the language starts with."""
    forced = b""
    while not complete(prefix + forced):
        nexts = [bytes([c]) for c in range(256) if viable(prefix + forced + bytes([c]))]
        if len(nexts) != 1:
            break
        forced += nexts[0]
    return forced


# a constraint and its reference: (viable(prefix bytes), complete(prefix bytes))
CHOICES = ["yes", "no", "nope", "42"]
REFERENCES = {
    "choice": (StructuredOutputs(choice=CHOICES), lambda s: any(c.encode().startswith(s) for c in CHOICES),
               lambda s: s.decode("latin-1") in CHOICES),
    "regex": (StructuredOutputs(regex="[0-9]{3}-[a-z]{2,5}"),
              lambda s: re.fullmatch(rb"[0-9]{0,3}|[0-9]{3}-[a-z]{0,5}", s) is not None,
              lambda s: re.fullmatch(rb"[0-9]{3}-[a-z]{2,5}", s) is not None),
    "lark": (StructuredOutputs(grammar='start: "a" B "c"\nB: /b+/'),
             lambda s: re.fullmatch(rb"(a(b+c?)?)?", s) is not None, lambda s: re.fullmatch(rb"ab+c", s) is not None),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_masks_equal_a_reference_of_the_same_language(engine, rng, name):
    """Along random walks through the grammar, the allowed tokens are exactly those whose bytes keep the output a
    prefix of the language, EOS exactly where the output is complete; padding ids past the tokenizer never."""
    spec, viable, complete = REFERENCES[name]
    compiler = engine.grammar_compiler
    vocab_size = engine.model_config.vocab_size
    pieces = _token_bytes(engine)
    eos = set(engine.eos_token_ids)  # every EOS id of the model ends a complete output
    for _ in range(6):
        grammar, prefix = compiler.matcher(spec), b""
        for _ in range(20):
            mask = np.empty((1, compiler.mask_words), np.int32)
            compiler.fill_masks([grammar], mask)
            allowed = _allowed(mask[0], vocab_size)
            want = {i for i, b in pieces.items() if b and viable(prefix + b)}
            forced = _forced_bytes(prefix, viable, complete)
            if forced:  # llguidance then allows only the forced bytes' canonical first token (its fast-forward)
                assert allowed - eos and allowed - eos <= want, f"{name} after {prefix!r}"
                assert all(forced.startswith(pieces[i]) or pieces[i].startswith(forced) for i in allowed - eos)
            else:
                assert allowed - eos == want, f"{name} after {prefix!r}"
            assert allowed & eos == (eos if complete(prefix) else set()), f"{name} after {prefix!r}"
            if not want:
                break
            token = int(rng.choice(sorted(want)))
            assert grammar.accept(token)
            prefix += pieces[token]
        assert complete(prefix) or viable(prefix)


def test_sampler_draws_only_allowed_tokens_and_their_logprobs_see_the_mask(rng):
    import llguidance.numpy as lnp
    batch, vocab_size = 6, 1003
    mask = rng.integers(-2**31, 2**31, (batch, -(-vocab_size // 32)), dtype=np.int64).astype(np.int32)
    mask[0] = -1  # unconstrained
    mask[1] = 0
    mask[1, 3] = 1 << 7  # one token allowed: 3 * 32 + 7
    logits = rng.standard_normal((batch, vocab_size)).astype(np.float32) * 3
    mine, theirs = logits.copy(), logits.copy()
    apply_token_mask(mine, mask)
    lnp.apply_token_bitmask_inplace(theirs, mask)  # llguidance's own numpy version of the same layout
    assert np.array_equal(mine, theirs)
    for temperature in (0.0, 1.0):
        rows = [(SamplingParams(temperature=temperature, logprobs=2), [1], [], 17 + r, ()) for r in range(batch)]
        t = SamplingTensors.build(rows, vocab_size, mask)
        out = sample(logits.copy(), t)
        for r, token in enumerate(out.token_ids):
            assert np.isfinite(mine[r, token]), (r, token)
            for i, lp in zip(out.top_ids[r], out.top_logprobs[r]):  # a forbidden alternative has logprob -inf
                assert np.isfinite(lp) == np.isfinite(mine[r, i]), (r, i, lp)
        assert out.token_ids[1] == 3 * 32 + 7 and out.logprobs[1] == pytest.approx(0.0, abs=1e-6)


def _check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(orjson.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(orjson.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"ab+c", text), text


SPECS = {"json": StructuredOutputs(json=SCHEMA, disable_any_whitespace=True),
         "json_object": StructuredOutputs(json_object=True, disable_any_whitespace=True),
         "regex": REFERENCES["regex"][0], "choice": REFERENCES["choice"][0],
         "grammar": StructuredOutputs(grammar='root ::= "a" "b"+ "c"')}  # GBNF, converted to Lark


def structured_batch(tok, rng, per_form: int, n: int):
    """Prompts and params: per_form requests of each form in SPECS (n choices, temperature 1, seeded), then one
    unconstrained request of 30 tokens. Returns (prompts, params, the form of each constrained request)."""
    base = int(rng.integers(2**31))
    prompts, params, kinds = [], [], []
    # An open JSON object ends only when a random model happens to close it: bias the closing tokens so it does.
    closing = {tok.token_to_id(c): 6.0 for c in ('"', "}") if tok.token_to_id(c) is not None}
    for kind, spec in SPECS.items():
        for i in range(per_form):
            prompts.append(f"request {i} wants {kind}:")
            params.append(SamplingParams(n=n, temperature=1.0, seed=base + i, max_tokens=120, structured_outputs=spec,
                                         logit_bias=closing if kind == "json_object" else None))
            kinds.append(kind)
    prompts.append("free text")
    params.append(SamplingParams(temperature=1.0, seed=base, max_tokens=30, ignore_eos=True))
    return prompts, params, kinds


def spy_late_masks(engine) -> list[bool]:
    """Per step from now on: whether it computed its masks with the previous step still in flight (late_mask)."""
    late, execute = [], engine.runner.execute

    def spy(*args, **kwargs):
        late.append(kwargs.get("late_mask") is not None)
        return execute(*args, **kwargs)
    engine.runner.execute = spy
    return late


def check_structured_outputs(outs, kinds) -> list[str]:
    """Every choice of a structured_batch's constrained requests ended by its constraint and follows it; the free
    request ran its 30 tokens. Returns the constrained texts in order."""
    texts = []
    for kind, out in zip(kinds, outs):
        for o in out.outputs:
            assert o.finish_reason == "stop", (kind, o.text)
            _check(kind, o.text)
            texts.append(o.text)
    assert len(outs[-1].outputs[0].token_ids) == 30
    return texts


@pytest.mark.parametrize("async_on", [False, True])
def test_every_sampled_generation_validates(rng, async_on):
    """Temperature 1, 12 seeds a form, n = 2: every output follows its constraint and ends by it ("stop"), the same
    with one step ahead as without (where the masks are computed after the next step is launched); the batch mixes in
    an unconstrained request; nothing stays allocated."""
    engine = LLMEngine(EngineConfig(device="numpy", max_model_len=256, seed=1, async_scheduling=async_on))
    prompts, params, kinds = structured_batch(engine.tokenizer, rng, per_form=6, n=2)
    late = spy_late_masks(engine)
    outs = engine.generate(prompts, params)
    texts = check_structured_outputs(outs, kinds)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    # one step ahead, a constrained decode step launches before the ids its masks need have landed
    assert sum(late) > len(late) // 2 if async_on else not any(late)
    if async_on:
        sync = LLMEngine(EngineConfig(device="numpy", max_model_len=256, seed=1, async_scheduling=False))
        assert [o.text for out in sync.generate(prompts, params)[:-1] for o in out.outputs] == texts


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputs(regex="[0-9"), "invalid regex"),
    (StructuredOutputs(json={"type": "nonsense"}), "invalid json"),
    (StructuredOutputs(json='{"type": "object",'), "not valid JSON"),
    (StructuredOutputs(grammar="start: undefined_rule"), "invalid grammar"),
])
def test_a_bad_constraint_is_refused_before_anything_is_queued(engine, spec, message):
    with pytest.raises(GrammarError, match=message):
        engine.add_request("bad", "hello", SamplingParams(structured_outputs=spec))
    assert not engine.requests and not engine.scheduler.waiting
    out = engine.generate(["still serving"], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"choice": []}, "non-empty list"),
    ({"choice": "ab"}, "list of strings"), ({"json": 3}, "JSON schema object"), ({"regex": ""}, "non-empty string"),
])
def test_structured_outputs_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputs(**fields)


def test_one_compilation_per_constraint(engine):
    """A schema given as an object or as its JSON text, in any key order, is one cache entry."""
    compiler = engine.grammar_compiler
    compiler._templates.cache_clear()
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    for spec in (StructuredOutputs(json=schema), StructuredOutputs(json=orjson.dumps(schema).decode()),
                 StructuredOutputs(json=dict(reversed(list(schema.items()))))):
        compiler.matcher(spec)
    assert compiler._templates.cache_info().misses == 1
