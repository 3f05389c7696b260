"""The numpy backend against transformers (torch, CPU, float32) on the same checkpoint files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence
from tests.conftest import ARCHS, VOCAB


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, device="numpy", **kw))


def _all_logits(engine: LLMEngine, ids: list[int]) -> np.ndarray:
    """Logits of every position of one prompt, computed through the paged cache in one step."""
    seq = Sequence("probe", 0, ids, SamplingParams(), seed=0)
    assert engine.block_manager.allocate(seq, len(ids))
    seq.num_computed_tokens = len(ids)
    runner = engine.runner
    input_ids, positions, meta = runner.prepare(SchedulerOutput([ScheduledSeq(seq, 0, len(ids))]))
    hidden = runner.model.forward(*runner.upload(input_ids, positions, meta), runner.kv_caches)
    engine.block_manager.free(seq)
    return runner.model.compute_logits(hidden)


def _max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_logits_match_transformers(arch, checkpoint, rng):
    path, model = checkpoint(arch)
    engine = _engine(path, max_model_len=256)
    for length in (1, 16, 37, 200):  # 200 > original_max_position_embeddings of the llama3 case
        ids = rng.integers(0, VOCAB, length).tolist()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        err = _max_rel_err(_all_logits(engine, ids), ref)
        assert err < 1e-4, f"{arch} length {length}: relative error {err:.2e}"


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers' full forward pass, recomputed each token (no generate():
    its EOS handling differs from ignore_eos, and its cache API changes between versions)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_greedy_with_chunking_and_preemption(arch, checkpoint, rng):
    path, model = checkpoint(arch)
    # 13 blocks of 16 tokens cannot hold all four sequences at full length (5+17+33+50 prompt tokens
    # plus 4 x 32 generated): preemption must happen. A 24-token budget forces chunked prefill.
    # A model whose every layer slides holds fewer blocks a sequence (those before the window go back): 9 blocks.
    blocks = 9 if arch == "mistral_window" else 13
    engine = _engine(path, max_model_len=128, max_num_batched_tokens=24, num_kv_blocks=blocks)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 17, 33, 50)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(model, prompt, 32)
        assert out.outputs[0].finish_reason == "length"
    assert engine.block_manager.usage == 0.0, "finished sequences must return every block"
