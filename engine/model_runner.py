"""ModelRunner: packs a scheduled step into arrays, runs the model on the backend, samples.

It owns the KV cache and is the only engine module that touches device arrays.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np

from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.memory import paged_cache
from engine.models.llama import LlamaModel, expected_shapes
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence
from ops.backend import merging
from ops.metadata import AttentionMetadata
from ops.sampling_types import DeferredSample, SamplerOutput, SamplingTensors

logger = logging.getLogger(__name__)

# Prompt rows whose logits one pass of the prompt-logprobs computation holds: float32 [256, V] is 155 MB at
# V = 152K (a whole 8K-token chunk at once would be 5 GB).
PROMPT_LOGPROB_ROWS = 256


@dataclass(slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens first .. first + k - 1 of `seq` (first >= 1), each given the tokens before it,
    from the logits of the positions before them that one step computed. Host arrays."""
    seq: Sequence
    first: int
    logprobs: np.ndarray  # float32[k]: the prompt token's
    ranks: np.ndarray  # int[k]: how many tokens have a logprob >= the prompt token's (vLLM's rank; 1 = the best)
    top_ids: np.ndarray | None  # int[k, N] best first, N = seq.params.prompt_logprobs; None when N = 0
    top_logprobs: np.ndarray | None  # float32[k, N]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, backend, weights, tp=None,
                 ranks=None):
        """tp: this rank's TensorParallel when the runner is a tensor-parallel worker; ranks: the workers' commands
        (tp_runner.RankCommands) when it is rank 0 of several. engine/tp_runner.py builds both (rank_zero_runner)."""
        self.ranks = ranks  # what each step sends the workers first
        if ranks is not None:
            tp = ranks.group.tp
        try:
            self._build(model_config, engine_config, backend, weights, tp)
            if self.ranks is not None:
                self.ranks.group.ready()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing without them)."""
        if self.ranks is not None:
            self.ranks.group.close()

    def _build(self, model_config: ModelConfig, engine_config: EngineConfig, backend, weights, tp) -> None:
        self.tp = tp
        self.config = tp.rank_config(model_config) if tp is not None else model_config  # this rank's shapes
        self.backend = backend
        problem = backend.unsupported(self.config)
        if problem:  # before any weight moves; every rank finds the same, and __init__ stops the others
            part = f" (one rank's part of {tp.world})" if tp is not None else ""
            raise ConfigError(f"the {backend.name} backend cannot run this model{part}: {problem}")
        self.block_size = engine_config.cache.block_size
        self.max_model_len = engine_config.scheduler.max_model_len
        self.stage_times: dict[str, float] = {}
        t0 = time.perf_counter()
        weights.check(expected_shapes(model_config))
        self.model = LlamaModel(self.config, backend, self.max_model_len, tp)
        with _fetcher(weights, backend, model_config, tp) as fetch:
            self.model.load_weights(fetch)
        if "fp8" in (engine_config.quantization, model_config.quantization):
            self.model.quantize_linears(backend.quantize_weight)
        spec = engine_config.speculative_config
        self.draft = DraftModel(spec.model, engine_config, backend, model_config, self.max_model_len) \
            if spec is not None and spec.method == "draft_model" else None
        backend.synchronize()
        self.stage_times["weights"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.num_blocks = engine_config.cache.num_blocks or self._auto_num_blocks(engine_config)
        if tp is not None:  # every rank the same blocks: the fewest any rank's memory holds
            mine = backend.from_host(np.array([self.num_blocks], np.float32))
            self.num_blocks = int(backend.to_host(tp.comm.all_gather(mine)).min())
        if self.num_blocks * self.block_size < self.max_model_len:  # raised here: __init__ then stops the ranks
            raise ConfigError(f"the KV cache holds {self.num_blocks} blocks ({self.num_blocks * self.block_size} "
                              f"tokens), fewer than one sequence of max_model_len {self.max_model_len}; "
                              "lower max_model_len or give the cache more memory")
        c = self.config
        if engine_config.kv_cache_dtype == "auto":
            self.kv_cache, self.kv_caches = paged_cache(backend, c, self.num_blocks, self.block_size)
        else:  # E4M3 codes, a byte an element: a quarter of the numpy backend's float32, half of fp16
            from ops.quant import Fp8Cache
            self.kv_cache, _ = paged_cache(backend, c, self.num_blocks, self.block_size, np.uint8)
            self.kv_caches = [tuple(Fp8Cache(self.kv_cache[i, j],
                                             backend.from_host(_kv_scale(weights, i, "kv"[j], c.num_key_value_heads)))
                                    for j in range(2)) for i in range(c.num_hidden_layers)]
            logger.info("KV cache: fp8 e4m3, %d blocks of %d tokens, %.1f MiB (%d bytes a block and layer; fp16 would "
                        "take twice that)", self.num_blocks, self.block_size, self.kv_cache.nbytes / 2**20,
                        self.kv_cache[0, :, 0].nbytes)
        if self.draft is not None:
            self.draft.allocate_cache(self.num_blocks, self.block_size)
        self.stage_times["KV cache"] = time.perf_counter() - t0
        self.num_computed_tokens_total = 0  # tokens run through the model: tests check prefix hits skip work
        self.prompt_logprobs: list[PromptLogprobs] = []  # what the last execute computed (LLMEngine collects it)
        self.graphs = self.verify_graphs = None
        self._last_sampled = None  # numpy backend: the ids of its last deferred step
        if backend.captures_graphs and not engine_config.enforce_eager:
            from graphs.manager import DecodeGraphs, capture_sizes
            t0 = time.perf_counter()
            backend.prepare_decode(self.config, capture_sizes(engine_config.scheduler.max_num_seqs),
                                   self.max_model_len, fp8=self.model.fp8)
            self.stage_times["GEMM tuning"] = time.perf_counter() - t0
            self.graphs = DecodeGraphs(self.model, self.kv_caches, engine_config.scheduler.max_num_seqs,
                                       self.max_model_len, self.block_size, model_config.vocab_size)
            self.graphs.capture()
            self.stage_times["graph capture"] = self.graphs.capture_seconds
            spec = engine_config.speculative_config
            # Verify steps of K + 1 rows a sequence, at the batch sizes that speculate. Opt-in until they have run on
            # a GPU (written 2026-12-07 when no device could be started; tests/gpu/test_spec_gpu.py checks them):
            # eager verify steps are what was measured.
            if spec is not None and os.environ.get("CUPYLLM_VERIFY_GRAPHS") == "1":
                self.verify_graphs = DecodeGraphs(
                    self.model, self.kv_caches, min(engine_config.scheduler.max_num_seqs, spec.disable_by_batch_size),
                    self.max_model_len, self.block_size, model_config.vocab_size,
                    query_len=spec.num_speculative_tokens + 1)
                self.verify_graphs.capture()
                self.stage_times["graph capture"] += self.verify_graphs.capture_seconds

    def _auto_num_blocks(self, cfg: EngineConfig) -> int:
        if not self.backend.has_device_memory:
            # On the CPU there is no memory to measure: room for up to 64 sequences at full length.
            s = cfg.scheduler
            return min(s.max_num_seqs, 64) * -(-s.max_model_len // self.block_size)
        from engine.memory import kv_blocks_from_memory
        return kv_blocks_from_memory(self, cfg)

    def prepare(self, sched: SchedulerOutput):
        """Host arrays of one step: ids, positions and the attention metadata.

        Vectorized over the batch: the only per-sequence Python is gathering list slices (a decode step of
        256 sequences costs a few hundred microseconds of CPU, which the GPU would otherwise wait for).
        """
        bs, items = self.block_size, sched.scheduled
        n = len(items)
        starts = np.fromiter((s.start for s in items), np.int32, n)
        lens = np.fromiter((s.num_tokens for s in items), np.int32, n)
        query_start_loc = np.zeros(n + 1, np.int32)
        np.cumsum(lens, out=query_start_loc[1:])
        total = int(query_start_loc[-1])
        input_ids = np.fromiter(chain.from_iterable(s.seq.token_ids[s.start:s.start + s.num_tokens] for s in items),
                                np.int32, total)
        row = np.repeat(np.arange(n, dtype=np.int32), lens)  # the sequence of every token
        positions = (np.arange(total, dtype=np.int32) - query_start_loc[row] + starts[row]).astype(np.int32)
        table_lens = np.fromiter((len(s.seq.block_table) for s in items), np.int32, n)
        block_tables = np.zeros((n, int(table_lens.max())), np.int32)
        table_starts = np.zeros(n, np.int32)
        np.cumsum(table_lens[:-1], out=table_starts[1:])
        flat = np.fromiter(chain.from_iterable(s.seq.block_table for s in items), np.int32, int(table_lens.sum()))
        table_row = np.repeat(np.arange(n, dtype=np.int32), table_lens)
        block_tables[table_row, np.arange(len(flat), dtype=np.int32) - table_starts[table_row]] = flat
        slot_mapping = (block_tables[row, positions // bs] * bs + positions % bs).astype(np.int32)
        seq_lens = starts + lens
        meta = AttentionMetadata(query_start_loc, seq_lens, block_tables, slot_mapping,
                                 max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()))
        return input_ids, positions, meta

    def upload(self, input_ids, positions, meta: AttentionMetadata):
        """The step's host arrays as backend arrays (one small copy each)."""
        up = self.backend.from_host
        dev_meta = AttentionMetadata(up(meta.query_start_loc), up(meta.seq_lens), up(meta.block_tables),
                                     up(meta.slot_mapping), meta.max_query_len, meta.max_seq_len)
        return up(input_ids), up(positions), dev_meta

    def one_step_ahead(self, sched: SchedulerOutput) -> bool:
        """Whether `sched` can run before the previous step's sampled ids reach the host: a decode batch
        that takes them on the device (a graph), or from the numpy backend's last result. Not a step with prompt
        logprobs to compute (a one-token prefill chunk): it runs eagerly."""
        if any(s.num_tokens != 1 for s in sched.scheduled) or self._prompt_logprob_spans(sched):
            return False
        return self.backend.host_results or self._replays(len(sched.scheduled), 1)

    def _replays(self, num_seqs: int, max_query_len: int) -> bool:
        """Whether a step of this shape replays a decode graph (else it runs eagerly)."""
        return self.graphs is not None and max_query_len == 1 and num_seqs <= self.graphs.max_size

    def _verifies(self, sched: SchedulerOutput) -> bool:
        """Whether the step is a verify batch a verify graph replays: every sequence K proposals and one more."""
        g = self.verify_graphs
        return g is not None and len(sched.scheduled) <= g.max_size and all(
            s.num_tokens == g.query_len and s.num_sampled_rows == g.query_len for s in sched.scheduled)

    def execute(self, sched: SchedulerOutput, sampling: SamplingTensors | None, defer: bool = False,
                late_mask: Callable[[], np.ndarray | None] | None = None) -> SamplerOutput | DeferredSample | None:
        """Run one step. Returns sampled tokens for the sequences whose `samples` is true, in order: one row each,
        or with speculative proposals (seq.num_spec = K) K + 1 rows, the positions of its last K + 1 tokens.

        A sequence with `pending_row` >= 0 has a placeholder as its last token: its id is row pending_row
        of the previous step's sample, which must have been deferred (one_step_ahead(sched) is true).
        defer: the step may return a DeferredSample (a decode batch without penalties or logprobs).
        Prompt logprobs of the prompt positions in the step, for the sequences that want them, go to
        self.prompt_logprobs (such a step runs eagerly: a graph computes only the sampled rows' logits).
        late_mask: called once the forward is launched, before sampling; its result becomes sampling's token_mask
        (the grammars' masks, which need the previous step's ids: they are computed while the GPU runs).
        """
        b = self.backend
        input_ids, positions, meta = self.prepare(sched)
        src = np.fromiter((s.seq.pending_row for s in sched.scheduled), np.int32, len(sched.scheduled))
        src = src if (src >= 0).any() else None
        self.num_computed_tokens_total += len(input_ids)
        self.prompt_logprobs = []
        spans = self._prompt_logprob_spans(sched)
        if not spans and self._replays(len(input_ids), meta.max_query_len):  # every decode row samples
            if self.ranks is not None:  # the other ranks replay their graph of the same size
                self.ranks.replay(input_ids, positions, meta)
            return self.graphs.run(input_ids, positions, meta, sampling, src, defer, late_mask)
        if not spans and self._verifies(sched):  # every row of a verify step samples too
            return self.verify_graphs.run(input_ids, positions, meta, sampling)
        if src is not None:  # the numpy backend one step ahead: its last ids are already on the host
            if meta.max_query_len != 1 or self._last_sampled is None:
                raise RuntimeError("a placeholder token outside a decode step that follows a deferred one")
            input_ids = np.where(src >= 0, self._last_sampled[np.maximum(src, 0)], input_ids).astype(np.int32)
        if self.ranks is not None:  # the other ranks run the same step on their shards
            self.ranks.forward(input_ids, positions, meta)
        hidden = self.model.forward(*self.upload(input_ids, positions, meta), self.kv_caches)
        if spans:
            self.prompt_logprobs = self._prompt_logprobs(hidden, meta, spans)
        rows = [int(meta.query_start_loc[i + 1]) - s.num_sampled_rows + j
                for i, s in enumerate(sched.scheduled) for j in range(s.num_sampled_rows)]
        if not rows:
            return None
        logits = self._logits(hidden, np.asarray(rows, np.int32))
        if late_mask is not None:
            sampling = replace(sampling, token_mask=late_mask())
        out = b.sample(logits, sampling)
        if defer and b.host_results and meta.max_query_len == 1 and sampling.ids_only:
            self._last_sampled = out.token_ids
            return DeferredSample(lambda: out, lambda: True)
        return out

    def _logits(self, hidden, rows: np.ndarray):
        """The whole vocabulary's logits of the forward's rows `rows` (tensor parallel: every rank computes its
        slice, all-gathered)."""
        if self.ranks is not None:
            self.ranks.logits(rows)
        return self.model.compute_logits(hidden[self.backend.from_host(rows)])

    @staticmethod
    def _prompt_logprob_spans(sched: SchedulerOutput) -> list[tuple[int, ScheduledSeq, int]]:
        """(row of the step, scheduled sequence, end position) per sequence whose positions start .. end - 1 in this
        step give prompt logprobs: position p gives prompt token p + 1's. The last prompt position gives the first
        output token instead. Each of a request's n choices computes them (the engine keeps the first of each), so
        they are complete whichever choice samples first."""
        spans = []
        for i, s in enumerate(sched.scheduled):
            seq = s.seq
            if seq.params.prompt_logprobs is None:
                continue
            end = min(s.start + s.num_tokens, seq.num_prompt_tokens - 1)
            if s.start < end:
                spans.append((i, s, end))
        return spans

    def _prompt_logprobs(self, hidden, meta: AttentionMetadata, spans: list) -> list[PromptLogprobs]:
        """Log-softmax of the logits of the spans' rows (the raw distribution, as vLLM's prompt logprobs): each
        next prompt token's logprob and rank, and the N best. On the backend's arrays (numpy or cupy), in passes
        of PROMPT_LOGPROB_ROWS rows; only the small results come back to the host."""
        b, xp = self.backend, self.backend.xp
        rows = np.concatenate([np.arange(meta.query_start_loc[i], meta.query_start_loc[i] + end - s.start,
                                         dtype=np.int32) for i, s, end in spans])
        targets = np.concatenate([np.asarray(s.seq.token_ids[s.start + 1:end + 1], np.int32) for _, s, end in spans])
        num = max(s.seq.params.prompt_logprobs for _, s, _ in spans)
        parts = []
        for lo in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            r = rows[lo:lo + PROMPT_LOGPROB_ROWS]
            logits = self._logits(hidden, r).astype(np.float32, copy=False)
            logits -= logits.max(axis=1, keepdims=True)
            logits -= xp.log(xp.exp(logits).sum(axis=1, keepdims=True))  # now logprobs
            token = logits[xp.arange(len(r)), b.from_host(targets[lo:lo + PROMPT_LOGPROB_ROWS])]
            rank = (logits >= token[:, None]).sum(axis=1)
            part = [token, rank]
            if num:
                top = xp.argpartition(-logits, num - 1, axis=1)[:, :num]
                top_lp = xp.take_along_axis(logits, top, axis=1)
                order = xp.argsort(-top_lp, axis=1)
                part += [xp.take_along_axis(top, order, axis=1), xp.take_along_axis(top_lp, order, axis=1)]
            parts.append([b.to_host(a) for a in part])
        token, rank, *top = [np.concatenate(column) for column in zip(*parts)]
        out, at = [], 0
        for _, s, end in spans:
            k, n = end - s.start, s.seq.params.prompt_logprobs
            top_ids, top_lp = (top[0][at:at + k, :n], top[1][at:at + k, :n]) if n else (None, None)
            out.append(PromptLogprobs(s.seq, s.start + 1, token[at:at + k], rank[at:at + k], top_ids, top_lp))
            at += k
        return out


