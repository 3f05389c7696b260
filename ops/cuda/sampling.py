"""The sampler on the GPU: SamplingBuffers holds a batch's parameters at fixed device addresses, and sample()
launches ops/kernels/token_mask.cu then ops/kernels/sampling.cu on the current stream with no host sync, so a
CUDA graph can capture it.

`sample(logits, buffers, out_ids, ...)` is the graph-safe form; `sample(logits, sampling_tensors)` is the
eager convenience (loads cached buffers, launches, copies the results back: it syncs) that CudaBackend uses.

Structured outputs: a SamplingTensors.token_mask (int32 [B, ceil(V / 32)], bit set = allowed) is loaded with the
other parameters and applied to the logits in place before sampling, as ops.sampling.sample does: the mask stays
applied (forbidden tokens are -inf in the logits and in the logprobs). A load without one leaves the mask off,
and the captured mask kernel then returns at once.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ops.cuda.compile import cuda_type, get_kernel
from ops.sampling_types import SamplerOutput, SamplingTensors, log_min_p

# Mirrors of sampling.cu's constants: the kernel's shared-memory layout and parameter buffer depend on them.
THREADS = 1024
CAND_CAP = 4096
RAW_CAP = 1024
N_FLOORS = 8
HEADER_BYTES = 64
# Header int 5 (sampling.cu's Header.pad[0], which the sampler does not read): the byte offset of the token mask in
# the parameter buffer, 0 = no mask this step (token_mask.cu's MASK_OFFSET_WORD).
MASK_OFFSET_WORD = 5
MASK_ALIGN = 16
MASK_THREADS = 256  # token_mask.cu's MASK_THREADS
MASK_CTAS_PER_SM = 4  # the mask launch's grid aims at this many CTAs per SM over all rows
F_EXCEPTIONS, F_COUNTED = 1, 2
MAX_TOP = 64  # top-N logprobs per row (OpenAI's ceiling is 20)
ROW_DTYPE = np.dtype([("temperature", "<f4"), ("top_p", "<f4"), ("log_min_p", "<f4"), ("repetition", "<f4"),
                      ("frequency", "<f4"), ("presence", "<f4"), ("top_k", "<i4"), ("flags", "<i4"),
                      ("seed", "<u8"), ("step", "<u8")])  # sampling.cu's RowParams, 48 bytes
LOGIT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16))  # uint16 = bfloat16 bits
ID_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_NULL = np.uint64(0)  # a null device pointer as a kernel argument (8 zero bytes on every CuPy version)


def shared_bytes(vocab_size: int) -> int:
    """Dynamic shared memory of one CTA: candidates, raw thread maxima, top-N candidates, per-thread floor
    masses, two V-bit bitmaps (sampling.cu's SMEM_* layout)."""
    return 8 * CAND_CAP + 8 * THREADS + 8 * RAW_CAP + 4 * (N_FLOORS + 1) * THREADS + 8 * (-(-vocab_size // 32))


class SamplingBuffers:
    """Device-side sampling parameters for up to max_batch rows, allocated once at fixed addresses.

    load() copies a host SamplingTensors in (one async copy from pinned memory, outside any graph capture);
    a captured sample() then reads whatever was loaded last. Also holds the kernel's scratch, uint32
    [max_batch, vocab_size], which the kernel leaves all zeros. Tables: prompt + output ids of at most
    max_history per row, at most max_bias logit-bias entries per row.

    Layout of `params` (bytes): header [64] (ints: batch, prompt_len, output_len, bias_len, table_offset,
    mask_offset), RowParams [max_batch], the tables packed back to back, then, where the step has a token mask,
    int32 [batch, mask_words] from mask_offset (16-byte aligned, right after the used tables, so the same copy
    carries it). mask_offset 0 = no mask: a load without one copies nothing more than before.
    """

    def __init__(self, max_batch: int, vocab_size: int, max_history: int = 4096, max_bias: int = 64):
        for name, value, low in (("max_batch", max_batch, 1), ("vocab_size", vocab_size, 1),
                                 ("max_history", max_history, 0), ("max_bias", max_bias, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"SamplingBuffers.{name} must be an integer >= {low}, got {value!r}")
        self.max_batch, self.vocab_size = int(max_batch), int(vocab_size)
        self.max_history, self.max_bias = int(max_history), int(max_bias)
        self.table_offset = HEADER_BYTES + ROW_DTYPE.itemsize * self.max_batch
        self.mask_words = -(-self.vocab_size // 32)
        self.nbytes = (self.table_offset + 4 * self.max_batch * (self.max_history + 2 * self.max_bias)
                       + MASK_ALIGN + 4 * self.max_batch * self.mask_words)
        self.params = cp.zeros(self.nbytes, np.uint8)  # header batch 0: every row is padding until load()
        self.scratch = cp.zeros((self.max_batch, self.vocab_size), np.uint32)
        # Two pinned staging buffers, so load() waits at most for the copy of two loads ago.
        self._pinned = [cp.cuda.alloc_pinned_memory(self.nbytes) for _ in range(2)]
        self._staging = [np.frombuffer(mem, np.uint8, self.nbytes) for mem in self._pinned]
        self._copied: list[cp.cuda.Event | None] = [None, None]
        self._slot = 0
        self.batch = 0
        self.num_logprobs = -1
        self.masked = False  # the last load carried a token mask (and clear_mask has not turned it off)

    def fits(self, t: SamplingTensors) -> bool:
        return (len(t.temperature) <= self.max_batch and t.logit_bias_ids.shape[1] <= self.max_bias
                and t.prompt_token_ids.shape[1] + t.output_token_ids.shape[1] <= self.max_history)

    def load(self, t: SamplingTensors) -> None:
        """Copy t's parameters to the device on the current stream; later launches on it see them."""
        batch, vocab_size = len(t.temperature), self.vocab_size
        prompt, output, bias_ids = t.prompt_token_ids, t.output_token_ids, t.logit_bias_ids
        if batch > self.max_batch:
            raise ValueError(f"SamplingTensors has {batch} rows; these buffers hold at most {self.max_batch}")
        if prompt.shape[1] + output.shape[1] > self.max_history:
            raise ValueError(f"penalty history of {prompt.shape[1]} prompt + {output.shape[1]} output ids per row "
                             f"exceeds max_history {self.max_history}")
        if bias_ids.shape[1] > self.max_bias:
            raise ValueError(f"{bias_ids.shape[1]} logit-bias entries per row exceed max_bias {self.max_bias}")
        for table in (prompt, output, bias_ids):
            if table.size and table.max() >= vocab_size:
                raise ValueError(f"token id {int(table.max())} is outside the vocabulary of {vocab_size}")
        mask = t.token_mask
        if mask is not None and mask.shape != (batch, self.mask_words):
            raise ValueError(f"token_mask has shape {mask.shape}; for {batch} rows of a {vocab_size}-token vocabulary "
                             f"it must be [{batch}, {self.mask_words}]")
        slot, self._slot = self._slot, self._slot ^ 1
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the copy that last read this staging buffer has finished
        staging = self._staging[slot]
        _fill_rows(staging[HEADER_BYTES:self.table_offset].view(ROW_DTYPE)[:batch], t, vocab_size)
        words = staging[self.table_offset:].view(np.int32)  # the tables, packed back to back
        used = 0
        bias_bits = np.ascontiguousarray(t.logit_bias_values).view(np.int32)
        for table in (prompt, output, bias_ids, bias_bits):
            words[used:used + table.size] = table.reshape(-1)
            used += table.size
        end = self.table_offset + 4 * used
        mask_offset = 0
        if mask is not None:  # right after the tables, in the same copy: B * mask_words words more
            mask_offset = -(-end // MASK_ALIGN) * MASK_ALIGN
            end = mask_offset + 4 * mask.size
            staging[mask_offset:end].view(np.int32)[:] = mask.reshape(-1)
        staging[:HEADER_BYTES].view(np.int32)[:MASK_OFFSET_WORD + 1] = (
            batch, prompt.shape[1], output.shape[1], bias_ids.shape[1], self.table_offset, mask_offset)
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(self.params.data.ptr, self._pinned[slot].ptr, end,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        event = cp.cuda.Event(disable_timing=True)
        event.record(stream)
        self._copied[slot] = event
        self.batch, self.num_logprobs, self.masked = batch, t.num_logprobs, mask is not None

    def clear_mask(self) -> None:
        """Turn the loaded token mask off on the current stream (a 4-byte memset, no host sync), so a replay that
        does not sample from these buffers (its step samples eagerly) leaves the graph's logits unmasked."""
        if self.masked:
            cp.cuda.runtime.memsetAsync(self.params.data.ptr + 4 * MASK_OFFSET_WORD, 0, 4,
                                        cp.cuda.get_current_stream().ptr)
            self.masked = False


def _fill_rows(rows: np.ndarray, t: SamplingTensors, vocab_size: int) -> None:
    """RowParams of every row, derived exactly as ops/sampling.py derives them (one log_min_p for both)."""
    rows["temperature"] = t.temperature
    rows["top_p"] = t.top_p
    rows["log_min_p"] = log_min_p(t.min_p)
    rows["repetition"] = t.repetition_penalty
    rows["frequency"] = t.frequency_penalty
    rows["presence"] = t.presence_penalty
    rows["top_k"] = np.where(t.top_k < vocab_size, t.top_k, 0)
    counted = (t.frequency_penalty != 0) | (t.presence_penalty != 0)
    penalized = counted | (t.repetition_penalty != 1)
    history = (t.prompt_token_ids >= 0).any(axis=1) | (t.output_token_ids >= 0).any(axis=1)
    exceptions = (t.logit_bias_ids >= 0).any(axis=1) | (penalized & history)
    rows["flags"] = np.where(exceptions, F_EXCEPTIONS, 0) | np.where(counted, F_COUNTED, 0)
    rows["seed"] = t.seeds
    rows["step"] = t.steps.astype(np.uint64)


@functools.cache
def _kernel(logit_dtype: np.dtype, id_dtype: np.dtype) -> cp.RawKernel:
    return get_kernel("sampling.cu", "sample_kernel", LOGIT_T=cuda_type(logit_dtype),
                      ID_BITS=8 * id_dtype.itemsize)


@functools.cache
def _mask_kernel(logit_dtype: np.dtype) -> cp.RawKernel:
    return get_kernel("token_mask.cu", "token_mask_kernel", LOGIT_T=cuda_type(logit_dtype))


@functools.cache
def _sm_count(device: int) -> int:
    return int(cp.cuda.Device(device).attributes["MultiProcessorCount"])


def mask_grid(rows: int, vocab_size: int, sms: int) -> tuple[int, int]:
    """(CTAs per row, rows) of the mask launch: about MASK_CTAS_PER_SM CTAs per SM in all, at least one a row,
    at most one per MASK_THREADS mask bytes (a thread a byte). Fixed per (rows, V), so a graph captures one grid
    for every step."""
    mask_bytes = -(-vocab_size // 8)
    whole_row = -(-mask_bytes // MASK_THREADS)
    return max(1, min(-(-(MASK_CTAS_PER_SM * sms) // rows), whole_row)), rows


_SHARED_SET: dict[int, int] = {}  # id(kernel) -> the dynamic shared memory it was allowed


def _check(name: str, array, shape: tuple, dtypes) -> None:
    if not isinstance(array, cp.ndarray):
        raise ValueError(f"{name} must be a cupy.ndarray, got {type(array).__name__}")
    if array.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {array.dtype}; allowed: {', '.join(str(d) for d in dtypes)}")
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (shape {array.shape}, strides {array.strides})")


def _check_logits(logits, buffers: SamplingBuffers) -> None:
    if not isinstance(logits, cp.ndarray) or logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D cupy.ndarray [B, V], got {type(logits).__name__} "
                         f"{getattr(logits, 'shape', '')}")
    _check("logits", logits, (logits.shape[0], buffers.vocab_size), LOGIT_DTYPES)
    if logits.shape[0] > buffers.max_batch:
        raise ValueError(f"logits has {logits.shape[0]} rows; the buffers hold at most {buffers.max_batch}")


def apply_token_mask(logits, buffers: SamplingBuffers) -> None:
    """logits[b, id] = -inf in place wherever the loaded token mask forbids id in row b (ops.sampling's
    apply_token_mask on the device), on the current stream without syncing. Graph-safe: the launch reads the
    mask's offset from the buffers, so a replay after a load without a mask changes nothing; rows past the
    loaded batch are left alone."""
    if not isinstance(buffers, SamplingBuffers):
        raise ValueError(f"buffers must be SamplingBuffers, got {type(buffers).__name__}")
    _check_logits(logits, buffers)
    _launch_mask(logits, buffers)


def _launch_mask(logits, buffers: SamplingBuffers) -> None:
    batch, vocab_size = logits.shape
    if batch == 0:
        return
    vec = vocab_size % 8 == 0 and logits.data.ptr % 16 == 0
    _mask_kernel(logits.dtype)(mask_grid(batch, vocab_size, _sm_count(logits.device.id)), (MASK_THREADS,),
                               (logits, np.int32(vocab_size), np.int32(vec), buffers.params))


def sample(logits, params, out_ids=None, out_logprobs=None, out_top_ids=None, out_top_logprobs=None,
           out_stats=None):
    """One token per row of logits [B, V] (float32, float16, or bfloat16 as uint16).

    With params a SamplingTensors: returns a SamplerOutput of host arrays (syncs). With params a
    SamplingBuffers: writes out_ids [B] (int32/int64), and where given out_logprobs [B] float32 (the token's
    raw logprob), out_top_ids [B, N] int32 with out_top_logprobs [B, N] float32 (the raw top N), out_stats
    [B, 4] float32 (tau, top-p mass, candidates, path: diagnostics), on the current stream, without syncing.
    Rows past the loaded batch are padding and get zeros.

    The loaded token mask, if any, is applied to the logits in place first (apply_token_mask) and stays applied,
    as in ops.sampling.sample: forbidden tokens are -inf, and the logprobs are those of the masked distribution.
    Bias and penalties never touch the logits. The buffers form always launches the mask kernel (a graph
    captured here masks exactly the steps whose load() had a mask).
    """
    if isinstance(params, SamplingTensors):
        return _sample_to_host(logits, params)
    return _sample(logits, params, out_ids, out_logprobs, out_top_ids, out_top_logprobs, out_stats, True)


def _sample(logits, buffers, out_ids, out_logprobs, out_top_ids, out_top_logprobs, out_stats, mask: bool):
    if not isinstance(buffers, SamplingBuffers):
        raise ValueError(f"params must be SamplingTensors or SamplingBuffers, got {type(buffers).__name__}")
    _check_logits(logits, buffers)
    batch, vocab_size = logits.shape
    _check("out_ids", out_ids, (batch,), ID_DTYPES)
    if out_logprobs is not None:
        _check("out_logprobs", out_logprobs, (batch,), (np.dtype(np.float32),))
    if (out_top_ids is None) != (out_top_logprobs is None):
        raise ValueError("out_top_ids and out_top_logprobs must be given together")
    num_top = 0
    if out_top_ids is not None:
        num_top = out_top_ids.shape[1] if getattr(out_top_ids, "ndim", 0) == 2 else -1
        if not 0 < num_top <= min(MAX_TOP, vocab_size):
            raise ValueError(f"out_top_ids must be [B, N] with 0 < N <= {min(MAX_TOP, vocab_size)}, "
                             f"got shape {out_top_ids.shape}")
        _check("out_top_ids", out_top_ids, (batch, num_top), (np.dtype(np.int32),))
        _check("out_top_logprobs", out_top_logprobs, (batch, num_top), (np.dtype(np.float32),))
    if out_stats is not None:
        _check("out_stats", out_stats, (batch, 4), (np.dtype(np.float32),))
    if batch == 0:
        return None
    if mask:
        _launch_mask(logits, buffers)
    kernel = _kernel(logits.dtype, out_ids.dtype)
    smem = shared_bytes(vocab_size)
    if _SHARED_SET.get(id(kernel), 0) < smem:  # a function attribute, not a stream op: harmless under capture
        kernel.max_dynamic_shared_size_bytes = smem
        _SHARED_SET[id(kernel)] = smem
    vec = vocab_size % 8 == 0 and logits.data.ptr % 16 == 0
    kernel((batch,), (THREADS,),
           (logits, np.int32(vocab_size), np.int32(vec), buffers.params, buffers.scratch, out_ids,
            _NULL if out_logprobs is None else out_logprobs, _NULL if out_top_ids is None else out_top_ids,
            _NULL if out_top_logprobs is None else out_top_logprobs, np.int32(num_top),
            _NULL if out_stats is None else out_stats), shared_mem=smem)
    return None


_HOST_BUFFERS: dict[int, SamplingBuffers] = {}  # vocab size -> buffers of the eager path, grown on demand


def _eager_buffers(t: SamplingTensors, vocab_size: int) -> SamplingBuffers:
    buffers = _HOST_BUFFERS.get(vocab_size)
    if buffers is None or not buffers.fits(t):
        have = (buffers.max_batch, buffers.max_history, buffers.max_bias) if buffers else (8, 1024, 16)
        need = (len(t.temperature), t.prompt_token_ids.shape[1] + t.output_token_ids.shape[1],
                t.logit_bias_ids.shape[1])
        batch, history, bias = (max(h, 1 << max(n - 1, 0).bit_length()) for h, n in zip(have, need))
        buffers = _HOST_BUFFERS[vocab_size] = SamplingBuffers(batch, vocab_size, history, bias)
    return buffers


def _sample_to_host(logits, t: SamplingTensors) -> SamplerOutput:
    if not isinstance(logits, cp.ndarray):  # host logits: a device copy, masked there (the caller's stay as they were)
        logits = cp.asarray(np.ascontiguousarray(logits))
    batch, vocab_size = logits.shape
    if batch != len(t.temperature):
        raise ValueError(f"logits has {batch} rows but the SamplingTensors {len(t.temperature)}")
    buffers = _eager_buffers(t, vocab_size)
    buffers.load(t)
    token_ids = cp.empty(batch, np.int64)
    logprobs = cp.empty(batch, np.float32) if t.num_logprobs >= 0 else None
    num_top = max(t.num_logprobs, 0)
    top_ids = cp.empty((batch, num_top), np.int32) if num_top else None
    top_logprobs = cp.empty((batch, num_top), np.float32) if num_top else None
    # the mask kernel only where this load has a mask: an eager step without one launches the sampler alone
    _sample(logits, buffers, token_ids, logprobs, top_ids, top_logprobs, None, t.token_mask is not None)
    host = lambda a: None if a is None else cp.asnumpy(a)  # noqa: E731
    return SamplerOutput(host(token_ids), host(logprobs), host(top_ids), host(top_logprobs))
