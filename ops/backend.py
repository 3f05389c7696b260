"""Picks the compute backend: `cuda` when CuPy sees a GPU and the CUDA ops are present, else `numpy`.

A backend is an object with `xp` (numpy or cupy), allocation helpers and the model ops, all with
the argument lists of ops/reference.py. Model code never imports numpy or cupy for compute.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from ops import quant, reference, sampling

logger = logging.getLogger(__name__)


class NumpyBackend:
    """Runs every op with ops/reference.py in float32 on the CPU."""

    name = "numpy"
    xp = np
    # What the model runner asks of a backend, instead of its name:
    captures_graphs = False  # decode steps can be captured as CUDA graphs (graphs/manager.py)
    host_results = True  # arrays live on the host: a step's sampled ids are known when it returns
    has_device_memory = False  # the KV cache is sized from free device memory (engine/memory.py)

    def __init__(self, dtype: str = "float32"):
        # The numpy backend always computes in float32; `dtype` is what the user asked for.
        self.requested_dtype = dtype
        self.dtype_name = "float32"
        self.dtype = np.dtype(np.float32)

    def unsupported(self, config) -> str | None:
        """Why this backend cannot run a model of `config`'s shapes (one rank's, under tensor parallelism), or
        None. The numpy backend runs every shape."""
        return None

    # memory
    def empty(self, shape, dtype=None):
        return np.empty(shape, dtype=dtype or self.dtype)

    def zeros(self, shape, dtype=None):
        return np.zeros(shape, dtype=dtype or self.dtype)

    def from_host(self, array: np.ndarray, dtype=None) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=dtype or array.dtype)

    def weight(self, array: np.ndarray) -> np.ndarray:
        """A weight in the compute dtype, copied out of the checkpoint's memory map."""
        return np.array(array, dtype=self.dtype, order="C")

    def weight_loader(self, weights):
        """A context giving fetch(*names) -> weight for a CheckpointWeights (ModelRunner loads through it)."""
        def fetch_one(name):
            if weights.is_fp8(name):  # an FP8 checkpoint's projection: kept as codes and scales
                codes, scale, input_scale = weights.get_fp8(name)
                return quant.Fp8Weight(np.array(codes), scale, input_scale)
            return self.weight(weights.get(name))
        return contextlib.nullcontext(merging(fetch_one, np))

    def random_weight(self, shape, seed: int, mean: float, std: float) -> np.ndarray:
        """A dummy weight (--load-format dummy) drawn from a seeded normal."""
        return np.random.default_rng(seed).normal(mean, std, shape).astype(self.dtype)

    def to_host(self, array) -> np.ndarray:
        return array

    def synchronize(self) -> None:
        pass

    # ops
    embedding = staticmethod(reference.embedding)
    rms_norm = staticmethod(reference.rms_norm)
    add_rms_norm = staticmethod(reference.add_rms_norm)
    linear = staticmethod(quant.linear)  # reference.linear, or FP8 math for an Fp8Weight
    quantize_weight = staticmethod(quant.quantize_weight)
    rms_norm_fp8 = staticmethod(quant.then_quantize(reference.rms_norm))  # out: an Fp8Activation
    add_rms_norm_fp8 = staticmethod(quant.then_quantize(reference.add_rms_norm))
    silu_and_mul_fp8 = staticmethod(quant.then_quantize(reference.silu_and_mul))
    quantize_fp8 = staticmethod(quant.quantize_activation)
    silu_and_mul = staticmethod(reference.silu_and_mul)
    rope_and_cache = staticmethod(reference.rope_and_cache)
    attention = staticmethod(reference.attention)
    moe = staticmethod(reference.moe)
    sample = staticmethod(sampling.sample)


def merging(fetch_one, xp):
    """fetch(*names) from a one-tensor fetch: several names are merged along the first axis (q/k/v, gate/up)."""
    def fetch(*names):
        if len(names) == 1:
            return fetch_one(names[0])
        parts = [fetch_one(n) for n in names]
        return quant.concatenate(parts, xp) if isinstance(parts[0], quant.Fp8Weight) else xp.concatenate(parts)
    return fetch


def cuda_available() -> bool:
    try:
        import cupy  # noqa: F401  (optional dependency: the [cuda12] / [cuda13] extras)
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA present without a device/driver
        return False


def get_backend(device: str = "auto", dtype: str = "float32"):
    """`device`: "auto" | "numpy" | "cuda"."""
    if device == "numpy":
        return NumpyBackend(dtype)
    if device == "auto" and not cuda_available():
        logger.info("no usable GPU: running on the numpy backend (float32, for tiny models)")
        return NumpyBackend(dtype)
    if not cuda_available():
        raise RuntimeError("device 'cuda' was asked for but CuPy sees no GPU here (CuPy comes with the "
                           "[cuda12] / [cuda13] extra); use --device numpy")
    from ops.cuda import CudaBackend  # only where CuPy and a GPU exist: its import errors are real errors
    return CudaBackend(dtype)
