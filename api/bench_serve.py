"""`cupyllm bench-serve` (also scripts/loadtest.py): streamed load against any OpenAI-compatible server,
reported with vLLM's serving metrics, plus cold start to first token and the server's memory.

Closed loop (`--concurrency` clients, each sending its next request when the last one ends) or open
loop (`--request-rate`, Poisson arrivals). Metric definitions follow `vllm bench serve`:
TTFT is send to the first chunk with text; TPOT is (latency - TTFT) / (output tokens - 1), per request;
ITL is every gap between consecutive chunks with text; E2E latency is send to the end of the stream.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from api import bench_target as S

PERCENTILES = (50, 95, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    p.add_argument("--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions"))
    p.add_argument("--model", help="model name sent in requests (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=S.positive_int, default=None,
                      help="closed loop: clients in flight (default 16); with --request-rate: most requests in flight")
    load.add_argument("--request-rate", type=float, default=None,
                      help="open loop: Poisson arrivals at this many requests/s, inf: all at once (default: closed)")
    load.add_argument("--num-prompts", type=S.positive_int, default=None,
                      help="requests to send (default 200, or unlimited with --duration)")
    load.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    load.add_argument("--warmup", type=int, default=1, help="untimed requests before the load (default 1)")
    load.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--input-len", type=S.positive_int, default=128, help="prompt tokens (default 128)")
    prompts.add_argument("--prompt-kind", choices=("random", "fixed"), default="random",
                         help="random: a fresh prompt per request; fixed: one prompt for all (prefix-cache hits)")
    prompts.add_argument("--prompt", help="send this text as every prompt (overrides --input-len)")
    prompts.add_argument("--prompt-pool", type=S.positive_int, default=256,
                         help="distinct random prompts prepared for a --duration run, cycled (default 256)")
    prompts.add_argument("--max-tokens", type=S.positive_int, default=128, help="output tokens asked (default 128)")
    prompts.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens (vLLM's ignore_eos)")
    prompts.add_argument("--temperature", type=float, default=0.0)
    prompts.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    server = p.add_argument_group("server process")
    server.add_argument("--launch", metavar="COMMAND",
                        help="start this server command first and measure process start to first streamed token")
    server.add_argument("--launch-timeout", type=float, default=900.0, help="seconds to wait for it to answer")
    server.add_argument("--launch-log", help="file for the launched server's output (default: a temporary file)")
    server.add_argument("--server-pid", type=int, help="measure the memory of this running server")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    out.add_argument("--bench-jsonl", metavar="FILE",
                     help="append the headline figures as one line for scripts/record_history.py (perf/history.jsonl)")
    out.add_argument("--label", help="name of this run in the JSON and in --compare tables")
    out.add_argument("--compare", nargs="+", metavar="JSON",
                     help="print a side-by-side table of earlier --json files (the first is the reference) and exit")


@dataclass(slots=True)
class Result:
    """One request as the client saw it; times in seconds from its send."""
    ok: bool = False
    error: str = ""
    prompt_tokens: int | None = None  # from the usage chunk
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between chunks with text
    text_chunks: int = 0
    last: float = 0.0

    def take(self, event: dict, at: float, chat: bool) -> bool:
        """Account one SSE event received `at` seconds after the send; False on an in-band error."""
        if "error" in event:
            error = event["error"]
            self.error = f"in-band error: {error.get('message') if isinstance(error, dict) else error}"[:200]
            return False
        if event.get("usage"):
            self.prompt_tokens = event["usage"].get("prompt_tokens")
            self.output_tokens = event["usage"].get("completion_tokens") or 0
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                if self.text_chunks:
                    self.itl.append(at - self.last)
                else:
                    self.ttft = at
                self.text_chunks += 1
                self.last = at
        return True


def request_body(args, model: str, prompt: str) -> dict:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def stream_request(session, url: str, body: dict, headers: dict, on_first_token=None) -> Result:
    """One streamed request, timed chunk by chunk; `on_first_token(perf_counter time)` at its first text."""
    import aiohttp

    r, chat = Result(), "messages" in body
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for line in resp.content:  # one `data: ...` line per event
                if not line.startswith(b"data:"):
                    continue
                if (data := line[5:].strip()) == b"[DONE]":
                    break
                now = time.perf_counter()
                first = r.text_chunks == 0
                if not r.take(json.loads(data), now - t0, chat):
                    return r
                if first and r.text_chunks and on_first_token:
                    on_first_token(now)
            r.latency = time.perf_counter() - t0
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"[:200]
        return r
    if r.text_chunks == 0:
        r.error = "the stream carried no text"
        return r
    r.output_tokens = r.output_tokens or r.text_chunks  # a server without usage: one token per chunk
    r.ok = True
    return r


class Feeder:
    """Hands out prompts until --num-prompts are sent or --duration has passed."""

    def __init__(self, args, prompts: list[str]):
        self.prompts, self.sent = prompts, 0
        self.limit = args.num_prompts or (math.inf if args.duration else 200)
        self.start = time.perf_counter()
        self.deadline = self.start + args.duration if args.duration else math.inf

    def next(self) -> str | None:
        if self.sent >= self.limit or time.perf_counter() >= self.deadline:
            return None
        self.sent += 1
        return self.prompts[(self.sent - 1) % len(self.prompts)]


async def run_load(args, session, url: str, headers: dict, prompts: list[str], model: str
                   ) -> tuple[list[Result], float]:
    """Send the requests; returns the results and the seconds from the first send to the last answer."""
    results: list[Result] = []
    feeder = Feeder(args, prompts)

    async def one(prompt: str) -> None:
        results.append(await stream_request(session, url, request_body(args, model, prompt), headers))

    if args.request_rate is None:
        await closed_loop(feeder, one, args.concurrency or 16)
    else:
        await open_loop(feeder, one, args.request_rate, args.concurrency, args.seed)
    return results, time.perf_counter() - feeder.start


async def closed_loop(feeder: Feeder, one, clients: int) -> None:
    """`clients` clients, each sending its next request as soon as its last one has ended."""
    async def client() -> None:
        while (prompt := feeder.next()) is not None:
            await one(prompt)
    await asyncio.gather(*(client() for _ in range(clients)))


async def open_loop(feeder: Feeder, one, rate: float, cap: int | None, seed: int) -> None:
    """Poisson arrivals at `rate` per second (all at once when infinite), at most `cap` in flight."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    gate = asyncio.Semaphore(cap) if cap else None

    async def capped(prompt: str) -> None:
        if gate is None:
            return await one(prompt)
        async with gate:
            await one(prompt)
    tasks, due = [], feeder.start
    while True:
        due += rng.exponential(1.0 / rate)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if (prompt := feeder.next()) is None:
            break
        tasks.append(asyncio.create_task(capped(prompt)))
    await asyncio.gather(*tasks)


