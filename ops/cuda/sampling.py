"""The sampler on the GPU: SamplingBuffers holds a batch's parameters at fixed device addresses, and sample()
launches ops/kernels/sampling.cu on the current stream with no host sync, so a CUDA graph can capture it.

`sample(logits, buffers, out_ids, ...)` is the graph-safe form; `sample(logits, sampling_tensors)` is the
eager convenience (loads cached buffers, launches, copies the results back: it syncs) that CudaBackend uses.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ops.cuda.compile import cuda_type, get_kernel
from ops.sampling import SamplerOutput, SamplingTensors

# Mirrors of sampling.cu's constants: the kernel's shared-memory layout and parameter buffer depend on them.
THREADS = 1024
CAND_CAP = 4096
RAW_CAP = 1024
N_FLOORS = 8
HEADER_BYTES = 64
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
    """

    def __init__(self, max_batch: int, vocab_size: int, max_history: int = 4096, max_bias: int = 64):
        for name, value, low in (("max_batch", max_batch, 1), ("vocab_size", vocab_size, 1),
                                 ("max_history", max_history, 0), ("max_bias", max_bias, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"SamplingBuffers.{name} must be an integer >= {low}, got {value!r}")
        self.max_batch, self.vocab_size = int(max_batch), int(vocab_size)
        self.max_history, self.max_bias = int(max_history), int(max_bias)
        self.table_offset = HEADER_BYTES + ROW_DTYPE.itemsize * self.max_batch
        self.nbytes = self.table_offset + 4 * self.max_batch * (self.max_history + 2 * self.max_bias)
        self.params = cp.zeros(self.nbytes, np.uint8)  # header batch 0: every row is padding until load()
        self.scratch = cp.zeros((self.max_batch, self.vocab_size), np.uint32)
        # Two pinned staging buffers, so load() waits at most for the copy of two loads ago.
        self._pinned = [cp.cuda.alloc_pinned_memory(self.nbytes) for _ in range(2)]
        self._staging = [np.frombuffer(mem, np.uint8, self.nbytes) for mem in self._pinned]
        self._copied: list[cp.cuda.Event | None] = [None, None]
        self._slot = 0
        self.batch = 0
        self.num_logprobs = -1

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
        slot, self._slot = self._slot, self._slot ^ 1
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # the copy that last read this staging buffer has finished
        staging = self._staging[slot]
        staging[:HEADER_BYTES].view(np.int32)[:5] = (batch, prompt.shape[1], output.shape[1], bias_ids.shape[1],
                                                     self.table_offset)
        _fill_rows(staging[HEADER_BYTES:self.table_offset].view(ROW_DTYPE)[:batch], t, vocab_size)
        words = staging[self.table_offset:].view(np.int32)  # the tables, packed back to back
        used = 0
        bias_bits = np.ascontiguousarray(t.logit_bias_values).view(np.int32)
        for table in (prompt, output, bias_ids, bias_bits):
            words[used:used + table.size] = table.reshape(-1)
            used += table.size
        stream = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(self.params.data.ptr, self._pinned[slot].ptr, self.table_offset + 4 * used,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        event = cp.cuda.Event(disable_timing=True)
        event.record(stream)
        self._copied[slot] = event
        self.batch, self.num_logprobs = batch, t.num_logprobs


def _fill_rows(rows: np.ndarray, t: SamplingTensors, vocab_size: int) -> None:
    """RowParams of every row, derived exactly as ops/sampling.py derives them (log_min_p in numpy's float32)."""
    rows["temperature"] = t.temperature
    rows["top_p"] = t.top_p
    with np.errstate(divide="ignore"):
        log_min_p = np.log(np.where(t.min_p > 0, t.min_p, 1)).astype(np.float32)
    log_min_p[t.min_p <= 0] = -np.inf
    rows["log_min_p"] = log_min_p
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


def sample(logits, params, out_ids=None, out_logprobs=None, out_top_ids=None, out_top_logprobs=None,
           out_stats=None):
    """One token per row of logits [B, V] (float32, float16, or bfloat16 as uint16).

    With params a SamplingTensors: returns a SamplerOutput of host arrays (syncs). With params a
    SamplingBuffers: writes out_ids [B] (int32/int64), and where given out_logprobs [B] float32 (the token's
    raw logprob), out_top_ids [B, N] int32 with out_top_logprobs [B, N] float32 (the raw top N), out_stats
    [B, 4] float32 (tau, top-p mass, candidates, path: diagnostics), on the current stream, without syncing.
    Rows past the loaded batch are padding and get zeros. The logits are left as they were.
    """
    if isinstance(params, SamplingTensors):
        return _sample_to_host(logits, params)
    buffers = params
    if not isinstance(buffers, SamplingBuffers):
        raise ValueError(f"params must be SamplingTensors or SamplingBuffers, got {type(buffers).__name__}")
    if not isinstance(logits, cp.ndarray) or logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D cupy.ndarray [B, V], got {type(logits).__name__} "
                         f"{getattr(logits, 'shape', '')}")
    batch, vocab_size = logits.shape
    _check("logits", logits, (batch, buffers.vocab_size), LOGIT_DTYPES)
    if batch > buffers.max_batch:
        raise ValueError(f"logits has {batch} rows; the buffers hold at most {buffers.max_batch}")
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
    if isinstance(logits, np.ndarray):
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
    sample(logits, buffers, token_ids, logprobs, top_ids, top_logprobs)
    host = lambda a: None if a is None else cp.asnumpy(a)  # noqa: E731
    return SamplerOutput(host(token_ids), host(logprobs), host(top_ids), host(top_logprobs))
