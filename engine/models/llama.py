"""The decoder-only transformer of Llama, Mistral, Qwen2/2.5 and Qwen3, written once against a backend.

Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm on q and k before RoPE; both are flags of the
same layer. q/k/v and gate/up projections are merged at load time so each is one GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from engine.config import ConfigError, ModelConfig
from engine.models import moe
from ops import fusion, quant
from ops.fusion import ATTENTION, BIAS, GEMM, HEAD, Buffer, Op
from ops.metadata import AttentionMetadata
from ops.quant import Fp8Weight
from ops.reference import rope_cos_sin


@dataclass(slots=True)
class LayerWeights:
    input_norm: Any  # [H]
    qkv: Any  # [(Hq + 2*Hkv) * D, H]
    qkv_bias: Any  # [(Hq + 2*Hkv) * D] or None
    o_proj: Any  # [H, Hq * D]
    o_bias: Any  # [H] or None
    q_norm: Any  # [D] or None (Qwen3)
    k_norm: Any
    post_norm: Any  # [H]
    gate_up: Any  # [2 * I, H] (None in a sparse layer)
    down: Any  # [H, I]
    moe: moe.MoeWeights | None = None  # the experts of a sparse layer (Mixtral, Qwen-MoE)


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the model reads, with its shape."""
    h, d = c.hidden_size, c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (c.q_size, h),
            p + "self_attn.k_proj.weight": (c.kv_size, h),
            p + "self_attn.v_proj.weight": (c.kv_size, h),
            p + "self_attn.o_proj.weight": (h, c.q_size),
        }
        shapes |= moe.shapes(c, i) if c.sparse(i) else {
            p + "mlp.gate_proj.weight": (c.intermediate_size, h),
            p + "mlp.up_proj.weight": (c.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, c.intermediate_size),
        }
        if c.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (c.q_size,), p + "self_attn.k_proj.bias": (c.kv_size,),
                       p + "self_attn.v_proj.bias": (c.kv_size,)}
            if c.o_proj_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
        if c.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return shapes


def layer_ops(c: ModelConfig, fp8: bool = False, w8a16: bool = False,
              layer: int | None = None) -> tuple[list[Op], dict[str, Buffer]]:
    """Decoder layer `layer` (any but the first; default the last) as the op list the fusion pass groups
    (ops/fusion.py), with its buffers. LlamaModel.forward launches what fusion.plan makes of it; tests/test_fusion.py
    checks that. A sparse layer's MLP is one MOE op (fp8 is refused for MoE models).
    fp8: the projections are E4M3 (--quantization fp8) and each GEMM input is quantized per token on its way;
    with w8a16 (a step of at most quant.W8A16_MAX_TOKENS tokens) the inputs stay in the model dtype."""
    h, d, inter, qkv = c.hidden_size, c.head_dim, c.intermediate_size, c.q_size + 2 * c.kv_size
    w = 1 if fp8 else 0  # a projection weight's itemsize (0: the model's); the per-row scales are beside it
    b = [Buffer("hidden", h), Buffer("residual", h, kept=True), Buffer("x", h), Buffer("qkv", qkv),
         Buffer("attn", c.q_size), Buffer("gate_up", 2 * inter), Buffer("act", inter),
         Buffer("cos_sin", d, itemsize=4), Buffer("kv_cache", 2 * c.kv_size, kept=True, cache=True),
         Buffer("input_norm", h, weight=True), Buffer("post_norm", h, weight=True),
         Buffer("qkv_proj", h, weight=True, rows=qkv, itemsize=w), Buffer("o_proj", c.q_size, weight=True, rows=h,
                                                                           itemsize=w),
         Buffer("gate_up_proj", h, weight=True, rows=2 * inter, itemsize=w),
         Buffer("down_proj", inter, weight=True, rows=h, itemsize=w),
         Buffer("qkv_bias", qkv, weight=True), Buffer("o_bias", h, weight=True),
         Buffer("q_norm", d, weight=True), Buffer("k_norm", d, weight=True)]
    b += [Buffer(n + "_q", width, itemsize=1) for n, width in (("x", h), ("attn", c.q_size), ("act", inter))]
    b += [Buffer(n + "_scale", 1, itemsize=4) for n in ("x", "attn", "act")]
    b += [Buffer(n + "_scales", rows, weight=True, itemsize=4) for n, rows in
          (("qkv_proj", qkv), ("o_proj", h), ("gate_up_proj", 2 * inter), ("down_proj", h))]

    def gemm(name, x, out):  # fp8: x's codes and scales (w8a16: x), the weight's codes and scales
        if not fp8:
            return [Op(name, GEMM, (x, name), (out,))]
        if w8a16:
            return [Op(name, GEMM, (x, name, name + "_scales"), (out,))]
        return [Op(name, GEMM, (x + "_q", x + "_scale", name, name + "_scales"), (out,))]

    def quantized(x, width):  # fp8: x quantized per token, in the kernel that made x
        return [fusion.quantize_fp8(x, x + "_q", x + "_scale", width)] if fp8 and not w8a16 else []

    o_bias = c.o_proj_bias
    ops = [fusion.add("hidden", "residual", "residual", h), fusion.rms_norm("residual", "input_norm", "x", h),
           *quantized("x", h), *gemm("qkv_proj", "x", "qkv")]
    ops += [Op("qkv_bias", BIAS, ("qkv", "qkv_bias"), ("qkv",))] if c.attention_bias else []
    ops += [Op("qk_norm", HEAD, ("qkv", "q_norm", "k_norm"), ("qkv",))] if c.qk_norm else []
    ops += [Op("rope", HEAD, ("qkv", "cos_sin"), ("qkv",)), Op("cache_write", HEAD, ("qkv",), ("kv_cache",)),
            Op("attention", ATTENTION, ("qkv", "kv_cache"), ("attn",)),
            *quantized("attn", c.q_size), *gemm("o_proj", "attn", "hidden")]
    ops += [Op("o_bias", BIAS, ("hidden", "o_bias"), ("hidden",))] if o_bias else []
    ops += [fusion.add("hidden", "residual", "residual", h), fusion.rms_norm("residual", "post_norm", "x", h),
            *quantized("x", h)]
    if not c.sparse(c.num_hidden_layers - 1 if layer is None else layer):
        ops += [*gemm("gate_up_proj", "x", "gate_up"), fusion.silu_mul("gate_up", "gate_up", "act", inter),
                *quantized("act", inter), *gemm("down_proj", "act", "hidden")]
    else:
        m, e = c.moe, c.moe.num_experts
        s = m.shared_intermediate_size
        b += [Buffer("router", h, weight=True, rows=e),
              Buffer("experts_gate_up", h, weight=True, rows=2 * m.intermediate_size, experts=e, picks=m.top_k),
              Buffer("experts_down", m.intermediate_size, weight=True, rows=h, experts=e, picks=m.top_k),
              Buffer("expert_rows", m.top_k * (6 * m.intermediate_size + 2 * h)),  # written, then read back
              Buffer("shared_expert", h, weight=True, rows=3 * s + 1)]
        ops.append(Op("moe", fusion.MOE, ("x", "router", "experts_gate_up", "experts_down", "expert_rows")
                      + (("shared_expert",) if s else ()), ("hidden",)))
    return ops, {buf.name: buf for buf in b}


