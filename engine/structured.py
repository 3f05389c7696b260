"""Structured outputs: a request's grammar compiled by llguidance, and one matcher per sequence.

A sequence's matcher gives the bitmask of tokens allowed next (int32 words, bit id & 31 of word id >> 5, the layout
ops/sampling.py's SamplingTensors.token_mask takes) and consumes each sampled token. Compiling a grammar is cached per
constraint: the first request of a schema validates and builds a matcher, every later sequence of that schema starts
from a deep copy of it or of one more built (up to the executor's threads: _Templates). The mask is computed on the
host in the step that samples with it. One step ahead, that step's forward is launched before the previous step's ids
land, and it samples after its forward (LLMEngine._land). The landed ids advance the grammars and the masks are
computed on a worker thread (LandedGrammars, start_batch_mask) while the engine's thread goes on: where the ids are
already on the host when the step begins (the masks before took longer than the forward), from before the step is
scheduled, its sampling tensors built and its forward launched; else from when they land, after the launch. The
engine's thread detokenizes them meanwhile.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import numpy as np
import orjson

from engine.sampling_params import StructuredOutputs

logger = logging.getLogger(__name__)

CACHE_SIZE = 512  # compiled constraints kept (their template matchers)
PARALLEL_ROWS = 8  # batches with more constrained rows than this compute their masks on llguidance's threads
# llguidance's executor threads; 0: its own default, 80% of the CPUs up to 32
MASK_THREADS = int(os.environ.get("CUPYLLM_MASK_THREADS", "0"))


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


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Templates:
    """A compiled constraint's template matchers, each built from the grammar. Deep copies of one matcher compute
    their masks one at a time (measured with llguidance 1.9.1: two copies' wide masks took as long on two threads as
    one after the other, through the executor or not; two matchers built apart took about one's). So a constraint's
    sequences copy up to `threads` templates in turn, and llguidance's executor can compute their masks side by side."""

    __slots__ = ("grammar", "matchers", "handed")

    def __init__(self, grammar: str, matcher):
        self.grammar, self.matchers, self.handed = grammar, [matcher], 0


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary, and hands out per-sequence matchers.

    vocab_size is the model's (logit rows), which may exceed the tokenizer's: the padding ids are never allowed.
    Thread-safe: the API validates on worker threads while the engine thread makes matchers.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, threads: int = 0):
        """threads: llguidance's executor threads, and template matchers per constraint (0: MASK_THREADS)."""
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
        self._executor = None  # llguidance's thread pool
        self.threads = threads or MASK_THREADS or min(32, max(1, _cpus() * 4 // 5))
        self._worker = None  # the thread start_batch_mask computes on

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
        return _Templates(grammar, matcher)

    def validate(self, spec: StructuredOutputs) -> None:
        """Compile `spec` now (cached), raising GrammarError if it is invalid: the API calls it off the event loop."""
        self._template(spec)

    def _template(self, spec: StructuredOutputs):
        with self._lock:  # lru_cache is thread-safe for lookups, but two threads could compile one schema twice
            return self._templates(spec_key(spec))

    def matcher(self, spec: StructuredOutputs) -> "SequenceGrammar":
        """A new sequence's grammar: a deep copy of the constraint's templates in turn (see _Templates), the first
        `threads` sequences of a constraint each building one more."""
        with self._lock:
            templates = self._templates(spec_key(spec))
            built = templates.matchers
            if templates.handed >= len(built) and len(built) < self.threads:
                try:
                    built.append(self._llg.LLMatcher(self.tokenizer, templates.grammar, log_level=0))
                except Exception:  # it compiled once: the copies of the first will do
                    logger.exception("structured output: building another template failed")
            template = built[templates.handed % len(built)]
            templates.handed += 1
        return SequenceGrammar(template.deep_copy())

    def fill_masks(self, grammars: list["SequenceGrammar"], out: np.ndarray) -> None:
        """Row i of out (int32[len(grammars), mask_words]) = the allowed next tokens of grammars[i]."""
        if len(grammars) > PARALLEL_ROWS:
            self._fill_par(grammars, out)
            return
        from llguidance.numpy import fill_next_token_bitmask
        for i, g in enumerate(grammars):
            fill_next_token_bitmask(g.matcher, out, i)

    def _fill_par(self, grammars: list["SequenceGrammar"], out: np.ndarray) -> None:
        """fill_masks in one call to llguidance's executor, which drops the GIL for all of it."""
        if self._executor is None:
            self._executor = self._llg.LLExecutor(self.threads)
        from llguidance.numpy import fill_next_token_bitmask_par
        fill_next_token_bitmask_par(self._executor, [(g.matcher, i) for i, g in enumerate(grammars)], out)

    def batch_mask(self, seqs, skip: frozenset = frozenset()) -> np.ndarray | None:
        """The grammar bitmask of every sampling row of `seqs` (all ones where unconstrained, for a finished sequence
        and for one whose id is in `skip`: its row is wasted), None when no row has one. A sequence with K proposals
        has K + 1 rows (a grammar's sequence never has proposals)."""
        return self.start_batch_mask(seqs, skip, worker=False).result()

    def start_batch_mask(self, seqs, skip: frozenset = frozenset(), worker: bool = True) -> "PendingMask":
        """batch_mask, computed on this compiler's worker thread: the caller goes on at once and takes the mask
        with .result(). Until then nothing else may touch these sequences' grammars. The worker makes one call to
        llguidance's executor (a row at a time, each call would wait for the GIL again behind the busy caller), and
        this returns once the worker holds the job, so the caller's Python work does not hold the worker back."""
        constrained, grammars, num_rows = [], [], 0
        for seq in seqs:
            if seq.grammar is not None and not seq.is_finished and id(seq) not in skip:
                constrained.append(num_rows)
                grammars.append(seq)
            num_rows += seq.num_spec + 1
        if not grammars:
            return PendingMask(None, None, seqs, constrained, grammars, num_rows)
        masks = np.empty((len(grammars), self.mask_words), np.int32)
        if not worker:
            self.fill_masks([seq.grammar for seq in grammars], masks)
            return PendingMask(None, masks, seqs, constrained, grammars, num_rows)
        started, matchers = threading.Event(), [seq.grammar for seq in grammars]

        def job() -> None:
            started.set()
            self._fill_par(matchers, masks)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="cupyllm-masks")
        future = self._worker.submit(job)
        started.wait()
        return PendingMask(future, masks, seqs, constrained, grammars, num_rows)


def advance_grammars(seqs, token_ids) -> dict[int, bool]:
    """Each live constrained sequence's sampled token (its row of token_ids; a sequence with K proposals has K + 1
    rows) into its grammar: id(seq) -> whether the grammar has ended (complete, or it refused the token)."""
    ended, row = {}, 0
    for seq in seqs:
        if seq.grammar is not None and not seq.is_finished:
            ended[id(seq)] = not seq.grammar.accept(int(token_ids[row])) or seq.grammar.done
        row += seq.num_spec + 1
    return ended


def rows_ahead(seqs) -> list:
    """The sequences of a launched step that the next step continues (those holding a placeholder), in order, if
    any of them has a grammar; else none."""
    ahead = [seq for seq in seqs if seq.pending_row >= 0]
    return ahead if any(seq.grammar is not None for seq in ahead) else []


class PendingMask:
    """A batch's token mask, maybe still being computed (GrammarCompiler.start_batch_mask): the rows of `seqs`, of
    which those of `computed` (the k-th at row constrained[k]) have a grammar's mask."""

    __slots__ = ("_future", "_masks", "seqs", "_constrained", "computed", "_num_rows")

    def __init__(self, future, masks, seqs, constrained: list[int], computed: list, num_rows: int):
        self._future, self._masks, self.seqs = future, masks, seqs
        self._constrained, self.computed, self._num_rows = constrained, computed, num_rows

    def wait(self, errors: bool = True) -> None:
        """Until the worker is done with the grammars (its error, if any, raised unless not `errors`)."""
        if self._future is not None and errors:
            self._future.result()
        elif self._future is not None:
            wait_futures([self._future])

    def result(self) -> np.ndarray | None:
        """int32[rows, mask_words], or None when no row is constrained."""
        self.wait()
        if self._masks is None or len(self._constrained) == self._num_rows:
            return self._masks
        mask = np.full((self._num_rows, self._masks.shape[1]), -1, np.int32)
        mask[self._constrained] = self._masks
        return mask

    def rows_of(self, seqs, compiler: GrammarCompiler, skip) -> np.ndarray | None:
        """The mask of the rows of other sequences `seqs`: each computed one's mask, computed here for a live
        constrained sequence this batch did not have (one whose id is in `skip` keeps all ones, as in
        start_batch_mask)."""
        if len(seqs) == len(self.seqs) and all(a is b for a, b in zip(seqs, self.seqs)):
            return self.result()  # the same rows: the next step runs the sequences the last one continued
        self.wait()
        index = {id(seq): k for k, seq in enumerate(self.computed)}
        taken, missing, num_rows = [], [], 0
        for seq in seqs:
            k = index.get(id(seq))
            if k is not None:
                taken.append((num_rows, k))
            elif seq.grammar is not None and not seq.is_finished and id(seq) not in skip:
                missing.append((num_rows, seq.grammar))
            num_rows += seq.num_spec + 1
        if not taken and not missing:
            return None
        mask = np.full((num_rows, compiler.mask_words), -1, np.int32)
        if taken:
            rows, ks = zip(*taken)
            mask[list(rows)] = self._masks[list(ks)]
        if missing:
            rows, grammars = zip(*missing)
            fill = np.empty((len(grammars), compiler.mask_words), np.int32)
            compiler.fill_masks(list(grammars), fill)
            mask[list(rows)] = fill
        return mask


class LandedGrammars:
    """A step's sampled ids in its sequences' grammars, before the engine detokenizes them: each live constrained
    sequence advanced by its token (ended: id(seq) -> whether its grammar has ended, what the detokenizing then goes
    by), then the masks of `mask_seqs`' rows started on the compiler's worker. Until the masks are taken (masks_for)
    or let go (release), nothing else may touch those grammars."""

    __slots__ = ("sampled", "ended", "skip", "_compiler", "_pending")

    def __init__(self, compiler: GrammarCompiler, seqs, sample, mask_seqs):
        """seqs: the step's sampling sequences; sample: its DeferredSample (waited for here)."""
        self.sampled, self._compiler = sample.result(), compiler
        self.ended = advance_grammars(seqs, self.sampled.token_ids)
        # a grammar that has ended ends its sequence (when detokenized): like a finished one's, its row is wasted
        self.skip = frozenset(k for k, done in self.ended.items() if done)
        self._pending = compiler.start_batch_mask(mask_seqs, self.skip)

    def masks_for(self, seqs) -> np.ndarray | None:
        """The token mask of the sampling rows of `seqs` (the step that samples next): those started, and any live
        constrained sequence they did not cover computed here. Raises the worker's error."""
        return self._pending.rows_of(seqs, self._compiler, self.skip)

    def release(self) -> None:
        """Wait until the worker lets go of the grammars, its masks unused (an error of theirs shows again where
        masks are next computed for these grammars)."""
        self._pending.wait(errors=False)


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
