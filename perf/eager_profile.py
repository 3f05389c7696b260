"""Host cost of an eager (prefill) step on the GPU: JIT row kernels against the hand launchers, in one process.

    python3 perf/eager_profile.py perf/configs/qwen2.5-7b [--prompt 32] [--reps 20] [--json PATH]

Runs a 1-token generation (prefill + one sample) of a `--prompt`-token prompt, eagerly, `--reps` times per
implementation (ops/cuda/basic.py's JIT launchers, then ops/cuda/basic_hand.py's patched in). It prints the
median wall time and the host functions that take the most time (cProfile, JIT run). Dummy weights.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

OPS = ("embedding", "rms_norm", "add_rms_norm", "silu_and_mul", "rope_and_cache")


def prefill_ms(engine, prompt: list[int], reps: int) -> list[float]:
    from engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=1)
    engine.generate([prompt], params)  # warm: compiles, tunes
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.generate([prompt], params)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config_dir")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import ops.cuda.basic as basic
    import ops.cuda.basic_hand as hand
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=args.config_dir, load_format="dummy", dtype="float16", max_model_len=256,
                                    enforce_eager=True, enable_prefix_caching=False, skip_tokenizer_init=True))
    prompt = list(range(100, 100 + args.prompt))
    results = {}
    jit_ops = {name: getattr(basic, name) for name in OPS}
    results["jit"] = prefill_ms(engine, prompt, args.reps)
    profile = cProfile.Profile()
    profile.enable()
    prefill_ms(engine, prompt, 5)
    profile.disable()
    for name in OPS:
        setattr(basic, name, getattr(hand, name))
    results["hand"] = prefill_ms(engine, prompt, args.reps)
    for name, fn in jit_ops.items():
        setattr(basic, name, fn)
    for impl, times in results.items():
        print(f"{impl:>5}: prefill of {args.prompt} tokens + 1 sample, eager: median {statistics.median(times):.2f} ms "
              f"(min {min(times):.2f})")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(18)
    print(text.getvalue())
    if args.json:
        with open(args.json, "a") as f:
            for impl, times in results.items():
                f.write(json.dumps({"bench": "eager_prefill", "impl": impl,
                                    "model": args.config_dir.rstrip("/").split("/")[-1], "prompt": args.prompt,
                                    "dtype": "float16", "ms": round(statistics.median(times), 3),
                                    "ms_min": round(min(times), 3)}) + "\n")


if __name__ == "__main__":
    main()
