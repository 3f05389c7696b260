"""Shared fixtures: tiny random checkpoints written by transformers itself, one per supported family.

Weights are drawn wider than transformers' default init so that greedy choices are decisive
(no near-ties that float rounding could flip) and every layer matters to the logits.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

VOCAB = 1024

# name -> (transformers config class name, extra config fields)
ARCHS = {
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "llama3_scaled": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama_linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    # sliding windows shorter than the prompts: every layer (its blocks released), and Qwen2's last layer only
    "mistral_window": ("MistralConfig", dict(sliding_window=40)),
    "qwen2_window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=12, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=64, tie_word_embeddings=True)),
    # a head size off the powers of two (Phi-2's 80), wider than hidden / heads: the GPU kernels' other specialisations
    "llama_hd80": ("LlamaConfig", dict(head_dim=80)),
    # mixtures of experts: Mixtral (4 experts, 2 a token, renormalised), Qwen2-MoE with its shared expert and a dense
    # first layer (mlp_only_layers), Qwen3-MoE with 3 of 8 experts renormalised
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=96, mlp_only_layers=[0])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64,
                                         norm_topk_prob=True, head_dim=64)),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["CUPYLLM_CACHE"] = str(tmp_path_factory.mktemp("cupyllm-cache"))


def write_checkpoint(path, arch: str, seed: int = 0):
    """Save a tiny random model of family `arch` with transformers' save_pretrained; return (path, model)."""
    import torch
    import transformers

    from engine.demo import write_demo_tokenizer

    cls_name, extra = ARCHS[arch]
    config = getattr(transformers, cls_name)(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.12 if p.dim() > 1 else 0.05))
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    write_demo_tokenizer(str(path))
    return str(path), model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch) -> (dir, transformers model), built once per session."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = write_checkpoint(tmp_path_factory.mktemp(arch), arch)
        return built[arch]
    return get


@pytest.fixture
def rng(request):
    # CUPYLLM_TEST_SEED replays a failure: the seed each test printed
    seed = int(os.environ.get("CUPYLLM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{request.node.name}: seed {seed}")
    return np.random.default_rng(seed)
