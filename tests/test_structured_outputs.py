"""Structured outputs on the numpy backend: llguidance's masks against a reference computed from the token bytes and
the language itself, the sampler never leaving the mask, and whole generations that always validate (many seeds,
temperature 1), one step ahead or not, n > 1, with no KV block left behind."""
from __future__ import annotations

import re
import threading
import time

import jsonschema
import numpy as np
import orjson
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams, StructuredOutputs
from engine.structured import GrammarCompiler, GrammarError
from ops.sampling import apply_token_mask, sample
from ops.sampling_types import SamplingTensors

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          # age bounded: a random model at temperature 1 once wrote 100 digits and ran out of tokens (seed 2099997605)
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99999},
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


def _spy_masks(engine) -> dict:
    """From now on, per sampled position (request number, choice, tokens so far): the mask row it sampled with (all
    ones where unconstrained), late or not."""
    seen, execute = {}, engine.runner.execute

    def store(keys, mask):
        for row, key in enumerate(keys):
            seen[key] = np.full(engine.grammar_compiler.mask_words, -1, np.int32) if mask is None else mask[row].copy()

    def spy(sched, sampling, defer=False, late_mask=None):
        keys = [(s.seq.request_id.rsplit("-", 1)[1], s.seq.index, s.seq.num_tokens) for s in sched.scheduled
                if s.samples]
        if late_mask is None:
            if sampling is not None:
                store(keys, sampling.token_mask)
            return execute(sched, sampling, defer)

        def late():
            mask = late_mask()
            store(keys, mask)
            return mask
        return execute(sched, sampling, defer, late)
    engine.runner.execute = spy
    return seen


def _ahead_against_sync(rng, monkeypatch, ids_ready: bool, max_num_seqs: int = 256, threads: int = 3):
    """A synchronous engine and one running one step ahead (the numpy backend's ids are on the host at once; with
    ids_ready False it says they are not, as a GPU would while the step runs), the same structured_batch, compilers of
    `threads` templates. Returns (texts of each, the masks each position sampled with in each)."""
    from engine import structured
    from ops.sampling_types import DeferredSample
    monkeypatch.setattr(structured, "MASK_THREADS", threads)
    if not ids_ready:
        monkeypatch.setattr(DeferredSample, "ready", lambda self: False)
    sync, ahead = (LLMEngine(EngineConfig(device="numpy", max_model_len=256, seed=1, async_scheduling=a,
                                          max_num_seqs=max_num_seqs)) for a in (False, True))
    prompts, params, _ = structured_batch(sync.tokenizer, rng, per_form=3, n=2)
    want, got = _spy_masks(sync), _spy_masks(ahead)
    texts = [[[o.text for o in out.outputs] for out in engine.generate(prompts, params)] for engine in (sync, ahead)]
    return texts, want, got


@pytest.mark.parametrize("ids_ready, max_num_seqs", [(True, 256), (False, 256), (True, 6)],
                         ids=["masks-before-scheduling", "masks-after-launch", "admissions-between"])
def test_one_step_ahead_masks_are_the_synchronous_ones_computed_beside_the_landing(rng, monkeypatch, ids_ready,
                                                                                   max_num_seqs):
    """One step ahead, the masks are computed on a worker: where the step in flight's ids are on the host when the
    next step begins, from before that step is scheduled (the engine's thread then schedules, builds the sampling
    tensors, launches, detokenizes); else from when they land after the launch (the engine's thread detokenizes).
    With few places in the batch, requests are admitted while others run: a step with a prefill lands the ids first
    and samples with the masks started before it was scheduled (those of the new sequences computed then).
    Either way every position samples with exactly the mask the synchronous engine used there (a mask computed before
    the landed token reached its grammar, or for another step, differs), the engine's thread never touches a grammar
    while the worker computes (the worker is slowed to make a race show), and that thread's work did overlap it."""
    from engine import model_runner, outputs, scheduler, structured
    engine_thread, busy, raced, overlapped, order = threading.get_ident(), [], [], set(), []
    fill = structured.GrammarCompiler._fill_par

    def slow_fill(self, grammars, out):
        if threading.get_ident() == engine_thread:
            return fill(self, grammars, out)
        busy.append(True)
        time.sleep(0.004)
        fill(self, grammars, out)
        busy.clear()

    def watch(name, method):
        def watched(*args, **kwargs):
            if busy and threading.get_ident() == engine_thread:  # a grammar's use is a race, the rest overlap
                (raced.append if name in ("accept", "done", "fill") else overlapped.add)(name)
            order.append(name)
            result = method(*args, **kwargs)
            order.append(name + " done")
            return result
        return watched
    monkeypatch.setattr(structured.GrammarCompiler, "_fill_par", slow_fill)
    monkeypatch.setattr(structured.SequenceGrammar, "accept", watch("accept", structured.SequenceGrammar.accept))
    monkeypatch.setattr(structured.SequenceGrammar, "done",
                        property(watch("done", structured.SequenceGrammar.done.fget)))
    monkeypatch.setattr(structured.GrammarCompiler, "fill_masks", watch("fill", structured.GrammarCompiler.fill_masks))
    monkeypatch.setattr(structured.LandedGrammars, "__init__", watch("land", structured.LandedGrammars.__init__))
    monkeypatch.setattr(outputs.SequenceOutputState, "append", watch("append", outputs.SequenceOutputState.append))
    monkeypatch.setattr(scheduler.Scheduler, "schedule", watch("schedule", scheduler.Scheduler.schedule))
    monkeypatch.setattr(model_runner.ModelRunner, "execute", watch("execute", model_runner.ModelRunner.execute))
    monkeypatch.setattr(structured.LandedGrammars, "masks_for", watch("masks", structured.LandedGrammars.masks_for))
    (texts, ahead_texts), want, got = _ahead_against_sync(rng, monkeypatch, ids_ready, max_num_seqs)
    assert ahead_texts == texts
    assert not raced, f"the engine's thread used a grammar while the worker computed masks: {raced[:5]}"
    # a landing outside the forward's launch is one before the next step's scheduling, which then runs beside the
    # worker; else the landing comes from the late mask, inside the launch
    def outside_launch(name):
        return [[e for e in order[:i] if e.startswith("execute")][-1] == "execute done"
                for i, e in enumerate(order) if e == name]
    early = outside_launch("land")
    if ids_ready:
        assert sum(early) > 10 and {"append", "schedule", "execute"} <= overlapped
    else:
        assert not any(early) and len(early) > 10 and "append" in overlapped
    assert (sum(outside_launch("masks")) > 0) == (max_num_seqs < 256)  # a prefill step sampled with them
    # the wasted rows of sequences that stopped on the landed token are ahead's alone
    assert set(want) <= set(got) and len(want) > 100
    wrong = [key for key in want if not np.array_equal(want[key], got[key])]
    assert not wrong, f"{len(wrong)} of {len(want)} positions sampled with another mask, e.g. {wrong[:3]}"


