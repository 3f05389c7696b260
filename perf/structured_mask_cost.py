"""Host cost of structured outputs per decode step: llguidance's token masks for N sequences on a model-sized
vocabulary (a tokenizer directory; perf/synthetic_tokenizer.py writes a 152K stand-in), with api/benchmark.py's
BENCH_SCHEMA. Each sequence walks its grammar by random allowed tokens; prints and optionally records the median
milliseconds of the step's masks (engine.structured.GrammarCompiler.fill_masks), of the tokens' consumption, and the
one-time tokenizer + schema compile.

    python perf/structured_mask_cost.py DIR [--n 1,16,64] [--steps 200] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    from api.benchmark import BENCH_SCHEMA
    from engine.config import ModelConfig
    from engine.sampling_params import StructuredOutputs
    from engine.structured import GrammarCompiler
    from engine.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--n", default="1,16,64")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    tok = Tokenizer.from_pretrained(args.model_dir)
    vocab = ModelConfig.from_pretrained(args.model_dir).vocab_size
    spec = StructuredOutputs(json=BENCH_SCHEMA)
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok, vocab, tok.eos_token_ids)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.validate(spec)
    compile_s = time.perf_counter() - t0
    print(f"vocabulary {vocab}: llguidance tokenizer {tokenizer_s:.2f} s, schema {compile_s * 1e3:.1f} ms")
    rng = np.random.default_rng(0)
    rows = []
    for n in sorted(int(x) for x in args.n.split(",")):
        grammars = [compiler.matcher(spec) for _ in range(n)]
        masks = np.empty((n, compiler.mask_words), np.int32)
        fill, consume = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            compiler.fill_masks(grammars, masks)
            t1 = time.perf_counter()
            bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
            picks = [int(rng.choice(np.flatnonzero(row))) for row in bits]
            t2 = time.perf_counter()
            for g, token in zip(grammars, picks):
                g.accept(token)
            consume.append(time.perf_counter() - t2)
            fill.append(t1 - t0)
        row = dict(bench="structured_mask_cost", n=n, vocab=vocab, steps=args.steps,
                   mask_ms_p50=round(float(np.median(fill)) * 1e3, 3),
                   mask_ms_p95=round(float(np.percentile(fill, 95)) * 1e3, 3),
                   consume_ms_p50=round(float(np.median(consume)) * 1e3, 3),
                   tokenizer_s=round(tokenizer_s, 2), schema_ms=round(compile_s * 1e3, 1))
        rows.append(row)
        print(f"N={n:<4} masks p50 {row['mask_ms_p50']:.3f} ms p95 {row['mask_ms_p95']:.3f} ms, "
              f"consume p50 {row['consume_ms_p50']:.3f} ms a step")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
