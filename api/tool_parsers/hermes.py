"""hermes: Qwen2.5 / Qwen3 / Hermes-style <tool_call>{json}</tool_call> blocks."""
from __future__ import annotations

import re

from api.tool_parsers.base import (
    ToolParser,
    _call_from_obj,
    _held_prefix,
    _loads,
)


class HermesToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, any number, anywhere.

    Text outside the blocks is content. A block whose JSON is not a valid call stays content,
    markers included; other blocks are unaffected. A block left open at the end of the output
    (no closing marker) is a call if the rest of the text parses as one.
    """

    name = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.S)

    def __init__(self):
        super().__init__()
        self._buf = ""  # outside a block: a held marker prefix; inside: the block's text so far
        self._in_block = False
        self._searched = 0  # inside a block: END cannot start before this index of _buf

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        segments, calls, pos = [], [], 0
        for m in self._BLOCK.finditer(text):
            segments.append(text[pos:m.start()])
            pos = m.end()
            call = _call_from_obj(_loads(m.group(1)))
            if call is None:
                segments.append(m.group(0))
            else:
                calls.append(self._tool_call(*call))
        segments.append(text[pos:])
        return self._content_of(segments), calls

    def feed(self, delta_text: str) -> list[dict]:
        self._check_open()
        out: list[dict] = []
        self._buf += delta_text
        while True:
            buf = self._buf
            if not self._in_block:
                i = buf.find(self.START)
                if i < 0:
                    cut = len(buf) - _held_prefix(buf, self.START)
                    self._emit_text(out, buf[:cut])
                    self._buf = buf[cut:]
                    return out
                self._emit_text(out, buf[:i])
                self._buf = buf[i + len(self.START):]
                self._in_block, self._searched = True, 0
            else:
                j = buf.find(self.END, self._searched)
                if j < 0:
                    self._searched = max(0, len(buf) - len(self.END) + 1)
                    return out
                self._close(out, buf[:j], self.START + buf[:j + len(self.END)])
                self._buf = buf[j + len(self.END):]
                self._in_block = False

    def finish(self) -> list[dict]:
        if self._finished:
            return []
        self._finished = True
        out: list[dict] = []
        if self._in_block:
            self._close(out, self._buf, self.START + self._buf)
        else:
            self._emit_text(out, self._buf)
        self._buf, self._in_block = "", False
        return out

    def _close(self, out: list[dict], body: str, raw: str) -> None:
        call = _call_from_obj(_loads(body))
        if call is None:
            self._emit_text(out, raw)
        else:
            self._emit_call(out, *call)
