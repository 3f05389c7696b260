"""The per-step floor of one decode step: bytes read/written and FLOPs, against the H100's measured ceilings.
Usage: python perf/step_floor.py perf/configs/qwen2.5-7b [--n 1,16,64,128,256] [--json PATH] [--targets ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from engine.config import ModelConfig

BW = 2.99e12  # B/s, measured device-to-device copy ceiling (../shared/GPU.md)
PEAK = 750e12  # FLOP/s, measured fp16 8192^3 matmul
# Measured cuBLAS GEMM-only step times (28 layers + LM head, CUDA graph) for the Qwen2.5-7B shape, by M.
GEMM_MS_7B = {1: 5.33, 16: 5.44, 64: 5.64, 128: 5.83}
DEFAULT_N = (1, 16, 64, 128, 256)
DEFAULT_TARGETS = (188, 2850, 10800, 20000, 32000)


def linear_elements(c: ModelConfig) -> dict:
    """Weight elements of the linears of one layer (bias included) and of the LM head."""
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
    qkv = (q + 2 * kv) * h + ((q + 2 * kv) if c.attention_bias else 0)
    return {"qkv": qkv, "o": h * q, "gate_up": 2 * i * h, "down": h * i, "lm_head": c.vocab_size * h}


def param_count(c: ModelConfig) -> int:
    """Every parameter of the checkpoint: embeddings, linears, norms (a tied LM head counts once)."""
    lin = linear_elements(c)
    norms = 2 * c.hidden_size + (2 * c.head_dim if c.qk_norm else 0)
    per_layer = lin["qkv"] + lin["o"] + lin["gate_up"] + lin["down"] + norms
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else lin["lm_head"]
    return c.num_hidden_layers * per_layer + c.hidden_size + embed + head


def step_costs(c: ModelConfig, n: int, dtype_bytes: int = 2, input_len: int = 32, output_len: int = 512) -> dict:
    """Bytes and FLOPs of one decode step of batch n, averaged over a run of output_len tokens."""
    h, i, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    lin = linear_elements(c)
    layer_lin = lin["qkv"] + lin["o"] + lin["gate_up"] + lin["down"]
    norms = layers * (2 * h + (2 * c.head_dim if c.qk_norm else 0)) + h
    # Every weight read once per step, except the embedding table: only the n rows looked up.
    weight_bytes = (layers * layer_lin + lin["lm_head"] + norms) * dtype_bytes + n * h * dtype_bytes
    avg_ctx = input_len + (output_len + 1) / 2
    kv_read = n * avg_ctx * layers * 2 * c.kv_size * dtype_bytes
    kv_write = n * layers * 2 * c.kv_size * dtype_bytes
    # Activations, per layer: input norm (read x, write), qkv (read [n,H], write [n,q+2kv]), attention
    # output write [n,q], o (read [n,q], write [n,H]), residual add (2 reads, 1 write), post norm
    # (read, write), gate_up (read [n,H], write [n,2I]), silu*mul (read [n,2I], write [n,I]), down (read
    # [n,I], write [n,H]), residual add (2 reads, 1 write): 12 [n,H] + 2 [n,q] + [n,q+2kv] + 4 [n,I] + [n,I].
    # Plus the final norm (2 [n,H]), the LM head's input read [n,H] and fp32 logits written [n,V].
    per_layer_act = 12 * h + 2 * c.q_size + (c.q_size + 2 * c.kv_size) + 5 * i
    act_bytes = n * (layers * per_layer_act + 3 * h) * dtype_bytes + n * v * 4
    total_bytes = weight_bytes + kv_read + kv_write + act_bytes
    flops = 2 * n * (layers * layer_lin + lin["lm_head"]) + 4 * n * avg_ctx * c.q_size * layers
    mem_s, math_s = total_bytes / BW, flops / PEAK
    floor_s, sum_s = max(mem_s, math_s), mem_s + math_s
    gemm_ms = GEMM_MS_7B.get(n) if _is_7b_shape(c) else None
    practical_ms = None if gemm_ms is None else gemm_ms + kv_read / BW * 1e3
    return {
        "n": n, "avg_context": avg_ctx, "params": param_count(c),
        "weights_gb": weight_bytes / 1e9, "kv_read_gb": kv_read / 1e9, "kv_write_gb": kv_write / 1e9,
        "act_gb": act_bytes / 1e9, "total_gb": total_bytes / 1e9, "flops_t": flops / 1e12,
        "mem_ms": mem_s * 1e3, "math_ms": math_s * 1e3,
        "floor_ms": floor_s * 1e3, "floor_tok_s": n / floor_s,
        "sum_ms": sum_s * 1e3, "sum_tok_s": n / sum_s,
        "gemm_ms": gemm_ms, "practical_ms": practical_ms,
        "practical_tok_s": None if practical_ms is None else n / practical_ms * 1e3,
    }


def _is_7b_shape(c: ModelConfig) -> bool:
    return (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == (3584, 18944, 28, 28, 4, 152064)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config_dir", help="directory holding config.json")
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--n", default=",".join(map(str, DEFAULT_N)), help="batch sizes, comma separated")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                   help="target tok/s, one per N in order ('' for none)")
    p.add_argument("--json", metavar="PATH", help="append one JSON object per N")
    a = p.parse_args(argv)
    c = ModelConfig.from_pretrained(a.config_dir)
    ns = [int(x) for x in a.n.split(",") if x]
    targets = [float(x) for x in a.targets.split(",") if x]
    model = os.path.basename(os.path.normpath(a.config_dir))
    rows = [step_costs(c, n, a.dtype_bytes, a.input_len, a.output_len) for n in ns]
    print(f"{model}: {rows[0]['params'] / 1e9:.3f}e9 params ({rows[0]['params'] * a.dtype_bytes / 1e9:.2f} GB), "
          f"dtype {a.dtype_bytes} B, input {a.input_len}, output {a.output_len}, "
          f"avg context {rows[0]['avg_context']:.1f}; BW {BW / 1e12:.2f} TB/s, PEAK {PEAK / 1e12:.0f} TFLOP/s")
    print("activations: per layer 12 [N,H] + 3 [N,q] + 2 [N,kv] + 5 [N,I] reads/writes; + logits fp32 [N,V]")
    head = (f"{'N':>4} {'weightsGB':>9} {'kvrdGB':>7} {'actGB':>6} {'TFLOP':>6} {'mem_ms':>7} {'math_ms':>7} "
            f"{'floor_ms':>8} {'floor_tok/s':>11} {'sum_ms':>7} {'sum_tok/s':>9} {'gemm_ms':>7} "
            f"{'prac_ms':>7} {'prac_tok/s':>10}")
    print(head)
    for r in rows:
        print(f"{r['n']:>4} {r['weights_gb']:>9.3f} {r['kv_read_gb']:>7.3f} {r['act_gb']:>6.3f} "
              f"{r['flops_t']:>6.3f} {r['mem_ms']:>7.3f} {r['math_ms']:>7.3f} {r['floor_ms']:>8.3f} "
              f"{r['floor_tok_s']:>11.0f} {r['sum_ms']:>7.3f} {r['sum_tok_s']:>9.0f} "
              f"{_fmt(r['gemm_ms'], '7.2f'):>7} {_fmt(r['practical_ms'], '7.3f'):>7} "
              f"{_fmt(r['practical_tok_s'], '10.0f'):>10}")
    if targets:
        print("targets (step = N / target; 'UNREACHABLE' when the target's step is shorter than the floor):")
        for r, t in zip(rows, targets):
            step_ms = r["n"] / t * 1e3
            r["target_tok_s"], r["target_step_ms"] = t, step_ms
            parts = [f"  N={r['n']:>4} target {t:>8.0f} tok/s -> {step_ms:7.3f} ms/step"]
            for key in ("floor_ms", "sum_ms", "practical_ms"):
                fl = r[key]
                if fl is None:
                    parts.append(f"{key[:-3]}: -")
                    continue
                margin = step_ms - fl
                verdict = "ok" if margin >= 0 else "UNREACHABLE"
                parts.append(f"{key[:-3]}: {verdict} ({margin:+.3f} ms, {margin / step_ms:+.1%})")
            print("; ".join(parts))
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps({"bench": "step_floor", "model": model, "dtype_bytes": a.dtype_bytes,
                                    "input_len": a.input_len, "output_len": a.output_len, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