def distribution(values: list[float], scale: float = 1e3) -> dict:
    """mean, median, p95, p99 and the p95 spread (p95 - p50, and as a percentage of p50), in ms."""
    if not values:
        return dict.fromkeys(("mean", "median", "p95", "p99", "p95_spread", "p95_spread_pct"))
    import numpy as np
    v = np.asarray(values, dtype=np.float64) * scale
    p50, p95, p99 = (float(x) for x in np.percentile(v, PERCENTILES))
    return {"mean": float(v.mean()), "median": p50, "p95": p95, "p99": p99, "p95_spread": p95 - p50,
            "p95_spread_pct": 100.0 * (p95 - p50) / p50 if p50 > 0 else None}


def summarize(results: list[Result], duration: float, prompt_lens: list[int | None]) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    known = [n for n in prompt_lens if n is not None]
    fallback_len = sum(known) / len(known) if known else 0
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else fallback_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out = {"completed": len(ok), "failed": len(results) - len(ok), "errors": errors, "duration": duration,
           "total_input_tokens": int(input_tokens), "total_output_tokens": output_tokens,
           "request_throughput": len(ok) / duration if duration else None,
           "output_throughput": output_tokens / duration if duration else None,
           "total_token_throughput": (input_tokens + output_tokens) / duration if duration else None}
    series = {"ttft": [r.ttft for r in ok], "e2el": [r.latency for r in ok],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
              "itl": [gap for r in ok for gap in r.itl]}
    for key in LATENCIES:
        for stat, value in distribution(series[key]).items():
            out[f"{stat}_{key}_ms" if stat != "p95_spread_pct" else f"p95_spread_{key}_pct"] = value
    return out


