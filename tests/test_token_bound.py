"""engine/token_bound.py: the lower bound on a text's token count never exceeds the count, for the tokenizer kinds
the served models use (byte-level BPE with NFC, SentencePiece-style byte-fallback BPE), on random texts made of
what shortens under normalization (combining marks, Hangul jamo), whitespace runs, emoji, control characters; and
it is refused (None) where a token can stand for any length of text or text can vanish."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from engine import token_bound
from engine.demo import write_demo_tokenizer
from engine.tokenizer import GIL_FREE_CHARS
from engine.tokenizer import Tokenizer as EngineTokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 4, "Ελληνικά και 한국어 텍스트, 日本語のテキスト。",
          "def f(x):\n    return x ** 2  # squares\n", "naïve café résumé façade", "1234567890 " * 8]
PIECES = ["a", "e\u0301", "\u03b1\u0313\u0301\u0345", "\u1100\u1161\u11a8", "한", "  ", "\n\n", "\t", "🙂", "\x00",
          "\u200b", "ﬁ", "word", "ÅΩ", "▁", "<0x41>", "the", "\u0301\u0301"]


def _random_text(rng, n: int) -> str:
    return "".join(PIECES[i] for i in rng.integers(0, len(PIECES), n))


def _byte_level_nfc():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, initial_alphabet=
                                                               pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _byte_fallback_metaspace():
    """Llama 2 / Mistral's layout: Prepend + Replace normalizer, no pre-tokenizer, BPE with byte fallback."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for word in ("▁", "▁the", "▁quick", "▁fox", "th", "he", "▁t", "e", "t", "h", "q", "u", "i", "c", "k"):
        vocab.setdefault(word, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("h", "e"), ("t", "h")]
    vocab.setdefault("▁th", len(vocab))
    vocab.setdefault("▁the", len(vocab))
    merges.append(("▁th", "e"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tok


@pytest.mark.parametrize("build", [_byte_level_nfc, _byte_fallback_metaspace], ids=["byte-level-nfc", "byte-fallback"])
def test_bound_never_exceeds_the_count(build, rng):
    tok = build()
    bound = token_bound.chars_per_token(tok.to_str(), tok.get_vocab(with_added_tokens=True))
    assert bound is not None
    worst = 0.0
    for _ in range(300):
        text = _random_text(rng, int(rng.integers(1, 200)))
        count = len(tok.encode(text).ids)
        need = token_bound.min_tokens(len(text), bound)
        assert need <= count, (text, need, count)
        worst = max(worst, need / max(count, 1))
    print(f"{build.__name__}: L={bound[0]}, shrink {bound[1]}; bound/count at most {worst:.2f}")


def test_a_huge_text_needs_many_tokens_by_the_bound_alone(tmp_path):
    """The demo tokenizer (byte-level BPE): 20 MB of text needs more than a million tokens, known at once."""
    write_demo_tokenizer(str(tmp_path))
    tok = EngineTokenizer.from_pretrained(str(tmp_path))
    assert tok.min_tokens("hello world " * 1_700_000) > 1_000_000
    text = "hello wörld, 🙂 " * 400  # past GIL_FREE_CHARS: encoded by the batch call, with the same ids as encode's
    assert len(text) >= GIL_FREE_CHARS and tok.encode(text) == tok._backend.encode(text).ids
    assert 0 < tok.min_tokens(text) <= len(tok.encode(text))


def _spec(normalizer=None, pre_tokenizer=None, **model) -> str:
    return json.dumps({"normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "model": model})


@pytest.mark.parametrize("spec", [
    _spec(type="WordPiece", unk_token="[UNK]", max_input_chars_per_word=100),  # a long word is one [UNK]
    _spec(type="WordLevel", unk_token="[UNK]"),
    _spec(type="BPE", unk_token="<unk>", fuse_unk=True),  # a run of unknown characters is one token
    _spec(type="Unigram", unk_id=0, byte_fallback=False),
    _spec(type="BPE", unk_token=None),  # not byte-level: unknown characters vanish
    _spec({"type": "Strip", "strip_left": True, "strip_right": True}, {"type": "ByteLevel"}, type="BPE"),
    _spec({"type": "BertNormalizer"}, {"type": "ByteLevel"}, type="BPE"),
    _spec(None, {"type": "Whitespace"}, type="BPE", byte_fallback=True),  # whitespace dropped
    _spec(None, {"type": "Split", "behavior": "Removed"}, type="BPE", byte_fallback=True),
    _spec({"type": "Replace", "pattern": {"String": "  "}, "content": " "}, None, type="BPE", byte_fallback=True),
], ids=["wordpiece", "wordlevel", "fused-unk", "unigram-unk", "bpe-drops", "strip", "bert", "whitespace",
        "split-removed", "shortening-replace"])
def test_no_bound_where_a_token_can_stand_for_any_length(spec):
    assert token_bound.chars_per_token(spec, {"ab": 0}) is None
    assert token_bound.min_tokens(10**9, None) == 0
