"""The `cupyllm` command: `cupyllm serve [MODEL]` runs the OpenAI-compatible server with vLLM's flags.

Subcommands live in SUBCOMMANDS; `benchmark` and `bench-serve` join it as (help, add_arguments, run).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from api import bench_serve, benchmark, jit_cli  # standard library and numpy only at import
from api.bench_target import positive_int
from api.tool_parsers import PARSERS as TOOL_PARSERS

logger = logging.getLogger("cupyllm")

DEMO_SERVED_NAME = "cupyllm-demo"
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class CLIError(Exception):
    """A flag value cupyllm cannot honour; main() prints it and exits with status 2."""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="model directory or Hugging Face name, cached or downloaded (same as --model)")
    p.add_argument("--model", help="model directory or Hugging Face name; default: the built-in demo model")
    p.add_argument("--revision", help="the Hub model's branch, tag or commit (default: main)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="name(s) clients use in 'model'; the first is reported in responses (default: --model)")
    p.add_argument("--dtype", default="auto", choices=("auto", "half", "float16", "bfloat16", "float", "float32"),
                   help="weight and activation dtype; auto: the checkpoint's torch_dtype")
    p.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=positive_int, help="token budget of one engine step")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                   help="fraction of GPU memory for weights, activations and the KV cache")
    p.add_argument("--num-gpu-blocks-override", type=positive_int, help="number of KV-cache blocks")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV-cache block (only 16)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"))
    p.add_argument("--quantization", "-q", default=None, choices=("fp8",),
                   help="fp8: linear weights as E4M3 with per-channel scales, activations per token "
                        "(sm_89+ GPUs, or numpy)")
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                   help="shard the model over N ranks, one process each (one GPU each on CUDA; numpy: CPU processes)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM takes it: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 1}; "disable_by_batch_size": N turns it off in '
                        'steps with more running sequences (default 8)')
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse KV blocks of shared prompt prefixes (default: on)")
    p.add_argument("--enforce-eager", action="store_true", help="never replay CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch each decode step before the previous one's tokens reach the host "
                        "(default: on with CUDA graphs)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: seeded random weights with the checkpoint's shapes (benchmarks without weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of requests that give none")
    p.add_argument("--device", default="auto", choices=("auto", "numpy", "cuda"),
                   help="auto: cuda when CuPy sees a GPU, else the numpy backend")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $CUPYLLM_API_KEY or $VLLM_API_KEY)")
    p.add_argument("--chat-template", help="chat template file, or the template itself (default: the model's)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide when to call tools (tool_choice auto); needs --tool-call-parser")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS),
                   help="how the model writes tool calls: hermes (Qwen2.5, Qwen3), llama3_json (Llama 3.1+), mistral")
    p.add_argument("--generation-config", default="auto",
                   help="auto: use the model's generation_config.json; vllm: ignore it")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--max-request-bytes", "--max-request-body-bytes", dest="max_request_bytes", type=positive_int,
                   help="larger request bodies get a 413 before they are read (cupyllm's own flag; default: "
                        "1 MiB + 64 bytes a token of --max-model-len)")
    p.add_argument("--max-waiting-requests", type=positive_int, default=4096,
                   help="sequences that may wait for the batch; past it new requests get 503 with Retry-After "
                        "(cupyllm's own flag)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish while new ones get 503")
    p.add_argument("--stream-timeout", type=float, default=60.0,
                   help="seconds a streaming client may accept no data before its request is aborted (its KV "
                        "blocks freed) and the connection closed (cupyllm's own flag)")
    p.add_argument("--log-prompts", "--enable-log-requests", action="store_true",
                   help="log each request's prompt and sampling parameters (off: prompts never reach the log)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no log line per finished request (id, tokens, finish reason, TTFT, e2e); prompts are "
                        "logged only with --log-prompts")
    p.add_argument("--allowed-origins", default='["*"]', type=_json_list, help="CORS: allowed origins (JSON list)")
    p.add_argument("--allowed-methods", default='["*"]', type=_json_list, help="CORS: allowed methods (JSON list)")
    p.add_argument("--allowed-headers", default='["*"]', type=_json_list, help="CORS: allowed headers (JSON list)")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="accepted for compatibility: cupyllm logs no periodic stats")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for compatibility: cupyllm never runs code shipped with a model")


# Flags whose feature the engine may not have yet: (EngineConfig field, flag, the value that asks for nothing,
# why another value cannot be served). A field EngineConfig has gets the value; otherwise only that value passes.
OPTIONAL_FEATURES = (
    ("gpu_memory_utilization", "--gpu-memory-utilization", 0.9,
     "this engine sizes the KV cache itself; set its size with --num-gpu-blocks-override"),
    ("kv_cache_dtype", "--kv-cache-dtype", "auto", "the KV cache is stored in the model dtype only"),
    ("quantization", "--quantization", None, "quantized weights are not implemented; use an unquantized checkpoint"),
    ("block_size", "--block-size", 16, "KV-cache blocks hold 16 tokens"),
    ("enforce_eager", "--enforce-eager", False, ""),
)


def engine_config(args: argparse.Namespace):
    from engine.config import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig) if f.init}
    kw = dict(model=model_path_arg(args), dtype=DTYPE_ALIASES.get(args.dtype, args.dtype), seed=args.seed,
              device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              num_kv_blocks=args.num_gpu_blocks_override, chat_template=chat_template_arg(args.chat_template),
              generation_config=generation_config_arg(args.generation_config), load_format=args.load_format)
    if args.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.enable_prefix_caching is not None:
        kw["enable_prefix_caching"] = args.enable_prefix_caching
    kw["async_scheduling"] = args.async_scheduling
    kw["speculative_config"] = args.speculative_config
    kw["tensor_parallel_size"] = args.tensor_parallel_size
    for field, flag, neutral, why in OPTIONAL_FEATURES:
        value = getattr(args, field)
        if field in fields:
            kw[field] = value
        elif value != neutral:
            raise CLIError(f"{flag} {value} is not supported yet: {why}")
    return EngineConfig(**kw)


def model_arg(args: argparse.Namespace) -> str | None:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise CLIError(f"two models given: {args.model_tag!r} (positional) and --model {args.model!r}")
    return args.model_tag or args.model


def model_path_arg(args: argparse.Namespace) -> str:
    """The model as given; with --revision, the snapshot directory of that revision (the engine resolves a Hub id
    at its default revision itself)."""
    model = model_arg(args) or ""
    if args.revision is None:
        return model
    if not model:
        raise CLIError("--revision names a revision of a Hugging Face model: give the model's id too")
    from engine.loader import resolve_model_path
    return resolve_model_path(model, revision=args.revision)


def api_key_arg(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("CUPYLLM_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def chat_template_arg(value: str | None) -> str | None:
    """A file's contents, or the value itself when it is a template; a missing file is an error."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" not in value and "{%" not in value:
        raise CLIError(f"--chat-template {value!r}: no such file, and it does not look like a jinja template")
    return value


