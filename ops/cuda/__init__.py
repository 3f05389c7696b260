"""The CUDA backend: the ops of ops/reference.py on the GPU, with the same argument lists.

Activations, weights and the KV cache are float16 or bfloat16 (bfloat16 arrays are uint16 bit
patterns: CuPy has no bfloat16 dtype); every op writes into a caller-provided `out` on the current
CuPy stream and never synchronises with the host, so a decode step can be captured in a graph.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ops import jit_ops, quant
from ops.cuda import attention as _attention
from ops.cuda import basic as _basic
from ops.cuda import moe as _moe
from ops.cuda import sampling as _sampling
from ops.cuda.linear import Linear
from ops.cuda.upload import WeightUploader
from ops.cuda_shapes import cuda_shape_problem
from ops.storage import STORAGE, bf16_bits_to_float32, float32_to_bf16_bits


class CudaBackend:
    name = "cuda"
    xp = cp
    captures_graphs, host_results, has_device_memory = True, False, True  # see ops.backend.NumpyBackend

    def __init__(self, dtype: str = "float16"):
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(f"the CUDA backend runs float16 or bfloat16, got {dtype!r}")
        self.dtype_name = dtype
        self.dtype = STORAGE[dtype]
        self._linear = Linear()

    def unsupported(self, config) -> str | None:
        """See ops.backend.NumpyBackend.unsupported: the attention kernels' head sizes, the MoE kernels' row widths."""
        return cuda_shape_problem(config)

    # memory
    def empty(self, shape, dtype=None):
        return cp.empty(shape, dtype=dtype or self.dtype)

    def zeros(self, shape, dtype=None):
        return cp.zeros(shape, dtype=dtype or self.dtype)

    def from_host(self, array: np.ndarray, dtype=None):
        """Upload as is (int metadata, float32 tables); `dtype` converts on the host first."""
        return cp.asarray(np.ascontiguousarray(array, dtype=dtype or array.dtype))

    def weight(self, array: np.ndarray):
        """A float32 host weight, rounded to the compute dtype and uploaded."""
        return cp.asarray(to_storage(np.asarray(array, np.float32), self.dtype_name))

    def weight_loader(self, weights):
        """A context giving name -> device weight for a CheckpointWeights: the stored bits go through
        pinned staging and async copies, and are rounded to the compute dtype on the GPU."""
        return WeightUploader(weights, self.dtype_name)

    def random_weight(self, shape, seed: int, mean: float, std: float):
        """A dummy weight (--load-format dummy) generated on the GPU: 15 GB of 7B weights never touch the host."""
        w = cp.random.default_rng(seed).standard_normal(shape, dtype=cp.float32)
        w *= std
        w += mean
        if self.dtype_name == "bfloat16":
            return float32_to_bf16_bits(w, cp)  # round to nearest even
        return w.astype(self.dtype)

    def to_host(self, array) -> np.ndarray:
        return cp.asnumpy(array)

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def device_name(self) -> str:
        return cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()

    def memory_info(self) -> tuple[int, int]:
        """(free, total) device bytes."""
        return cp.cuda.runtime.memGetInfo()

    def memory_used(self) -> int:
        free, total = self.memory_info()
        return total - free

    def release_cached_memory(self) -> None:
        cp.get_default_memory_pool().free_all_blocks()

    def prepare_decode(self, config, sizes: list[int], max_model_len: int, fp8: bool = False) -> None:
        """Before graph capture: the split-KV workspace for every batch size, and GEMM algorithms
        tuned (or read from the on-disk cache) for the decode shapes (fp8: the projections' as FP8 GEMMs).
        `sizes`: the decode batch sizes the graphs will capture, ascending (graphs.manager.capture_sizes)."""
        _attention.reserve_decode_workspace(sizes[-1], config.num_attention_heads, config.num_key_value_heads,
                                            config.head_dim, max_model_len)
        h, qkv = config.hidden_size, config.q_size + 2 * config.kv_size
        shapes = [(qkv, h, config.attention_bias), (h, config.q_size, False)]
        moe = config.moe
        if moe is None or len(moe.layers) < config.num_hidden_layers:  # a dense MLP somewhere
            shapes += [(2 * config.intermediate_size, h, False), (h, config.intermediate_size, False)]
        if moe is not None:  # the router's logits and the shared expert go through cuBLASLt (ops/cuda/moe.py)
            s = moe.shared_intermediate_size
            shapes += [(moe.num_experts, h, False)] + ([(2 * s, h, False), (h, s, False), (1, h, False)] if s else [])
        projections = [(m, n, k, bias) for m in sizes for n, k, bias in shapes]
        lm_head = [(m, config.vocab_size, h, False) for m in sizes]
        if fp8:
            self._linear.tune(projections, self.dtype_name, fp8=True)
            self._linear.tune(lm_head, self.dtype_name)
        else:
            self._linear.tune(projections + lm_head, self.dtype_name)

    # ops
    def embedding(self, ids, table, out):
        _basic.embedding(ids, table, out)

    def rms_norm(self, x, weight, eps, out):
        _basic.rms_norm(x, weight, eps, out)

    def add_rms_norm(self, x, residual, weight, eps, out):
        _basic.add_rms_norm(x, residual, weight, eps, out)

    def linear(self, x, weight, bias, out):
        self._linear(x, weight, bias, out)

    def silu_and_mul(self, x, out):
        _basic.silu_and_mul(x, out)

    def moe(self, x, router, gate_up, down, top_k, normalize, out, shared=None):
        _moe.moe(self._linear, x, router, gate_up, down, top_k, normalize, out, shared)

    # FP8 (--quantization fp8): weights quantized per output row at load, GEMM inputs per token by the kernel
    # that makes them (out: an ops/quant.Fp8Activation, codes and scales)
    def quantize_weight(self, w) -> quant.Fp8Weight:
        require_fp8()
        codes, scale = cp.empty(w.shape, cp.uint8), cp.empty((w.shape[0], 1), cp.float32)
        jit_ops.quantize_fp8(w, codes, scale)
        return quant.Fp8Weight(codes, scale.reshape(-1))

    def rms_norm_fp8(self, x, weight, eps, out):
        jit_ops.rms_norm_fp8(x, weight, eps, out.codes, out.scale)

    def add_rms_norm_fp8(self, x, residual, weight, eps, out):
        jit_ops.add_rms_norm_fp8(x, residual, weight, eps, out.codes, out.scale)

    def silu_and_mul_fp8(self, x, out):
        jit_ops.silu_and_mul_fp8(x, out.codes, out.scale)

    def quantize_fp8(self, x, out):
        jit_ops.quantize_fp8(x, out.codes, out.scale)

    # The caches are arrays, or (--kv-cache-dtype fp8) ops/quant.Fp8Cache: E4M3 codes and a scale per KV head.
    def rope_and_cache(self, qkv, positions, slot_mapping, k_cache, v_cache, cos_sin,
                       q_norm=None, k_norm=None, eps=1e-6):
        (k, ks), (v, vs) = _cache_parts(k_cache), _cache_parts(v_cache)
        _basic.rope_and_cache(qkv, positions, slot_mapping, k, v, cos_sin, q_norm, k_norm, eps,
                              None if ks is None else (ks, vs))

    def attention(self, qkv, k_cache, v_cache, meta, scale, out, window: int = 0):
        (k, ks), (v, vs) = _cache_parts(k_cache), _cache_parts(v_cache)
        _attention.attention(qkv, k, v, meta, scale, out, k_scale=ks, v_scale=vs, window=window)

    def sample(self, logits, sampling_tensors):
        return _sampling.sample(logits, sampling_tensors)

    # a decode graph's sampling (graphs/manager.py): parameters loaded into fixed buffers, ids written on the device
    def sampling_buffers(self, max_batch: int, vocab_size: int, max_history: int, max_bias: int):
        return _sampling.SamplingBuffers(max_batch, vocab_size, max_history, max_bias)

    def sample_into(self, logits, buffers, out_ids) -> None:
        """Sample with the parameters loaded into `buffers` (their token mask first), ids to out_ids; no sync."""
        _sampling.sample(logits, buffers, out_ids)


def _cache_parts(cache):
    """(codes, scale [Hkv]) of an Fp8Cache, (array, None) of an fp16/bf16 cache."""
    return (cache.codes, cache.scale) if isinstance(cache, quant.Fp8Cache) else (cache, None)


def require_fp8() -> None:
    """FP8 GEMMs need Ada or Hopper tensor cores (sm_89+): say which GPU this is and what runs instead."""
    device = cp.cuda.Device()
    cc = int(device.compute_capability)
    if cc < 89:
        name = cp.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
        raise RuntimeError(f"FP8 weights need an sm_89 or newer GPU (Ada, Hopper) for FP8 GEMMs; this {name} is "
                           f"sm_{cc}. Serve without --quantization fp8 (fp16/bf16 weights), or an unquantized "
                           "checkpoint")


def to_storage(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """float32 host array -> the host storage of `dtype_name` (bfloat16 as uint16 bits, rounded to nearest even)."""
    if dtype_name == "bfloat16":
        return float32_to_bf16_bits(array)
    return array.astype(STORAGE[dtype_name])


def to_float32(array) -> np.ndarray:
    """Device array in storage dtype -> float32 host array (tests compare against the numpy oracle)."""
    host = cp.asnumpy(array)
    if host.dtype == np.uint16:
        return bf16_bits_to_float32(host)
    return host.astype(np.float32)
