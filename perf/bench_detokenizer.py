"""CPU cost of turning sampled ids into streamed text: IncrementalDetokenizer.add per token, with the
demo model's byte-level BPE tokenizer. Run with `python -m pytest perf --benchmark-enable`."""
from __future__ import annotations

import functools

from engine.demo import CORPUS_PATH, demo_model_dir
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

NUM_TOKENS = 256


@functools.cache
def tokenizer_and_ids() -> tuple[Tokenizer, list[int]]:
    tokenizer = Tokenizer.from_pretrained(demo_model_dir())
    with open(CORPUS_PATH, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False)
    return tokenizer, ids[:NUM_TOKENS]


def test_detokenize_256_tokens_incrementally(benchmark):
    tokenizer, ids = tokenizer_and_ids()

    def stream() -> str:
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.add(i) for i in ids)
        return text + detok.flush()

    benchmark.extra_info["tokens"] = len(ids)
    assert benchmark(stream) == tokenizer.decode(ids)