def generation_config_arg(value: str) -> str:
    if value not in ("auto", "vllm"):
        raise CLIError(f"--generation-config {value!r} is not supported yet: use 'auto' (the model's "
                       "generation_config.json) or 'vllm' (ignore it)")
    return value


class Stage:
    """Times one start-up stage; past a second, a live timer on stderr (when it is a terminal)."""

    def __init__(self, name: str, timings: dict[str, float]):
        self.name, self.timings = name, timings
        self._done = threading.Event()

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._ticker = threading.Thread(target=self._tick, daemon=True) if sys.stderr.isatty() else None
        if self._ticker is not None:
            self._ticker.start()
        return self

    def _tick(self) -> None:
        if self._done.wait(1.0):
            return
        while not self._done.wait(0.2):
            sys.stderr.write(f"\r{self.name}: {time.perf_counter() - self._t0:5.1f} s ")
            sys.stderr.flush()
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    def __exit__(self, *exc):
        self._done.set()
        if self._ticker is not None:
            self._ticker.join()  # its line is cleared before the log line below
        self.timings[self.name] = time.perf_counter() - self._t0
        if exc[0] is None:
            logger.info("%s took %.2f s", self.name, self.timings[self.name])


def _json_list(text: str) -> list[str]:
    """vLLM's form of the CORS flags: a JSON list of strings, e.g. '["https://a.example", "https://b.example"]'."""
    import json
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. '[\"*\"]', got {text!r}")
    return value


