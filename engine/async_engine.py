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

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served until a restart."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="cupyllm-engine", daemon=True)
        self._stopped = threading.Event()
        self.dead_error: BaseException | None = None
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield this request's output deltas until it finishes. Cancelling the consumer aborts it."""
        if self.is_dead:
            raise EngineDeadError(f"engine is dead: {self.dead_error!r}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
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

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=10)

    # engine thread
    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
        except BaseException as e:  # the loop cannot go on: fail every stream, flip health
            logger.exception("engine loop died")
            self.dead_error = e
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine loop died: {e!r}"))
            while not self._stopped.is_set():  # answer later adds instead of leaving them hanging
                self._drain_commands(block=True)

    def _drain_commands(self, block: bool) -> None:
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if cmd[0] == "add":
                _, request_id, prompt, params = cmd
                if self.dead_error is not None:
                    self._deliver(request_id, EngineDeadError(f"engine is dead: {self.dead_error!r}"))
                    continue
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as e:
                    self._deliver(request_id, e)
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)
