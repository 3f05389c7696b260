"""`cupyllm plan` (the fused per-layer plan of a model: kernels, what each stores, HBM bytes) and `cupyllm kernels`
(the on-disk cache of generated kernels: list or clear). Neither needs a GPU."""
from __future__ import annotations

import argparse
import datetime
import json

from api.bench_target import positive_int

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (its config.json is all that is read)")
    p.add_argument("--tokens", default="1,128", help="comma-separated decode batch sizes (one token per sequence)")
    p.add_argument("--context", type=positive_int, default=288, help="cached tokens per sequence that attention "
                   "reads (default 288: the mean of a 32-in / 512-out run)")
    p.add_argument("--dtype", default="float16", choices=sorted(_ITEMSIZE))
    p.add_argument("--unfused", action="store_true", help="also print the plan before the fusion pass")
    p.add_argument("--quantization", "-q", default=None, choices=("fp8",),
                   help="fp8: the plan of E4M3 projections, each GEMM input quantized per token")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")


def run_plan(args) -> int:
    from engine.config import ModelConfig
    from engine.models.llama import layer_ops
    from ops import fusion
    config = ModelConfig.from_pretrained(args.model)
    ops, buffers = layer_ops(config, fp8=args.quantization == "fp8")
    tokens = [int(t) for t in args.tokens.split(",")]
    size = _ITEMSIZE[args.dtype]
    plans = {"fused": fusion.plan(ops)} | ({"unfused": fusion.plan(ops, fuse=False)} if args.unfused else {})
    report = {name: {t: fusion.describe(k, buffers, t, size, args.context) for t in tokens}
              for name, k in plans.items()}
    if args.json:
        print(json.dumps({"model": args.model, "dtype": args.dtype, "quantization": args.quantization,
                          "context": args.context,
                          "layers": config.num_hidden_layers, "plans": report}))
        return 0
    for name, per_t in report.items():
        print(f"{name} plan of one decoder layer ({config.num_hidden_layers} layers), {args.dtype}"
              f"{', fp8 projections' if args.quantization else ''}, "
              f"attention over {args.context} cached tokens:")
        rows = per_t[tokens[0]]
        header = f"  {'kernel':<26} {'stores':<18}" + "".join(f"{f'bytes T={t}':>14}" for t in tokens)
        print(header)
        for i, r in enumerate(rows):
            sizes = "".join(f"{fusion.fmt_bytes(per_t[t][i]['bytes']):>14}" for t in tokens)
            print(f"  {r['kernel']:<26} {','.join(r['stores']) or '-':<18}{sizes}")
        totals = "".join(f"{fusion.fmt_bytes(fusion.totals(per_t[t])[1]):>14}" for t in tokens)
        print(f"  {f'{len(rows)} launches':<45}{totals}\n")
    return 0


def add_kernels_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="every cached kernel: name, arch, size, when")
    group.add_argument("--clear", action="store_true", help="remove every cached kernel (the next start compiles)")


def run_kernels(args) -> int:
    from ops.jit.cache import KernelCache
    cache = KernelCache()
    if args.clear:
        print(f"removed {cache.clear()} kernels from {cache.directory}")
        return 0
    entries = cache.entries()
    print(f"{len(entries)} kernels in {cache.directory}")
    for e in sorted(entries, key=lambda e: (e.get("name", ""), e.get("arch", ""))):
        when = datetime.datetime.fromtimestamp(e.get("created", 0)).strftime("%Y-%m-%d %H:%M")
        state = "" if e["complete"] else "  (incomplete: recompiled on use)"
        print(f"  {e.get('name', '?'):<24} {e.get('arch', '?'):<7} {e.get('bytes', 0):>8} B  {when}  "
              f"{e['key'][:16]}{state}")
    return 0
