"""Tensor parallelism on the numpy backend (issue #15): the model sharded over 2 and 4 ranks, run as threads that
all-reduce and all-gather through engine.parallel.ThreadGroup, gives the unsharded model's logits, for a prompt
and then decode steps through each rank's own paged KV cache (its heads only). Four ranks with two KV heads
replicate each KV head on two ranks. A model that does not split evenly is refused by name."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from engine.config import ConfigError, ModelConfig
from engine.loader import CheckpointWeights
from engine.model_runner import _paged_cache
from engine.models.llama import LlamaModel
from engine.parallel import TensorParallel, ThreadGroup, sharded_fetch
from ops.backend import NumpyBackend
from ops.metadata import AttentionMetadata
from tests.conftest import VOCAB

BLOCK = 16


def _run(model, c: ModelConfig, steps: list[list[int]], put=np.asarray) -> list:
    """Logits of each step's last token; steps[0] is the prompt, each later step one token, one sequence.
    put: host arrays to the model's backend (cupy.asarray on the GPU)."""
    b = model.backend
    _, caches = _paged_cache(b, c, 8, BLOCK)
    out, done = [], 0
    for ids in steps:
        n = len(ids)
        positions = np.arange(done, done + n, dtype=np.int32)
        meta = AttentionMetadata(query_start_loc=put(np.array([0, n], np.int32)),
                                 seq_lens=put(np.array([done + n], np.int32)),
                                 block_tables=put(np.arange(8, dtype=np.int32)[None, :]),
                                 slot_mapping=put(positions.copy()), max_query_len=n, max_seq_len=done + n)
        hidden = model.forward(put(np.array(ids, np.int32)), put(positions), meta, caches)
        out.append(model.compute_logits(hidden[-1:]))
        done += n
    return out


def _models(path: str, world: int):
    c = ModelConfig.from_pretrained(path)
    backend = NumpyBackend()
    weights = CheckpointWeights(path)
    with backend.weight_loader(weights) as fetch:
        whole = LlamaModel(c, backend, 128)
        whole.load_weights(fetch)
        group, ranks = ThreadGroup(world), []
        for r in range(world):
            tp = TensorParallel(r, world, group.for_rank(r))
            model = LlamaModel(tp.rank_config(c), NumpyBackend(), 128, tp)
            model.load_weights(sharded_fetch(fetch, c, tp, np.asarray))
            ranks.append(model)
    return c, whole, ranks


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("arch", ["qwen2_untied", "llama3_scaled", "qwen3", "mistral_window"])
def test_sharded_forward_equals_the_whole_model(checkpoint, rng, arch, world):
    path, _ = checkpoint(arch)
    c, whole, ranks = _models(path, world)
    prompt = rng.integers(0, VOCAB, 45).tolist()
    steps = [prompt] + [[int(t)] for t in rng.integers(0, VOCAB, 3)]
    want = _run(whole, c, steps)
    got: list = [None] * world
    errors = []

    def rank_main(r):
        try:
            got[r] = _run(ranks[r], ranks[r].config, steps)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for r in range(world):
        for step, (ours, ref) in enumerate(zip(got[r], want)):
            assert ours.shape == ref.shape == (1, VOCAB)
            err = float(np.abs(ours - ref).max() / np.abs(ref).max())
            assert err < 1e-5, f"{arch} x{world} rank {r} step {step}: relative error {err:.2e}"


def test_uneven_splits_are_refused_by_name():
    def config(heads, kv, inter, vocab=96):
        return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 96,
                                      "intermediate_size": inter, "num_hidden_layers": 1,
                                      "num_attention_heads": heads, "num_key_value_heads": kv})
    with pytest.raises(ConfigError, match="over 8 ranks needs num_attention_heads divisible by 8; it is 4"):
        TensorParallel(0, 8, None).rank_config(config(4, 4, 96))
    with pytest.raises(ConfigError, match="over 8 ranks needs intermediate_size divisible by 8; it is 100"):
        TensorParallel(0, 8, None).rank_config(config(8, 4, 100))
    with pytest.raises(ConfigError, match="needs num_key_value_heads \\(4\\) to divide 3 or be a multiple"):
        TensorParallel(0, 3, None).rank_config(config(12, 4, 96))
    c = TensorParallel(1, 8, None).rank_config(config(8, 2, 96, vocab=128))  # 2 KV heads, each on 4 ranks
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (1, 1, 12, 16)
