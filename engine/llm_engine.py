"""LLMEngine: add_request / step / abort, and generate() for offline use.

A step is schedule -> run -> post-process and nothing else; the pieces live in the scheduler,
the model runner and engine/outputs.py.
"""
from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from engine.block_manager import BlockManager
from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.errors import EngineStepError, FatalEngineError
from engine.loader import CheckpointWeights, DummyWeights, resolve_model_path
from engine.model_runner import ModelRunner
from engine.outputs import PromptLogprob, RequestOutput, SequenceOutputState, collect_prompt_logprobs
from engine.sampling_params import SamplingParams, check_token_ids
from engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.spec_decode import AcceptanceGate, SpecDecodeStats, Speculator, build_proposer
from engine.structured import GrammarCompiler, LandedGrammars, rows_ahead
from engine.tokenizer import Tokenizer
from ops.backend import get_backend
from ops.sampling_types import DeferredSample, SamplingTensors

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine's state for /metrics (LLMEngine.stats): what the API reads, never the scheduler."""
    running: int = 0  # sequences in the batch
    waiting: int = 0  # sequences waiting for a place in it
    kv_usage: float = 0.0  # fraction of KV blocks held by live sequences
    preemptions: int = 0  # cumulative
    spec: SpecDecodeStats | None = None  # a copy of the spec-decode counters while speculation is configured


