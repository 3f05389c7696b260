"""Decode CUDA graphs: one per batch size, captured largest first into one private memory pool,
replayed with the step's inputs copied into static buffers before each launch.

A batch of n decodes replays the smallest captured size >= n; rows past n are padding that every
kernel treats as a no-op (slot -1: no cache write; seq_len 0: no attention, zero output).

Sampling is part of each graph: the step's parameters are loaded into fixed device buffers before the
launch (ops/cuda/sampling.SamplingBuffers), and the only copy back is the sampled ids. A batch asking for
logprobs, or with more penalty history or logit-bias entries than the buffers hold, samples eagerly from
the graph's logits instead (same kernel, same Philox draws: the same tokens).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ops.metadata import AttentionMetadata
from ops.sampling import SamplerOutput, SamplingTensors

logger = logging.getLogger(__name__)

GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The sizes to capture: every size below max_num_seqs and the first that covers it."""
    sizes = [s for s in GRAPH_SIZES if s < max_num_seqs]
    cover = next((s for s in GRAPH_SIZES if s >= max_num_seqs), None)
    return sizes + ([cover] if cover else [])


def padded_size(sizes: list[int], n: int) -> int | None:
    """The smallest captured size that holds n rows, or None (the batch runs eagerly)."""
    return next((s for s in sizes if s >= n), None)


class DecodeGraphs:
    """Owns the static inputs, the captured graphs and their logits outputs."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 vocab_size: int, max_history: int = 32768, max_bias: int = 64):
        import cupy as cp  # graphs exist on the CUDA backend only

        from ops.cuda import sampling
        self.cp = cp
        self._sampling = sampling
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        b, max_blocks = self.max_size, -(-max_model_len // block_size)
        i32 = np.int32
        # Static device inputs at the largest size; each graph reads a prefix of them.
        self.input_ids = cp.zeros(b, i32)
        self.positions = cp.zeros(b, i32)
        self.slot_mapping = cp.full(b, -1, i32)
        self.seq_lens = cp.zeros(b, i32)
        self.query_start_loc = cp.arange(b + 1, dtype=i32)  # one query row per sequence, always
        self.block_tables = cp.zeros((b, max_blocks), i32)
        # Penalty history per row: prompt + output, so at most max_model_len ids.
        self.sampling_buffers = sampling.SamplingBuffers(b, vocab_size, min(max_model_len, max_history), max_bias)
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, object] = {}
        self.token_ids: dict[int, object] = {}
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()
        self.steps = self.steps_sampled_in_graph = 0
        self._rows_live = 0  # rows holding a real sequence since the last replay: the rest are padding
        self.capture_seconds = 0.0

    def _meta(self, size: int) -> AttentionMetadata:
        # max_seq_len = max_model_len: the split-KV grid is fixed at capture, valid for any context
        return AttentionMetadata(self.query_start_loc[:size + 1], self.seq_lens[:size], self.block_tables[:size],
                                 self.slot_mapping[:size], max_query_len=1, max_seq_len=self.max_model_len)

    def _forward(self, size: int):
        hidden = self.model.forward(self.input_ids[:size], self.positions[:size], self._meta(size), self.kv_caches)
        logits = self.model.compute_logits(hidden)
        token_ids = self.cp.empty(size, np.int32)
        self._sampling.sample(logits, self.sampling_buffers, token_ids)
        return logits, token_ids

    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse the pool's blocks."""
        cp = self.cp
        t0 = time.perf_counter()
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):
            for size in reversed(self.sizes):
                self._forward(size)  # eager once: kernels loaded, cuBLASLt plans built, before capture
                self.stream.begin_capture()
                self.logits[size], self.token_ids[size] = self._forward(size)
                self.graphs[size] = self.stream.end_capture()
        self.stream.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured %d decode graphs (%s) in %.3f s", len(self.sizes),
                    ", ".join(map(str, self.sizes)), self.capture_seconds)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata,
            sampling: SamplingTensors) -> SamplerOutput:
        """Replay the graph for this decode batch (host arrays from ModelRunner.prepare) and sample."""
        cp, n = self.cp, len(input_ids)
        size = padded_size(self.sizes, n)
        stream = cp.cuda.get_current_stream()
        in_graph = sampling.num_logprobs < 0 and self.sampling_buffers.fits(sampling)
        if in_graph:
            self.sampling_buffers.load(sampling)
        self.input_ids[:n].set(input_ids, stream)
        self.positions[:n].set(positions, stream)
        self.slot_mapping[:n].set(meta.slot_mapping, stream)
        self.seq_lens[:n].set(meta.seq_lens, stream)
        width = meta.block_tables.shape[1]  # columns past it may be stale: seq_lens bound every read
        self.block_tables[:n, :width] = cp.asarray(meta.block_tables)
        if self._rows_live > n:  # rows a larger batch left behind become padding again
            self.slot_mapping[n:self._rows_live] = -1
            self.seq_lens[n:self._rows_live] = 0
        self._rows_live = n
        self.graphs[size].launch(stream)
        self.steps += 1
        self.steps_sampled_in_graph += in_graph
        if in_graph:
            return SamplerOutput(self.token_ids[size][:n].get(stream), None, None, None)
        return self._sampling.sample(self.logits[size][:n], sampling)

    def time_replay(self, n: int, context: int, iters: int = 50) -> float:
        """GPU milliseconds of one replay for n rows at `context` tokens each, on the block tables the last
        batch left (call after a batch of >= n rows that reached `context`); writes no cache slot."""
        cp, size = self.cp, padded_size(self.sizes, n)
        self.slot_mapping[:] = -1
        self.seq_lens[:] = 0
        self.seq_lens[:n] = context
        self._rows_live = size
        stream = cp.cuda.get_current_stream()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        self.graphs[size].launch(stream)  # warm
        start.record(stream)
        for _ in range(iters):
            self.graphs[size].launch(stream)
        end.record(stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / iters
