"""ops/cuda/upload.py: checkpoint tensors uploaded through pinned staging and rounded on the GPU carry the same
bits as the host path (CudaBackend.weight), across chunk boundaries, NaNs and overflow included; they are
complete on any stream once the loader exits; an engine loads the same weights and gives the same logits."""
from __future__ import annotations

import dataclasses

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.loader import CheckpointWeights, WeightsError
from engine.safetensors import float32_to_bf16_bits, save_file
from ops.backend import merging
from ops.cuda import CudaBackend
from ops.cuda.upload import WeightUploader
from tests.conftest import VOCAB
from tests.test_parity import _all_logits

TINY_STAGING = 4096  # every tensor but the smallest crosses several chunks
STORED = ("F32", "F16", "BF16")
_BITS = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}
_VIEW = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# (all-ones exponent, quiet bit) of each stored format
_NAN_BITS = {"F32": (0x7F800000, 0x00400000), "F16": (0x7C00, 0x0200), "BF16": (0x7F80, 0x0040)}

LEAST_F16 = 2.0 ** -24  # the least fp16 subnormal
EDGES = np.array([
    0.0, -0.0, 1.0, -1.0,
    1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11),  # fp16 ties: to even, down then up
    1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20,  # bf16 ties, and just past one
    LEAST_F16, LEAST_F16 / 2, 3 * LEAST_F16 / 2, LEAST_F16 / 2 * (1 + 2 ** -20), 5 * LEAST_F16 / 2,  # subnormal ties
    2 ** -14, 2 ** -14 - LEAST_F16 / 2, 2 ** -15 + 2 ** -25,  # around the least fp16 normal
    2 ** -149, 1e-40, -1e-30,  # float32 subnormal, below every fp16
    65504, 65519.99, 65520, -65520, 1e6, 3.0e38, -3.4e38,  # fp16's largest, its overflow tie, beyond
    np.inf, -np.inf, np.nan, -np.nan,
], dtype=np.float32)


def _stored(values: np.ndarray, stored: str) -> np.ndarray:
    if stored == "F32":
        return values
    if stored == "BF16":
        return float32_to_bf16_bits(values)
    with np.errstate(over="ignore"):
        return values.astype(np.float16)


def _random_bits(rng, stored: str, shape) -> np.ndarray:
    """Every bit pattern equally likely, except that NaNs are quiet: hosts disagree on signalling NaNs
    (numpy's own conversion keeps them, F16C hardware quiets them), so no reference exists for those."""
    dtype = _BITS[stored]
    bits = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
    exponent, quiet = _NAN_BITS[stored]
    bits[(bits & exponent) == exponent] |= dtype(quiet)  # infinities become NaNs too; EDGES has them
    return bits.view(_VIEW[stored])


def _write_checkpoint(path, tensors: dict[str, np.ndarray], stored: dict[str, str]) -> str:
    save_file(tensors, str(path / "model.safetensors"), stored)
    return str(path)


def _host_path(backend: CudaBackend, weights: CheckpointWeights, name: str):
    with np.errstate(over="ignore", invalid="ignore"):
        return backend.weight(weights.get(name))


