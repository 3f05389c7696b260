"""AsyncLLMEngine: the engine loop on its own thread, one asyncio output stream per request.

The event loop only enqueues commands (add, abort) and reads per-request queues; the engine
thread owns the LLMEngine and hands outputs back with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from engine.errors import EngineDeadError, EngineStepError, RequestFailedError
from engine.llm_engine import EngineStats, LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestFailedError"]

logger = logging.getLogger(__name__)

# Failed steps in a row after which the engine counts as broken (a device that fails every step)
# rather than unlucky (one bad batch): the loop stops and /health turns 503.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="cupyllm-engine", daemon=True)
        self._stopped = threading.Event()
        self.dead_error: BaseException | None = None
        # Sequences sent to the engine thread and not yet taken in: each counter has one writer thread.
        self._seqs_sent = 0  # written by the event loop
        self._seqs_taken = 0  # written by the engine thread
        self.failed_steps = 0  # steps that raised and failed their requests
        self._failures_in_a_row = 0
        ranks = getattr(getattr(engine, "runner", None), "ranks", None)
        if ranks is not None:  # a tensor-parallel worker that dies while the engine idles stops the loop too
            ranks.group.on_failure = lambda error: self._commands.put(("failed", error))
        self._thread.start()

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a place in the batch, including those the engine thread has not taken in
        yet; read from the event loop without a lock (a deque's length and two ints)."""
        return len(self.engine.scheduler.waiting) + self._seqs_sent - self._seqs_taken

    def stats(self) -> EngineStats:
        """The engine-state snapshot /metrics reads (LLMEngine.stats), taken from the event loop without a lock."""
        return self.engine.stats()

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield this request's output deltas until it finishes. Cancelling the consumer aborts it."""
        if self.is_dead:
            raise EngineDeadError(f"engine is dead: {self.dead_error!r}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        self._seqs_sent += params.n
        self._commands.put(("add", request_id, prompt, params))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):  # rejected at add, or the engine died
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def fail_all(self, error: BaseException) -> None:
        """End every live stream with `error` (server shutdown); each stream's consumer then aborts its
        request. Call from the event loop."""
        for request_id in list(self._streams):
            self._deliver(request_id, error)

    def shutdown(self) -> None:
        """Stop the engine loop, then the engine's worker processes (tensor parallelism)."""
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=10)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    # engine thread
    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # the loop cannot go on: flip health first, then fail every stream
            self.dead_error = self.dead_error or e
            logger.exception("engine loop died")
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine loop died: {e!r}"))
            while not self._stopped.is_set():  # answer later adds instead of leaving them hanging
                self._drain_commands(block=True)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineStepError as e:  # the engine has already dropped these requests and freed their blocks
            self.failed_steps += 1
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:  # dead before any client hears of it
                self.dead_error = EngineDeadError(f"{self._failures_in_a_row} engine steps failed in a row; the "
                                                  f"last: {type(e.cause).__name__}: {e.cause}")
            error = RequestFailedError(f"the engine step running this request failed: "
                                       f"{type(e.cause).__name__}: {e.cause}")
            for request_id in e.request_ids:
                self._deliver(request_id, error)
            if self.dead_error is not None:
                raise self.dead_error from e
            return
        self._failures_in_a_row = 0
        for out in outputs:
            self._deliver(out.request_id, out)

    def _drain_commands(self, block: bool) -> None:
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if cmd[0] == "add":
                _, request_id, prompt, params = cmd
                self._seqs_taken += params.n
                if self.dead_error is not None:
                    self._deliver(request_id, EngineDeadError(f"engine is dead: {self.dead_error!r}"))
                    continue
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as e:
                    self._deliver(request_id, e)
                except Exception as e:  # a bug met by one request fails that request, not the engine
                    logger.error("adding request %s failed", request_id, exc_info=e)
                    self.engine.abort(request_id)
                    self._deliver(request_id, RequestFailedError(f"the engine could not add this request: "
                                                                 f"{type(e).__name__}: {e}"))
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])
            elif cmd[0] == "failed" and self.dead_error is None:  # RankFailedError from the workers' watcher
                raise cmd[1]

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)