def test_the_mask_comparison_sees_a_mask_of_the_wrong_grammar_state(rng, monkeypatch):
    """The check above fails where the masks come from the grammars before the landed token reached them."""
    from engine import structured

    def masks_first(self, compiler, seqs, sample, mask_seqs):
        self.sampled, self._compiler, self.skip = sample.result(), compiler, frozenset()
        self._pending = compiler.start_batch_mask(mask_seqs)
        self._pending.wait()  # no race: the masks are done before the tokens go in, only too early
        self.ended = structured.advance_grammars(seqs, self.sampled.token_ids)
    monkeypatch.setattr(structured.LandedGrammars, "__init__", masks_first)
    _, want, got = _ahead_against_sync(rng, monkeypatch, ids_ready=True)
    assert any(key in got and not np.array_equal(want[key], got[key]) for key in want)


@pytest.mark.parametrize("ids_ready", [True, False], ids=["masks-before-scheduling", "masks-after-launch"])
def test_a_mask_error_one_step_ahead_fails_only_its_step(rng, monkeypatch, ids_ready):
    """The worker's mask computation raises once: that step's requests fail (EngineStepError names them, their blocks
    come back), the requests that were waiting run to the end and follow their constraint."""
    from engine import structured
    from engine.errors import EngineStepError
    from ops.sampling_types import DeferredSample
    if not ids_ready:
        monkeypatch.setattr(DeferredSample, "ready", lambda self: False)
    engine_thread, calls, fill = threading.get_ident(), [], structured.GrammarCompiler._fill_par

    def failing_fill(self, grammars, out):
        if threading.get_ident() != engine_thread:
            calls.append(len(grammars))
            if len(calls) == 6:
                raise RuntimeError("mask computation failed")
        return fill(self, grammars, out)
    monkeypatch.setattr(structured.GrammarCompiler, "_fill_par", failing_fill)
    engine = LLMEngine(EngineConfig(device="numpy", max_model_len=256, seed=1, async_scheduling=True, max_num_seqs=2))
    spec = SPECS["json"]
    for i in range(4):
        engine.add_request(f"r{i}", f"request {i}:", SamplingParams(temperature=1.0, seed=i, max_tokens=120,
                                                                     structured_outputs=spec))
    failed, outs = None, {}
    while engine.has_unfinished_requests():
        try:
            step_outs = engine.step()
        except EngineStepError as e:
            assert failed is None, "one failure only"
            failed = e
            continue
        for out in step_outs:
            outs.setdefault(out.request_id, out) if out.request_id not in outs else outs[out.request_id].merge(out)
    assert failed is not None and "mask computation failed" in str(failed.cause)
    assert sorted(failed.request_ids) == ["r0", "r1"]  # the two running; r2 and r3 were waiting
    for rid in ("r2", "r3"):
        out = outs[rid].outputs[0]
        assert out.finish_reason == "stop", out.text
        _check("json", out.text)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_constraints_sequences_copy_templates_in_turn_with_the_same_masks(engine):
    """With threads = 3, a constraint's first three sequences each build a template, the next ones copy them in turn;
    along the same tokens every copy gives the same masks, one at a time or all in one executor call."""
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids, threads=3)
    spec = SPECS["json"]
    grammars = [compiler.matcher(spec) for _ in range(10)]
    templates = compiler._template(spec)
    assert len(templates.matchers) == 3 and templates.handed == 10
    tokens = engine.tokenizer.encode('{"age":7,"name":"ab","tags":["red"')  # the schema's keys sorted
    for token in [None, *tokens]:
        if token is not None:
            assert all(g.accept(token) for g in grammars)
        one = np.empty((1, compiler.mask_words), np.int32)
        compiler.fill_masks(grammars[:1], one)
        together = np.empty((10, compiler.mask_words), np.int32)
        compiler.fill_masks(grammars, together)  # more than PARALLEL_ROWS: llguidance's executor
        assert (together == one).all()
