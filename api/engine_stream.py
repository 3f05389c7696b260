"""One API call's engine requests merged into one stream of outputs (EngineStream), the error an API caller sees for
what the engine raised (to_api_error), and vLLM's one log line per request."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from api.metrics import Metrics
from api.protocol import APIError
from engine.errors import EngineDeadError, RequestFailedError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def to_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(f"The engine is not running: {e}", 503)
    if isinstance(e, RequestFailedError):  # the engine has logged the step's traceback
        return APIError(f"Internal error: {e}", 500)
    if isinstance(e, ValueError):
        return APIError(str(e))
    logger.error("request failed", exc_info=e)
    return APIError(f"Internal error: {type(e).__name__}: {e}", 500)


class EngineStream:
    """The engine requests of one API call merged into one stream of (prompt index, RequestOutput).

    `start()` waits for the first output, so a request the engine rejects fails before any byte of
    the response is sent. `aclose()` aborts whatever is unfinished; the caller always runs it.
    """

    def __init__(self, engine, metrics: Metrics, request_id: str, prompts: list[list[int]],
                 params: list[SamplingParams], log_requests: bool = False):
        self._metrics = metrics
        self._log = _RequestLog(request_id, sum(len(p) for p in prompts)) if log_requests else None
        self._gens = [engine.generate(f"{request_id}-{i}", ids, p) for i, (ids, p) in enumerate(zip(prompts, params))]
        self._timers = [metrics.request_timer() for _ in prompts]
        self._choices = [p.n for p in params]
        self._tasks: list[asyncio.Task] = []
        self._iter = self._merged()
        self._first: tuple[int, RequestOutput] | None = None

    async def start(self) -> None:
        try:
            self._first = await self.__anext__()
        except StopAsyncIteration:
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._first is not None:
            item, self._first = self._first, None
            return item
        try:
            item = await self._iter.__anext__()
            if self._log is not None:
                self._log.saw(item[1])
            return item
        except StopAsyncIteration:
            raise
        except Exception as e:
            raise to_api_error(e) from e

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self._gens) == 1:  # the common case, without the extra hop through a queue
            async for out in self._gens[0]:
                self._metrics.observe(self._timers[0], out)
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen) -> None:
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))
            else:
                queue.put_nowait((i, None))
        self._tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self._gens)]
        left = len(self._tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                self._metrics.observe(self._timers[i], item)
                yield i, item

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._iter.aclose()
        for gen in self._gens:  # a generator left suspended aborts its engine request when closed
            await gen.aclose()
        for timer, n in zip(self._timers, self._choices):
            self._metrics.abandoned(timer, n)
        if self._log is not None:
            self._log.write()


class _RequestLog:
    """vLLM's one line per finished request (unless --disable-log-requests): id, tokens, finish, TTFT, e2e."""

    __slots__ = ("request_id", "prompt_tokens", "output_tokens", "finish", "start", "first")

    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id, self.prompt_tokens, self.output_tokens = request_id, prompt_tokens, 0
        self.finish: list[str] = []
        self.start, self.first = time.monotonic(), None

    def saw(self, out: RequestOutput) -> None:
        for o in out.outputs:
            if o.token_ids and self.first is None:
                self.first = time.monotonic()
            self.output_tokens += len(o.token_ids)
            if o.finish_reason is not None:
                self.finish.append(o.finish_reason)

    def write(self) -> None:
        end = time.monotonic()
        ttft = f"{self.first - self.start:.3f} s" if self.first is not None else "-"
        logger.info("request %s: %d prompt tokens, %d output tokens, finish %s, TTFT %s, e2e %.3f s",
                    self.request_id, self.prompt_tokens, self.output_tokens, ",".join(self.finish) or "abort",
                    ttft, end - self.start)
