"""Tensor parallelism on the numpy backend (issue #15): the model sharded over 2 and 4 ranks, run as threads that
all-reduce and all-gather through engine.parallel.ThreadGroup, gives the unsharded model's logits, for a prompt
and then decode steps through each rank's own paged KV cache (its heads only). Four ranks with two KV heads
replicate each KV head on two ranks. The mixtures of experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE),
every expert's intermediate dimension split over the ranks, give the whole model's logits at every prompt position
too. A model that does not split evenly (an expert's size included) is refused by name."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from engine.config import ConfigError, ModelConfig
from engine.loader import CheckpointWeights
from engine.memory import paged_cache
from engine.models.llama import LlamaModel
from engine.parallel import TensorParallel, ThreadGroup, sharded_fetch
from ops.backend import NumpyBackend
from ops.metadata import AttentionMetadata
from tests.conftest import VOCAB

BLOCK = 16


def _run(model, c: ModelConfig, steps: list[list[int]], put=np.asarray, every: bool = False) -> list:
    """Logits of each step's last token (every: of each of its tokens); steps[0] is the prompt, each later step one
    token, one sequence. put: host arrays to the model's backend (cupy.asarray on the GPU)."""
    b = model.backend
    _, caches = paged_cache(b, c, 8, BLOCK)
    out, done = [], 0
    for ids in steps:
        n = len(ids)
        positions = np.arange(done, done + n, dtype=np.int32)
        meta = AttentionMetadata(query_start_loc=put(np.array([0, n], np.int32)),
                                 seq_lens=put(np.array([done + n], np.int32)),
                                 block_tables=put(np.arange(8, dtype=np.int32)[None, :]),
                                 slot_mapping=put(positions.copy()), max_query_len=n, max_seq_len=done + n)
        hidden = model.forward(put(np.array(ids, np.int32)), put(positions), meta, caches)
        out.append(model.compute_logits(hidden if every else hidden[-1:]))
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


def _run_ranks(ranks: list, steps: list[list[int]], every: bool = False) -> list:
    """_run on each rank's model, the ranks as threads (their collectives meet in the ThreadGroup)."""
    world = len(ranks)
    got: list = [None] * world
    errors = []

    def rank_main(r):
        try:
            got[r] = _run(ranks[r], ranks[r].config, steps, every=every)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return got


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("arch", ["qwen2_untied", "llama3_scaled", "qwen3", "mistral_window"])
def test_sharded_forward_equals_the_whole_model(checkpoint, rng, arch, world):
    path, _ = checkpoint(arch)
    c, whole, ranks = _models(path, world)
    prompt = rng.integers(0, VOCAB, 45).tolist()
    steps = [prompt] + [[int(t)] for t in rng.integers(0, VOCAB, 3)]
    want = _run(whole, c, steps)
    got = _run_ranks(ranks, steps)
    for r in range(world):
        for step, (ours, ref) in enumerate(zip(got[r], want)):
            assert ours.shape == ref.shape == (1, VOCAB)
            err = float(np.abs(ours - ref).max() / np.abs(ref).max())
            assert err < 1e-5, f"{arch} x{world} rank {r} step {step}: relative error {err:.2e}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_sharded_mixture_of_experts_equals_the_whole_model(checkpoint, rng, arch, world):
    """Each rank holds every expert with I / world of its rows (gate, up) and columns (down), the router and
    Qwen2-MoE's shared expert gate whole, the shared expert split like a dense MLP; the all-reduced partial sums
    give the whole model's logits at every prompt position and for each decode step, to float32 rounding."""
    path, _ = checkpoint(arch)
    c, whole, ranks = _models(path, world)
    prompt = rng.integers(0, VOCAB, 45).tolist()
    steps = [prompt] + [[int(t)] for t in rng.integers(0, VOCAB, 3)]
    want = _run(whole, c, steps, every=True)
    got = _run_ranks(ranks, steps, every=True)
    for r in range(world):
        for step, (ours, ref) in enumerate(zip(got[r], want)):
            assert ours.shape == ref.shape == (len(steps[step]), VOCAB)
            err = float(np.abs(ours - ref).max() / np.abs(ref).max())
            assert err < 1e-5, f"{arch} x{world} rank {r} step {step}: relative error {err:.2e}"
            if step == 0:  # every prompt position's greedy token
                assert (ours.argmax(1) == ref.argmax(1)).all(), f"{arch} x{world} rank {r}: prefill argmax"
    m, h = c.moe, c.hidden_size
    e, i, s = m.num_experts, m.intermediate_size // world, m.shared_intermediate_size // world
    for model in ranks:  # the shapes each rank holds: every expert, its slice of each
        assert model.config.moe.intermediate_size == i and model.config.moe.shared_intermediate_size == s
        for layer in m.layers:
            experts = model.layers[layer].moe
            assert (experts.router.shape, experts.gate_up.shape, experts.down.shape) == ((e, h), (e, 2 * i, h),
                                                                                        (e, h, i))
            if s:
                assert (experts.shared_gate_up.shape, experts.shared_down.shape,
                        experts.shared_gate.shape) == ((2 * s, h), (h, s), (1, h))


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


def test_uneven_expert_splits_are_refused_by_name():
    def config(arch, **moe):
        return ModelConfig.from_dict({"architectures": [arch], "vocab_size": 96, "hidden_size": 96,
                                      "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8,
                                      "num_key_value_heads": 4, "num_experts": 4, "num_local_experts": 4,
                                      "num_experts_per_tok": 2, **moe})
    with pytest.raises(ConfigError, match="over 8 ranks needs moe_intermediate_size divisible by 8; it is 100"):
        TensorParallel(0, 8, None).rank_config(config("Qwen3MoeForCausalLM", moe_intermediate_size=100))
    with pytest.raises(ConfigError, match="over 4 ranks needs shared_expert_intermediate_size divisible by 4; "
                                          "it is 42"):
        TensorParallel(0, 4, None).check(config("Qwen2MoeForCausalLM", moe_intermediate_size=64,
                                                shared_expert_intermediate_size=42))
    with pytest.raises(ConfigError, match="over 8 ranks needs intermediate_size divisible by 8; it is 100"):
        TensorParallel(0, 8, None).check(config("MixtralForCausalLM", intermediate_size=100))  # its experts' size
    c = TensorParallel(3, 4, None).rank_config(config("Qwen2MoeForCausalLM", moe_intermediate_size=64,
                                                      shared_expert_intermediate_size=48))
    assert (c.intermediate_size, c.moe.intermediate_size, c.moe.shared_intermediate_size) == (24, 16, 12)
    assert (c.moe.num_experts, c.moe.top_k, c.moe.layers) == (4, 2, (0, 1))  # every expert, the same routing
