"""Checkpoint tensors to the GPU through pinned staging buffers and async copies on a dedicated stream,
rounded to the compute dtype on the device, bit for bit as the host path (ops.cuda.to_storage) rounds.

Per chunk of a tensor: wait for the copy that last read this staging buffer, copy the chunk out of the
memory map into it (the disk or page-cache read, on the CPU), then cudaMemcpyAsync it to the device on
the copy stream and record an event. With two buffers the CPU reads chunk k+1 while the DMA engine
moves chunk k. Bits stored in the compute dtype go straight into the destination; others land in a
device scratch that one elementwise kernel per chunk converts into place, on the copy stream.
"""
from __future__ import annotations

import functools
import logging
import math
import time

import cupy as cp
import numpy as np
from tqdm import tqdm

from ops import quant
from ops.storage import FLOAT_DTYPES, SAFETENSORS_DTYPES, STORAGE, WeightsError

logger = logging.getLogger(__name__)

# 64 MiB per staging buffer: a chunk's fixed cost (a few Python calls, an event, a copy and maybe a kernel
# launch: tens of microseconds) is under 1% of the ~2.5 ms PCIe 5 needs to move it, while the pair costs
# only 128 MiB of page-locked RAM, pins in tens of milliseconds, and the first chunk's read (which
# nothing overlaps) stays short. Tensors smaller than a buffer still alternate buffers, so they overlap too.
STAGING_BYTES = 64 * 2**20

_BITS = {"F32": "uint32", "F16": "uint16", "BF16": "uint16"}  # the kernels read stored values as raw bits

# Integer arithmetic on the bits, not the hardware conversions: those give every NaN one canonical
# pattern, where numpy (the host path) keeps the sign and top payload bits. Both round to nearest even.
_PREAMBLE = r"""
__device__ unsigned short f32_to_f16_bits(unsigned int x) {
    unsigned int sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a > 0x7f800000u) {                          // NaN: keep the top 10 payload bits, never make it inf
        unsigned int payload = (a >> 13) & 0x3ffu;
        return sign | 0x7c00u | (payload ? payload : 1u);
    }
    if (a >= 0x477ff000u) return sign | 0x7c00u;    // inf, and from 65520 up (a tie past 65504) overflow
    if (a >= 0x38800000u) {                         // a normal half: rebias the exponent, round off 13 bits
        unsigned int r = a - 0x38000000u;
        return sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
    }
    if (a <= 0x33000000u) return sign;              // up to 2^-25, half the least subnormal (a tie): zero
    // a subnormal half: the significand in units of 2^-24 is m >> shift; round off the bits shifted out
    unsigned int m = (a & 0x7fffffu) | 0x800000u, shift = 126u - (a >> 23);
    unsigned int q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    return sign | (q + (rest > half || (rest == half && (q & 1u))));
}

__device__ unsigned int f16_to_f32_bits(unsigned short h) {  // exact
    unsigned int sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (exponent == 0x1fu) return sign | 0x7f800000u | (m << 13);            // inf, NaN with its payload
    if (exponent != 0u) return sign | (((h & 0x7fffu) + 0x1c000u) << 13);    // normal: rebias 15 -> 127
    return sign | __float_as_uint((float)m * 5.9604644775390625e-8f);        // zero, subnormal: m * 2^-24
}

__device__ unsigned short f32_to_bf16_bits(unsigned int x) {  // ops.storage.float32_to_bf16_bits
    return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;            // wraps mod 2^32 as numpy's uint32 does
}
"""

# (stored dtype, compute dtype) -> the conversion of one element; absent: the stored bits are the result
_CONVERSIONS = {
    ("F32", "float16"): "y = f32_to_f16_bits(x)",
    ("F32", "bfloat16"): "y = f32_to_bf16_bits(x)",
    ("BF16", "float16"): "y = f32_to_f16_bits((unsigned int)x << 16)",
    ("F16", "bfloat16"): "y = f32_to_bf16_bits(f16_to_f32_bits(x))",
}


@functools.cache
def _convert_kernel(stored: str, dtype_name: str) -> cp.ElementwiseKernel | None:
    operation = _CONVERSIONS.get((stored, dtype_name))
    if operation is None:
        return None
    return cp.ElementwiseKernel(f"{_BITS[stored]} x", "uint16 y", operation,
                                f"cupyllm_{stored.lower()}_to_{dtype_name}", preamble=_PREAMBLE)


def float_bytes(weights) -> tuple[int, int]:
    """(total, largest) bytes of the float tensors in the checkpoint, from the headers (nothing is read)."""
    total = largest = 0
    for name in weights.names():
        _, dtype, shape = weights.info(name)
        if dtype in FLOAT_DTYPES:
            nbytes = SAFETENSORS_DTYPES[dtype].itemsize * math.prod(shape)
            total, largest = total + nbytes, max(largest, nbytes)
    return total, largest


