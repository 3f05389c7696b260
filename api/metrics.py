"""Prometheus metrics under vLLM's names (`vllm:*`), in the text exposition format, so dashboards keep working.

Counters and histograms are updated on the event loop as outputs arrive; gauges are read from the
engine when /metrics is scraped.
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 10.0, 20.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0)


def token_buckets(max_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_len: buckets for per-request token counts."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


@dataclass(slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks held by live sequences
    preemptions: int = 0
    spec: object | None = None  # engine/spec_decode.SpecDecodeStats while speculation is configured


def engine_stats(async_engine) -> EngineStats:
    """Gauges of an AsyncLLMEngine, read from the event loop: lengths and counters only, no locking needed."""
    engine = async_engine.engine
    scheduler = engine.scheduler
    return EngineStats(len(scheduler.running), len(scheduler.waiting), float(engine.block_manager.usage),
                       int(scheduler.num_preemptions), engine.spec_stats if engine.spec is not None else None)


class Histogram:
    __slots__ = ("name", "help", "buckets", "counts", "sum", "count")

    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}\n# TYPE {self.name} histogram\n")
        total = 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{self.name}_bucket{{{labels},le="{bound!r}"}} {total}\n')
        out.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}\n')
        out.append(f"{self.name}_sum{{{labels}}} {self.sum!r}\n{self.name}_count{{{labels}}} {self.count}\n")


class RequestTimer:
    """Timestamps of one engine request, for TTFT, inter-token and end-to-end latency."""

    __slots__ = ("arrival", "last_token", "generated", "finished")

    def __init__(self):
        self.arrival = time.monotonic()
        self.last_token: float | None = None
        self.generated = 0
        self.finished = False


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats], max_model_len: int):
        self.labels = f'model_name="{_label_value(model_name)}"'
        self.stats = stats
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        # The name older vLLM versions and their Grafana dashboard use for the same observations.
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                             E2E_BUCKETS)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                        token_buckets(max_model_len))
        self.request_generation = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                            token_buckets(max_model_len))

    def request_timer(self) -> RequestTimer:
        return RequestTimer()

    def observe(self, timer: RequestTimer, out: RequestOutput) -> None:
        """Account one output delta of the engine request `timer` belongs to."""
        now = time.monotonic()
        new_tokens = sum(len(o.token_ids) for o in out.outputs)
        if new_tokens:
            if timer.last_token is None:
                self.ttft.observe(now - timer.arrival)
                self.prompt_tokens += len(out.prompt_token_ids)
                self.request_prompt.observe(len(out.prompt_token_ids))
            else:
                self.itl.observe(now - timer.last_token)
                self.tpot.observe(now - timer.last_token)
            timer.last_token = now
            timer.generated += new_tokens
            self.generation_tokens += new_tokens
        if out.finished and not timer.finished:
            timer.finished = True
            self.e2e.observe(now - timer.arrival)
            self.request_generation.observe(timer.generated)
            for o in out.outputs:
                reason = o.finish_reason or "abort"
                self.finished[reason] = self.finished.get(reason, 0) + 1

    def abandoned(self, timer: RequestTimer, num_choices: int) -> None:
        """An engine request its client gave up on (disconnect or error) before it finished."""
        if not timer.finished:
            timer.finished = True
            self.finished["abort"] = self.finished.get("abort", 0) + num_choices

    def render(self) -> bytes:
        s, lb = self.stats(), self.labels
        out = []

        def scalar(name: str, kind: str, help_: str, value) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name}{{{lb}}} {value!r}\n")

        scalar("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               float(s.running))
        scalar("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", float(s.waiting))
        scalar("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", float(s.kv_usage))
        scalar("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage (older name). 1 means 100 percent usage.",
               float(s.kv_usage))
        scalar("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions from the engine.",
               float(s.preemptions))
        scalar("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", float(self.prompt_tokens))
        scalar("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               float(self.generation_tokens))
        out.append("# HELP vllm:request_success_total Count of successfully processed requests.\n"
                   "# TYPE vllm:request_success_total counter\n")
        for reason in sorted(set(self.finished) | {"stop", "length", "abort"}):
            out.append(f'vllm:request_success_total{{{lb},finished_reason="{reason}"}} '
                       f"{float(self.finished.get(reason, 0))!r}\n")
        for h in (self.ttft, self.itl, self.tpot, self.e2e, self.request_prompt, self.request_generation):
            h.render(lb, out)
        if s.spec is not None:  # as vLLM, only where speculative decoding is on
            sp = s.spec
            scalar("vllm:spec_decode_num_drafts_total", "counter", "Number of spec decoding drafts.",
                   float(sp.num_drafts))
            scalar("vllm:spec_decode_num_draft_tokens_total", "counter", "Number of draft tokens.",
                   float(sp.num_draft_tokens))
            scalar("vllm:spec_decode_num_accepted_tokens_total", "counter", "Number of accepted tokens.",
                   float(sp.num_accepted_tokens))
            out.append("# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.\n"
                       "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter\n")
            for pos, n in enumerate(sp.accepted_per_pos):
                out.append(f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{lb},position="{pos}"}} {float(n)!r}\n')
            # vLLM has no names for these two: cupyllm's own
            scalar("cupyllm:spec_decode_draft_seconds_total", "counter", "Seconds spent proposing (drafting).",
                   float(sp.draft_seconds))
            scalar("cupyllm:spec_decode_verify_seconds_total", "counter", "Seconds of steps that verified proposals.",
                   float(sp.verify_seconds))
        return "".join(out).encode()
