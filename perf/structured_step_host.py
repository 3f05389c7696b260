"""The host side of a structured-output decode step, on the CPU: the real engine (scheduling, landing, detokenizing,
the grammars and their masks, the sampling tensors) in front of a stand-in GPU that takes a fixed time a step.

The stand-in (FakeGpu) replaces ModelRunner.execute and one_step_ahead. It keeps a clock of when its stream would be
free: a launch queues the forward (--forward-ms) behind what is already queued, a late mask is asked for right after
that launch (as DecodeGraphs.run does), then the sampling (--sample-ms) is queued behind the forward as the mask
comes back, and the sampled ids are ready at its end: a DeferredSample that sleeps until then (its ready() says whether
they are). Its ids are random tokens each row's mask allows (random in the vocabulary where a row is unconstrained),
picked on the host after the sampling is queued (vectorized: about 0.1 ms for 16 rows, where a GPU's host launches two
kernels; a per-row pick took 0.7 ms and sat in the chain mask -> sampling -> next step's masks).
So a step's wall time is max(the host's work, the stand-in GPU's), as on a GPU one step ahead, and the host's work is
the engine's own. The model is a one-layer stand-in with the tokenizer's vocabulary (its weights are never used).

    python perf/synthetic_tokenizer.py /tmp/q7
    python perf/structured_step_host.py /tmp/q7 [--n 16] [--output-len 256] [--forward-ms 5.84] [--repeats 3]
        [--mask-threads K] [--json FILE]

Prints, per N, the decode step p50/p95/mean (ms) of a plain run and of a run with api/benchmark.py's BENCH_SCHEMA on
every request, greedy, ignore_eos (as `cupyllm benchmark --structured` runs them), and their ratios. One step ahead a
step's wall time moves with the difference of two steps' mask times, so its p50 and p95 spread where throughput
does not: the mean is the tok/s figure (tok/s = N / mean step).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def tiny_model_dir(tokenizer_dir: str, vocab: int) -> str:
    """A directory with the tokenizer's files and a one-layer Qwen2 config of `vocab` rows."""
    path = tempfile.mkdtemp(prefix="cupyllm-structured-host-")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": True, "torch_dtype": "float32"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