def _assert_same_bits(got, want, what: str) -> None:
    got_bits, want_bits = cp.asnumpy(got).view(np.uint16), cp.asnumpy(want).view(np.uint16)
    assert got_bits.shape == want_bits.shape, f"{what}: shape {got_bits.shape} != {want_bits.shape}"
    bad = np.flatnonzero(got_bits != want_bits)
    assert bad.size == 0, (f"{what}: {bad.size} of {got_bits.size} differ, first at {bad[0]}: "
                           f"{got_bits.reshape(-1)[bad[0]]:#06x} != {want_bits.reshape(-1)[bad[0]]:#06x}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("stored", STORED)
def test_uploaded_bits_equal_the_host_path(stored, dtype, tmp_path, rng):
    tensors = {"edges": _stored(EDGES, stored), "random": _random_bits(rng, stored, (37, 259)),
               "more": _random_bits(rng, stored, (5, 259)), "one": _random_bits(rng, stored, (1,)),
               "empty": np.zeros((0, 8), _VIEW[stored])}
    path = _write_checkpoint(tmp_path, tensors, dict.fromkeys(tensors, stored))
    backend = CudaBackend(dtype)
    with CheckpointWeights(path) as weights:
        with WeightUploader(weights, dtype, staging_bytes=TINY_STAGING) as fetch:
            assert fetch.chunk_bytes == TINY_STAGING and tensors["random"].nbytes > 4 * TINY_STAGING
            got = {name: fetch(name) for name in tensors}
            # merged on the way (q/k/v, gate/up): each tensor straight into its rows
            merged = {("random", "more"): fetch("random", "more"), ("one", "edges"): fetch("one", "edges")}
            with pytest.raises(WeightsError, match="cannot merge random, edges"):
                fetch("random", "edges")
        for names, array in merged.items():
            want = cp.concatenate([_host_path(backend, weights, name) for name in names])
            assert array.flags.c_contiguous and array.base is None
            _assert_same_bits(array, want, f"{stored} {'+'.join(names)} -> {dtype}")
        for name, array in got.items():
            want = _host_path(backend, weights, name)
            assert array.dtype == want.dtype == backend.dtype
            assert array.shape == tuple(weights.info(name)[2])
            assert array.flags.c_contiguous and array.base is None  # its own allocation, not a view
            _assert_same_bits(array, want, f"{stored} {name} -> {dtype}")


def test_array_is_complete_on_another_stream_once_the_loader_exits(tmp_path, rng):
    # 64 MiB of F32 through 1 MiB chunks: the last copies and conversions are still queued when fetch returns
    values = rng.standard_normal((4096, 4096), dtype=np.float32)
    path = _write_checkpoint(tmp_path, {"w": values}, {"w": "F32"})
    with CheckpointWeights(path) as weights:
        with WeightUploader(weights, "float16", staging_bytes=2**20) as fetch:
            w = fetch("w")
        assert fetch.stream.done
        other = cp.cuda.Stream(non_blocking=True)  # waits for nothing the loader queued
        host = w.get(stream=other)
    np.testing.assert_array_equal(host.view(np.uint16), values.astype(np.float16).view(np.uint16))


def test_array_is_ready_on_the_compute_stream_without_a_host_sync(tmp_path, rng):
    values = rng.standard_normal((4096, 4096), dtype=np.float32)
    path = _write_checkpoint(tmp_path, {"w": float32_to_bf16_bits(values)}, {"w": "BF16"})
    with CheckpointWeights(path) as weights, cp.cuda.Stream(non_blocking=True):
        with WeightUploader(weights, "float16", staging_bytes=2**20) as fetch:
            # queued on the (non-blocking) compute stream at once: correct only if it waits for the upload
            host = fetch("w").get()
    want = (float32_to_bf16_bits(values).astype(np.uint32) << 16).view(np.float32).astype(np.float16)
    np.testing.assert_array_equal(host.view(np.uint16), want.view(np.uint16))


_spin_then_copy = cp.RawKernel(r"""
extern "C" __global__ void spin_then_copy(const unsigned short* src, unsigned short* dst, long long n,
                                          long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
""", "spin_then_copy")


def test_a_recycled_block_is_written_only_after_the_compute_stream_is_done_with_it(tmp_path, rng):
    cp.get_default_memory_pool().free_all_blocks()  # so the only free block of this size is the one freed below
    a, b = (rng.standard_normal((2048, 2048)).astype(np.float16) for _ in range(2))
    path = _write_checkpoint(tmp_path, {"a": a, "b": b}, {"a": "F16", "b": "F16"})
    with CheckpointWeights(path) as weights, cp.cuda.Stream(non_blocking=True) as compute:
        with WeightUploader(weights, "float16") as fetch:
            first = fetch("a")
            snapshot = cp.empty_like(first)
            # the compute stream reads `first` only after ~0.1 s; freeing it meanwhile hands its block back
            _spin_then_copy((132,), (256,), (first, snapshot, np.int64(first.size), np.int64(2 * 10**8)))
            first_ptr = first.data.ptr
            del first
            second = fetch("b")
            assert second.data.ptr == first_ptr, "the pool did not recycle the block; the test proves nothing"
        compute.synchronize()
        np.testing.assert_array_equal(snapshot.get().view(np.uint16), a.view(np.uint16))
        np.testing.assert_array_equal(second.get().view(np.uint16), b.view(np.uint16))


def test_non_float_tensor_names_file_and_tensor(tmp_path):
    path = _write_checkpoint(tmp_path, {"ids": np.arange(8, dtype=np.int32)}, {})
    with CheckpointWeights(path) as weights, WeightUploader(weights, "float16") as fetch:
        with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'ids' has dtype I32"):
            fetch("ids")


def _model_arrays(model) -> dict[str, object]:
    arrays = {"embed": model.embed, "final_norm": model.final_norm, "lm_head": model.lm_head}
    for i, layer in enumerate(model.layers):
        for field in dataclasses.fields(layer):
            if getattr(layer, field.name) is not None:
                arrays[f"layers.{i}.{field.name}"] = getattr(layer, field.name)
    return arrays


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["qwen2_untied", "qwen3"])
def test_engine_loads_the_same_weights_and_logits_as_the_host_path(arch, dtype, checkpoint, rng):
    path, _ = checkpoint(arch)  # float32 files: every weight is rounded on the GPU
    engine = LLMEngine(EngineConfig(model=path, device="cuda", dtype=dtype, max_model_len=256, max_num_seqs=8,
                                    num_kv_blocks=64, enforce_eager=True))
    runner = engine.runner
    ids = rng.integers(0, VOCAB, 40).tolist()
    uploaded = {name: array.copy() for name, array in _model_arrays(runner.model).items()}
    logits = cp.asnumpy(_all_logits(engine, ids))
    with CheckpointWeights(path) as weights:  # load again, the old way, into the same model and GEMM plans
        runner.model.load_weights(merging(lambda name: runner.backend.weight(weights.get(name)), cp))
    runner.backend.synchronize()
    host_path = _model_arrays(runner.model)
    assert uploaded.keys() == host_path.keys()
    for name in uploaded:
        _assert_same_bits(uploaded[name], host_path[name], f"{arch} {name} ({dtype})")
    np.testing.assert_array_equal(cp.asnumpy(_all_logits(engine, ids)).view(np.uint16), logits.view(np.uint16))
