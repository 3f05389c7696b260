"""How many tokens a text needs at least, known without encoding it: a huge prompt is refused at once.

A token stands for at most L characters of the normalized, pre-tokenized text, where L is the length of the
longest vocabulary entry (byte-level BPE: an entry has one character per byte it stands for, so at least as many
as the text characters; SentencePiece-style "▁" entries: one per character; byte-fallback "<0x41>" entries: six
for one byte; an added token's content is its text). So encode(text) has at least len(normalized) / L ids.
Unicode composition (NFC/NFKC) shortens a text at most four-fold (a Greek vowel with three combining marks
composes to one character), the other normalizers and pre-tokenizers allowed here never shorten it.

The bound does not hold, and is not used (chars_per_token gives None), where one token can stand for text of any
length or text can vanish: an unknown word as one [UNK] (WordPiece, WordLevel), runs of unknown characters fused
into one (BPE or Unigram without byte fallback), unknown characters dropped (BPE with no [UNK] that is not
byte-level), normalizers that strip or drop characters, pre-tokenizers that drop whitespace. The tokenizers of the
model families served (byte-level BPE: Qwen, Llama 3; byte-fallback BPE: Mistral, Llama 2) all have it.
"""
from __future__ import annotations

import json

COMPOSING = {"NFC", "NFKC"}
KEEPING_NORMALIZERS = {"NFD", "NFKD", "Prepend", "Lowercase"}
KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


def chars_per_token(tokenizer_json: str, vocab: dict) -> tuple[int, int] | None:
    """(L, shrink): each token of the tokenizer stands for at most L characters of a text shortened at most
    `shrink`-fold by normalization; None where no such bound holds."""
    spec = json.loads(tokenizer_json)
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not _keeps_text(spec.get("pre_tokenizer")):
        return None
    model = spec.get("model") or {}
    kind = model.get("type")
    if model.get("byte_fallback"):  # BPE, Unigram: an unknown character becomes its bytes' tokens
        pass
    elif kind == "BPE" and model.get("unk_token") is None:  # unknown characters are dropped, unless none exist
        if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
            return None
    elif kind != "BPE" or model.get("fuse_unk"):  # WordPiece, WordLevel: a word of any length can be one [UNK]
        return None
    return max(map(len, vocab), default=1), shrink


def min_tokens(num_chars: int, bound: tuple[int, int] | None) -> int:
    """At least this many ids encode a text of num_chars characters (0 where no bound holds)."""
    if bound is None:
        return 0
    longest, shrink = bound
    return -(-num_chars // (longest * shrink))


def _normalizer_shrink(node) -> int | None:
    if node is None:
        return 1
    kind = node.get("type")
    if kind == "Sequence":
        factors = [_normalizer_shrink(n) for n in node.get("normalizers", [])]
        if None in factors:
            return None
        out = 1
        for f in factors:
            out *= f
        return out
    if kind in COMPOSING:
        return 4
    if kind in KEEPING_NORMALIZERS:
        return 1
    if kind == "Replace":  # a literal pattern replaced by content at least as long keeps the length
        pattern = (node.get("pattern") or {}).get("String")
        return 1 if pattern is not None and len(node.get("content", "")) >= len(pattern) else None
    return None  # Strip, StripAccents, BertNormalizer (drops control characters), Precompiled, regex Replace


def _keeps_text(node) -> bool:
    if node is None:
        return True
    kind = node.get("type")
    if kind == "Sequence":
        return all(_keeps_text(n) for n in node.get("pretokenizers", []))
    if kind == "Split":
        return node.get("behavior") != "Removed"
    return kind in KEEPING_PRE_TOKENIZERS  # not Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit
