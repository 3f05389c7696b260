"""Configuration dataclasses: the model (from config.json), the KV cache, the scheduler, the engine.

Everything is validated here, at the door, with messages that name the field, its value and what
is allowed; nothing deeper in the engine re-checks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ops.moe_layout import MAX_EXPERTS, MAX_TOP_K

# Each mixture-of-experts architecture with the dense one whose attention (and config rules) it shares
MOE_FAMILIES = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen2MoeForCausalLM": "Qwen2ForCausalLM",
                "Qwen3MoeForCausalLM": "Qwen3ForCausalLM"}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM",
                           *MOE_FAMILIES)
SUPPORTED_ROPE_SCALING = ("llama3", "linear", "default (none)")
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A model or engine configuration that cupyllm cannot run; the message says what is supported."""


@dataclass(slots=True)
class RopeScaling:
    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(slots=True, frozen=True)
class MoeConfig:
    """The sparse MLP of a mixture-of-experts model: a router picks top_k of num_experts experts per token (softmax
    over the router's logits in float32, the top_k probabilities renormalised to sum 1 when `normalize`), each a
    SiLU-gated MLP of `intermediate_size`; the token's output is their weighted sum, plus Qwen2-MoE's shared expert
    scaled by sigmoid(its gate). Layers outside `layers` have a dense MLP of the model's intermediate_size."""
    num_experts: int
    top_k: int
    intermediate_size: int
    normalize: bool
    layers: tuple[int, ...]
    shared_intermediate_size: int = 0  # 0: no shared expert


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2)
    qk_norm: bool  # RMSNorm on each head of q and k before RoPE (Qwen3)
    rope_scaling: RopeScaling | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_path: str = ""
    quantization: str | None = None  # "fp8": the checkpoint's projection weights are E4M3 with *_scale tensors
    sliding_window: int = 0  # > 0: the layers in sliding_layers attend only to the last sliding_window positions
    sliding_layers: tuple[int, ...] = ()
    family: str = ""  # the dense architecture whose attention this one has (MOE_FAMILIES); itself when dense
    moe: MoeConfig | None = None

    def window(self, layer: int) -> int:
        """How many positions (the query's own included) layer `layer` attends to; 0 = all."""
        return self.sliding_window if layer in self.sliding_layers else 0

    @property
    def all_layers_slide(self) -> bool:
        """Every layer has the window: K/V older than it is never read again (its blocks can go)."""
        return self.sliding_window > 0 and len(self.sliding_layers) == self.num_hidden_layers

    def sparse(self, layer: int) -> bool:
        """Layer `layer`'s MLP is a mixture of experts."""
        return self.moe is not None and layer in self.moe.layers

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts if self.moe is not None else 0

    @property
    def o_proj_bias(self) -> bool:
        """o_proj has a bias: Llama's attention_bias covers it, Qwen2's q/k/v biases do not."""
        return self.attention_bias and self.family != "Qwen2ForCausalLM"

    def __post_init__(self):
        self.family = self.family or MOE_FAMILIES.get(self.architecture, self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict, model_path: str = "") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"config.json: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        text = raw.get("text_config")
        if isinstance(text, dict):  # some checkpoints nest the language model's fields
            raw = {**raw, **text}
        _refuse_unimplemented(arch, raw)
        family = MOE_FAMILIES.get(arch, arch)
        try:
            hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
            head_dim = raw.get("head_dim") or hidden // heads
            eos = raw.get("eos_token_id")
            return cls(
                architecture=arch,
                vocab_size=raw["vocab_size"],
                hidden_size=hidden,
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(raw)),
                max_position_embeddings=raw.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=_attention_bias(arch, raw),
                qk_norm=family == "Qwen3ForCausalLM",
                rope_scaling=_rope_scaling(raw.get("rope_scaling") or raw.get("rope_parameters")),
                torch_dtype=_dtype_name(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos])),
                model_path=model_path,
                quantization=_quantization(raw.get("quantization_config")),
                **_sliding_window(arch, raw),
                family=family,
                moe=_moe(arch, raw),
            )
        except KeyError as e:
            raise ConfigError(f"config.json: required field {e.args[0]!r} is missing for {arch}") from e

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        try:
            with open(path, "rb") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a model directory must hold config.json") from None
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw, model_path=model_dir)


def _quantization(q) -> str | None:
    """The checkpoint's quantization, as published for vLLM: `quant_method: fp8` (per-tensor or per-channel
    weight_scale), or compressed-tensors with 8-bit float weights. Anything else is refused by name."""
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method == "fp8":
        if q.get("weight_block_size"):
            raise ConfigError(f"config.json: fp8 with weight_block_size {q['weight_block_size']} (block-wise scales) "
                              "is not supported; per-tensor and per-channel weight scales are")
        return "fp8"
    if method == "compressed-tensors":
        for name, group in (q.get("config_groups") or {}).items():
            w = (group or {}).get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("tensor", "channel"):
                raise ConfigError(f"config.json: compressed-tensors group {name!r} has weights {w}; supported: "
                                  "8-bit float with strategy tensor or channel (FP8 E4M3)")
        return "fp8"
    raise ConfigError(f"config.json: quantization_config.quant_method {method!r} is not supported; supported: fp8, "
                      "compressed-tensors (FP8 weights)")


