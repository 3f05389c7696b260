"""`cupyllm benchmark`: the direct engine (no HTTP) at several batch sizes, greedy, ignore_eos.

tok/s = output tokens / wall time from the first request added to the last finished (prefill
included); TTFT per request; median and p95 of the decode steps. One JSON line per N.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

HISTORY = Path(__file__).resolve().parent.parent / "perf" / "history.jsonl"
# --structured: a JSON schema every request follows, that no output of --output-len tokens can complete (so every
# request still makes exactly output_len tokens), visiting keys, strings and numbers as an extraction would.
BENCH_SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "count", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 16}, "count": {"type": "integer"},
                   "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 8}}}}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="model directory or org/name (a config.json alone does with dummy)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--n", default="1,16,64,128", help="comma-separated numbers of concurrent requests")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--device", default="auto", choices=["auto", "numpy", "cuda"])
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over N ranks (one GPU each on CUDA)")
    p.add_argument("--quantization", "-q", default=None, choices=("fp8",), help="fp8: E4M3 projection weights")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "fp8_e4m3"))
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before the last one's tokens reach the host (default: with graphs)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length the engine is built for (default: input + output + 16); larger sizes the "
                        "KV cache from memory instead of the 4-sequences-per-slot cap")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="with --spec-acceptance: the K to measure, e.g. '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 4}'")
    p.add_argument("--spec-acceptance", default=None, metavar="A,B,...",
                   help="speculation with dummy weights: per N, a plain greedy run, then one per acceptance rate a "
                        "with a proposer each of whose K tokens the target takes as its own with probability a "
                        "(engine/spec_decode.OracleProposer), same prompts; prints tok/s against the plain run's")
    p.add_argument("--spec-gate", default="on", choices=("on", "off"),
                   help="off: speculate every step whatever the acceptance (the verify step's cost curve)")
    p.add_argument("--structured", action="store_true",
                   help="per N, a plain run then one with a JSON schema on every request (BENCH_SCHEMA; the model "
                        "directory needs a tokenizer: perf/synthetic_tokenizer.py writes a stand-in of 152K tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append one JSON line per N to this file")
    p.add_argument("--no-history", action="store_true", help="do not append to perf/history.jsonl")


def run(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    ns = sorted({int(x) for x in args.n.split(",")})
    has_tokenizer = bool(args.model) and os.path.exists(os.path.join(args.model, "tokenizer.json"))
    spec = _spec_config(args, ns)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(speculative_config=spec,
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, load_format=args.load_format,
        max_num_seqs=max(ns), max_model_len=args.max_model_len or args.input_len + args.output_len + 16,
        max_num_batched_tokens=max(8192, max(ns) * args.input_len), enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        skip_tokenizer_init=bool(args.model) and not has_tokenizer))
    startup = time.perf_counter() - t0
    print(f"engine ready in {startup:.2f} s ({engine.backend.name}); stages: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in engine.stage_times.items()))
    rng = np.random.default_rng(args.seed)
    vocab = engine.model_config.vocab_size
    rows, cold_start = [], None
    if args.spec_acceptance is not None:
        engine.enable_speculation(None)  # the plain runs; its verify graphs stay captured
        rows = speculation_rows(engine, spec, args, ns, rng, vocab)
        record(rows, args, engine)
        return 0
    if args.structured:
        if not has_tokenizer and args.model:
            raise SystemExit(f"--structured needs {args.model}/tokenizer.json (perf/synthetic_tokenizer.py writes one)")
        rows = structured_rows(engine, args, ns, rng, vocab)
        record(rows, args, engine)
        return 0
    for n in ns:
        warm = measure(engine, rng, vocab, n, args.input_len, 8)  # warm-up: same shapes, few tokens
        if cold_start is None and (started := process_start_epoch()) is not None:
            cold_start = round(warm["first_token_epoch"] - started, 2)  # process start to the first token
        r = measure(engine, rng, vocab, n, args.input_len, args.output_len)
        del r["first_token_epoch"]
        r.update(n=n, input_len=args.input_len, output_len=args.output_len, startup_s=round(startup, 2),
                 async_scheduling=engine.async_scheduling)
        graphs = engine.runner.graphs
        # a replay on rank 0 alone would wait for ever for the other ranks' collectives
        if graphs is not None and n <= graphs.max_size and engine.runner.ranks is None:
            # The GPU's share of a decode step: the graph alone, at the run's median context.
            r["graph_ms"] = round(graphs.time_replay(n, args.input_len + args.output_len // 2), 3)
        rows.append(r)
        print(f"N={n:<4} {r['tok_s']:>9.1f} tok/s  TTFT {r['ttft_ms']:>8.1f} ms  "
              f"step p50 {r['step_ms_p50']:.2f} ms p95 {r['step_ms_p95']:.2f} ms"
              + (f"  graph alone {r['graph_ms']:.2f} ms" if "graph_ms" in r else ""))
    resources = resource_figures(engine, cold_start)
    for r in rows:
        r.update(resources)
    print_table(rows)
    print("cold start to first token {} s, CPU RSS {} MiB (peak {} MiB), GPU memory {} MiB, weights {} GiB, "
          "{} KV blocks".format(*(resources.get(k, "-") for k in ("cold_start_first_token_s", "rss_mib", "rss_peak_mib",
                                                                   "gpu_memory_mib", "weights_gib", "kv_blocks"))))
    record(rows, args, engine)
    return 0


def process_start_epoch() -> float | None:
    """When this process started (Linux /proc), as a time.time() value; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the comm field
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def resource_figures(engine, cold_start: float | None) -> dict:
    """Cold start to first token, CPU RSS now and at peak, and the GPU memory in use (CUDA only)."""
    from api.bench_target import memory_kib
    rss, hwm = memory_kib([os.getpid()])
    out = {"rss_mib": round(rss / 1024, 1), "rss_peak_mib": round(hwm / 1024, 1)} if rss else {}
    if cold_start is not None:
        out["cold_start_first_token_s"] = cold_start
    out["weights_gib"] = round(engine.runner.model.weight_bytes() / 2**30, 3)
    out["kv_blocks"] = engine.runner.num_blocks
    if engine.backend.has_device_memory:
        free, total = engine.backend.memory_info()
        out["gpu_memory_mib"] = round((total - free) / 2**20, 1)
    return out


