"""Structured outputs: a request's grammar compiled by llguidance, and one matcher per sequence.

A sequence's matcher gives the bitmask of tokens allowed next (int32 words, bit id & 31 of word id >> 5, the layout
ops/sampling.py's SamplingTensors.token_mask takes) and consumes each sampled token. Compiling a grammar is cached per
constraint: the first request of a schema validates and builds a matcher, every later sequence of that schema starts
from a deep copy of it. The mask is computed on the host in the step that samples with it; a step whose batch holds a
constrained sequence does not run one step ahead (the mask needs the previous token), see LLMEngine.step.
"""
from __future__ import annotations

import functools
import logging
import threading

import numpy as np
import orjson

from engine.sampling_params import StructuredOutputs

logger = logging.getLogger(__name__)

CACHE_SIZE = 512  # compiled constraints kept (a template matcher each)
PARALLEL_ROWS = 8  # batches with more constrained rows than this compute their masks on llguidance's threads


class GrammarError(ValueError):
    """A constraint llguidance cannot compile: the message names the kind and the problem (a 400 for the API)."""


def grammar_source(spec: StructuredOutputs) -> str:
    """The llguidance grammar of `spec` (not yet validated)."""
    import llguidance
    m = llguidance.LLMatcher
    kind = spec.kind
    if kind == "json":
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = orjson.loads(schema)
            except orjson.JSONDecodeError as e:
                raise GrammarError(f"structured output: the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"structured output: a JSON schema must be an object, got {type(schema).__name__}")
        try:
            return m.grammar_from_json_schema(schema, overrides=_json_options(spec))
        except (ValueError, TypeError) as e:
            raise GrammarError(f"structured output: invalid JSON schema: {e}") from None
    if kind == "json_object":
        return m.grammar_from_json_schema({"type": "object"}, overrides=_json_options(spec))
    if kind == "regex":
        return m.grammar_from_regex(spec.regex)
    if kind == "choice":
        return m.grammar_from_lark("start: " + " | ".join(orjson.dumps(c).decode() for c in spec.choice))
    from llguidance.gbnf_to_lark import any_to_lark  # Lark passes through; GBNF (llama.cpp, vLLM's EBNF) converts
    try:
        return m.grammar_from_lark(any_to_lark(spec.grammar))
    except Exception as e:  # the converter raises plain Exceptions on malformed GBNF
        raise GrammarError(f"structured output: cannot read the grammar: {e}") from None


def _json_options(spec: StructuredOutputs) -> dict | None:
    return {"whitespace_flexible": False} if spec.disable_any_whitespace else None


def spec_key(spec: StructuredOutputs) -> tuple:
    """A hashable key of what the constraint means (a schema given as an object or as text is the same)."""
    value = getattr(spec, spec.kind)
    if isinstance(value, str) and spec.kind == "json":
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            pass  # compiling it gives the error
    if isinstance(value, dict):
        value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return spec.kind, value, spec.disable_any_whitespace


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary, and hands out per-sequence matchers.

    vocab_size is the model's (logit rows), which may exceed the tokenizer's: the padding ids are never allowed.
    Thread-safe: the API validates on worker threads while the engine thread makes matchers.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        import llguidance
        self._llg = llguidance
        eos = [t for t in sorted(eos_token_ids) if t < vocab_size]
        if tokenizer.eos_token_id in eos:  # llguidance's primary EOS first
            eos.remove(tokenizer.eos_token_id)
            eos.insert(0, tokenizer.eos_token_id)
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size, eos_token=eos or None)
        self.vocab_size = vocab_size
        self.mask_words = -(-vocab_size // 32)
        self._lock = threading.Lock()
        self._templates = functools.lru_cache(CACHE_SIZE)(self._compile)
        self._executor = None

    def _compile(self, key: tuple):
        spec = StructuredOutputs(**{key[0]: key[1]}, disable_any_whitespace=key[2])
        try:
            return self._build(spec)
        except GrammarError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # llguidance's Rust side may raise anything, a panic included: still the input's
            raise GrammarError(f"structured output: cannot compile the {spec.kind}: {type(e).__name__}: {e}") from None

    def _build(self, spec: StructuredOutputs):
        grammar = grammar_source(spec)
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"structured output: invalid {spec.kind}: {error.strip()}")
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"structured output: invalid {spec.kind}: {matcher.get_error()}")
        return matcher

    def validate(self, spec: StructuredOutputs) -> None:
        """Compile `spec` now (cached), raising GrammarError if it is invalid: the API calls it off the event loop."""
        self._template(spec)

    def _template(self, spec: StructuredOutputs):
        with self._lock:  # lru_cache is thread-safe for lookups, but two threads could compile one schema twice
            return self._templates(spec_key(spec))

    def matcher(self, spec: StructuredOutputs) -> "SequenceGrammar":
        return SequenceGrammar(self._template(spec).deep_copy())

    def fill_masks(self, grammars: list["SequenceGrammar"], out: np.ndarray) -> None:
        """Row i of out (int32[len(grammars), mask_words]) = the allowed next tokens of grammars[i]."""
        if len(grammars) > PARALLEL_ROWS:
            if self._executor is None:
                self._executor = self._llg.LLExecutor()
            from llguidance.numpy import fill_next_token_bitmask_par
            fill_next_token_bitmask_par(self._executor, [(g.matcher, i) for i, g in enumerate(grammars)], out)
            return
        from llguidance.numpy import fill_next_token_bitmask
        for i, g in enumerate(grammars):
            fill_next_token_bitmask(g.matcher, out, i)


class SequenceGrammar:
    """One sequence's place in its grammar."""

    __slots__ = ("matcher",)

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar refused it (the matcher is then in error)."""
        ok = self.matcher.consume_token(int(token_id))
        if not ok:
            logger.error("structured output: the grammar refused token %d: %s", token_id, self.matcher.get_error())
        return ok

    @property
    def done(self) -> bool:
        """Nothing but EOS can follow: the output is complete (or the grammar failed)."""
        return self.matcher.is_stopped()
