"""The Sanic app: OpenAI routes, SSE streaming, API-key auth, and errors in OpenAI's shape.

`create_app` takes an AsyncLLMEngine (or anything shaped like one), so tests build the app around
a real engine or a fake one; `api.cli` builds the engine and runs the app.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sanic import HTTPResponse, Request, Sanic
from sanic.exceptions import SanicException

from api import protocol
from api.metrics import EngineStats, Metrics
from api.protocol import APIError
from api.responses import SSE_HEADERS
from api.serving import DEFAULT_MAX_WAITING, OpenAIServing

logger = logging.getLogger(__name__)

BODY_BYTES_PER_TOKEN = 64  # JSON-escaped text runs 1-12 bytes a token; long whitespace or symbol tokens a few dozen
BODY_BYTES_FIXED = 1 << 20  # messages' structure, tools, response_format schemas, logit_bias
DRAIN_BYTES = 256 << 20  # an over-limit body up to this size is read and dropped after its 413; past it, a reset
DEFAULT_STREAM_TIMEOUT = 60.0  # seconds a streaming client may accept nothing before its request is aborted
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds SIGTERM waits for running requests; keep below the orchestrator's grace
RANK_FAILURE_EXIT_DELAY = 2.0  # seconds /health answers 503 after a tensor-parallel rank died, before the exit
_app_ids = itertools.count()


def default_max_body_bytes(max_model_len: int) -> int:
    """The request-body limit (`--max-request-bytes`) when none is given: a prompt of the whole context at 64 bytes a
    token, plus 1 MiB. A larger body holds more text than the context can take, so it is refused with a 413 from
    its Content-Length, before a byte of it is read or parsed; one within it gets the exact context-length 400."""
    return BODY_BYTES_FIXED + BODY_BYTES_PER_TOKEN * max_model_len


def version() -> str:
    try:
        return metadata.version("cupyllm")
    except metadata.PackageNotFoundError:  # running from a checkout: read setup.cfg beside the packages
        import configparser
        cfg = configparser.ConfigParser()
        cfg.read(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg"))
        return cfg.get("metadata", "version", fallback="unknown")


def json_response(body: bytes, status: int = 200, headers: dict | None = None) -> HTTPResponse:
    return HTTPResponse(body, status=status, headers=headers, content_type="application/json")


def error_response(e: APIError, headers: dict | None = None) -> HTTPResponse:
    if e.headers:
        headers = {**e.headers, **(headers or {})}
    return json_response(e.body(), e.status, headers)


def create_app(engine, served_model_names: list[str] | None = None, api_key: str | None = None,
               max_body_bytes: int | None = None,
               stats: Callable[[], EngineStats] | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
               log_prompts: bool = False, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
               tool_parser: str | None = None, cors: "CORS | None" = None, log_requests: bool = True,
               stream_timeout: float = DEFAULT_STREAM_TIMEOUT) -> Sanic:
    """The server around `engine`; `stats` gives the engine-state metrics (default: `engine.stats`, the engine's
    EngineStats snapshot).

    Run in the main thread (`cupyllm serve`), SIGTERM drains: see `Drain`.
    """
    llm = engine.engine
    names = list(served_model_names or [llm.config.model])
    metrics = Metrics(names[0], stats or engine.stats, llm.max_model_len)
    serving = OpenAIServing(engine, llm.tokenizer, names, llm.max_model_len, llm.model_config.vocab_size,
                            metrics, model_root=llm.config.model, max_waiting=max_waiting, log_prompts=log_prompts,
                            tool_parser=tool_parser, log_requests=log_requests)
    app = Sanic(f"cupyllm_{next(_app_ids)}", configure_logging=False)
    app.ctx.max_body_bytes = max_body_bytes or default_max_body_bytes(llm.max_model_len)
    # The POST routes read their bodies themselves (_json_body) against max_body_bytes; Sanic's own limit only bounds
    # how much of a refused body it reads and drops so that the client, still sending, gets to read the 413.
    app.config.REQUEST_MAX_SIZE = max(app.ctx.max_body_bytes, DRAIN_BYTES)
    app.config.RESPONSE_TIMEOUT = 7 * 24 * 3600  # generations may stream for a long time
    app.config.NOISY_EXCEPTIONS = False
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 2.0  # Sanic's own wait, after Drain has done the real one
    _add_cors(app, cors or CORS())
    drain = Drain(app, engine, serving, shutdown_timeout)
    app.ctx.engine, app.ctx.serving, app.ctx.metrics, app.ctx.drain = engine, serving, metrics, drain
    app.ctx.stream_timeout = stream_timeout
    _add_auth(app, api_key)
    _add_errors(app)
    _add_routes(app, engine, serving, metrics, drain)
    _exit_on_rank_failure(app, engine)
    return app


def _exit_on_rank_failure(app: Sanic, engine) -> None:
    """A tensor-parallel rank that died leaves an engine that can never run again: /health answers 503 naming the
    rank (the engine's dead_error) for RANK_FAILURE_EXIT_DELAY seconds, so that a health check sees why, then the
    server stops (cupyllm serve exits with status 1 and the error)."""
    from engine.tp_workers import RankFailedError

    async def watch():
        while not isinstance(getattr(engine, "dead_error", None), RankFailedError):
            await asyncio.sleep(0.05)
        logger.error("%s; /health answers 503, the server exits in %.0f s", engine.dead_error,
                     RANK_FAILURE_EXIT_DELAY)
        await asyncio.sleep(RANK_FAILURE_EXIT_DELAY)
        app.stop(terminate=False)

    @app.after_server_start
    async def start_watch(app):
        app.add_task(watch())


class Drain:
    """Graceful shutdown. On SIGTERM new generations get 503 with Retry-After and /health turns 503,
    while the running ones go on for up to `timeout` seconds; whatever is left then ends with an
    in-band 503, and the server stops. A second SIGTERM, or SIGINT, stops at once."""

    def __init__(self, app: Sanic, engine, serving: OpenAIServing, timeout: float):
        self.app, self.engine, self.serving, self.timeout = app, engine, serving, timeout
        self.in_flight = 0  # generation requests between parsing and their last byte
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

        @app.after_server_start
        async def install(app):
            if threading.current_thread() is threading.main_thread():  # signal handlers need the main thread
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.on_sigterm)

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def on_sigterm(self) -> None:
        if self._task is not None:
            logger.warning("second SIGTERM: stopping now")
            self.app.stop(terminate=False)
            return
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        self.serving.draining = True
        self._idle = asyncio.Event()
        if self.in_flight == 0:
            self._idle.set()
        logger.info("SIGTERM: refusing new requests, draining %d running for up to %.0f s", self.in_flight,
                    self.timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), self.timeout)
            logger.info("drained: stopping")
        except asyncio.TimeoutError:
            logger.warning("drain timed out with %d requests running: ending them", self.in_flight)
            fail_all = getattr(self.engine, "fail_all", None)
            if fail_all is not None:
                fail_all(APIError("The server is shutting down; this request was cut short.", 503))
            try:  # their handlers send the error and return
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        self.app.stop(terminate=False)


@dataclass(frozen=True)
class CORS:
    """vLLM's CORS flags (--allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials), its
    defaults: every origin, method and header, no credentials."""
    origins: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False


def _add_cors(app: Sanic, cors: CORS) -> None:
    """Sanic's own extension does CORS (preflight OPTIONS answered for every route, headers on every response);
    nothing else of sanic-ext is switched on."""
    from sanic_ext import Config
    methods = "" if "*" in cors.methods else ",".join(cors.methods)  # sanic-ext: "" = the route's own methods
    app.extend(config=Config(
        cors=True, cors_origins="*" if "*" in cors.origins else list(cors.origins), cors_methods=methods,
        cors_allow_headers=",".join(cors.headers), cors_supports_credentials=cors.credentials,
        cors_send_wildcard="*" in cors.origins and not cors.credentials,
        cors_automatic_options=True, cors_always_send=True, oas=False, health=False, logging=False,
        http_auto_head=False, http_auto_trace=False, http_all_methods=False, http_auto_options=True))


def _add_auth(app: Sanic, api_key: str | None) -> None:
    if not api_key:
        return
    expected = api_key.encode("utf-8", "surrogateescape")
    challenge = {"WWW-Authenticate": "Bearer"}

    @app.on_request
    async def check_api_key(request: Request):
        if request.method == "OPTIONS" or (not request.path.startswith("/v1/") and request.path != "/v1"):
            return None  # a CORS preflight carries no credentials, by the browser's rules
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return error_response(APIError("Missing API key: send the header 'Authorization: Bearer <key>'.",
                                           401), challenge)
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compare the bytes the client sent.
        if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), expected):
            return error_response(APIError("Incorrect API key provided.", 401), challenge)
        return None


def _add_errors(app: Sanic) -> None:
    @app.exception(Exception)
    async def handle(request: Request, e: Exception):
        if isinstance(e, APIError):
            return error_response(e)
        if isinstance(e, SanicException):  # 404 route, 405 method, 413 body, 408 timeout, malformed HTTP
            status = e.status_code or 500
            if status == 413:  # a chunked body that grew past the limit while read
                return error_response(_too_large(request.app.ctx.max_body_bytes))
            if status >= 500:
                logger.error("%s %s failed", request.method, request.path, exc_info=e)
            return error_response(APIError(str(e) or type(e).__name__, status))
        logger.error("%s %s failed", request.method, request.path, exc_info=e)
        return error_response(APIError(f"Internal error: {type(e).__name__}: {e}", 500))


def _too_large(limit: int) -> APIError:
    return APIError(f"Request body exceeds the size limit of {limit} bytes; the server's --max-request-bytes sets it "
                    f"(by default {BODY_BYTES_FIXED} + {BODY_BYTES_PER_TOKEN} bytes a token of --max-model-len)", 413)


async def _json_body(request: Request):
    """The parsed JSON body of a POST route. The routes are registered with stream=True, so Sanic leaves the reading
    to this: a body whose Content-Length is over the limit gets its 413 before any of it is read (Sanic then reads and
    drops the rest, up to DRAIN_BYTES, so a client that sends it whole still reads the 413 and not a reset);
    a chunked body is counted as it is read."""
    limit = request.app.ctx.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    if request.stream is not None:
        request.stream.request_max_size = limit
        await request.receive_body()
    return protocol.parse_json(request.body)


def _add_routes(app: Sanic, engine, serving: OpenAIServing, metrics: Metrics, drain: Drain) -> None:
    @app.post("/v1/completions", stream=True)
    async def completions(request: Request):
        req = protocol.parse_completion(await _json_body(request))
        drain.enter()
        try:
            return await _answer(request, await serving.completion(req), req.stream)
        finally:
            drain.leave()

    @app.post("/v1/chat/completions", stream=True)
    async def chat_completions(request: Request):
        req = protocol.parse_chat(await _json_body(request))
        drain.enter()
        try:
            return await _answer(request, await serving.chat(req), req.stream)
        finally:
            drain.leave()

    @app.get("/v1/models")
    async def models(request: Request):
        return json_response(serving.models())

    @app.get("/health")
    async def health(request: Request):
        if engine.is_dead:
            return error_response(APIError(f"The engine is not running: {engine.dead_error!r}", 503))
        if serving.draining:
            return error_response(APIError("The server is shutting down.", 503))
        return HTTPResponse(status=200)

    @app.get("/version")
    async def version_route(request: Request):
        return json_response(orjson.dumps({"version": version()}))

    @app.get("/metrics")
    async def metrics_route(request: Request):
        return HTTPResponse(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", stream=True)
    async def tokenize(request: Request):
        return json_response(await serving.tokenize(protocol.parse_tokenize(await _json_body(request))))

    @app.post("/detokenize", stream=True)
    async def detokenize(request: Request):
        return json_response(serving.detokenize(*protocol.parse_detokenize(await _json_body(request))))


async def _answer(request: Request, job, stream: bool) -> HTTPResponse | None:
    """Send `job`'s answer; if the client goes away, Sanic cancels this task and `aclose` aborts the job. A stream
    whose client accepts nothing for the app's stream_timeout (its socket buffers full: it stopped reading) is
    aborted the same way, and its connection closed: a reader that never reads holds no KV blocks for long."""
    try:
        if not stream:
            return json_response(await job.response())
        response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
        timeout = request.app.ctx.stream_timeout
        async for chunk in job.chunks():
            try:
                await asyncio.wait_for(response.send(chunk), timeout)
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
                logger.warning("request %s: the client accepted nothing for %.0f s; aborting its stream",
                               job.request_id, timeout)
                request.transport.close()
                return None
        await response.eof()
        return None
    finally:
        await job.aclose()