def _spec_config(args, ns):
    """The SpeculativeConfig of a --spec-acceptance run (speculating at every N asked for), else None."""
    if args.spec_acceptance is None:
        return None
    from engine.config import SpeculativeConfig
    spec = SpeculativeConfig.parse(args.speculative_config or '{"method": "ngram", "num_speculative_tokens": 4}')
    spec.disable_by_batch_size = max(ns)
    return spec


def speculation_rows(engine, spec, args, ns, rng, vocab) -> list[dict]:
    """Per N: a plain greedy run, then the same prompts with an OracleProposer at each acceptance rate (a verify of K
    then accepts sum_{j=1..K} a^j proposals on average)."""
    from engine.spec_decode import AcceptanceGate, OracleProposer

    rates = [float(a) for a in args.spec_acceptance.split(",")]
    rows = []
    print(f"speculation, K = {spec.num_speculative_tokens}, gate {args.spec_gate}")
    for n in ns:
        prompts = [rng.integers(0, vocab, args.input_len).tolist() for _ in range(n)]
        measure(engine, rng, vocab, n, args.input_len, 8, prompts)  # warm-up
        plain = measure(engine, rng, vocab, n, args.input_len, args.output_len, prompts)
        plain.update(n=n, acceptance_target=None, k=0)
        rows.append(plain)
        print(f"N={n:<4} plain      {plain['tok_s']:>9.1f} tok/s  step p50 {plain['step_ms_p50']:.2f} ms")
        for a in rates:
            oracle = OracleProposer(a, vocab, seed=args.seed)
            engine.enable_speculation(spec, oracle, AcceptanceGate(enabled=args.spec_gate == "on"))
            try:
                r = measure(engine, rng, vocab, n, args.input_len, args.output_len, prompts)
            finally:
                stats = engine.spec_stats
                engine.enable_speculation(None)
            r.update(n=n, acceptance_target=a, k=spec.num_speculative_tokens, spec_gate=args.spec_gate,
                     acceptance_rate=round(stats.acceptance_rate, 4), drafts=stats.num_drafts,
                     mean_accepted_length=round(stats.mean_accepted_length, 3),
                     draft_s=round(stats.draft_seconds, 3), verify_s=round(stats.verify_seconds, 3),
                     speedup=round(r["tok_s"] / plain["tok_s"], 3))
            rows.append(r)
            print(f"N={n:<4} a={a:<5}    {r['tok_s']:>9.1f} tok/s  step p50 {r['step_ms_p50']:.2f} ms  "
                  f"x{r['speedup']:.2f}  accepted {r['acceptance_rate']:.2f}, "
                  f"{r['mean_accepted_length']:.2f} tokens a verify, {r['drafts']} verifies, "
                  f"draft {r['draft_s']:.2f} s, verify {r['verify_s']:.2f} s")
    for r in rows:
        r.update(input_len=args.input_len, output_len=args.output_len)
    return rows


def structured_rows(engine, args, ns, rng, vocab) -> list[dict]:
    """Per N: a plain greedy run, then the same prompts with BENCH_SCHEMA on every request."""
    from engine.sampling_params import StructuredOutputs
    spec = StructuredOutputs(json=BENCH_SCHEMA)
    t0 = time.perf_counter()
    engine.grammar_compiler.validate(spec)  # the tokenizer's trie and the schema, once: start-up, not the run
    compile_s = time.perf_counter() - t0
    print(f"structured outputs: tokenizer + schema compiled in {compile_s:.2f} s")
    rows = []
    for n in ns:
        prompts = [rng.integers(0, vocab, args.input_len).tolist() for _ in range(n)]
        measure(engine, rng, vocab, n, args.input_len, 8, prompts)  # warm-up
        plain = measure(engine, rng, vocab, n, args.input_len, args.output_len, prompts)
        measure(engine, rng, vocab, n, args.input_len, 8, prompts, structured=spec)
        r = measure(engine, rng, vocab, n, args.input_len, args.output_len, prompts, structured=spec)
        plain.update(n=n, structured=False)
        r.update(n=n, structured=True, vs_plain=round(r["tok_s"] / plain["tok_s"], 3), compile_s=round(compile_s, 2))
        rows += [plain, r]
        print(f"N={n:<4} plain {plain['tok_s']:>9.1f} tok/s, JSON schema {r['tok_s']:>9.1f} tok/s "
              f"(x{r['vs_plain']:.3f}); step p50 {plain['step_ms_p50']:.2f} / {r['step_ms_p50']:.2f} ms")
    for r in rows:
        r.pop("first_token_epoch", None)
        r.update(input_len=args.input_len, output_len=args.output_len)
    return rows