def run_serve(args: argparse.Namespace) -> int:
    from api.server import CORS, create_app
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise CLIError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                       f"{', '.join(sorted(TOOL_PARSERS))})")
    from engine.async_engine import AsyncLLMEngine
    from engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    config = engine_config(args)
    api_key = api_key_arg(args)
    served = args.served_model_name or [model_arg(args) or DEMO_SERVED_NAME]
    sock = bind_socket(args.host, args.port)  # before loading: a busy port should not cost a model load
    timings: dict[str, float] = {}
    logger.info("loading %s", config.model or "the built-in demo model (random weights: its output is nonsense)")
    with Stage("engine start (load, kernels, graph capture)", timings):
        llm = LLMEngine(config)
    if llm.runner.ranks is not None:
        logger.info("tensor parallel: %d ranks, rank 0 in this process, ranks 1-%d as pids %s",
                    config.tensor_parallel_size, config.tensor_parallel_size - 1,
                    " ".join(map(str, llm.runner.ranks.group.pids)))
    for stage, seconds in (getattr(llm, "stage_times", None) or {}).items():
        logger.info("  %s: %.2f s", stage, seconds)
    engine = AsyncLLMEngine(llm)
    app = create_app(engine, served, api_key, args.max_request_bytes, max_waiting=args.max_waiting_requests,
                     log_prompts=args.log_prompts, shutdown_timeout=args.shutdown_timeout,
                     tool_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                     cors=CORS(tuple(args.allowed_origins), tuple(args.allowed_methods), tuple(args.allowed_headers),
                               args.allow_credentials),
                     log_requests=not args.disable_log_requests, stream_timeout=args.stream_timeout)

    @app.after_server_start
    async def ready(app):
        gc.collect()
        gc.freeze()  # start-up objects never need scanning again: shorter GC pauses while serving
        host, port = sock.getsockname()[:2]
        logger.info("ready in %.2f s: serving %s on http://%s:%d", time.perf_counter() - t0, ", ".join(served),
                    f"[{host}]" if ":" in host else host, port)

    try:
        app.run(sock=sock, single_process=True, access_log=False, motd=False, backlog=1024)
    finally:
        engine.shutdown()
    from engine.tp_workers import RankFailedError
    if isinstance(engine.dead_error, RankFailedError):  # the server stopped itself (api.server)
        sys.stderr.write(f"cupyllm serve: error: {engine.dead_error}; the server stopped\n")
        return 1
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.set_inheritable(True)
    return sock


# name -> (help, add_arguments, run). `benchmark` and `bench-serve` are registered here when they exist.
SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "serve": ("run the OpenAI-compatible server", add_serve_arguments, run_serve),
    "benchmark": ("the direct engine (no HTTP) at several batch sizes: tok/s, TTFT, decode step times",
                  benchmark.add_arguments, benchmark.run),
    "bench-serve": ("load-test an OpenAI-compatible server: throughput, TTFT, TPOT, latency percentiles",
                    bench_serve.add_arguments, bench_serve.run),
    "plan": ("the fused per-layer kernel plan of a model: launches, what each stores, HBM bytes per batch size",
             jit_cli.add_plan_arguments, jit_cli.run_plan),
    "kernels": ("the on-disk cache of generated JIT kernels: --list or --clear", jit_cli.add_kernels_arguments,
                jit_cli.run_kernels),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cupyllm", description="LLM serving engine, OpenAI-compatible")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":  # Sanic's own start-up chatter
        logging.getLogger("sanic").setLevel(logging.WARNING)


def limit_blas_threads() -> None:
    """One OpenBLAS thread unless the user chose otherwise; must run before numpy is imported.

    OpenBLAS's spinning workers fight the engine thread and the event loop for cores: 64 streams of
    64 tokens from the demo model took 7.8 s with its default threads and 0.8 s with one, on 2 cores
    (docs/server.md). The numpy backend serves tiny models, whose matmuls gain nothing from threads.
    """
    if not any(name in os.environ for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"))
    limit_blas_threads()
    try:
        return args.run(args)
    except CLIError as e:
        parser.exit(2, f"cupyllm {args.command}: error: {e}\n")
    except (ValueError, OSError) as e:  # ConfigError, TokenizerError, missing files: the message says it all
        logger.debug("start-up failed", exc_info=True)
        parser.exit(1, f"cupyllm {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
