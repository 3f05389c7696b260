"""The fusion pass (ops/fusion.py): the plan it makes of each model family is what LlamaModel.forward launches;
a run of row ops becomes one kernel that computes what the ops one by one compute, stores only what outlives
it, and moves the bytes the plan says; `cupyllm plan` and `cupyllm kernels` print them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from api import cli
from engine.config import ModelConfig
from engine.models.llama import LlamaModel, layer_ops
from ops import fusion, jit, reference
from ops.backend import NumpyBackend
from ops.metadata import AttentionMetadata

FAMILIES = {  # architecture, extra config fields
    "qwen2": ("Qwen2ForCausalLM", {}),
    "llama": ("LlamaForCausalLM", {}),
    "llama-bias": ("LlamaForCausalLM", {"attention_bias": True}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}),
    # a sparse MLP (one moe op) after a dense first layer, and Qwen2-MoE's shared expert beside the experts
    "qwen3-moe": ("Qwen3MoeForCausalLM", {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 32, "mlp_only_layers": [0]}),
    "qwen2-moe": ("Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                          "shared_expert_intermediate_size": 48}),
}
# the backend op each kernel of the plan is
LAUNCH = {"add+rms_norm": "add_rms_norm", "gemm": "linear", "gemm+bias": "linear", "rope+cache_write": "rope_and_cache",
          "qk_norm+rope+cache_write": "rope_and_cache", "attention": "attention", "silu_mul": "silu_and_mul",
          # --quantization fp8: each GEMM input quantized by the kernel that makes it
          "add+rms_norm+quantize_fp8": "add_rms_norm_fp8", "quantize_fp8": "quantize_fp8",
          "silu_mul+quantize_fp8": "silu_and_mul_fp8", "moe": "moe"}


def config(family: str) -> ModelConfig:
    arch, extra = FAMILIES[family]
    return ModelConfig.from_dict({"architectures": [arch], "vocab_size": 64, "hidden_size": 64,
                                  "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
                                  "tie_word_embeddings": True, **extra})


class Recording(NumpyBackend):
    """The numpy backend, logging each op it runs (and whether a linear had a bias)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        for name in ("embedding", "rms_norm", "add_rms_norm", "linear", "silu_and_mul", "rope_and_cache",
                     "attention", "rms_norm_fp8", "add_rms_norm_fp8", "silu_and_mul_fp8", "quantize_fp8", "moe"):
            setattr(self, name, self._logged(name, getattr(NumpyBackend, name)))

    def _logged(self, name, fn):
        def run(*args):
            self.calls.append(name + ("+bias" if name == "linear" and args[2] is not None else ""))
            return fn(*args)
        return run


