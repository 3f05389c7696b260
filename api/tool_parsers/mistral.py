"""mistral: [TOOL_CALLS] then the calls."""
from __future__ import annotations

import re
import string

from api.tool_parsers.base import (
    _WS,
    ToolParser,
    _arguments_text,
    _Brackets,
    _call_from_obj,
    _held_prefix,
    _json_end,
    _loads,
    _mistral_id,
    _skip,
)


class MistralToolParser(ToolParser):
    """`[TOOL_CALLS]` followed by a JSON list of calls `[{"name": ..., "arguments": {...}}, ...]`.

    Text before the marker is content; the marker may come more than once, and text after a
    list is content too. A single object instead of a list is accepted, and so is the newer form
    `[TOOL_CALLS]name[ARGS]{...}` (Mistral tokenizers v11+). Whatever follows the marker must be
    a valid call (or list of calls, all valid) or else everything from that marker to the end of
    the output is content (as in vLLM, which keeps the whole output). Ids are 9 alphanumerics.
    """

    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    _NAME = re.compile(r"[A-Za-z0-9_.\-]+")
    _NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")

    def __init__(self):
        super().__init__()
        self._buf = ""  # text not yet looked at
        self._held = ""  # from the marker on: content if it turns out not to be a call
        # "text" (before a marker) | "after" (just after it) | "json" | "name" | "args" (after [ARGS])
        # | "json_args" (the v11 arguments object) | "rest" (after a failure: all content)
        self._mode = "text"
        self._brackets = _Brackets()
        self._json = ""  # the JSON value or v11 name being read
        self._call_name = ""

    def _new_id(self) -> str:
        return _mistral_id()

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        segments, calls, pos = [], [], 0
        while True:
            m = text.find(self.MARKER, pos)
            if m < 0:
                segments.append(text[pos:])
                break
            segments.append(text[pos:m])
            found, end = self._parse_at(text, _skip(text, m + len(self.MARKER), _WS))
            if found is None:
                segments.append(text[m:])
                break
            calls.extend(self._tool_call(*c) for c in found)
            pos = end
        return self._content_of(segments), calls

    def _parse_at(self, text: str, p: int) -> tuple[list[tuple[str, str]] | None, int]:
        """The calls that start at text[p] (just after the marker and whitespace), and their end."""
        if p < len(text) and text[p] in "[{":
            end = _json_end(text, p)
            return (None, p) if end < 0 else (self._calls_of(text[p:end]), end)
        m = self._NAME.match(text, p)
        if m is None or not text.startswith(self.ARGS, m.end()):
            return None, p
        q = _skip(text, m.end() + len(self.ARGS), _WS)
        if not text.startswith("{", q):
            return None, p
        end = _json_end(text, q)
        if end < 0:
            return None, p
        args = _arguments_text(_loads(text[q:end]))
        return (None if args is None else [(m.group(0), args)]), end

    @staticmethod
    def _calls_of(json_text: str) -> list[tuple[str, str]] | None:
        value = _loads(json_text)
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            return None
        calls = [_call_from_obj(v) for v in value]
        return None if any(c is None for c in calls) else calls

    def feed(self, delta_text: str) -> list[dict]:
        self._check_open()
        out: list[dict] = []
        self._buf += delta_text
        while self._buf:
            buf, mode = self._buf, self._mode
            if mode == "rest":
                self._emit_text(out, buf)
                self._buf = ""
            elif mode == "text":
                i = buf.find(self.MARKER)
                if i < 0:
                    cut = len(buf) - _held_prefix(buf, self.MARKER)
                    self._emit_text(out, buf[:cut])
                    self._buf = buf[cut:]
                    break
                self._emit_text(out, buf[:i])
                self._held, self._mode, self._buf = self.MARKER, "after", buf[i + len(self.MARKER):]
            elif mode == "after" or mode == "args":
                p = _skip(buf, 0, _WS)
                self._held += buf[:p]
                buf = self._buf = buf[p:]
                if not buf:
                    break
                c = buf[0]
                if mode == "after" and c in "[{":
                    self._mode, self._brackets, self._json = "json", _Brackets(), ""
                elif mode == "args" and c == "{":
                    self._mode, self._brackets, self._json = "json_args", _Brackets(), ""
                elif mode == "after" and c in self._NAME_CHARS:
                    self._mode, self._json = "name", ""
                else:
                    self._fail(out)
            elif mode == "name":
                p = 0
                while p < len(buf) and buf[p] in self._NAME_CHARS:
                    p += 1
                self._json += buf[:p]
                self._held += buf[:p]
                buf = self._buf = buf[p:]
                if not buf:
                    break
                if buf.startswith(self.ARGS):
                    self._held += self.ARGS
                    self._call_name, self._mode, self._buf = self._json, "args", buf[len(self.ARGS):]
                elif self.ARGS.startswith(buf):
                    break  # could still become [ARGS]
                else:
                    self._fail(out)
            else:  # "json" or "json_args"
                end = self._brackets.scan(buf)
                if end < 0:
                    self._json += buf
                    self._held += buf
                    self._buf = ""
                    break
                self._json += buf[:end]
                self._held += buf[:end]
                self._buf = buf[end:]
                if mode == "json":
                    calls = self._calls_of(self._json)
                else:
                    args = _arguments_text(_loads(self._json))
                    calls = None if args is None else [(self._call_name, args)]
                if calls is None:
                    self._fail(out)
                else:
                    for c in calls:
                        self._emit_call(out, *c)
                    self._held, self._json, self._mode = "", "", "text"
        return out

    def _fail(self, out: list[dict]) -> None:
        """What follows the marker is not a call: the marker and everything after it is content."""
        self._mode = "rest"
        self._emit_text(out, self._held + self._buf)
        self._held = self._buf = self._json = ""

    def finish(self) -> list[dict]:
        if self._finished:
            return []
        self._finished = True
        out: list[dict] = []
        self._emit_text(out, self._held + self._buf)  # a marker prefix, or a call that never closed
        self._held = self._buf = self._json = ""
        self._mode = "rest"
        return out
