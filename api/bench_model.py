"""A model directory for serving benchmarks without weights: a real architecture's config.json beside a synthetic
word-level tokenizer whose vocabulary covers every id below the config's vocab_size.

A random model samples ids all over its vocabulary. With a real tokenizer's file missing (none can be downloaded),
the server would have nothing to detokenize them with; with a smaller tokenizer, ids past its vocabulary stream as
empty chunks and TPOT/ITL lose their meaning. Here every id but the few special ones decodes to a word:

    python -m api.bench_model /tmp/qwen2.5-7b-bench --config perf/configs/qwen2.5-7b
    cupyllm serve /tmp/qwen2.5-7b-bench --load-format dummy --dtype float16

The tokenizer is a WordPiece model over whitespace-separated words: the words of engine/demo_corpus.txt (so the
load test's prompts are whole tokens and their lengths exact), every character of that text and of printable ASCII
alone and as a `##` continuation (so any text encodes), then made-up words ("bada", "bade", ...) up to vocab_size.
Decoding joins words with single spaces. The special tokens sit at the config's own eos/bos ids; the chat tokens
<|im_start|> and <|im_end|> take the next free ids (151644 and 151645 for Qwen2.5, as in its real tokenizer).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys

from engine.demo import CHAT_TEMPLATE, CORPUS_PATH

UNK = "<unk>"  # a plain token, not a special one: sampled, it streams as text like any other id
ROLES = ("system", "user", "assistant", "tool")  # the words of the chat template
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
PREFIX = "##"  # WordPiece's continuing-subword prefix
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def read_config(path: str) -> tuple[dict, str]:
    """(config, path of config.json) from a directory holding config.json, or the file itself."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read a model config: {e}") from e
    size = config.get("vocab_size") if isinstance(config, dict) else None
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{file}: vocab_size must be a positive integer, got {size!r}")
    return config, file


def _ids(value) -> list[int]:
    """eos_token_id / bos_token_id: an int, a list of ints, or absent."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _free_id(taken: dict[int, str], start: int, vocab_size: int) -> int:
    """The first id from `start` up that is free, else the highest free id below vocab_size."""
    for i in itertools.chain(range(start, vocab_size), range(vocab_size - 1, -1, -1)):
        if i not in taken:
            return i
    raise ValueError(f"vocab_size {vocab_size} leaves no id free for the special tokens")


def special_tokens(config: dict) -> dict[int, str]:
    """id -> text of the special tokens: the config's eos and bos ids, then the two chat tokens."""
    vocab_size = config["vocab_size"]
    eos, bos = _ids(config.get("eos_token_id")), _ids(config.get("bos_token_id"))
    for name, ids in (("eos_token_id", eos), ("bos_token_id", bos)):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"{name} {bad[0]} is outside the vocabulary [0, {vocab_size})")
    specials: dict[int, str] = {}
    for k, i in enumerate(eos):
        specials.setdefault(i, "<|endoftext|>" if k == 0 else f"<|eos_{k}|>")
    for i in bos:
        specials.setdefault(i, "<|begin_of_text|>")
    if not eos:  # a config without one: the engine still needs an end-of-text token to stop on
        specials[_free_id(specials, vocab_size, vocab_size)] = "<|endoftext|>"
    for token in CHAT_TOKENS:
        specials[_free_id(specials, max(specials) + 1, vocab_size)] = token
    return specials


def corpus_words() -> list[str]:
    with open(CORPUS_PATH, encoding="utf-8") as f:
        return f.read().split()


def synthetic_words():
    """Made-up words of 2, 3, ... consonant-vowel syllables, in a fixed order, without end."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    for n in itertools.count(2):
        for parts in itertools.product(syllables, repeat=n):
            yield "".join(parts)


def vocabulary(vocab_size: int, specials: dict[int, str]) -> dict[str, int]:
    """token -> id for every id below vocab_size: the specials at their ids, words in the others."""
    text_words = corpus_words()
    chars = sorted({chr(c) for c in range(33, 127)} | {c for w in text_words for c in w})
    needed = [UNK, *ROLES, *chars, *(PREFIX + c for c in chars)]
    room = vocab_size - len(specials)
    if room < len(needed):
        raise ValueError(f"vocab_size {vocab_size} is too small for a synthetic tokenizer: it needs at least "
                         f"{len(needed) + len(specials)} ids (special tokens, characters and continuations)")
    seen, words = set(specials.values()), []
    for word in itertools.chain(needed, (w for w in text_words if not w.startswith(PREFIX)), synthetic_words()):
        if len(words) == room:
            break
        if word not in seen:
            seen.add(word)
            words.append(word)
    free = (i for i in range(vocab_size) if i not in specials)
    vocab = {word: i for word, i in zip(words, free)}
    vocab.update({token: i for i, token in specials.items()})
    return vocab


def build_tokenizer(vocab_size: int, specials: dict[int, str]):
    """The `tokenizers` Tokenizer: WordPiece over whitespace-split words, decoded with single spaces between."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece(vocabulary(vocab_size, specials), unk_token=UNK,
                                           continuing_subword_prefix=PREFIX, max_input_chars_per_word=100))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix=PREFIX, cleanup=False)  # cleanup would glue punctuation
    # Already in the vocabulary, so they keep their ids; as added tokens they are matched before splitting.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size
    return tokenizer


def tokenizer_config(config: dict, specials: dict[int, str]) -> dict:
    eos, bos = _ids(config.get("eos_token_id")), _ids(config.get("bos_token_id"))
    by_text = {t: i for i, t in specials.items()}
    eos_token = specials[eos[0]] if eos else "<|endoftext|>"
    bos_token = specials[bos[0]] if bos else None
    return {
        # Llama-style configs (a bos distinct from every eos) get their BOS prepended, Qwen-style ones do not.
        "add_bos_token": bool(bos) and bos[0] not in eos,
        "added_tokens_decoder": {str(by_text[t]): {"content": t, "lstrip": False, "normalized": False,
                                                   "rstrip": False, "single_word": False, "special": True}
                                 for t in sorted(by_text, key=by_text.get)},
        "bos_token": bos_token,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "model_max_length": config.get("max_position_embeddings", 2048),
        "pad_token": eos_token,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,  # <unk> is a plain word here (see UNK)
    }


def build_bench_model(out_dir: str, config_path: str) -> str:
    """Write config.json (copied), tokenizer.json and tokenizer_config.json into `out_dir`; returns `out_dir`."""
    config, config_file = read_config(config_path)
    specials = special_tokens(config)
    tokenizer = build_tokenizer(config["vocab_size"], specials)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(config_file, os.path.join(out_dir, "config.json"))
    generation = os.path.join(os.path.dirname(config_file), "generation_config.json")
    if os.path.isfile(generation):
        shutil.copyfile(generation, os.path.join(out_dir, "generation_config.json"))
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(config, specials), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m api.bench_model", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="directory to write (created; files in it are replaced)")
    p.add_argument("--config", required=True, help="a model's config.json, or the directory holding it")
    args = p.parse_args(argv)
    try:
        build_bench_model(args.out_dir, args.config)
    except (OSError, ValueError) as e:
        print(f"bench_model: error: {e}", file=sys.stderr)
        return 1
    config, _ = read_config(args.out_dir)
    specials = ", ".join(f"{t} {i}" for i, t in sorted(special_tokens(config).items()))
    print(f"wrote {args.out_dir}: {config.get('architectures', ['?'])[0]} config, a synthetic tokenizer of "
          f"{config['vocab_size']} tokens (specials: {specials}); serve it with --load-format dummy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
