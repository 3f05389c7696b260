"""The tensor-parallel communicator on GPUs (engine/parallel.py's Communicator): NCCL through cupy.cuda.nccl.

One process per GPU; rank 0 makes the unique id (`unique_id()`) and hands it to the others before they build
their NcclGroup. Collectives run on the current stream without a host sync, so a decode graph captures them.
Every process that uses this must run with NCCL_NVLS_ENABLE=0 (NVLink multicast off; set by `NcclGroup` if the
environment does not say otherwise).
"""
from __future__ import annotations

import os

import cupy as cp
import numpy as np

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before the first communicator is made


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError as e:  # a CuPy built without NCCL
        raise RuntimeError(f"tensor parallelism needs CuPy with NCCL (cupy.cuda.nccl): {e}") from None
    return nccl


def unique_id() -> tuple:
    """Made once, by rank 0, and given to every rank's NcclGroup."""
    return _nccl().get_unique_id()


def _nccl_type(dtype) -> int:
    nccl = _nccl()
    table = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
             np.dtype(np.int32): nccl.NCCL_INT32}
    if hasattr(nccl, "NCCL_BFLOAT16"):
        table[np.dtype(np.uint16)] = nccl.NCCL_BFLOAT16  # bfloat16 bits, as the CUDA backend stores them
    try:
        return table[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"NCCL collectives here take float16, bfloat16 (uint16 bits), float32 or int32, "
                        f"not {dtype}") from None


class NcclGroup:
    """This process's rank of a `world`-rank NCCL communicator (cupy.cuda.nccl.NcclCommunicator)."""

    def __init__(self, world: int, rank: int, uid: tuple):
        self.world, self.rank = world, rank
        self._comm = _nccl().NcclCommunicator(world, uid, rank)

    def all_reduce(self, x) -> None:
        """x += every other rank's x, in place (a contiguous cupy array), on the current stream."""
        stream = cp.cuda.get_current_stream().ptr
        self._comm.allReduce(x.data.ptr, x.data.ptr, x.size, _nccl_type(x.dtype), _nccl().NCCL_SUM, stream)

    def all_gather(self, x):
        """The ranks' x [..., n] side by side along the last axis: [..., world * n]."""
        x = cp.ascontiguousarray(x)
        out = cp.empty((self.world,) + x.shape, x.dtype)  # NCCL gathers rank-major
        self._comm.allGather(x.data.ptr, out.data.ptr, x.size, _nccl_type(x.dtype), cp.cuda.get_current_stream().ptr)
        return cp.moveaxis(out, 0, -2).reshape(x.shape[:-1] + (self.world * x.shape[-1],))

    def broadcast(self, x, root: int = 0) -> None:
        """x = rank root's x, in place (a contiguous cupy array), on the current stream: a decode graph's input ids,
        which only rank 0 has where they came from its last sampled step."""
        stream = cp.cuda.get_current_stream().ptr
        self._comm.broadcast(x.data.ptr, x.data.ptr, x.size, _nccl_type(x.dtype), root, stream)

    def abort(self) -> None:
        """ncclCommAbort (another rank died): collectives waiting for it return instead of spinning for ever."""
        self._comm.abort()