# Fields that change what transformers computes for these architectures, which cupyllm does not implement: refused
# by name when present with anything but the neutral value (tests/test_config.py lists them).
UNIMPLEMENTED_FIELDS = {
    "hidden_act": ("silu", None),  # the MLP's activation: SiLU x up only (None: the architecture's default, SiLU)
    "mlp_bias": (False, None),  # Llama: bias on gate/up/down
    "partial_rotary_factor": (1, 1.0, None),  # rotary embedding on part of each head
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "no_rope_layers": (None,),  # layers without rotary embedding
}
LAYER_TYPES = ("full_attention", "sliding_attention")


def _refuse_unimplemented(arch: str, raw: dict) -> None:
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    for name, neutral in UNIMPLEMENTED_FIELDS.items():
        value = params.get(name, raw.get(name)) if name == "partial_rotary_factor" else raw.get(name)
        if value not in neutral:
            raise ConfigError(f"config.json: {name} = {value!r} is not supported for {arch} (it changes the model's "
                              f"math and cupyllm does not implement it); supported: {neutral[0]!r}")
    types = raw.get("layer_types")
    if types is not None and (not isinstance(types, list) or any(t not in LAYER_TYPES for t in types)):
        raise ConfigError(f"config.json: layer_types may hold only {', '.join(LAYER_TYPES)}; got {types!r}")


def _sliding_window(arch: str, raw: dict) -> dict:
    """sliding_window and sliding_layers as transformers reads them: Mistral slides every layer when sliding_window
    is set (Mixtral too); Qwen2/Qwen3 only with use_sliding_window, on the layers layer_types marks (else from
    max_window_layers on), and Qwen3-MoE then on every layer; Llama never."""
    window = raw.get("sliding_window")
    family = MOE_FAMILIES.get(arch, arch)
    if family == "LlamaForCausalLM" or not window or (family != "MistralForCausalLM" and
                                                      not raw.get("use_sliding_window")):
        return {}
    if not isinstance(window, int) or window <= 0:
        raise ConfigError(f"config.json: sliding_window must be a positive integer or null, got {window!r}")
    num_layers = raw["num_hidden_layers"]
    if family == "MistralForCausalLM" or arch == "Qwen3MoeForCausalLM":
        layers = range(num_layers)
    elif raw.get("layer_types") is not None:
        layers = [i for i, t in enumerate(raw["layer_types"]) if t == "sliding_attention"]
    else:
        layers = range(int(raw.get("max_window_layers", 28)), num_layers)
    return {"sliding_window": window, "sliding_layers": tuple(layers)}


def _moe(arch: str, raw: dict) -> MoeConfig | None:
    """The sparse MLP's shape as transformers reads it: Mixtral's every layer, with the model's intermediate_size and
    renormalised top-k weights; Qwen's layers (i + 1) % decoder_sparse_step == 0 outside mlp_only_layers, with
    moe_intermediate_size and norm_topk_prob (Qwen2-MoE adds a shared expert)."""
    if arch not in MOE_FAMILIES:
        return None
    n, k = raw.get("num_experts", raw.get("num_local_experts")), raw.get("num_experts_per_tok")
    for name, value in (("num_experts", n), ("num_experts_per_tok", k)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config.json: {name} must be a positive integer for {arch}, got {value!r}")
    if k > n:
        raise ConfigError(f"config.json: num_experts_per_tok ({k}) must be at most the number of experts ({n})")
    if k > MAX_TOP_K or n > MAX_EXPERTS:
        raise ConfigError(f"config.json: {n} experts, {k} a token: supported up to {MAX_EXPERTS} experts and "
                          f"{MAX_TOP_K} a token")
    layers = raw["num_hidden_layers"]
    if arch == "MixtralForCausalLM":
        return MoeConfig(n, k, raw["intermediate_size"], True, tuple(range(layers)))
    step, dense = raw.get("decoder_sparse_step", 1) or 1, set(raw.get("mlp_only_layers") or ())
    shared = raw.get("shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
    return MoeConfig(n, k, raw["moe_intermediate_size"], bool(raw.get("norm_topk_prob", False)),
                     tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0), shared or 0)


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return raw.get("rope_theta", 10000.0)


def _attention_bias(arch: str, raw: dict) -> bool:
    if arch == "Qwen2ForCausalLM":
        return True  # Qwen2 always has q/k/v bias; its config has no field for it
    if arch == "Qwen2MoeForCausalLM":
        return bool(raw.get("qkv_bias", True))  # transformers 5 names it qkv_bias; older configs have none
    return bool(raw.get("attention_bias", False))


def _dtype_name(value) -> str:
    name = str(value).removeprefix("torch.")
    return {"half": "float16", "bf16": "bfloat16", "fp16": "float16", "float": "float32"}.get(name, name)


def _rope_scaling(raw) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(raw["factor"]), float(raw.get("low_freq_factor", 1.0)),
                           float(raw.get("high_freq_factor", 4.0)),
                           int(raw.get("original_max_position_embeddings", 8192)))
    raise ConfigError(
        f"config.json: rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_SCALING)}")


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory (GPU) or from max_model_len x max_num_seqs (CPU)
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.block_size != 16:
            raise ConfigError(f"block_size must be 16, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be at least 1, got {self.num_blocks}")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