def measure(engine, rng, vocab: int, n: int, input_len: int, output_len: int, prompts=None,
            structured=None) -> dict:
    """Greedy generation of n requests (random prompts unless given); `structured`: a StructuredOutputs every
    request follows."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, structured_outputs=structured)
    start = time.perf_counter()
    first_token: dict[str, float] = {}
    prompts = prompts or [rng.integers(0, vocab, input_len).tolist() for _ in range(n)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{n}-{output_len}-{i}", prompt, params)
    steps, tokens, first_epoch = [], 0, None
    # a bar on a terminal only (disable=None: none when stderr is not a TTY, as in CI logs)
    bar = tqdm(total=n * output_len, desc=f"N={n}", unit="tok", disable=None, leave=False)
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if outs and first_epoch is None:
            first_epoch = time.time()
        for out in outs:
            new = sum(len(o.token_ids) for o in out.outputs)
            tokens += new
            bar.update(new)
            first_token.setdefault(out.request_id, now)
        if len(first_token) == n:  # every request has its first token: from here, decode steps only
            steps.append(now - t)
    wall = time.perf_counter() - start
    bar.close()
    decode = np.array(steps[1:] or [0.0]) * 1e3  # the step that produced the last first token is a prefill
    ttft = np.array(list(first_token.values())) - start
    return dict(first_token_epoch=first_epoch, tok_s=round(tokens / wall, 1), output_tokens=tokens,
                wall_s=round(wall, 3), ttft_ms=round(float(np.median(ttft)) * 1e3, 1),
                step_ms_p50=round(float(np.median(decode)), 3), step_ms_p95=round(float(np.percentile(decode, 95)), 3))


def print_table(rows: list[dict]) -> None:
    print(f"\n{'N':>5} {'tok/s':>10} {'TTFT ms':>9} {'step p50 ms':>12} {'step p95 ms':>12} {'graph ms':>9}")
    for r in rows:
        graph = f"{r['graph_ms']:>9.2f}" if "graph_ms" in r else f"{'-':>9}"
        print(f"{r['n']:>5} {r['tok_s']:>10.1f} {r['ttft_ms']:>9.1f} {r['step_ms_p50']:>12.2f} "
              f"{r['step_ms_p95']:>12.2f} {graph}")


def _w8a16(args) -> dict:
    """FP8 runs say up to how many tokens the W8A16 GEMV served (ops/quant.W8A16_MAX_TOKENS)."""
    from ops import quant
    return {"w8a16_max_tokens": quant.W8A16_MAX_TOKENS} if args.quantization == "fp8" else {}


def _tp(args: argparse.Namespace) -> dict:
    """The tensor-parallel size where it is not 1 (entries of one GPU keep their old keys)."""
    size = getattr(args, "tensor_parallel_size", 1)
    return {"tensor_parallel_size": size} if size > 1 else {}


def record(rows: list[dict], args: argparse.Namespace, engine) -> None:
    card = engine.backend.device_name() if engine.backend.has_device_memory else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    bench = "spec_benchmark" if args.spec_acceptance is not None else \
        "structured_benchmark" if args.structured else "engine_benchmark"
    base = dict(bench=bench,
                date=datetime.date.today().isoformat(),
                commit=commit or "unknown (no git here)", card=card,
                model=os.path.basename(os.path.normpath(args.model)) if args.model else "demo",
                dtype=engine.backend.dtype_name, quantization=args.quantization or "none",
                kv_cache_dtype=args.kv_cache_dtype, **_w8a16(args), **_tp(args),
                command="cupyllm benchmark " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                       if k in ("model", "load_format", "n", "input_len",
                                                                "output_len", "dtype", "quantization") and v)
                + (f" --kv-cache-dtype {args.kv_cache_dtype}" if args.kv_cache_dtype != "auto" else "")
                + (f" --speculative-config '{args.speculative_config}' --spec-acceptance {args.spec_acceptance}"
                   f" --spec-gate {args.spec_gate}" if args.spec_acceptance is not None else "")
                + (" --structured" if args.structured else "")
                + (f" --tensor-parallel-size {_tp(args)['tensor_parallel_size']}" if _tp(args) else ""))
    lines = [json.dumps({**base, **r}, sort_keys=True) + "\n" for r in rows]
    targets = ([args.json] if args.json else []) + ([] if args.no_history else [str(HISTORY)])
    for path in targets:
        with open(path, "a") as f:
            f.writelines(lines)
