"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): the config read as transformers reads it, the
reference MoE against a token-by-token definition, and refusals. Parity with transformers is tests/test_parity.py
(its ARCHS hold the three families)."""
from __future__ import annotations

import numpy as np
import pytest
import transformers

from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.loader import WeightsError
from ops import reference
from tests.conftest import write_checkpoint


def _raw(arch: str, **fields) -> dict:
    raw = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, moe_intermediate_size=16)
    raw |= {"num_local_experts" if arch == "MixtralForCausalLM" else "num_experts": 4}
    return raw | fields


@pytest.mark.parametrize("cls, fields", [
    ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[3])),
    ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, mlp_only_layers=[0, 2],
                            norm_topk_prob=True)),
])
def test_sparse_layers_and_expert_shapes_are_the_ones_transformers_builds(cls, fields):
    """The layers transformers builds with a sparse block, and its experts' sizes, are what the config says to us."""
    config = getattr(transformers, cls)(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ours = ModelConfig.from_dict(config.to_dict() | {"architectures": [type(model).__name__]})
    blocks = [getattr(layer, "block_sparse_moe", None) or layer.mlp for layer in model.model.layers]
    sparse = tuple(i for i, block in enumerate(blocks) if hasattr(block, "experts"))
    assert ours.moe.layers == sparse and 0 < len(sparse)
    block = blocks[sparse[0]]
    assert ours.moe.num_experts == block.experts.gate_up_proj.shape[0]
    assert ours.moe.intermediate_size == block.experts.down_proj.shape[2]
    assert ours.moe.top_k == config.num_experts_per_tok
    assert ours.moe.shared_intermediate_size == (24 if cls == "Qwen2MoeConfig" else 0)
    assert ours.moe.normalize == (cls != "Qwen2MoeConfig")  # Mixtral always renormalises


def test_family_rules_follow_the_dense_sibling():
    mixtral = ModelConfig.from_dict(_raw("MixtralForCausalLM", sliding_window=64))
    assert (mixtral.sliding_window, mixtral.sliding_layers, mixtral.attention_bias) == (64, (0, 1, 2, 3), False)
    qwen2 = ModelConfig.from_dict(_raw("Qwen2MoeForCausalLM", shared_expert_intermediate_size=8))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.family == "Qwen2ForCausalLM"
    qwen3 = ModelConfig.from_dict(_raw("Qwen3MoeForCausalLM", use_sliding_window=True, sliding_window=32))
    assert qwen3.qk_norm and qwen3.sliding_layers == (0, 1, 2, 3)
    assert ModelConfig.from_dict(_raw("Qwen3MoeForCausalLM", sliding_window=32)).sliding_window == 0


@pytest.mark.parametrize("fields, message", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok (5) must be at most the number of experts (4)"),
    (dict(num_experts=0), "num_experts must be a positive integer for Qwen3MoeForCausalLM, got 0"),
    (dict(num_experts=512, num_experts_per_tok=2), "supported up to 256 experts and 16 a token"),
])
def test_impossible_expert_counts_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(_raw("Qwen3MoeForCausalLM", **fields))
    assert message in str(e.value)


def _moe_by_definition(x, router, gate_up, down, k, normalize, shared=None):
    """One token at a time, one expert at a time: the MoE MLP as the model card states it."""
    out = np.zeros_like(x)
    inter = down.shape[2]
    for t, row in enumerate(x):
        logits = router @ row
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = sorted(range(len(p)), key=lambda e: -p[e])[:k]
        w = p[top] / (p[top].sum() if normalize else 1.0)
        for e, weight in zip(top, w):
            h = gate_up[e] @ row
            act = h[:inter] / (1 + np.exp(-h[:inter])) * h[inter:]
            out[t] += weight * (down[e] @ act)
        if shared is not None:
            s_gate_up, s_down, s_gate = shared
            h = s_gate_up @ row
            s = s_down.shape[1]
            out[t] += (s_down @ (h[:s] / (1 + np.exp(-h[:s])) * h[s:])) / (1 + np.exp(-(s_gate @ row)[0]))
    return out


@pytest.mark.parametrize("normalize, with_shared", [(True, False), (False, True)])
def test_reference_moe_equals_the_definition(rng, normalize, with_shared):
    t, h, e, i, k = 37, 24, 6, 10, 3
    x = rng.normal(size=(t, h)).astype(np.float32)
    router, gate_up = rng.normal(size=(e, h)).astype(np.float32), rng.normal(0, 0.3, (e, 2 * i, h)).astype(np.float32)
    down = rng.normal(0, 0.3, (e, h, i)).astype(np.float32)
    shared = (rng.normal(0, 0.3, (16, h)).astype(np.float32), rng.normal(0, 0.3, (h, 8)).astype(np.float32),
              rng.normal(size=(1, h)).astype(np.float32)) if with_shared else None
    out = np.empty_like(x)
    reference.moe(x, router, gate_up, down, k, normalize, out, shared)
    np.testing.assert_allclose(out, _moe_by_definition(x, router, gate_up, down, k, normalize, shared),
                               rtol=2e-5, atol=2e-5)


def test_routing_weights_and_ids():
    logits = np.array([[0.0, 2.0, 1.0, 2.0], [5.0, -1.0, 0.0, 0.0]], np.float32)
    ids, w = reference.moe_route(logits, 2, normalize=True)
    assert ids.tolist() == [[1, 3], [0, 2]]  # a tie goes to the lower expert
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    _, raw = reference.moe_route(logits, 2, normalize=False)
    p = np.exp(logits[1]) / np.exp(logits[1]).sum()
    np.testing.assert_allclose(raw[1], [p[0], p[2]], rtol=1e-6)


def test_fp8_and_a_missing_expert_are_refused_clearly(tmp_path):
    path, _ = write_checkpoint(tmp_path / "m", "qwen3_moe")
    with pytest.raises(ConfigError, match="--quantization fp8 is not supported for mixture-of-experts models"):
        LLMEngine(EngineConfig(model=path, device="numpy", quantization="fp8"))
    from safetensors.numpy import load_file, save_file
    tensors = load_file(f"{path}/model.safetensors")
    del tensors["model.layers.1.mlp.experts.7.down_proj.weight"]
    save_file(tensors, f"{path}/model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.experts\.7\.down_proj\.weight"):
        LLMEngine(EngineConfig(model=path, device="numpy"))