SPEC_METHODS = ("ngram", "self_draft", "draft_model")
_SPEC_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size",
              "model", "draft_layers"}


@dataclass(slots=True)
class SpeculativeConfig:
    """vLLM's --speculative-config: {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
    "prompt_lookup_min": 1}, {"method": "self_draft", "num_speculative_tokens": K, "draft_layers": L} (the
    target's first L layers draft), or {"method": "draft_model", "model": PATH, "num_speculative_tokens": K} (a
    smaller model with the same vocabulary); disable_by_batch_size: no speculation in steps with more running
    sequences."""
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    disable_by_batch_size: int = 8
    draft_layers: int | None = None
    model: str | None = None  # draft_model: the draft's directory or Hugging Face name

    @classmethod
    def parse(cls, raw) -> SpeculativeConfig | None:
        """A dict, its JSON text, or None (no speculation)."""
        if raw is None or isinstance(raw, SpeculativeConfig):
            return raw
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {type(raw).__name__}")
        unknown = set(raw) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
        method = raw.get("method")
        if method not in SPEC_METHODS:
            raise ConfigError(f"speculative_config method must be one of {', '.join(SPEC_METHODS)}; got {method!r}")
        k = raw.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ConfigError(f"speculative_config num_speculative_tokens must be an integer in [1, 16]; got {k!r}")
        hi, lo = raw.get("prompt_lookup_max", 4), raw.get("prompt_lookup_min", 1)
        for name, v in (("prompt_lookup_max", hi), ("prompt_lookup_min", lo)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"speculative_config {name} must be a positive integer; got {v!r}")
        if lo > hi:
            raise ConfigError(f"speculative_config prompt_lookup_min ({lo}) is larger than prompt_lookup_max ({hi})")
        by_batch = raw.get("disable_by_batch_size", 8)
        if not isinstance(by_batch, int) or isinstance(by_batch, bool) or by_batch < 1:
            raise ConfigError(f"speculative_config disable_by_batch_size must be a positive integer; got {by_batch!r}")
        layers = raw.get("draft_layers")
        if method == "self_draft" and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
            raise ConfigError(f"speculative_config method self_draft needs draft_layers, a positive integer (how many "
                              f"of the target's first layers draft); got {layers!r}")
        model = raw.get("model")
        if method == "draft_model" and (not isinstance(model, str) or not model):
            raise ConfigError(f"speculative_config method draft_model needs model, the draft's directory or name; "
                              f"got {model!r}")
        return cls(method, k, hi, lo, by_batch, layers if method == "self_draft" else None,
                   model if method == "draft_model" else None)


@dataclass(slots=True)
class EngineConfig:
    model: str = ""
    dtype: str = "auto"
    seed: int = 0
    device: str = "auto"  # "auto" | "numpy" | "cuda"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    generation_config: str = "auto"  # "auto": read generation_config.json; "vllm": ignore it
    chat_template: str | None = None
    load_format: str = "auto"  # "auto": safetensors from the model dir; "dummy": seeded random weights
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory for weights + activations + KV cache
    enforce_eager: bool = False  # never replay CUDA graphs
    async_scheduling: bool | None = None  # decode one step ahead of the host; None: on where graphs run
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks on config-only dirs)
    quantization: str | None = None  # "fp8": linear weights as E4M3 per output channel, activations per token
    kv_cache_dtype: str = "auto"  # "fp8" / "fp8_e4m3": K and V stored as E4M3 with a scale per KV head
    speculative_config: SpeculativeConfig | dict | str | None = None  # vLLM's --speculative-config
    tensor_parallel_size: int = 1  # ranks the model is sharded over, one process (and GPU) each (engine/tp_runner.py)
    cache: CacheConfig = field(init=False)
    scheduler: SchedulerConfig = field(init=False)

    def __post_init__(self):
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "numpy", "cuda"):
            raise ConfigError(f"device must be auto, numpy or cuda; got {self.device!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ConfigError(f"load_format must be auto, safetensors or dummy; got {self.load_format!r}")
        if self.quantization is not None and self.quantization not in ("fp8",):
            raise ConfigError(f"quantization must be fp8 or unset; got {self.quantization!r}")
        if self.kv_cache_dtype not in ("auto", "fp8", "fp8_e4m3"):
            raise ConfigError(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3 (E4M3); got {self.kv_cache_dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        self.cache = CacheConfig(num_blocks=self.num_kv_blocks, enable_prefix_caching=self.enable_prefix_caching)
        self.scheduler = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len or 4096)
