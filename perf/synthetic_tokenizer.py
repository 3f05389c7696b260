"""A stand-in tokenizer of a real model's size, for benchmarks that need one and cannot download it.

Structured outputs compute a token mask over the whole vocabulary each step; what that costs depends on how many
tokens there are and how long they are, so a benchmark of a 7B shape needs a ~152K vocabulary, not the demo's 1000.
This writes a byte-level BPE tokenizer.json with Qwen2.5's counts (151,643 ordinary tokens, then <|endoftext|> =
151643, <|im_start|>, <|im_end|>) and a token length mix like a real BPE vocabulary's: the 256 bytes, then
fragments of the demo corpus's words and random letters/digits/punctuation, 1 to 16 bytes, most with a leading
space. It has no merges (text encodes to bytes): benchmarks give prompts as ids. Not a model's tokenizer: its mask
costs are representative, its tokenizations are not.

    python perf/synthetic_tokenizer.py DIR [--vocab 151643]   # writes DIR/tokenizer.json, tokenizer_config.json
"""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_chars() -> list[str]:
    """ByteLevel's printable stand-in of each byte value."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary(size: int, seed: int = 0) -> list[str]:
    """`size` distinct ordinary tokens, as ByteLevel strings."""
    from engine.demo import CORPUS_PATH
    rng = np.random.default_rng(seed)
    to_char = _byte_chars()
    with open(CORPUS_PATH, encoding="utf-8") as f:
        words = sorted(set(re.findall(r"\w+", f.read())))
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,:;-'\"(){}[]")
    tokens = list(to_char)
    seen = set(tokens)
    while len(tokens) < size:
        if rng.random() < 0.5:
            word = words[rng.integers(len(words))]
            start = int(rng.integers(0, max(1, len(word) - 1)))
            text = word[start:start + int(rng.integers(2, 12))]
        else:
            text = "".join(rng.choice(alphabet, int(rng.integers(1, 10))))
        if rng.random() < 0.6:
            text = " " + text
        piece = "".join(to_char[b] for b in text.encode()[:16])
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
    return tokens


def write(directory: str, size: int = 151643) -> None:
    tokens = vocabulary(size)
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [{"id": size + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": None, "pad_token": "<|endoftext|>",
                   "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--vocab", type=int, default=151643, help="ordinary tokens (then the three special ones)")
    args = p.parse_args()
    write(args.directory, args.vocab)


if __name__ == "__main__":
    main()
