"""FP8 on the GPU (issue #13): the generated quantizers against the interpreter, the cuBLASLt FP8 GEMM (outer-vector
scales, and the float32 fallback) against numpy on the same E4M3 codes, inside a CUDA graph too, and the engine with
--quantization fp8 against the numpy backend's FP8 model and the GPU's own fp16 run; --kv-cache-dtype fp8 (alone and
with FP8 weights) against the numpy backend's FP8 cache, prefill and decode, graphs and prefix-cache hits included."""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence
from ops import jit_ops, quant
from ops.cuda import to_float32
from ops.cuda.linear import Linear
from ops.jit import dtypes
from tests.conftest import VOCAB
from tests.gpu.test_jit_gpu import STORAGE, stored
from tests.test_parity import _all_logits

if int(cp.cuda.Device().compute_capability) < 89:
    pytest.skip("FP8 GEMMs need sm_89+", allow_module_level=True)


def assert_quantized(got, want, what):
    """GPU codes and scales against the interpreter's: rsqrtf/expf move the unrounded value by an ulp, so a rare
    fp16 rounding (and so a code) can go the other way; never by more than one E4M3 step."""
    (codes, scale), (want_codes, want_scale) = got, want
    np.testing.assert_allclose(scale, want_scale, rtol=2.0 ** -9, err_msg=what)
    step = np.abs(codes.astype(np.int16) - want_codes.astype(np.int16))
    assert step.max() <= 1 and (step > 0).mean() < 0.01, f"{what}: {(step > 0).sum()} codes differ, by {step.max()}"


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("h,inter", [(3584, 18944), (4096, 14336), (896, 4864), (2048, 1000)])
def test_quantizers_equal_the_interpreter(h, inter, dtype):
    rng = np.random.default_rng(h + inter)
    for t in (1, 5, 130):
        x, res, w = stored(rng, (t, h), dtype), stored(rng, (t, h), dtype), stored(rng, (h,), dtype)
        gu = stored(rng, (t, 2 * inter), dtype)
        cases = {"quantize_fp8": ([x], jit_ops.quantize_fp8, h),
                 "rms_norm_fp8": ([x, w], lambda x, w, c, s: jit_ops.rms_norm_fp8(x, w, 1e-6, c, s), h),
                 "add_rms_norm_fp8": ([x, res, w], lambda x, r, w, c, s: jit_ops.add_rms_norm_fp8(x, r, w, 1e-6, c, s),
                                      h),
                 "silu_and_mul_fp8": ([gu], jit_ops.silu_and_mul_fp8, inter)}
        for name, (inputs, fn, width) in cases.items():
            outs = [np.zeros((t, width), np.uint8), np.zeros((t, 1), np.float32)]
            cpu = [a.copy() for a in inputs + outs]
            gpu = [cp.asarray(a) for a in inputs + outs]
            fn(*cpu)
            fn(*gpu)
            gpu = [cp.asnumpy(a) for a in gpu]
            assert_quantized(gpu[-2:], cpu[-2:], f"{name} {dtype} T={t}")
            if name == "add_rms_norm_fp8":
                np.testing.assert_array_equal(gpu[1], cpu[1])  # the residual sum: exact


def _fp8_operands(rng, m, n, k, dtype):
    """x quantized per token and W per row on the GPU, and the numpy result of the same codes (float64)."""
    x = cp.asarray(stored(rng, (m, k), dtype))
    w = cp.asarray(stored(rng, (n, k), dtype))
    xq = quant.activation(cp, m, k)
    jit_ops.quantize_fp8(x, xq.codes, xq.scale)
    wq = quant.Fp8Weight(cp.empty((n, k), cp.uint8), cp.empty(n, cp.float32))
    jit_ops.quantize_fp8(w, wq.codes, wq.scale.reshape(n, 1))
    host = [cp.asnumpy(a) for a in (xq.codes, xq.scale, wq.codes, wq.scale)]
    want = (quant.dequantize_rows(host[0], host[1][:, 0]).astype(np.float64)
            @ quant.dequantize_rows(host[2], host[3]).astype(np.float64).T)
    # the GPU's quantizer is the interpreter's (ops/quant) on the same stored x
    codes, s = quant.quantize_rows(dtypes.to_float32(cp.asnumpy(x), dtypes.get(dtype)))
    np.testing.assert_array_equal(host[0], codes)
    np.testing.assert_array_equal(host[1][:, 0], s)
    return xq, wq, want


@pytest.mark.parametrize("scales", ["outer", "unit"])
@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("m,n,k,bias", [(1, 4608, 3584, True), (7, 3584, 18944, False), (64, 37888, 3584, False),
                                        (300, 3584, 3584, True)])
def test_fp8_linear_equals_numpy_on_the_same_codes(m, n, k, bias, dtype, scales):
    rng = np.random.default_rng(m * n)
    linear = Linear()
    linear.fp8_unit = {True, False} if scales == "unit" else set()
    xq, wq, want = _fp8_operands(rng, m, n, k, dtype)
    b = cp.asarray(stored(rng, (n,), dtype)) if bias else None
    if bias:
        want = want + to_float32(b)[None, :]
    out = cp.empty((m, n), STORAGE[dtype])
    linear(xq, wq, b, out)
    got = to_float32(out)
    # fp32 accumulation (any order) and one rounding to the output dtype
    half_ulp = 2.0 ** (-11 if dtype == "float16" else -8)
    tol = 2 * half_ulp * np.abs(want) + 2.0 ** -12 * np.sqrt(np.mean(want ** 2))
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off, max {np.abs(got - want).max()}"
    if scales == "outer" and linear.fp8_unit:  # the fallback ran, and was checked above
        pytest.skip(f"cuBLASLt {linear.lt.version} refuses outer-vector FP8 scales on this GPU")


