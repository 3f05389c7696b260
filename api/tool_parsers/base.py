"""What the tool-call parsers share: the ToolParser interface (extract, feed, finish), JSON scanning, ids.
The package docstring (api/tool_parsers/__init__.py) says what every parser guarantees."""
from __future__ import annotations

import secrets
import string

import orjson

_ALNUM = string.ascii_letters + string.digits
_WS = " \t\n\r"  # JSON whitespace


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _mistral_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def _arguments_text(args) -> str | None:
    """Compact JSON text of a call's arguments object, or None when they are not an object.

    Accepts the object itself, null/missing (no arguments) or a string holding an object's JSON
    (some models double-encode).
    """
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:
            args = orjson.loads(args)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    try:
        return orjson.dumps(args).decode()
    except (orjson.JSONEncodeError, TypeError):
        return None


def _call_from_obj(obj) -> tuple[str, str] | None:
    """(name, arguments JSON) from a parsed {"name": ..., "arguments"|"parameters": {...}}, else None."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    text = _arguments_text(args)
    return None if text is None else (name, text)


def _loads(text: str):
    """orjson.loads, with None for text that is not JSON (None is never a valid call anyway)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _skip(text: str, pos: int, chars: str) -> int:
    n = len(text)
    while pos < n and text[pos] in chars:
        pos += 1
    return pos


class _Brackets:
    """Finds, incrementally, where a JSON object or array that starts with its first character ends.

    Counts brackets outside strings; says nothing about validity (the text is parsed afterwards).
    """

    __slots__ = ("depth", "in_string", "escaped")

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str) -> int:
        """Index just past the closing bracket in `text` (continuing from earlier calls), or -1."""
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for i, c in enumerate(text):
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c == "{" or c == "[":
                depth += 1
            elif c == "}" or c == "]":
                depth -= 1
                if depth == 0:
                    self.depth, self.in_string, self.escaped = depth, in_string, escaped
                    return i + 1
        self.depth, self.in_string, self.escaped = depth, in_string, escaped
        return -1


def _json_end(text: str, start: int) -> int:
    """Index just past the object or array that opens at text[start], or -1 if it never closes."""
    end = _Brackets().scan(text[start:])
    return -1 if end < 0 else start + end


class _ContentStream:
    """Streams content so that what was sent, joined, is the whole content stripped."""

    __slots__ = ("started", "blank")

    def __init__(self):
        self.started = False  # some non-whitespace content went out
        self.blank = ""  # whitespace held until non-whitespace follows it

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.blank + text
        kept = text.rstrip()
        self.blank = text[len(kept):]
        return kept


class ToolParser:
    """Base class: one object per choice of one request. Subclasses define extract, feed, finish."""

    name = ""

    def __init__(self):
        self.tools_called = False
        self._count = 0  # tool calls streamed so far: the next call's index
        self._content = _ContentStream()
        self._finished = False

    # -- helpers for subclasses

    def _new_id(self) -> str:
        return new_call_id()

    def _tool_call(self, name: str, arguments: str) -> dict:
        """A complete tool call, as in a non-streaming message."""
        self.tools_called = True
        return {"id": self._new_id(), "type": "function", "function": {"name": name, "arguments": arguments}}

    def _emit_call(self, out: list[dict], name: str, arguments: str) -> None:
        index = self._count
        self._count += 1
        self.tools_called = True
        out.append({"tool_calls": [{"index": index, "id": self._new_id(), "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})

    def _emit_text(self, out: list[dict], text: str) -> None:
        if not text:
            return
        text = self._content.push(text)
        if not text:
            return
        if out and "content" in out[-1]:
            out[-1]["content"] += text
        else:
            out.append({"content": text})

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"{type(self).__name__}: feed() after finish()")

    @staticmethod
    def _content_of(segments: list[str]) -> str | None:
        return "".join(segments).strip() or None

    # -- the interface

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a complete output. Content is None when empty."""
        raise NotImplementedError

    def feed(self, delta_text: str) -> list[dict]:
        """Delta bodies to send for the next piece of output text (possibly none)."""
        raise NotImplementedError

    def finish(self) -> list[dict]:
        """Delta bodies for whatever was held back; call once, after the last feed()."""
        raise NotImplementedError
