"""FP8 quality on a real model shape (issue #13): the logits of every position of a few prompts with the fp16 weights,
then with the same weights quantized in place (--quantization fp8's per-channel E4M3, activations per token), in
one engine. Prints and records per-position cosine similarity and teacher-forced argmax agreement.

    python perf/fp8_quality.py perf/configs/qwen2.5-7b [--prompts 4 --len 128] [--json FILE]

With --load-format dummy weights (no checkpoint can be downloaded) the logits are those of a random network, whose
activations are wider-tailed than a trained model's: a harder case for per-token E4M3 than real weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time

import numpy as np


def all_logits(engine, ids: list[int]) -> np.ndarray:
    """float32 host logits of every position of one prompt, computed through the paged cache in one step."""
    from engine.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSeq, SchedulerOutput
    from engine.sequence import Sequence
    seq = Sequence("probe", 0, ids, SamplingParams(), seed=0)
    assert engine.block_manager.allocate(seq, len(ids))
    seq.num_computed_tokens = len(ids)
    runner = engine.runner
    hidden = runner.model.forward(*runner.upload(*runner.prepare(SchedulerOutput([ScheduledSeq(seq, 0, len(ids))]))),
                                  runner.kv_caches)
    engine.block_manager.free(seq)
    logits = runner.model.compute_logits(hidden)
    if engine.backend.name == "cuda":
        from ops.cuda import to_float32
        return to_float32(logits)
    return np.asarray(logits, np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--len", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                                    dtype="float16", max_model_len=args.len + 16, max_num_seqs=1,
                                    enforce_eager=True, num_kv_blocks=-(-(args.len + 16) // 16) + 1,
                                    skip_tokenizer_init=True))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, engine.model_config.vocab_size, args.len).tolist() for _ in range(args.prompts)]
    t0 = time.perf_counter()
    base = [all_logits(engine, ids) for ids in prompts]
    before = engine.runner.model.weight_bytes()
    engine.runner.model.quantize_linears(engine.backend.quantize_weight)
    engine.backend.synchronize()
    after = engine.runner.model.weight_bytes()
    fp8 = [all_logits(engine, ids) for ids in prompts]
    a, b = np.concatenate(fp8), np.concatenate(base)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    card = engine.backend.device_name() if engine.backend.name == "cuda" else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = dict(bench="fp8_quality", date=time.strftime("%Y-%m-%d"), commit=commit or "unknown", card=card,
                  command="python perf/fp8_quality.py " + args.model, model=args.model, positions=int(cos.size),
                  cosine_min=round(float(cos.min()), 5), cosine_mean=round(float(cos.mean()), 5),
                  cosine_p1=round(float(np.percentile(cos, 1)), 5), argmax_agreement=round(agree, 4),
                  weight_bytes_fp16=int(before), weight_bytes_fp8=int(after),
                  fp16_weights_gib=round(before / 2**30, 3), fp8_weights_gib=round(after / 2**30, 3),
                  seconds=round(time.perf_counter() - t0, 1))
    print(f"{card}: {cos.size} positions, cosine min {cos.min():.5f} p1 {np.percentile(cos, 1):.5f} mean "
          f"{cos.mean():.5f}; teacher-forced argmax agreement {agree:.1%}; weights {before / 2**30:.2f} GiB fp16 -> "
          f"{after / 2**30:.2f} GiB fp8")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