class DraftModel:
    """The draft of speculative method "draft_model": a smaller model of the same vocabulary, with a KV cache of its
    own that the target's block tables index (same blocks, same slots), so the block manager serves both."""

    def __init__(self, path: str, engine_config: EngineConfig, backend, target: ModelConfig, max_model_len: int):
        from engine.loader import CheckpointWeights, DummyWeights, resolve_model_path
        path = resolve_model_path(path)
        self.config = c = ModelConfig.from_pretrained(path)
        if c.vocab_size > target.vocab_size:  # fewer is padding the target has and the draft not (Qwen2.5 0.5B / 7B)
            raise ConfigError(f"speculative_config model {path}: its vocabulary has {c.vocab_size} tokens, more than "
                              f"the target's {target.vocab_size}; a draft must share the target's tokenizer")
        weights = DummyWeights(engine_config.seed + 1) if engine_config.load_format == "dummy" else \
            CheckpointWeights(path)
        self.backend = backend
        with weights:
            weights.check(expected_shapes(c))
            self.model = LlamaModel(c, backend, max_model_len)
            with _fetcher(weights, backend) as fetch:
                self.model.load_weights(fetch)
        self.kv_caches = None

    def bytes_per_block(self, block_size: int) -> int:
        from engine.memory import cache_bytes_per_block
        return cache_bytes_per_block(self.config, block_size, np.dtype(self.backend.dtype).itemsize)

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        _, self.kv_caches = paged_cache(self.backend, self.config, num_blocks, block_size)


