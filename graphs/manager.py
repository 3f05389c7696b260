"""Decode CUDA graphs: one per batch size, captured largest first into one private memory pool,
replayed after one host->device copy of the step's packed inputs.

A batch of n decodes replays the smallest captured size >= n; rows past n are padding that every
kernel treats as a no-op (slot -1: no cache write; seq_len 0: no attention, zero output).

Sampling is part of each graph: the step's parameters are loaded into fixed device buffers before the
launch (ops/cuda/sampling.SamplingBuffers), and the only copy back is the sampled ids. A batch asking for
logprobs, or with more penalty history or logit-bias entries than the buffers hold, samples eagerly from
the graph's logits instead (same kernel, same Philox draws: the same tokens).

Structured outputs: a step's token mask (SamplingTensors.token_mask) travels in the same load and the graph's
sampling applies it to its logits first (ops/kernels/token_mask.cu), so a masked step still samples in the graph;
after a load without a mask, or when the step samples eagerly (which masks the logits itself), the captured mask
kernel does nothing. A mask that needs the step in flight before it (one step ahead with a grammar: its ids
must reach the grammar first) comes late: run(..., late_mask=f) launches the graph, calls f while the GPU runs
the forward, then loads the mask and launches the same two sampling kernels after the graph, into `sampled`.

Verify graphs (speculative decoding): the same with query_len = K + 1 rows per sequence, all of them sampled;
the prefill attention kernel runs them (its grid depends on query_len only, not on the context).

One step ahead: every graph writes its sampled ids to one device buffer, `sampled`, and its first node
(ops/kernels/step_inputs.cu) takes a row's input id from there when the host marks it (src >= 0). So the
engine can launch step t+1 before step t's ids reach the host; run(..., defer=True) returns a
DeferredSample whose ids come back by an async copy the host waits for later.

Tensor parallelism (engine/tp_runner.py): each rank captures the same graphs on its shard, the collectives
(NCCL, on the capturing stream) inside them; rank 0's graph broadcasts its input ids after unpacking them, and a
worker stages the same packed inputs and launches the same size (replay).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from ops.metadata import AttentionMetadata
from ops.sampling_types import DeferredSample, SamplerOutput, SamplingTensors

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
                 vocab_size: int, max_history: int = 32768, max_bias: int = 64, query_len: int = 1):
        import cupy as cp  # graphs exist on the CUDA backend only

        from ops.cuda.compile import get_kernel
        self.cp = cp
        self.backend = model.backend  # samples as the eager path does, from fixed buffers
        self._unpack = get_kernel("step_inputs.cu", "unpack_step_inputs")
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = b = self.sizes[-1]  # sequences
        self.query_len = q = query_len
        self._rows = r = b * q  # token rows
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        i32 = np.int32
        # Packed inputs (step_inputs.cu's layout): one copy a step fills ids, positions, slots, seq_lens,
        # src and the flat block tables; the model reads the first four in place. Arrays of `r` token rows;
        # seq_lens uses its first b (one a sequence).
        self._words = 4 + 5 * r + b * self.max_blocks
        self.packed = cp.zeros(self._words, i32)
        rows = self.packed[4:4 + 5 * r].reshape(5, r)
        rows[2:5:2] = -1  # slots and src: padding until the first step
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.src = rows
        self.query_start_loc = cp.arange(0, r + 1, q, dtype=i32)  # query_len rows per sequence, always
        self.block_tables = cp.zeros((b, self.max_blocks), i32)
        self.sampled = cp.zeros(r, i32)  # every graph's sampled ids (a prefix); the next step's src reads it
        # Penalty history per row: prompt + output, so at most max_model_len ids.
        self.sampling_buffers = self.backend.sampling_buffers(r, vocab_size, min(max_model_len, max_history), max_bias)
        # Two pinned copies of `packed` and of `sampled`: the host fills one while the other may be in flight.
        self._staging = [_pinned(cp, self._words) for _ in range(2)]
        self._results = [_pinned(cp, r) for _ in range(2)]
        self._staged: list = [None, None]
        self._slot = self._result_slot = 0
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, object] = {}
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()
        self.steps = self.steps_sampled_in_graph = 0
        self.capture_seconds = 0.0

    def _meta(self, size: int) -> AttentionMetadata:
        # max_seq_len = max_model_len: the split-KV grid is fixed at capture, valid for any context
        return AttentionMetadata(self.query_start_loc[:size + 1], self.seq_lens[:size], self.block_tables[:size],
                                 self.slot_mapping[:size * self.query_len], max_query_len=self.query_len,
                                 max_seq_len=self.max_model_len)

    def _forward(self, size: int):
        t = size * self.query_len
        self._unpack((-(-self.max_blocks // 128), size), (128,),
                     (self.packed, np.int32(size), np.int32(self._rows), self.sampled, self.block_tables,
                      np.int32(self.max_blocks)))
        tp = getattr(self.model, "tp", None)
        if tp is not None and tp.world > 1:  # only rank 0's device has the ids its last step sampled
            tp.comm.broadcast(self.input_ids[:t])
        hidden = self.model.forward(self.input_ids[:t], self.positions[:t], self._meta(size), self.kv_caches)
        logits = self.model.compute_logits(hidden)
        self.backend.sample_into(logits, self.sampling_buffers, self.sampled[:t])
        return logits

    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse the pool's blocks."""
        cp = self.cp
        t0 = time.perf_counter()
        with self.stream, cp.cuda.using_allocator(self.pool.malloc):
            # a bar on a terminal only (disable=None: none when stderr is not a TTY), and only past half a second
            for size in tqdm(self.sizes[::-1], desc="capturing graphs", unit="graph", disable=None, leave=False,
                             delay=0.5):
                self._forward(size)  # eager once: kernels loaded, cuBLASLt plans built, before capture
                self.stream.begin_capture()
                self.logits[size] = self._forward(size)
                self.graphs[size] = self.stream.end_capture()
        self.stream.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        logger.info("captured %d %s graphs (%s) in %.3f s", len(self.sizes),
                    "decode" if self.query_len == 1 else f"verify ({self.query_len} rows a sequence)",
                    ", ".join(map(str, self.sizes)), self.capture_seconds)

    def _stage(self, input_ids, positions, meta: AttentionMetadata, src, size: int, stream) -> None:
        """Pack this step's inputs into pinned memory and copy them to `packed` (one async copy)."""
        cp, b, t = self.cp, self._rows, len(input_ids)
        n, q = len(meta.seq_lens), self.query_len
        slot, self._slot = self._slot, self._slot ^ 1
        if self._staged[slot] is not None:
            self._staged[slot].synchronize()  # the copy that last read this staging buffer is done
        host = self._staging[slot][1]
        width = meta.block_tables.shape[1]
        host[0] = width
        rows = host[4:4 + 5 * b].reshape(5, b)
        rows[0, :t], rows[1, :t], rows[2, :t] = input_ids, positions, meta.slot_mapping
        rows[3, :n] = meta.seq_lens
        rows[4, :t] = -1 if src is None else src
        rows[:, t:size * q] = _PADDING  # token rows past t: no cache write, no gather
        rows[3, n:size] = 0  # sequences past n: no attention, zero output
        used = 4 + 5 * b + n * width
        host[4 + 5 * b:used] = meta.block_tables.reshape(-1)
        cp.cuda.runtime.memcpyAsync(self.packed.data.ptr, self._staging[slot][0].ptr, 4 * used,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        self._staged[slot] = _record(cp, stream)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata,
            sampling: SamplingTensors, src: np.ndarray | None = None, defer: bool = False, late_mask=None):
        """Replay the graph for this decode batch (host arrays from ModelRunner.prepare) and sample.

        src: per row, the row of the previous step's `sampled` that holds its input id (-1: input_ids has
        it). defer: return a DeferredSample instead of waiting, when sampling ran inside the graph and no
        row needs penalty history (which would need the ids still on their way).
        late_mask: called after the launch, while the GPU runs the forward; what it returns becomes the
        sampling's token mask, and the step samples after the graph from its logits, into `sampled` (the
        graph's own kernels, launched on their own), so that it can still be deferred.
        """
        cp, n = self.cp, len(input_ids)  # token rows: sequences x query_len
        size = padded_size(self.sizes, len(meta.seq_lens))
        stream = cp.cuda.get_current_stream()
        # a token mask does not matter here: any batch that fits the buffers fits its mask too
        buffered = sampling.num_logprobs < 0 and self.sampling_buffers.fits(sampling)
        in_graph = buffered and late_mask is None
        if in_graph:
            self.sampling_buffers.load(sampling)
        else:  # the graph's own sampling reads stale parameters: its mask, if any, must not touch the logits
            self.sampling_buffers.clear_mask()
        self._stage(input_ids, positions, meta, src, size, stream)
        self.graphs[size].launch(stream)
        self.steps += 1
        self.steps_sampled_in_graph += in_graph
        if late_mask is not None:
            sampling = replace(sampling, token_mask=late_mask())
            if buffered:
                self.sampling_buffers.load(sampling)
                self.backend.sample_into(self.logits[size][:n], self.sampling_buffers, self.sampled[:n])
        if not buffered:  # the eager sampler loads its own buffers, token mask included, and applies it
            return self.backend.sample(self.logits[size][:n], sampling)
        if not (defer and sampling.ids_only):
            return SamplerOutput(self.sampled[:n].get(stream), None, None, None)
        slot, self._result_slot = self._result_slot, self._result_slot ^ 1
        mem, host = self._results[slot]
        cp.cuda.runtime.memcpyAsync(mem.ptr, self.sampled.data.ptr, 4 * n, cp.cuda.runtime.memcpyDeviceToHost,
                                    stream.ptr)
        done = _record(cp, stream)

        def wait() -> SamplerOutput:
            done.synchronize()
            return SamplerOutput(host[:n].copy(), None, None, None)
        return DeferredSample(wait, lambda: done.done)

    def replay(self, input_ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata) -> None:
        """A tensor-parallel worker's decode step: the same inputs and graph as rank 0's run(), no sampling of its
        own to load or read (its graph's ids come from rank 0's broadcast; what it samples is never read)."""
        size = padded_size(self.sizes, len(meta.seq_lens))
        stream = self.cp.cuda.get_current_stream()
        self._stage(input_ids, positions, meta, None, size, stream)
        self.graphs[size].launch(stream)

    def time_replay(self, n: int, context: int, iters: int = 50) -> float:
        """GPU milliseconds of one replay for n rows at `context` tokens each, on the block tables the last
        batch left (call after a batch of >= n rows that reached `context`); writes no cache slot."""
        cp, size = self.cp, padded_size(self.sizes, n)
        self.slot_mapping[:] = -1
        self.src[:] = -1
        self.seq_lens[:] = 0
        self.seq_lens[:n] = context
        stream = cp.cuda.get_current_stream()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        self.graphs[size].launch(stream)  # warm
        start.record(stream)
        for _ in range(iters):
            self.graphs[size].launch(stream)
        end.record(stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / iters


_PADDING = np.array([[0], [0], [-1], [0], [-1]], np.int32)  # id, position, slot, seq_len, src of a padding row


def _pinned(cp, words: int):
    mem = cp.cuda.alloc_pinned_memory(4 * words)
    return mem, np.frombuffer(mem, np.int32, words)


def _record(cp, stream):
    event = cp.cuda.Event(disable_timing=True)
    event.record(stream)
    return event
