"""The NCCL communicator (ops/cuda/nccl.py) on one GPU: a single-rank group, which runs every tensor-parallel code
path of the model (sharded load, local embedding ids, all-reduce and all-gather calls) on the CUDA backend, gives
the logits of the model without tensor parallelism; and the collectives on a one-rank communicator, fp16, fp32 and
bf16 bits. Two ranks wait for a machine with two GPUs (docs/scaling.md)."""
from __future__ import annotations

import cupy as cp  # tests/gpu/conftest.py collects these files only where a GPU is
import numpy as np

from engine.config import ModelConfig
from engine.loader import CheckpointWeights
from engine.models.llama import LlamaModel
from engine.parallel import TensorParallel, sharded_fetch
from ops.cuda import CudaBackend, nccl
from tests.conftest import VOCAB
from tests.test_tensor_parallel import _run


def test_single_rank_tensor_parallel_model_equals_the_whole_model(checkpoint, rng):
    path, _ = checkpoint("qwen2_untied")
    c = ModelConfig.from_pretrained(path)
    backend = CudaBackend("float16")
    weights = CheckpointWeights(path)
    tp = TensorParallel(0, 1, nccl.NcclGroup(1, 0, nccl.unique_id()))
    with backend.weight_loader(weights) as fetch:
        whole = LlamaModel(c, backend, 128)
        whole.load_weights(fetch)
        ranked = LlamaModel(tp.rank_config(c), backend, 128, tp)
        ranked.load_weights(sharded_fetch(weights.get, c, tp, backend.weight))
    steps = [rng.integers(0, VOCAB, 40).tolist(), [5], [17]]
    for ours, ref in zip(_run_gpu(ranked, tp.rank_config(c), steps), _run_gpu(whole, c, steps)):
        err = float(np.abs(ours - ref).max() / np.abs(ref).max())
        assert err < 1e-3, f"relative error {err:.2e}"  # the same kernels on the same fp16 weights


def _run_gpu(model, c, steps):
    """tests.test_tensor_parallel._run with the step's arrays on the device."""
    return [cp.asnumpy(x).astype(np.float32) for x in _run(model, c, steps, put=cp.asarray)]


def test_nccl_all_reduce_and_all_gather_on_a_one_rank_communicator():
    """Real NCCL calls (a one-rank communicator): the all-reduce leaves x as it is, the all-gather returns it."""
    group = nccl.NcclGroup(1, 0, nccl.unique_id())
    for dtype in (cp.float16, cp.float32, cp.uint16):
        x = cp.arange(12).astype(dtype).reshape(3, 4)
        want = cp.asnumpy(x).copy()
        group.all_reduce(x)
        cp.cuda.get_current_stream().synchronize()
        np.testing.assert_array_equal(cp.asnumpy(x), want)
        np.testing.assert_array_equal(cp.asnumpy(group.all_gather(x)), want)
