"""Tool-call parsers: a model's raw output text -> OpenAI `tool_calls` plus the remaining content.

One parser class per `--tool-call-parser` name that vLLM accepts and that the supported families
use (see PARSERS). A server makes one parser object per choice of a request and then either:

- non-streaming: `content, tool_calls = parser.extract(text)` on the finished text;
- streaming: `parser.feed(delta_text)` for each detokenized delta, then `parser.finish()` once at
  the end; each returned item is an OpenAI chat `delta` body (`{"content": ...}` or
  `{"tool_calls": [...]}`) to send as its own chunk, in order.

Afterwards `parser.tools_called` says whether any tool call came out, so that the server can
report finish_reason "tool_calls" instead of "stop".

What streaming guarantees, for any split of a text into deltas (tests/test_tool_parsers.py checks
it on random splits):

- the tool calls are the ones `extract()` finds in the whole text, in the same order, with the same
  names; for call i the concatenation of its streamed `arguments` fragments equals `extract()`'s
  `arguments` for call i (ids are random, so they differ between the two);
- the concatenation of all streamed `content` strings equals `extract()`'s content exactly (or ""
  where `extract()` says None). Content is stripped of surrounding whitespace in both: streaming
  drops leading whitespace and holds whitespace back until some non-whitespace content follows it
  (so a trailing newline never goes out, and the whitespace between two tool calls is not sent).

How promptly things go out: ordinary text is sent as soon as it cannot be the start of a tool-call
marker; only a possible marker prefix (e.g. "<tool" for hermes) and trailing whitespace are held.
A tool call is held whole until its JSON is complete (closing marker or closing bracket), then sent
as two fragments: the name (with id, type and empty arguments), then the full arguments. A call is
never announced before it is known to be valid, so nothing sent ever needs to be taken back.

Malformed tool-call JSON never raises: the text stays content (hermes: that one block, markers
included; llama3_json and mistral: everything from the failed call to the end of the output).

Arguments are re-serialized compactly with orjson (non-ASCII kept as UTF-8, key order kept).
Numbers go through orjson's parser: integers beyond 64 bits become floats.

The markers are text: the detokenizer must keep them. `<tool_call>` (Qwen) is an ordinary added
token, but `[TOOL_CALLS]` (Mistral) is a special token that `skip_special_tokens=True` drops, so the
server must detokenize with special tokens kept when the mistral parser is on (as vLLM does).
`<|python_tag|>` (Llama) is optional here, so dropping it is harmless.
"""
from __future__ import annotations

import re
import secrets
import string

import orjson

__all__ = ["PARSERS", "get_parser", "ToolParser", "HermesToolParser", "Llama3JsonToolParser",
           "MistralToolParser", "tool_call_schema", "parse_required_output", "parse_named_output"]

_ALNUM = string.ascii_letters + string.digits
_WS = " \t\n\r"  # JSON whitespace


# ---------------------------------------------------------------------------------------------
# shared pieces


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


# ---------------------------------------------------------------------------------------------
# hermes: Qwen2.5 / Qwen3 / Hermes-style <tool_call>{json}</tool_call> blocks


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


# ---------------------------------------------------------------------------------------------
# llama3_json: Llama 3.1 / 3.2 JSON tool calls


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


# ---------------------------------------------------------------------------------------------
# mistral: [TOOL_CALLS] followed by a JSON list (or the v11 `name[ARGS]{...}` form)


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


# ---------------------------------------------------------------------------------------------
# registry


PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
    MistralToolParser.name: MistralToolParser,
}


def get_parser(name: str) -> type[ToolParser]:
    """The parser class for a `--tool-call-parser` name."""
    try:
        return PARSERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tool call parser {name!r}; choose one of: {', '.join(sorted(PARSERS))}") from None


# ---------------------------------------------------------------------------------------------
# tool_choice "required" / a named function: structured output instead of parsing


_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _functions(tools: list[dict]) -> dict[str, dict]:
    """name -> parameters schema of each function tool, in order."""
    out: dict[str, dict] = {}
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}")
        parameters = function.get("parameters")
        out[function["name"]] = parameters if isinstance(parameters, dict) else _EMPTY_PARAMETERS
    return out


def _named(tool_choice) -> str | None:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
        raise ValueError("a named tool_choice must be {'type': 'function', 'function': {'name': ...}}")
    return None


def tool_call_schema(tools: list[dict], tool_choice) -> dict | None:
    """The JSON schema that constrains generation for a `tool_choice` that forces a tool call.

    - `"required"`: the model must write a non-empty JSON list of calls,
      `[{"name": <one of the functions>, "parameters": {<that function's arguments>}}, ...]`; the
      schema is an array (minItems 1) whose items are an anyOf over the functions, each branch
      pinning "name" to one function (enum of one) and "parameters" to that function's schema.
      The server constrains decoding with it (guided JSON), sends no parser output, and turns the
      finished text into tool calls with `parse_required_output(text)`; message content is None.
    - `{"type": "function", "function": {"name": X}}`: the model writes only X's arguments object;
      the schema is X's parameters schema. The server constrains decoding with it and makes one
      call with `parse_named_output(X, text)`.
    - `"auto"`, `"none"` or None: nothing to constrain, returns None (use a parser, or nothing).

    For streaming, the server can send the constrained text as the arguments of call 0 (named) or
    buffer it and send calls when done (required). A function without "parameters" gets the
    schema of an empty-object. Raises ValueError for a tool_choice that names an unknown function,
    "required" without tools, or a malformed tools list.
    """
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    functions = _functions(tools)
    name = _named(tool_choice)
    if name is not None:
        if name not in functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
        return functions[name]
    if tool_choice != "required":
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, not {tool_choice!r}")
    if not functions:
        raise ValueError("tool_choice 'required' needs at least one tool")
    branches = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [fname]}, "parameters": parameters},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for fname, parameters in functions.items()]
    return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}}


def parse_required_output(text: str) -> list[dict]:
    """Tool calls from output constrained by tool_call_schema(tools, "required"); [] if it is not such a list
    (e.g. cut off by max_tokens), in which case the server should return the text as content."""
    value = _loads(text)
    if not isinstance(value, list):
        return []
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return []
        args = _arguments_text(item.get("parameters"))
        if args is None:
            return []
        calls.append({"id": new_call_id(), "type": "function", "function": {"name": item["name"], "arguments": args}})
    return calls


def parse_named_output(name: str, text: str) -> list[dict]:
    """The one tool call from output constrained to function `name`'s parameters schema; [] if the text is not
    a JSON object. The arguments are the text re-serialized compactly."""
    value = _loads(text)
    args = _arguments_text(value) if isinstance(value, dict) else None
    if args is None:
        return []
    return [{"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}]
