"""Does a sequence get the same greedy tokens alone as in a busy batch (prefill chunks, prefix hits,
preemption)? Per seed, with async scheduling on and off, on a tiny checkpoint of each family given.
Prints where each prompt first diverges (-1: never). GPU or CPU: python scripts/batch_invariance.py [--device cuda]
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

from engine.config import EngineConfig
from engine.demo import write_demo_tokenizer
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.conftest import VOCAB, write_checkpoint


def first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="llama3_scaled")
    p.add_argument("--seeds", type=int, default=6)
    args = p.parse_args()
    path = tempfile.mkdtemp()
    write_checkpoint(path, args.arch)
    write_demo_tokenizer(path)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)

    def engine(**kw) -> LLMEngine:
        return LLMEngine(EngineConfig(model=path, device=args.device, dtype="float16", max_model_len=256,
                                      max_num_seqs=8, **kw))
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        shared = rng.integers(0, VOCAB, 40).tolist()
        prompts = [shared + rng.integers(0, VOCAB, n).tolist() for n in (2, 9, 30)] + \
                  [rng.integers(0, VOCAB, n).tolist() for n in (5, 50)]
        alone = [engine().generate([q], params)[0].outputs[0].token_ids for q in prompts]
        line = [f"seed {seed}:"]
        for async_on in (False, True):
            busy = engine(max_num_batched_tokens=24, num_kv_blocks=16, async_scheduling=async_on)
            together = [o.outputs[0].token_ids for o in busy.generate(prompts, params)]
            line.append(f"async {'on ' if async_on else 'off'} ({busy.scheduler.num_preemptions} preemptions) "
                        f"first diff {[first_diff(a, b) for a, b in zip(together, alone)]}")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
