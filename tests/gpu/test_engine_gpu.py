"""The whole engine on the GPU: logits against transformers (fp32) on the same checkpoint files in
fp16 and bf16, graph replay equal to eager, and batch composition not changing anyone's tokens."""
from __future__ import annotations

import numpy as np
import pytest

cp = pytest.importorskip("cupy")
if cp.cuda.runtime.getDeviceCount() == 0:
    pytest.skip("no GPU", allow_module_level=True)

import torch  # noqa: E402  (the reference only)

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from tests.conftest import ARCHS, VOCAB  # noqa: E402
from tests.test_parity import _all_logits  # noqa: E402


def _engine(path, dtype, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, device="cuda", dtype=dtype, max_model_len=256, max_num_seqs=8, **kw))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers_fp32(arch, dtype, checkpoint, rng):
    path, model = checkpoint(arch)
    engine = _engine(path, dtype, enforce_eager=True)
    ids = rng.integers(0, VOCAB, 120).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = _all_logits(engine, ids)
    ours = engine.backend.to_host(ours)
    if ours.dtype == np.uint16:
        ours = (ours.astype(np.uint32) << 16).view(np.float32)
    ours = ours.astype(np.float32)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{arch} {dtype}: max rel err {rel:.2e}, teacher-forced argmax agreement {agree:.3f}")
    assert rel < 2e-2 and agree >= 0.99


def test_graph_replay_equals_eager(checkpoint, rng):
    path, _ = checkpoint("qwen2_untied")
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 20, 7, 33, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    graphed = _engine(path, "float16")
    assert graphed.runner.graphs is not None and graphed.runner.graphs.sizes == [1, 2, 4, 8]
    eager = _engine(path, "float16", enforce_eager=True)
    a = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert a == b


def test_mixed_batch_with_prefix_hits_and_preemption_matches_alone(checkpoint, rng):
    path, _ = checkpoint("llama3_scaled")
    shared = rng.integers(0, VOCAB, 40).tolist()
    prompts = [shared + rng.integers(0, VOCAB, n).tolist() for n in (2, 9, 30)] + \
              [rng.integers(0, VOCAB, n).tolist() for n in (5, 50)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    alone = []
    for p in prompts:
        e = _engine(path, "float16")
        alone.append(e.generate([p], params)[0].outputs[0].token_ids)
    busy = _engine(path, "float16", max_num_batched_tokens=24, num_kv_blocks=16)
    together = [o.outputs[0].token_ids for o in busy.generate(prompts, params)]
    assert busy.scheduler.num_preemptions > 0
    assert max(o.num_cached_tokens for o in busy.generate(prompts[:2], params)) >= 32
    assert together == alone