async def cold_start(args, session, url: str, headers: dict, server: S.ServerProcess) -> str:
    """Wait for the launched server, then time one streamed request to its first token; returns the model."""
    await server.wait_ready(session, args.base_url, args.launch_timeout)
    model = args.model or await S.first_model(session, args.base_url, headers)
    body = {**request_body(args, model, S.PROBE_PROMPT), "max_tokens": 4}
    first: list[float] = []
    r = await stream_request(session, url, body, headers, first.append)
    if not r.ok:
        raise S.BenchError(f"the first request to the launched server failed: {r.error}")
    server.first_token_at = first[0]
    return model


async def bench(args) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.base_url.rstrip("/") + args.endpoint
    server = S.ServerProcess.launch(args.launch, args.launch_log) if args.launch else (
        S.ServerProcess.attach(args.server_pid) if args.server_pid else None)
    memory: dict = {}
    try:
        timeout = aiohttp.ClientTimeout(total=args.request_timeout)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            if args.launch:  # first of all: a cold server's first token
                model = await cold_start(args, session, url, headers, server)
            else:
                model = args.model or await S.first_model(session, args.base_url, headers)
            maker = S.PromptMaker(session, args.base_url, headers, model, args.endpoint, args.seed)
            await maker.setup()
            prompts, prompt_lens = await make_prompts(args, maker)
            for i in range(args.warmup):
                r = await stream_request(session, url, request_body(args, model, prompts[i % len(prompts)]), headers)
                if not r.ok:
                    raise S.BenchError(f"warm-up request failed: {r.error}")
            prompts = prompts[args.warmup:] if len(prompts) > args.warmup else prompts
            sampler = server.start_sampling() if server else None
            results, duration = await run_load(args, session, url, headers, prompts, model)
            if server:
                memory = await server.stop_sampling(sampler)
    finally:
        if args.launch:
            server.stop()
    return {"label": args.label, "model": model, "config": config_of(args), **maker.report(prompt_lens),
            **summarize(results, duration, prompt_lens), **S.server_report(server, memory)}


async def make_prompts(args, maker: S.PromptMaker) -> tuple[list[str], list[int | None]]:
    if args.prompt is not None:
        return [args.prompt], [await maker.count(args.prompt)]
    if args.prompt_kind == "fixed":
        text, n = await maker.make(args.input_len)
        return [text], [n]
    count = args.num_prompts or 200
    if args.duration:  # a pool, cycled: as many as the run can send, up to --prompt-pool
        expected = math.ceil(1.5 * args.request_rate * args.duration) + 8 if args.request_rate else math.inf
        count = min(args.num_prompts or math.inf, expected, args.prompt_pool)
    made = await maker.make_many(args.input_len, count + args.warmup)
    return [t for t, _ in made], [n for _, n in made]


def config_of(args) -> dict:
    keys = ("base_url", "endpoint", "concurrency", "request_rate", "num_prompts", "duration", "warmup", "input_len",
            "prompt_kind", "max_tokens", "ignore_eos", "temperature", "seed", "launch")
    config = {k: getattr(args, k) for k in keys}
    config["mode"] = "closed loop" if args.request_rate is None else "open loop (Poisson)"
    if args.request_rate is None and config["concurrency"] is None:
        config["concurrency"] = 16
    return config


def run(args: argparse.Namespace) -> int:
    from api import bench_report

    if args.compare:
        bench_report.print_comparison([bench_report.load(path) for path in args.compare])
        return 0
    for flag, value in (("--request-rate", args.request_rate), ("--duration", args.duration)):
        if value is not None and not value > 0:
            print(f"bench-serve: error: {flag} must be > 0 (inf allowed for --request-rate), got {value}",
                  file=sys.stderr)
            return 2
    import aiohttp

    # Killed (`timeout`, a CI job's end), still stop a launched server: it runs in a session of its own, so
    # nothing else would. SystemExit unwinds through bench()'s `finally`, which stops it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        summary = asyncio.run(bench(args))
    except (S.BenchError, aiohttp.ClientError, OSError) as e:  # OSError: nothing listens at --base-url
        print(f"bench-serve: error: {e}", file=sys.stderr)
        return 1
    bench_report.print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    if args.bench_jsonl and summary["completed"]:
        with open(args.bench_jsonl, "a") as f:
            f.write(json.dumps(bench_report.history_entry(summary)) + "\n")
    return 1 if summary["completed"] == 0 else 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtest", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