class FakeGpu:
    """ModelRunner.execute and one_step_ahead for a GPU that takes forward_s a forward and sample_s a sampling."""

    def __init__(self, forward_s: float, sample_s: float, vocab: int, seed: int = 0):
        self.forward_s, self.sample_s, self.vocab = forward_s, sample_s, vocab
        self.rng = np.random.default_rng(seed)
        self.free_at = 0.0  # when the stream has run everything queued so far
        self.steps = 0

    @staticmethod
    def one_step_ahead(sched) -> bool:
        return all(s.num_tokens == 1 for s in sched.scheduled)

    def execute(self, sched, sampling, defer: bool = False, late_mask=None):
        from ops.sampling_types import DeferredSample, SamplerOutput
        self.steps += 1
        forward_end = max(time.perf_counter(), self.free_at) + self.forward_s
        self.free_at = forward_end
        if sampling is None:
            return None
        mask = late_mask() if late_mask is not None else sampling.token_mask
        end = max(time.perf_counter(), forward_end) + self.sample_s  # queued now: the pick below is no GPU's work
        self.free_at = end
        out = SamplerOutput(self._pick(mask, len(sampling.seeds)), None, None, None)

        def wait():
            _sleep_until(end)
            return out
        if defer and self.one_step_ahead(sched) and sampling.ids_only:
            return DeferredSample(wait, lambda: time.perf_counter() >= end)
        return wait()

    def _pick(self, mask, rows: int) -> np.ndarray:
        """Per row a random nonzero word of its mask, then a random set bit of that word (rows of all ones keep a
        random id of the vocabulary); vectorized over the rows (about 0.1 ms for 16, as a GPU would take none)."""
        ids = self.rng.integers(0, self.vocab, rows).astype(np.int32)
        if mask is None:
            return ids
        rows_c = np.flatnonzero(~(mask == -1).all(axis=1))
        if not len(rows_c):
            return ids
        words = mask.shape[1]
        nonzero = np.cumsum(mask[rows_c].ravel() != 0, dtype=np.int32)  # over the rows laid end to end
        ends = nonzero[words - 1::words]
        before = np.concatenate(([0], ends[:-1]))
        kth = before + (self.rng.random(len(rows_c)) * (ends - before)).astype(np.int32)
        word = np.searchsorted(nonzero, kth, side="right") % words
        rows_c, word = rows_c[ends > before], word[ends > before]  # a row that allows nothing keeps its random id
        bits = np.cumsum((mask[rows_c, word].view(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1, axis=1,
                         dtype=np.int32)
        kth = (self.rng.random(len(rows_c)) * bits[:, -1]).astype(np.int32)
        ids[rows_c] = 32 * word + (bits > kth[:, None]).argmax(axis=1)
        return ids


def _sleep_until(t: float) -> None:
    while (left := t - time.perf_counter()) > 0:
        time.sleep(left)


def run(engine, n: int, input_len: int, output_len: int, structured, rng) -> np.ndarray:
    """Decode step wall times (ms) of one run of n requests (the steps after every request has its first token)."""
    from engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, structured_outputs=structured)
    vocab = engine.model_config.vocab_size - 1000
    for i in range(n):
        engine.add_request(f"host-{time.monotonic_ns()}-{i}", rng.integers(0, vocab, input_len).tolist(), params)
    steps, started = [], set()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        started.update(o.request_id for o in outs)
        if len(started) == n:
            steps.append(now - t)
    return np.array(steps[1:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tokenizer_dir", help="a tokenizer directory (perf/synthetic_tokenizer.py writes a 152K one)")
    p.add_argument("--n", default="16")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--forward-ms", type=float, default=5.84, help="the H100's plain step at N=16, 7B shape")
    p.add_argument("--sample-ms", type=float, default=0.05)
    p.add_argument("--vocab", type=int, default=152064, help="the model's vocabulary (Qwen2.5-7B's)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each kind, interleaved")
    p.add_argument("--mask-threads", type=int, default=0,
                   help="llguidance's executor threads and templates per schema (CUPYLLM_MASK_THREADS; 0: its default)")
    p.add_argument("--json", default=None, help="append one JSON line per N to this file")
    args = p.parse_args()
    if args.mask_threads:
        os.environ["CUPYLLM_MASK_THREADS"] = str(args.mask_threads)  # read when engine.structured is imported

    from api.benchmark import BENCH_SCHEMA
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import StructuredOutputs

    vocab = args.vocab
    ns = [int(x) for x in args.n.split(",")]
    engine = LLMEngine(EngineConfig(model=tiny_model_dir(args.tokenizer_dir, vocab), device="numpy",
                                    load_format="dummy", async_scheduling=True, max_num_seqs=max(ns),
                                    max_model_len=args.input_len + args.output_len + 16))
    gpu = FakeGpu(args.forward_ms / 1e3, args.sample_ms / 1e3, vocab)
    engine.runner.execute, engine.runner.one_step_ahead = gpu.execute, gpu.one_step_ahead
    schema = StructuredOutputs(json=BENCH_SCHEMA)
    engine.grammar_compiler.validate(schema)
    rng = np.random.default_rng(0)
    for n in ns:
        run(engine, n, args.input_len, 8, schema, rng)  # warm-up
        plain, constrained = [], []
        for _ in range(args.repeats):
            plain.append(run(engine, n, args.input_len, args.output_len, None, rng))
            constrained.append(run(engine, n, args.input_len, args.output_len, schema, rng))
        a, b = np.concatenate(plain), np.concatenate(constrained)
        row = dict(bench="structured_step_host", card="CPU: development machine, 2 cores, stand-in GPU", n=n,
                   vocab=vocab, forward_ms=args.forward_ms, mask_threads=engine.grammar_compiler.threads,
                   plain_step_ms_p50=round(float(np.median(a)), 3),
                   plain_step_ms_p95=round(float(np.percentile(a, 95)), 3),
                   json_step_ms_p50=round(float(np.median(b)), 3),
                   json_step_ms_p95=round(float(np.percentile(b, 95)), 3),
                   plain_step_ms_mean=round(float(a.mean()), 3), json_step_ms_mean=round(float(b.mean()), 3),
                   ratio_p50=round(float(np.median(a) / np.median(b)), 3),
                   ratio_mean=round(float(a.mean() / b.mean()), 3))
        print(f"N={n}: plain step p50 {row['plain_step_ms_p50']:.2f} ms (p95 {row['plain_step_ms_p95']:.2f}, "
              f"mean {row['plain_step_ms_mean']:.2f}), JSON schema p50 {row['json_step_ms_p50']:.2f} ms "
              f"(p95 {row['json_step_ms_p95']:.2f}, mean {row['json_step_ms_mean']:.2f}); "
              f"plain/json x{row['ratio_p50']:.3f} at p50, x{row['ratio_mean']:.3f} in mean")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
