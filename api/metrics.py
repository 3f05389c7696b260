"""Prometheus metrics under vLLM's names (`vllm:*`), through prometheus_client, so dashboards keep working.

Every app has its own CollectorRegistry (tests run several apps in one process); /metrics serves
`generate_latest(metrics.registry)`. Request counters and histograms are updated on the event loop as outputs
arrive. What reflects engine state (the gauges, the engine's preemption and spec-decode counters) comes from one
EngineStats snapshot, taken when /metrics is scraped.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.llm_engine import EngineStats  # what the `stats` hook returns; importable from here as before
from engine.outputs import RequestOutput

__all__ = ["EngineStats", "Metrics", "RequestTimer"]

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # e2e and queue time
LABELS = ["model_name"]


def token_buckets(max_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_len: buckets for per-request token counts."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class RequestTimer:
    """Timestamps of one engine request, for TTFT, inter-token and end-to-end latency."""

    __slots__ = ("arrival", "last_token", "generated", "finished", "queued")

    def __init__(self):
        self.arrival = time.monotonic()
        self.last_token: float | None = None
        self.generated = 0
        self.finished = False
        self.queued = False  # its queue time has been observed


class EngineCollector(Collector):
    """The engine's gauges and cumulative counters, from one `stats()` snapshot per scrape."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.model_name, self.stats = model_name, stats
        self.created = time.time()  # as prometheus_client's own counters report their `_created`

    def collect(self) -> Iterator[Metric]:
        s, labels = self.stats(), [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(labels, value, created=self.created)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage)
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (older name). 1 means 100 percent usage.",
                    s.kv_usage)
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", s.preemptions)
        sp = s.spec
        if sp is None:  # as vLLM, the spec-decode counters only where speculative decoding is on
            return
        yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", sp.num_drafts)
        yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", sp.num_draft_tokens)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", sp.num_accepted_tokens)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Accepted tokens per draft position.", labels=[*LABELS, "position"])
        for pos, n in enumerate(sp.accepted_per_pos):
            per_pos.add_metric([self.model_name, str(pos)], n, created=self.created)
        yield per_pos
        # vLLM has no names for these two: cupyllm's own
        yield counter("cupyllm:spec_decode_draft_seconds", "Seconds spent proposing (drafting).", sp.draft_seconds)
        yield counter("cupyllm:spec_decode_verify_seconds", "Seconds of steps that verified proposals.",
                      sp.verify_seconds)


class Metrics:
    """The app's metrics on their own registry, all labelled model_name=<the first served name>."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats], max_model_len: int):
        self.registry = r = CollectorRegistry()
        r.register(EngineCollector(model_name, stats))

        def counter(name: str, doc: str):
            return Counter(name, doc, LABELS, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(model_name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                [*LABELS, "finished_reason"], registry=r)
        self._model_name = model_name
        self.finished = {reason: self._success.labels(model_name, reason) for reason in ("stop", "length", "abort")}
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        # The name older vLLM versions and their Grafana dashboard use for the same observations.
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                              ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.request_prompt = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                        token_buckets(max_model_len))
        self.request_generation = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                            token_buckets(max_model_len))

    def request_timer(self) -> RequestTimer:
        return RequestTimer()

    def _finished(self, reason: str, n: int = 1) -> None:
        child = self.finished.get(reason)
        if child is None:
            child = self.finished[reason] = self._success.labels(self._model_name, reason)
        child.inc(n)

    def observe(self, timer: RequestTimer, out: RequestOutput) -> None:
        """Account one output delta of the engine request `timer` belongs to."""
        now = time.monotonic()
        if not timer.queued and "queue_time" in out.metrics:  # the engine's: arrival to first scheduled
            timer.queued = True
            self.queue.observe(out.metrics["queue_time"])
        new_tokens = sum(len(o.token_ids) for o in out.outputs)
        if new_tokens:
            if timer.last_token is None:
                self.ttft.observe(now - timer.arrival)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.request_prompt.observe(len(out.prompt_token_ids))
            else:
                self.itl.observe(now - timer.last_token)
                self.tpot.observe(now - timer.last_token)
            timer.last_token = now
            timer.generated += new_tokens
            self.generation_tokens.inc(new_tokens)
        if out.finished and not timer.finished:
            timer.finished = True
            self.e2e.observe(now - timer.arrival)
            self.request_generation.observe(timer.generated)
            for o in out.outputs:
                self._finished(o.finish_reason or "abort")

    def abandoned(self, timer: RequestTimer, num_choices: int) -> None:
        """An engine request its client gave up on (disconnect or error) before it finished."""
        if not timer.finished:
            timer.finished = True
            self._finished("abort", num_choices)
