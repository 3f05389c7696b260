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

from api.tool_parsers.base import ToolParser, new_call_id
from api.tool_parsers.forced import parse_named_output, parse_required_output, tool_call_schema
from api.tool_parsers.hermes import HermesToolParser
from api.tool_parsers.llama3 import Llama3JsonToolParser
from api.tool_parsers.mistral import MistralToolParser

__all__ = ["PARSERS", "get_parser", "ToolParser", "HermesToolParser", "Llama3JsonToolParser",
           "MistralToolParser", "tool_call_schema", "parse_required_output", "parse_named_output", "new_call_id"]


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
