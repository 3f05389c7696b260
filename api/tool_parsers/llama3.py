"""llama3_json: Llama 3.1 JSON tool calls, optionally after <|python_tag|>."""
from __future__ import annotations

from api.tool_parsers.base import (
    _WS,
    ToolParser,
    _Brackets,
    _call_from_obj,
    _json_end,
    _loads,
    _skip,
)


class Llama3JsonToolParser(ToolParser):
    """The output is tool calls when it starts (after whitespace) with `{` or `<|python_tag|>`.

    Then it is a run of call objects `{"name": ..., "parameters": {...}}` ("arguments" also
    accepted), separated by `;` and/or whitespace, each optionally preceded by `<|python_tag|>`.
    Parsing stops at the first thing that is not a valid call: if no call came before it the whole
    output is content (as in vLLM), otherwise the text from there to the end is content.
    Any other output is all content (a call after some text is not recognized, as in vLLM).

    An output starting with `{` is held until that object closes, since it may be a call.
    """

    name = "llama3_json"
    TAG = "<|python_tag|>"
    _FIRST = _WS  # what may come before the first call
    _BETWEEN = _WS + ";"  # what may separate calls

    def __init__(self):
        super().__init__()
        self._buf = ""  # text not yet looked at
        self._held = ""  # looked at but undecided: content if what follows is not a call
        self._mode = "sep"  # "sep": before a call / between calls; "obj": in an object; "text": the rest is content
        self._brackets = _Brackets()
        self._obj = ""  # the object being read

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        calls, pos, n = [], 0, len(text)
        while True:
            skip = self._BETWEEN if calls else self._FIRST
            start = 0 if not calls else _skip(text, pos, skip)  # where content would begin
            p = _skip(text, start, skip)
            while text.startswith(self.TAG, p):
                p = _skip(text, p + len(self.TAG), skip)
            if p == n:
                rest = text[start:]
                break
            end = _json_end(text, p) if text[p] == "{" else -1
            call = _call_from_obj(_loads(text[p:end])) if end > 0 else None
            if call is None:
                rest = text[start:]
                break
            calls.append(self._tool_call(*call))
            pos = end
        return self._content_of([rest]), calls

    def feed(self, delta_text: str) -> list[dict]:
        self._check_open()
        out: list[dict] = []
        self._buf += delta_text
        while self._buf:
            if self._mode == "text":
                self._emit_text(out, self._buf)
                self._buf = ""
            elif self._mode == "sep":
                skip = self._BETWEEN if self._count else self._FIRST
                buf = self._buf
                p = _skip(buf, 0, skip)
                if self._held or not self._count:  # inside the element (or before the first): keep all
                    self._held += buf[:p]
                buf = buf[p:]
                if not buf:
                    self._buf = ""
                elif buf.startswith(self.TAG):
                    self._held += self.TAG
                    self._buf = buf[len(self.TAG):]
                elif self.TAG.startswith(buf):  # could still become the tag
                    self._buf = buf
                    break
                elif buf[0] == "{":
                    self._mode, self._brackets, self._obj, self._buf = "obj", _Brackets(), "", buf
                else:
                    self._fail(out, buf)
            else:  # "obj"
                buf = self._buf
                end = self._brackets.scan(buf)
                if end < 0:
                    self._obj += buf
                    self._held += buf
                    self._buf = ""
                    break
                self._obj += buf[:end]
                self._held += buf[:end]
                call = _call_from_obj(_loads(self._obj))
                if call is None:
                    self._fail(out, buf[end:])
                else:
                    self._emit_call(out, *call)
                    self._held, self._obj, self._mode, self._buf = "", "", "sep", buf[end:]
        return out

    def _fail(self, out: list[dict], rest: str) -> None:
        self._mode = "text"
        self._emit_text(out, self._held + rest)
        self._held, self._buf = "", ""

    def finish(self) -> list[dict]:
        if self._finished:
            return []
        self._finished = True
        out: list[dict] = []
        self._emit_text(out, self._held + self._buf)  # an unclosed object is never valid JSON
        self._held, self._buf, self._mode = "", "", "text"
        return out