def test_fp8_linear_in_a_cuda_graph():
    rng = np.random.default_rng(3)
    linear = Linear()
    xq, wq, want = _fp8_operands(rng, 8, 4608, 3584, "float16")
    out = cp.zeros((8, 4608), cp.float16)
    linear(xq, wq, None, out)  # plans the shape before capture
    eager = cp.asnumpy(out).copy()
    out.fill(0)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        linear(xq, wq, None, out)
        graph = stream.end_capture()
        graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(out), eager)


def test_engine_fp8_against_numpy_fp8_and_gpu_fp16(checkpoint, rng):
    """The GPU's FP8 model computes what the numpy backend's FP8 model computes (dequantized float32 math), up
    to fp16 rounding; its logits stay close to the GPU's own fp16 run; graphs give what eager gives."""
    path, _ = checkpoint("qwen2_untied")
    kw = dict(model=path, max_model_len=256, max_num_seqs=8)
    gpu8 = LLMEngine(EngineConfig(device="cuda", dtype="float16", quantization="fp8", **kw))
    assert gpu8.runner.model.fp8 and gpu8.runner.graphs is not None
    cpu8 = LLMEngine(EngineConfig(device="numpy", quantization="fp8", **kw))
    gpu16 = LLMEngine(EngineConfig(device="cuda", dtype="float16", **kw))
    cos_numpy, cos_fp16 = [], []
    for n in (5, 17, 40):
        ids = rng.integers(0, VOCAB, n).tolist()
        a = to_float32(_all_logits(gpu8, ids))
        b = _all_logits(cpu8, ids)
        c = to_float32(_all_logits(gpu16, ids))
        cos = lambda u, v: (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)  # noqa: E731
        cos_numpy += list(cos(a, b))
        cos_fp16 += list(cos(a, c))
    print(f"fp8 GPU vs fp8 numpy: cosine min {min(cos_numpy):.5f}; fp8 GPU vs fp16 GPU: min {min(cos_fp16):.4f} "
          f"mean {np.mean(cos_fp16):.4f}")
    assert min(cos_numpy) > 0.99  # same math but for fp16 rounding of activations (and the code flips it makes)
    assert np.mean(cos_fp16) > 0.97
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 20, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    eager = LLMEngine(EngineConfig(device="cuda", dtype="float16", quantization="fp8", enforce_eager=True, **kw))
    assert [o.outputs[0].token_ids for o in gpu8.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in eager.generate(prompts, params)]


def _prefill_then_decode(engine, ids):
    """Logits of the last token of `ids` computed by a decode step (one query row over the paged cache) after a
    prefill of the others: each step through the runner, eagerly, so that both attention kernels run."""
    seq = Sequence("probe", 0, ids, SamplingParams(), seed=0)
    assert engine.block_manager.allocate(seq, len(ids))
    runner, logits = engine.runner, None
    for start, n in ((0, len(ids) - 1), (len(ids) - 1, 1)):
        seq.num_computed_tokens = start + n
        input_ids, positions, meta = runner.prepare(SchedulerOutput([ScheduledSeq(seq, start, n)]))
        hidden = runner.model.forward(*runner.upload(input_ids, positions, meta), runner.kv_caches)
        logits = runner.model.compute_logits(hidden[-1:])
    engine.block_manager.free(seq)
    return logits


def _cosine(u, v):
    return (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["fp16-weights", "fp8-weights"])
def test_engine_fp8_kv_cache_against_numpy(checkpoint, rng, quantization):
    """An E4M3 KV cache on the GPU (written by the rope/cache kernel, read by prefill and decode attention) computes
    what the numpy backend's FP8 cache computes; graphs give what eager gives; a prefix-cache hit reads the cached
    codes back to the same output."""
    path, _ = checkpoint("qwen2_untied")
    kw = dict(model=path, max_model_len=256, max_num_seqs=8, kv_cache_dtype="fp8", quantization=quantization)
    gpu = LLMEngine(EngineConfig(device="cuda", dtype="float16", **kw))
    assert gpu.runner.kv_cache.dtype == np.uint8 and gpu.runner.graphs is not None
    cpu = LLMEngine(EngineConfig(device="numpy", **kw))
    prefill, decode = [], []
    for n in (5, 17, 40):
        ids = rng.integers(0, VOCAB, n).tolist()
        prefill += list(_cosine(to_float32(_all_logits(gpu, ids)), _all_logits(cpu, ids)))
        decode += list(_cosine(to_float32(_prefill_then_decode(gpu, ids)), _prefill_then_decode(cpu, ids)))
    print(f"fp8 KV cache ({quantization or 'fp16'} weights), GPU vs numpy cosine: prefill min {min(prefill):.5f}, "
          f"decode min {min(decode):.5f}")
    assert min(prefill) > 0.99 and min(decode) > 0.99
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 20, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    graphs = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]
    again = [o.outputs[0].token_ids for o in gpu.generate(prompts, params)]  # prompts' blocks now cached
    eager = LLMEngine(EngineConfig(device="cuda", dtype="float16", enforce_eager=True, **kw))
    assert graphs == again == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
