"""The engine's failure classes, kept apart so that any engine module (the model runner included) can
raise them without importing the engine itself.

A failed step fails its requests and the engine goes on; a fatal error or too many failed steps in a
row stop the engine loop, and from then on every request is answered 503.
"""
from __future__ import annotations


class FatalEngineError(RuntimeError):
    """Raised inside a step when the engine cannot go on at all (a lost device, a corrupted cache):
    the loop stops at once instead of failing the step's requests and trying the next step."""


class EngineStepError(RuntimeError):
    """A step raised; its requests were failed and their blocks freed, and the engine can go on."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.cause = cause


class RequestFailedError(RuntimeError):
    """What a request's stream receives when a step it ran in failed (an HTTP 500)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served until a restart (an HTTP 503)."""