class LlamaModel:
    def __init__(self, config: ModelConfig, backend, max_positions: int, tp=None):
        """tp: an engine.parallel.TensorParallel (this rank's part of the model; `config` is its rank_config), or
        None: the whole model."""
        self.config = config
        self.backend = backend
        self.tp = tp
        self.layers: list[LayerWeights] = []
        self.embed = self.final_norm = self.lm_head = None
        # float32 on every backend: positions up to 128K need more than fp16's 11 bits of mantissa
        self.cos_sin = backend.from_host(
            rope_cos_sin(config.head_dim, max_positions, config.rope_theta, config.rope_scaling))
        self.scale = config.head_dim ** -0.5

    def load_weights(self, fetch: Callable[[str], Any]) -> None:
        """`fetch(name)` returns checkpoint tensor `name` as a backend array in the compute dtype, and
        `fetch(a, b, ...)` those tensors merged along their first axis (q/k/v, gate/up): on the GPU each
        is uploaded straight into its rows of the merged weight."""
        c = self.config
        self.embed = fetch("model.embed_tokens.weight")
        self.final_norm = fetch("model.norm.weight")
        # tensor parallel: the embedding's last row is the zero row of ids other ranks hold (not a logit)
        tied = self.embed[:-1] if self.tp is not None else self.embed
        self.lm_head = tied if c.tie_word_embeddings else fetch("lm_head.weight")
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            merged = lambda *names: fetch(*(p + n for n in names))  # noqa: E731
            self.layers.append(LayerWeights(
                input_norm=fetch(p + "input_layernorm.weight"),
                qkv=merged("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                qkv_bias=merged("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
                if c.attention_bias else None,
                o_proj=fetch(p + "self_attn.o_proj.weight"),
                o_bias=fetch(p + "self_attn.o_proj.bias") if c.o_proj_bias else None,
                q_norm=fetch(p + "self_attn.q_norm.weight") if c.qk_norm else None,
                k_norm=fetch(p + "self_attn.k_norm.weight") if c.qk_norm else None,
                post_norm=fetch(p + "post_attention_layernorm.weight"),
                gate_up=None if c.sparse(i) else merged("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                down=None if c.sparse(i) else fetch(p + "mlp.down_proj.weight"),
                moe=moe.load(c, i, fetch) if c.sparse(i) else None,
            ))

    def quantize_linears(self, quantize: Callable[[Any], Any]) -> None:
        """Replace each layer's projection weights by quantize(w) (--quantization fp8). The embedding, the norms
        and lm_head stay in the model dtype, as vLLM's fp8 leaves them."""
        if self.config.moe is not None:
            raise ConfigError(f"--quantization fp8 is not supported for mixture-of-experts models "
                              f"({self.config.architecture}) yet; serve it in float16 or bfloat16")
        for layer in self.layers:
            for name in ("qkv", "o_proj", "gate_up", "down"):
                w = getattr(layer, name)
                if not isinstance(w, Fp8Weight):  # an FP8 checkpoint's weights come quantized
                    setattr(layer, name, quantize(w))

    def weight_bytes(self) -> int:
        """Device (or host) bytes the weights take: an FP8 projection counts its codes and scales."""
        arrays = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        arrays += [getattr(layer, f) for layer in self.layers for f in LayerWeights.__slots__ if f != "moe"]
        arrays += [a for layer in self.layers if layer.moe is not None for a in layer.moe.arrays()]
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def fp8(self) -> bool:
        """The projections are E4M3 (Fp8Weight): each GEMM input is quantized per token by the kernel making it."""
        return bool(self.layers) and isinstance(self.layers[0].qkv, Fp8Weight)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches, num_layers: int | None = None) -> Any:
        """Hidden states after the final norm, [T, H]. kv_caches[i] = (k_cache, v_cache) of layer i.
        The launches are fusion.plan(layer_ops(config, self.fp8)) per layer (tests/test_fusion.py).
        num_layers: run only the first layers, then the final norm (the self-draft of speculative decoding)."""
        b, c = self.backend, self.config
        t, h, eps = input_ids.shape[0], c.hidden_size, c.rms_norm_eps
        fp8 = self.fp8 and t > quant.W8A16_MAX_TOKENS  # quantized GEMM inputs (else W8A16, or no FP8 at all)
        residual = b.empty((t, h))
        x = b.empty((t, h))
        qkv = b.empty((t, c.q_size + 2 * c.kv_size))
        attn = b.empty((t, c.q_size))
        hidden = b.empty((t, h))
        dense = c.moe is None or len(c.moe.layers) < c.num_hidden_layers  # a layer with the dense MLP
        gate_up = b.empty((t, 2 * c.intermediate_size)) if dense else None
        if fp8:  # the GEMM inputs as E4M3 codes with a scale per token
            xin, attn_in, act = (quant.activation(b.xp, t, n) for n in (h, c.q_size, c.intermediate_size))
            norm, add_norm, silu = b.rms_norm_fp8, b.add_rms_norm_fp8, b.silu_and_mul_fp8
        else:
            xin, attn_in, act = x, attn, b.empty((t, c.intermediate_size)) if dense else None
            norm, add_norm, silu = b.rms_norm, b.add_rms_norm, b.silu_and_mul
        tp = self.tp
        if tp is None:
            b.embedding(input_ids, self.embed, residual)
        else:  # each rank its vocabulary rows, zeros for the others' ids: the sum is every row
            b.embedding(tp.local_ids(b.xp, input_ids, c.vocab_size), self.embed, residual)
            tp.comm.all_reduce(residual)
        norm(residual, self.layers[0].input_norm, eps, xin)
        for i, layer in enumerate(self.layers[:num_layers]):
            k_cache, v_cache = kv_caches[i]
            if i > 0:
                add_norm(hidden, residual, layer.input_norm, eps, xin)
            b.linear(xin, layer.qkv, layer.qkv_bias, qkv)
            b.rope_and_cache(qkv, positions, meta.slot_mapping, k_cache, v_cache, self.cos_sin,
                             layer.q_norm, layer.k_norm, eps)
            b.attention(qkv, k_cache, v_cache, meta, self.scale, attn, c.window(i))
            if fp8:
                b.quantize_fp8(attn, attn_in)
            b.linear(attn_in, layer.o_proj, layer.o_bias, hidden)
            if tp is not None:  # each rank's heads' share of o_proj: summed over the ranks
                tp.comm.all_reduce(hidden)
            add_norm(hidden, residual, layer.post_norm, eps, xin)
            if layer.moe is not None:  # never fp8 (quantize_linears refuses): xin is x
                m = layer.moe
                b.moe(x, m.router, m.gate_up, m.down, c.moe.top_k, c.moe.normalize, hidden, m.shared)
            else:
                b.linear(xin, layer.gate_up, None, gate_up)
                silu(gate_up, act)
                b.linear(act, layer.down, None, hidden)
            if tp is not None:
                tp.comm.all_reduce(hidden)
        b.add_rms_norm(hidden, residual, self.final_norm, eps, x)  # lm_head stays in the model dtype
        return x

    def compute_logits(self, hidden) -> Any:
        # hidden: [B, H] rows of the tokens that sample; logits: [B, V]
        logits = self.backend.empty((hidden.shape[0], self.config.vocab_size))
        self.backend.linear(hidden, self.lm_head, None, logits)
        return logits if self.tp is None else self.tp.comm.all_gather(logits)  # each rank its vocabulary slice
