"""The built-in demo model: a tiny Qwen2 checkpoint with seeded random weights and a BPE tokenizer.

It is built on first use from `demo_corpus.txt` into the cache directory, so `cupyllm serve` runs with no download.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile

import numpy as np

from engine.safetensors import float32_to_bf16_bits, save_file

# Bump when anything below changes what is written, so old cache directories are not reused.
DEMO_NAME = "demo-qwen2-v1"
CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_corpus.txt")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 1000  # must stay <= 1024: tests pair this tokenizer with vocab-1024 checkpoints

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS

CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('Conversation roles must be system, user, assistant or tool, got ' + message['role']) }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def cache_root() -> str:
    """$CUPYLLM_CACHE, else ~/.cache/cupyllm."""
    return os.environ.get("CUPYLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cupyllm")


def demo_model_dir() -> str:
    """Path of the demo checkpoint, building it on first use.

    The build happens in a private temporary directory that is renamed into place, so a reader
    never sees a half-written checkpoint and two racing processes both end up with the same one.
    """
    root = cache_root()
    final = os.path.join(root, DEMO_NAME)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=root)
    try:
        build_demo_model(tmp)
        os.rename(tmp, final)
    except OSError:
        # Another process renamed its copy into place first; theirs is identical, keep it.
        if not os.path.isdir(final):
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.cache
def _tokenizer_json() -> str:
    # Imported here so that importing engine.demo stays cheap for code that never builds the model.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([CORPUS_PATH], trainer)
    return tokenizer.to_str()


def _special_ids() -> dict[str, int]:
    return {t["content"]: t["id"] for t in json.loads(_tokenizer_json())["added_tokens"]}


def _vocab_size() -> int:
    return len(json.loads(_tokenizer_json())["model"]["vocab"])


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def write_demo_tokenizer(model_dir: str) -> None:
    """Write the demo tokenizer.json and tokenizer_config.json into an existing directory."""
    with open(os.path.join(model_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(_tokenizer_json())
    ids = _special_ids()
    _write_json(os.path.join(model_dir, "tokenizer_config.json"), {
        "add_bos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for token, i in ids.items()},
        "bos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    })


def _model_config(vocab_size: int) -> dict:
    ids = _special_ids()
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }


def _random_weights(vocab_size: int) -> dict[str, np.ndarray]:
    """Qwen2 weights under their HF names, drawn in a fixed order from one seeded generator."""
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    weights = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}"
        weights.update({
            f"{p}.input_layernorm.weight": np.ones(HIDDEN_SIZE, np.float32),
            f"{p}.self_attn.q_proj.weight": normal(q_size, HIDDEN_SIZE),
            f"{p}.self_attn.q_proj.bias": normal(q_size),
            f"{p}.self_attn.k_proj.weight": normal(kv_size, HIDDEN_SIZE),
            f"{p}.self_attn.k_proj.bias": normal(kv_size),
            f"{p}.self_attn.v_proj.weight": normal(kv_size, HIDDEN_SIZE),
            f"{p}.self_attn.v_proj.bias": normal(kv_size),
            f"{p}.self_attn.o_proj.weight": normal(HIDDEN_SIZE, q_size),
            f"{p}.post_attention_layernorm.weight": np.ones(HIDDEN_SIZE, np.float32),
            f"{p}.mlp.gate_proj.weight": normal(INTERMEDIATE_SIZE, HIDDEN_SIZE),
            f"{p}.mlp.up_proj.weight": normal(INTERMEDIATE_SIZE, HIDDEN_SIZE),
            f"{p}.mlp.down_proj.weight": normal(HIDDEN_SIZE, INTERMEDIATE_SIZE),
        })
    weights["model.norm.weight"] = np.ones(HIDDEN_SIZE, np.float32)
    return weights


def build_demo_model(model_dir: str) -> None:
    """Write the whole demo checkpoint into `model_dir` (which must exist); deterministic byte for byte."""
    write_demo_tokenizer(model_dir)
    vocab_size = -(-_vocab_size() // 64) * 64  # padded like real checkpoints, so the LM head has unused rows
    _write_json(os.path.join(model_dir, "config.json"), _model_config(vocab_size))
    ids = _special_ids()
    _write_json(os.path.join(model_dir, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    weights = _random_weights(vocab_size)
    save_file({name: float32_to_bf16_bits(w) for name, w in weights.items()},
              os.path.join(model_dir, "model.safetensors"),
              dtypes={name: "BF16" for name in weights}, metadata={"format": "pt"})