@pytest.mark.parametrize("fp8,w8a16", [(False, False), (True, False), (True, True)], ids=["fp16", "fp8", "w8a16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_is_what_the_model_launches(family, fp8, w8a16, monkeypatch):
    """fp8 steps of more than quant.W8A16_MAX_TOKENS tokens quantize GEMM inputs; w8a16: a step within it."""
    from ops import quant
    monkeypatch.setattr(quant, "W8A16_MAX_TOKENS", 8 if w8a16 else 0)
    c = config(family)
    if fp8 and c.moe is not None:
        pytest.skip("fp8 is refused for mixture-of-experts models (tests/test_moe.py)")
    ops, buffers = layer_ops(c, fp8, w8a16)
    kernels = fusion.plan(ops)
    want = [LAUNCH[k.name] + ("+bias" if k.name == "gemm+bias" else "") for k in kernels]
    b = Recording()
    model = LlamaModel(c, b, 64)
    rng = np.random.default_rng(0)
    model.load_weights(lambda *names: np.concatenate([rng.standard_normal(_shape(c, n)).astype(np.float32)
                                                      for n in names]))
    if fp8:
        model.quantize_linears(b.quantize_weight)
    kv = [(b.zeros((4, c.num_key_value_heads, 16, c.head_dim)),) * 2 for _ in range(c.num_hidden_layers)]
    meta = AttentionMetadata(np.array([0, 1, 2], np.int32), np.array([1, 1], np.int32),
                             np.array([[0], [1]], np.int32), np.array([0, 16], np.int32), 1, 1)
    model.forward(np.array([1, 2], np.int32), np.zeros(2, np.int32), meta, kv)
    per_layer = len(want)
    # embedding, rms_norm, layer 0 (no residual add before it), layers 1.., the final add + norm
    layers = b.calls[2:-1]
    assert b.calls[:2] == ["embedding", "rms_norm_fp8" if fp8 and not w8a16 else "rms_norm"]
    assert b.calls[-1] == "add_rms_norm"
    if c.moe is not None:  # the last layer is sparse (qwen3-moe's first is dense): compare it from the end
        assert layers[-per_layer:] == want
        assert len(kernels) == 7  # the MLP's gemm, silu_mul, gemm are one moe op
        return
    assert layers[:per_layer - 1] == want[1:]
    for i in range(1, c.num_hidden_layers):
        got = layers[per_layer - 1 + (i - 1) * per_layer:][:per_layer]
        assert got == want, f"layer {i}: model launches {got}, plan says {want}"
    assert len(kernels) == (10 if fp8 and not w8a16 else 9)  # fp8: attention's output has a quantizer of its own
    assert len(fusion.plan(ops, fuse=False)) > len(kernels)


def _shape(c, name):
    from engine.models.llama import expected_shapes
    return expected_shapes(c)[name]


def test_stores_only_what_outlives_the_kernel():
    """y = rms_norm(x) feeds an add in the same kernel and nothing else: it stays in registers."""
    h = 40
    ops = (fusion.rms_norm("x", "w", "y", h), fusion.add("y", "r", "z", h))
    buffers = {n: fusion.Buffer(n, h, weight=n == "w") for n in ("x", "w", "y", "r", "z")}
    kernels = fusion.plan(list(ops) + [fusion.Op("proj", fusion.GEMM, ("z", "w"), ("x",))])
    assert [k.name for k in kernels] == ["rms_norm+add", "gemm"]
    assert fusion.stored(kernels, buffers)[0] == ["z"]
    assert fusion.operands(ops, ("z",)) == ["x", "w", "r", "z"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_generated_chain_equals_the_ops_one_by_one(dtype):
    """norm, then add, then norm again: a chain written nowhere by hand; each intermediate rounded as stored."""
    t, h = 5, 200
    rng = np.random.default_rng(1)
    x, r = (rng.standard_normal((t, h)).astype(dtype) for _ in range(2))
    w1, w2 = (rng.standard_normal(h).astype(dtype) for _ in range(2))
    ops = (fusion.rms_norm("x", "w1", "y", h), fusion.add("y", "r", "r", h), fusion.rms_norm("r", "w2", "out", h))
    call = fusion.row_kernel(ops, frozenset({"w1", "w2"}), ("r", "out"))
    got_r, out = r.copy(), np.full((t, h), np.nan, dtype)
    with jit.record() as launches:
        call(x, w1, got_r, w2, out, eps0=1e-6, eps1=1e-5)
    y = np.empty((t, h), np.float32)
    reference.rms_norm(x.astype(np.float32), w1.astype(np.float32), 1e-6, y)
    want_r = (y.astype(dtype).astype(np.float32) + r.astype(np.float32)).astype(dtype)
    want = np.empty((t, h), np.float32)
    reference.rms_norm(want_r.astype(np.float32), w2.astype(np.float32), 1e-5, want)
    tol = 2e-3 if dtype == np.float16 else 2e-6
    np.testing.assert_allclose(got_r.astype(np.float32), want_r.astype(np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(out.astype(np.float32), want, rtol=4 * tol, atol=4 * tol)
    # the plan's bytes are the launch's: x, w1, r, w2 read once; r and out written once
    buffers = {n: fusion.Buffer(n, h, weight=n.startswith("w")) for n in ("x", "w1", "w2", "y", "r", "out")}
    kernel = fusion.Kernel(fusion.ROW, list(ops))
    itemsize = np.dtype(dtype).itemsize
    assert fusion.bytes_moved(kernel, ["r", "out"], buffers, t, itemsize) == launches[0].bytes_moved()


def test_cli_plan_and_kernels(capsys, tmp_path, monkeypatch):
    assert cli.main(["plan", "--model", "perf/configs/qwen2.5-7b", "--tokens", "1,256", "--json", "--unfused"]) == 0
    report = json.loads(capsys.readouterr().out)
    fused, unfused = report["plans"]["fused"]["1"], report["plans"]["unfused"]["1"]
    assert [r["kernel"] for r in fused] == ["add+rms_norm", "gemm+bias", "rope+cache_write", "attention", "gemm",
                                            "add+rms_norm", "gemm", "silu_mul", "gemm"]
    assert len(unfused) == 13
    weights = 3584 * (3584 + 2 * 512 + 3584 + 3 * 18944) * 2  # qkv, o, gate_up, down of Qwen2.5-7B in fp16
    assert weights < fusion.totals(fused)[1] < weights * 1.01  # at T=1 the step is its weights
    assert cli.main(["plan", "--model", "perf/configs/qwen2.5-7b"]) == 0
    assert "9 launches" in capsys.readouterr().out

    monkeypatch.setenv("CUPYLLM_KERNEL_CACHE", str(tmp_path))
    from ops.jit.cache import KernelCache  # the CLI reads the directory the environment names
    KernelCache(tmp_path, compiler=lambda *a: b"cubin").get("// source", "k", "sm_90")
    assert cli.main(["kernels", "--list"]) == 0
    out = capsys.readouterr().out
    assert "1 kernels" in out and " k " in out and "sm_90" in out
    assert cli.main(["kernels", "--clear"]) == 0
    assert "removed 1 kernels" in capsys.readouterr().out and not list(tmp_path.glob("*.cubin"))