@dataclass(slots=True)
class _InFlight:
    """A launched step whose sampled ids have not reached the host yet."""
    sched: SchedulerOutput
    seqs: list[Sequence]  # the sampling rows, in order
    sample: DeferredSample
    landed: bool = False
    grammars: LandedGrammars | None = None  # its ids in the grammars and the next masks started, ahead of landing


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    states: list[SequenceOutputState]
    arrival_time: float
    # SamplingParams.prompt_logprobs: [None, then one entry per prompt token as the steps compute them]; handed
    # out with the request's first output, after which prompt_logprobs_sent is set
    prompt_logprobs: list[PromptLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    # RequestOutput.metrics of all its outputs: "queue_time" (arrival to first scheduled) once it has been scheduled
    metrics: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config = copy.deepcopy(config)  # the engine fills in what the caller left open (model, max_model_len)
        if not config.model:
            from engine.demo import demo_model_dir
            config.model = demo_model_dir()
        t0 = time.perf_counter()
        self.stage_times: dict[str, float] = {}  # start-up stage -> seconds, logged by `cupyllm serve`
        self.config = config
        path = resolve_model_path(config.model)
        self.model_config = ModelConfig.from_pretrained(path)
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer.from_pretrained(
            path, chat_template=config.chat_template, use_generation_config=config.generation_config != "vllm")
        mc, sc = self.model_config, config.scheduler
        if config.max_model_len is None:
            sc.max_model_len = mc.max_position_embeddings
        elif config.max_model_len > mc.max_position_embeddings:
            raise ConfigError(f"max_model_len {config.max_model_len} is larger than the model's "
                              f"max_position_embeddings ({mc.max_position_embeddings})")
        self.max_model_len = sc.max_model_len
        # vLLM's "auto": the checkpoint's dtype, but float16 for float32 checkpoints
        dtype = config.dtype if config.dtype != "auto" else {"float32": "float16"}.get(mc.torch_dtype, mc.torch_dtype)
        self.backend = get_backend(config.device, dtype)
        self.stage_times["config and tokenizer"] = time.perf_counter() - t0
        weights = DummyWeights(config.seed) if config.load_format == "dummy" else CheckpointWeights(path)
        with weights:
            if config.tensor_parallel_size > 1:
                from engine.tp_runner import rank_zero_runner
                self.runner = rank_zero_runner(mc, config, self.backend, weights)
            else:
                self.runner = ModelRunner(mc, config, self.backend, weights)
        self.stage_times.update(self.runner.stage_times)
        num_blocks = self.runner.num_blocks  # at least one max_model_len sequence's (ModelRunner checks)
        # every layer sliding: blocks the window has passed go back (a model with some full layers keeps them all)
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                          mc.sliding_window if mc.all_layers_slide else 0)
        self.scheduler = Scheduler(sc, self.block_manager)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        self.eos_token_ids = frozenset(mc.eos_token_ids) | tokenizer_eos
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(config.seed)
        self._in_flight: _InFlight | None = None
        self.async_scheduling = config.async_scheduling if config.async_scheduling is not None \
            else self.runner.graphs is not None
        self._grammar_compiler = None
        self._grammar_lock = threading.Lock()
        self.speculator: Speculator | None = None
        self.enable_speculation(config.speculative_config)
        logger.info("engine ready in %.2f s: %s on %s, %d KV blocks (%d tokens), max_model_len %d, "
                    "decode graphs %s, one step ahead %s", time.perf_counter() - t0, mc.architecture,
                    self.backend.name, num_blocks, num_blocks * config.cache.block_size, self.max_model_len,
                    "on" if self.runner.graphs is not None else "off", "on" if self.async_scheduling else "off")

    @property
    def grammar_compiler(self):
        """Compiles structured-output constraints (engine/structured.py); made at first use (llguidance reads the
        tokenizer, about a second for a 150K vocabulary). The API validates with it off the event loop."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need the tokenizer; this engine runs with skip_tokenizer_init")
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                         self.eos_token_ids)
            return self._grammar_compiler

    # requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str) and self.tokenizer is None:
            raise ValueError("this engine runs without a tokenizer (skip_tokenizer_init): give the prompt as token ids")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(ids)
        params.validate_against_vocab(self.model_config.vocab_size)
        seqs = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else int(self._rng.integers(2 ** 63))
            seqs.append(Sequence(request_id, i, ids, params, seed, arrival_time))
        if params.structured_outputs is not None:  # compiled (or found in the cache) before anything is queued
            for s in seqs:
                s.grammar = self.grammar_compiler.matcher(params.structured_outputs)
        states = [SequenceOutputState(self.tokenizer, s) for s in seqs]
        self.requests[request_id] = Request(request_id, ids, params, seqs, states, seqs[0].arrival_time,
                                            [None] if params.prompt_logprobs is not None else None)
        for s in seqs:
            self.scheduler.add(s)

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        check_token_ids(ids, self.model_config.vocab_size, "prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length "
                             f"of {self.max_model_len}. Make sure that `max_model_len` is no smaller than the "
                             "number of text tokens plus one generated token.")

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also done at interpreter exit)."""
        self.runner.close()

    # the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run, post-process. If running or post-processing raises, the requests scheduled in
        this step fail (EngineStepError names them) and everything else stays as it was.

        One step ahead (async scheduling): a decode step whose sampled ids are still on the GPU stays in
        flight; the next call schedules and launches the following step behind it (each sequence's new
        token is a placeholder the GPU fills in), and only then waits for the ids and post-processes them,
        so the host's work overlaps the GPU's. A sequence that stops on that token has run one wasted row.
        """
        in_flight, self._in_flight = self._in_flight, None
        touched: dict[str, Request] = {}
        speculator = self.speculator
        if speculator is not None:
            if in_flight is not None and speculator.may_propose():
                self._land(in_flight, touched)  # a proposal continues the ids in flight
                in_flight = None
            speculator.propose()
        if in_flight is not None and in_flight.sample.ready() and (ahead := rows_ahead(in_flight.seqs)):
            self._land_grammars(in_flight, ahead)  # its masks outlasted its forward: the next ones start at once
        waiting = len(self.scheduler.waiting)
        sched = self.scheduler.schedule()
        if len(self.scheduler.waiting) < waiting:  # admitted from the waiting queue: the last scheduled entries
            self._note_admitted(sched.scheduled[len(self.scheduler.waiting) - waiting:])
        if speculator is not None:
            speculator.drop_unscheduled(sched)
        result, late, late_mask, landed = None, None, None, None
        if in_flight is not None and (sched.is_empty or not self.runner.one_step_ahead(sched)):
            self._land(in_flight, touched)  # this step needs the ids on the host
            in_flight, landed = None, in_flight.grammars  # the masks started before scheduling serve this step
            # A sequence the landed token finished (EOS, a stop string) has no blocks any more: it must not run.
            sched.scheduled = [s for s in sched.scheduled if not s.seq.is_finished]
        sampling_seqs = [s.seq for s in sched.scheduled if s.samples]
        if in_flight is not None and any(seq.grammar is not None for seq in sampling_seqs):
            # A grammar's mask needs the in-flight ids: the forward is launched first, then they land and the
            # masks are computed while it runs, then the step samples (ModelRunner.execute's late_mask).
            late, in_flight = in_flight, None
            late_mask = functools.partial(self._land, late, touched, sampling_seqs)
        if not sched.is_empty:
            try:
                tensors = self._sampling_tensors(sampling_seqs, late_mask is None, landed) if sampling_seqs else None
                t0 = time.perf_counter()
                result = self.runner.execute(sched, tensors, defer=self.async_scheduling, late_mask=late_mask)
                collect_prompt_logprobs(self.runner.prompt_logprobs, self.requests)
                if speculator is not None and any(s.seq.num_spec for s in sched.scheduled):
                    speculator.stats.verify_seconds += time.perf_counter() - t0  # sampled ids are on the host
            except FatalEngineError:
                raise
            except Exception as e:
                for step in (in_flight, late):  # its tokens stay; their text goes out with a later output
                    if step is not None and not step.landed:
                        self._land(step, touched)
                raise self._fail_step(sched, e) from e
        if in_flight is not None:
            self._land(in_flight, touched)
        if isinstance(result, DeferredSample):
            outputs = [self._request_output(req) for req in touched.values()]
            self._in_flight = _InFlight(sched, sampling_seqs, result)
            for row, seq in enumerate(sampling_seqs):
                self._add_placeholder(seq, row)
            return outputs
        if result is not None:
            try:
                self._append_all(sampling_seqs, result, touched)
            except Exception as e:
                raise self._fail_step(sched, e) from e
        return [self._request_output(req) for req in touched.values()]

    def _land(self, in_flight: _InFlight, touched: dict[str, Request], masks_of: list[Sequence] | None = None):
        """Wait for an in-flight step's ids and post-process them. masks_of: the sampling sequences of the step behind
        it (its late mask): the ids advance the grammars (unless step() did before scheduling), the masks are computed
        on the worker while this thread detokenizes (grammars untouched) and returned; else the worker is done first."""
        in_flight.landed, landed = True, in_flight.grammars
        if masks_of is not None and landed is None:
            landed = self._land_grammars(in_flight, masks_of)
        elif masks_of is None and landed is not None:
            landed.release()
        try:
            sampled, ended = (in_flight.sample.result(), None) if landed is None else (landed.sampled, landed.ended)
            self._append_all(in_flight.seqs, sampled, touched, ended)
        except Exception as e:
            if landed is not None:
                landed.release()  # the worker lets go of the grammars before their requests fail
            raise self._fail_step(in_flight.sched, e) from e
        return None if masks_of is None else landed.masks_for(masks_of)

    def _land_grammars(self, in_flight: _InFlight, mask_seqs: list[Sequence]) -> LandedGrammars:
        """Wait for an in-flight step's ids, advance its grammars by them and start the masks of `mask_seqs`."""
        try:
            in_flight.grammars = LandedGrammars(self.grammar_compiler, in_flight.seqs, in_flight.sample, mask_seqs)
        except Exception as e:
            raise self._fail_step(in_flight.sched, e) from e
        return in_flight.grammars

    def _append_all(self, seqs: list[Sequence], sampled, touched: dict[str, Request],
                    grammars_ended: dict[int, bool] | None = None) -> None:
        """grammars_ended: what advance_grammars said of these tokens (then the grammars are not touched)."""
        row = 0
        for seq in seqs:
            first, row = row, row + seq.num_spec + 1  # a sequence with K proposals has K + 1 rows
            if seq.is_finished:  # stopped by the step before (one step ahead), or aborted
                continue
            if seq.num_spec:
                self.speculator.verify(seq, sampled, first, self._append_token)
            else:
                self._append_token(seq, sampled, first, None if grammars_ended is None else grammars_ended.get(id(seq)))
            touched[seq.request_id] = self.requests[seq.request_id]

    # speculative decoding (engine/spec_decode.py: the Speculator, and why drawing and comparing is the rejection rule)
    def enable_speculation(self, spec, proposer=None, gate: AcceptanceGate | None = None) -> None:
        """Speculate from the next step on with `spec` (a SpeculativeConfig; None: stop); `proposer` replaces the
        config's (the benchmark's OracleProposer). Counters start over."""
        if spec is None:
            self.speculator = None
            return
        proposer = proposer or build_proposer(spec, self.runner, self.block_manager,
                                              self.model_config.num_hidden_layers)
        self.speculator = Speculator(spec, proposer, gate or AcceptanceGate(), self.scheduler, self.block_manager,
                                     self.max_model_len, self.config.scheduler.max_num_batched_tokens)

    @property
    def spec(self):
        """The SpeculativeConfig in force, None when not speculating."""
        return None if self.speculator is None else self.speculator.spec

    @property
    def spec_stats(self) -> SpecDecodeStats:
        return SpecDecodeStats() if self.speculator is None else self.speculator.stats

    def _add_placeholder(self, seq: Sequence, row: int) -> None:
        """A token for `seq` is in flight: hold its place so the next step can be scheduled, unless the
        token ends the sequence by length whatever it is (then there is no next step for it)."""
        if seq.is_finished or self._ends_by_length(seq, pending=1):
            return
        seq.token_ids.append(-1)
        seq.pending_row = row

    def _fail_step(self, sched: SchedulerOutput, cause: Exception) -> EngineStepError:
        """Fail every request with a sequence in the failed step; free their blocks, and make the prefix
        cache forget the blocks they hold first: the step may have left half-written K/V in them."""
        request_ids = list(dict.fromkeys(s.seq.request_id for s in sched.scheduled))
        for s in sched.scheduled:
            self.block_manager.drop_hashes(s.seq)
        for request_id in request_ids:
            req = self.requests.pop(request_id, None)
            for seq in req.seqs if req is not None else ():
                self.scheduler.finish(seq, "error")
        logger.error("engine step failed (%d sequences); failing requests %s", len(sched.scheduled),
                     ", ".join(request_ids), exc_info=cause)
        return EngineStepError(request_ids, cause)

    def _sampling_tensors(self, seqs: list[Sequence], masks: bool = True, landed=None) -> SamplingTensors:
        """A row per sampled position: a sequence with K proposals has K + 1, row j seeing the first j proposals
        as output (penalty history, min_tokens, the sampler's step counter), as it would without speculation.
        masks: the grammars' token masks too (else they come later, from _land), those `landed` started if any."""
        rows = []
        for seq in seqs:
            p = seq.params
            end = seq.num_tokens - seq.num_spec
            for j in range(seq.num_spec + 1):
                outputs = seq.token_ids[seq.num_prompt_tokens:end + j]
                banned = ()
                if len(outputs) < p.min_tokens:  # a grammar decides when EOS may come (else it could ban all)
                    eos = () if p.ignore_eos or seq.grammar is not None else tuple(self.eos_token_ids)
                    banned = tuple(p.stop_token_ids or ()) + eos
                rows.append((p, seq.prompt_token_ids, outputs, seq.seed, banned))
        constrained = masks and any(seq.grammar is not None for seq in seqs)
        mask = None if not constrained else landed.masks_for(seqs) if landed else self.grammar_compiler.batch_mask(seqs)
        return SamplingTensors.build(rows, self.model_config.vocab_size, mask)

    def _append_token(self, seq: Sequence, sampled, row: int, grammar_ended: bool | None = None) -> None:
        token = int(sampled.token_ids[row])
        if seq.pending_row >= 0:  # the placeholder this token was scheduled under
            seq.token_ids[-1] = token
            seq.pending_row = -1
            self.block_manager.token_replaced(seq, seq.num_tokens - 1)
        else:
            seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if seq.logprobs is not None:
            n = seq.params.logprobs
            top = [] if n == 0 else [(int(i), float(v)) for i, v in
                                     zip(sampled.top_ids[row, :n], sampled.top_logprobs[row, :n])]
            seq.logprobs.append((token, float(sampled.logprobs[row]), top))
        p = seq.params
        state = self.requests[seq.request_id].states[seq.index]
        # a grammar that is complete (only EOS could follow) or refused the token ends the sequence
        grammar_done = grammar_ended if grammar_ended is not None else \
            seq.grammar is not None and (not seq.grammar.accept(token) or seq.grammar.done)
        past_min = seq.num_output_tokens >= p.min_tokens
        stop = state.append(seq, token, check_stops=past_min)
        if past_min and not p.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, state, "stop", None)
        elif past_min and token in (p.stop_token_ids or ()):
            self._finish(seq, state, "stop", token)
        elif stop is not None:
            self._finish(seq, state, "stop", stop)
        elif self._ends_by_length(seq):
            self._finish(seq, state, "length", None)
        elif grammar_done:
            self._finish(seq, state, "stop", None)

    def _ends_by_length(self, seq: Sequence, pending: int = 0) -> bool:
        """Whether `seq`, with `pending` more tokens, has reached max_tokens or max_model_len."""
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and seq.num_output_tokens + pending >= max_tokens) \
            or seq.num_tokens + pending >= self.max_model_len

    def _finish(self, seq: Sequence, state: SequenceOutputState, reason: str, stop_reason) -> None:
        if reason != "stop" or not isinstance(stop_reason, str):
            state.flush()
        self.scheduler.finish(seq, reason)
        seq.stop_reason = stop_reason

    def _request_output(self, req: Request) -> RequestOutput:
        # A choice appears until its finish has been reported once (n > 1 siblings finish apart).
        outputs = [d for d in (state.delta(seq) for seq, state in zip(req.seqs, req.states)) if d is not None]
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:  # complete once any choice sampled
            prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
        return RequestOutput(req.request_id, req.prompt_token_ids, outputs, finished,
                             max(s.num_cached_tokens for s in req.seqs), req.metrics, prompt_logprobs=prompt_logprobs)

    def _note_admitted(self, admitted: list[ScheduledSeq]) -> None:
        """vLLM's queue time: from a request's arrival to the first step that schedules any of its sequences."""
        now = time.monotonic()
        for s in admitted:
            req = self.requests.get(s.seq.request_id)
            if req is not None and "queue_time" not in req.metrics:
                req.metrics["queue_time"] = now - req.arrival_time

    def stats(self) -> EngineStats:
        """The engine's state for /metrics. Safe from another thread (the event loop): queue lengths and counters,
        read without a lock; the spec-decode counters are copied."""
        sched, spec, speculator = self.scheduler, None, self.speculator
        if speculator is not None:
            spec = replace(speculator.stats, accepted_per_pos=list(speculator.stats.accepted_per_pos))
        return EngineStats(len(sched.running), len(sched.waiting), float(self.block_manager.usage),
                           int(sched.num_preemptions), spec)

    # offline use
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run `prompts` to completion together; outputs in prompt order, whole texts."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        results: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].merge(out)
                else:
                    results[out.request_id] = out
        return [results[rid] for rid in ids]