class WeightUploader:
    """`with WeightUploader(weights, "bfloat16") as fetch: fetch(name)` -> tensor `name` of a CheckpointWeights
    as a new C-contiguous device array in the compute dtype, ready for work on the stream current at the call;
    `fetch(a, b, c)` -> those tensors merged along their first axis, each uploaded into its rows.

    The host waits only for a staging buffer's previous copy; leaving the context waits for the copy
    stream and releases the pinned buffers.
    """

    def __init__(self, weights, dtype_name: str, staging_bytes: int = STAGING_BYTES):
        if dtype_name not in ("float16", "bfloat16"):
            raise ValueError(f"dtype_name must be float16 or bfloat16, got {dtype_name!r}")
        if staging_bytes < 4 or staging_bytes % 4:
            raise ValueError(f"staging_bytes must be a positive multiple of 4 (whole F32 values), got {staging_bytes}")
        self.weights, self.dtype_name, self.staging_bytes = weights, dtype_name, staging_bytes
        self.stream: cp.cuda.Stream | None = None

    def __enter__(self) -> "WeightUploader":
        total, largest = float_bytes(self.weights)
        self._start, self._done = time.perf_counter(), 0  # pinning counts toward the rate
        # a bar on a terminal only (disable=None: none when stderr is not a TTY); the summary is logged either way
        self.progress = tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, disable=None, leave=False)
        # a tiny model (the tests, the demo) pins no more than its largest tensor
        self.chunk_bytes = min(self.staging_bytes, max(4, -(-largest // 4) * 4))
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._pinned = [cp.cuda.alloc_pinned_memory(self.chunk_bytes) for _ in range(2)]
        self._staging = [np.frombuffer(mem, np.uint8, self.chunk_bytes) for mem in self._pinned]
        # Events are re-recorded: synchronize() and wait_event() see the latest record, and an event never
        # recorded counts as done.
        self._copied = [cp.cuda.Event(disable_timing=True) for _ in range(2)]
        self._slot = 0
        self._compute_ready = cp.cuda.Event(disable_timing=True)
        self._uploaded = cp.cuda.Event(disable_timing=True)
        self._scratch = None  # device bytes for stored bits that need converting, allocated at first need
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.stream.synchronize()
        finally:
            self._scratch = self._staging = self._pinned = None
            # Dropped pinned blocks stay cached in CuPy's pinned pool; up to 128 MiB of page-locked RAM is worth
            # handing back to the OS for the life of a server.
            cp.get_default_pinned_memory_pool().free_all_blocks()
            self.progress.close()
            if exc_type is None:
                seconds = time.perf_counter() - self._start
                logger.info("loaded %.2f GB of weights in %.1f s (%.1f GB/s)", self._done / 1e9, seconds,
                            self._done / 1e9 / seconds if seconds > 0 else 0.0)

    def __call__(self, *names: str):
        """Tensor `names[0]`, or several tensors merged along their first axis (q/k/v, gate/up): each is
        uploaded straight into its rows of one new array, so the merge costs no copy and no temporary."""
        if not names:
            raise ValueError("fetch needs at least one tensor name")
        if self.weights.is_fp8(names[0]):  # an FP8 checkpoint's projection: its codes and scales as they are
            return self._fp8(names)
        shapes = [tuple(self.weights.info(name)[2]) for name in names]
        shape = shapes[0]
        if len(names) > 1:
            if any(len(s) == 0 or s[1:] != shape[1:] for s in shapes):
                raise WeightsError(f"cannot merge {', '.join(names)} along the first axis: shapes "
                                   f"{', '.join(str(list(s)) for s in shapes)}")
            shape = (sum(s[0] for s in shapes), *shape[1:])
        out = cp.empty(shape, STORAGE[self.dtype_name])
        compute = cp.cuda.get_current_stream()
        # The pool hands out blocks freed on the compute stream that its queued work may still read: the
        # copy stream writes `out` (and the scratch) only after that work.
        self._compute_ready.record(compute)
        self.stream.wait_event(self._compute_ready)
        flat, at = out.view(np.uint16).reshape(-1), 0
        for name in names:
            at += self._fill(name, flat, at)
        self._uploaded.record(self.stream)
        compute.wait_event(self._uploaded)
        return out

    def _fp8(self, names):
        from ops.cuda import require_fp8
        require_fp8()
        parts = []
        for name in names:
            codes, scale, input_scale = self.weights.get_fp8(name)
            parts.append(quant.Fp8Weight(cp.asarray(np.ascontiguousarray(codes)), cp.asarray(scale), input_scale))
        return parts[0] if len(parts) == 1 else quant.concatenate(parts, cp)

    def _fill(self, name: str, out_bits, at: int) -> int:
        """Upload tensor `name` into out_bits[at:] (uint16 elements of the destination); returns its size."""
        raw, stored = self.weights.get_raw(name)  # WeightsError (naming file and tensor) if not a float tensor
        kernel = _convert_kernel(stored, self.dtype_name)
        if kernel is not None and self._scratch is None:
            self._scratch = cp.empty(self.chunk_bytes, np.uint8)
        source, base = raw.reshape(-1), out_bits.data.ptr + 2 * at
        step = self.chunk_bytes // raw.itemsize  # elements a chunk
        for start in range(0, source.size, step):
            chunk = source[start:start + step]
            if kernel is None:
                self._upload(chunk, base + start * raw.itemsize)
            else:
                self._upload(chunk, self._scratch.data.ptr)
                with self.stream:  # stream order: after this chunk's copy, before the next chunk's
                    kernel(self._scratch[:chunk.nbytes].view(_BITS[stored]),
                           out_bits[at + start:at + start + chunk.size])
            self._done += chunk.nbytes
            self.progress.update(chunk.nbytes)
        return source.size

    def _upload(self, chunk: np.ndarray, device_ptr: int) -> None:
        slot, self._slot = self._slot, self._slot ^ 1
        self._copied[slot].synchronize()  # the copy that last read this staging buffer has finished
        np.copyto(self._staging[slot][:chunk.nbytes].view(chunk.dtype), chunk)  # reads the memory map
        cp.cuda.runtime.memcpyAsync(device_ptr, self._pinned[slot].ptr, chunk.nbytes,
                                    cp.cuda.runtime.memcpyHostToDevice, self.stream.ptr)
        self._copied[slot].record(self.stream)