def _kv_scale(weights, layer: int, which: str, num_kv_heads: int) -> np.ndarray:
    """Layer `layer`'s k or v cache scale per KV head: the checkpoint's self_attn.{k,v}_scale (one value, or one a
    head) where it has one, else 1.0 (vLLM's default without calibrated scales)."""
    name = f"model.layers.{layer}.self_attn.{which}_scale"
    from engine.loader import CheckpointWeights
    if not isinstance(weights, CheckpointWeights) or name not in weights:
        return np.ones(num_kv_heads, np.float32)
    scale = weights.get(name).reshape(-1)
    if scale.size not in (1, num_kv_heads):
        raise ValueError(f"{name} has {scale.size} values; expected 1 or one per KV head ({num_kv_heads})")
    return np.broadcast_to(scale, (num_kv_heads,)).astype(np.float32)


def _fetcher(weights, backend, c: ModelConfig | None = None, tp=None):
    """A context giving fetch(*names) -> backend array (several names: merged along the first axis):
    generated on the backend for dummy weights, else the backend's checkpoint loader (on the GPU: pinned
    staging and async copies, see ops/cuda/upload.py). With tp, rank tp.rank's shard of each tensor of the model
    of config `c`: a dummy tensor generated whole on the backend and sliced there (the same bits as unsharded), a
    checkpoint's read on the host, sliced, then uploaded."""
    from engine.loader import DummyWeights
    if tp is not None:
        from engine.parallel import sharded_fetch
        if isinstance(weights, DummyWeights):
            return contextlib.nullcontext(sharded_fetch(lambda name: backend.random_weight(*weights.spec(name)), c,
                                                        tp, lambda a: a, backend.xp))
        return contextlib.nullcontext(sharded_fetch(weights.get, c, tp, backend.weight))
    if isinstance(weights, DummyWeights):
        return contextlib.nullcontext(merging(lambda name: backend.random_weight(*weights.spec(name)), backend.xp))
    return backend.weight_loader(weights)
