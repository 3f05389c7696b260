"""One chat choice's output as content and OpenAI `tool_calls`, whole or as stream deltas, by the request's tool_choice.

- "auto" (with --enable-auto-tool-choice): the --tool-call-parser reads the model's own tool-call format.
- "required": the output was constrained to a JSON list of {name, parameters} (api/tool_parsers.tool_call_schema);
  each item is a call. Streamed once the list is complete.
- a named function: the output was constrained to that function's arguments; it is the one call's arguments,
  streamed as they come.
- "none" or no tools: plain content.
finish_reason becomes "tool_calls" where the model chose to call (auto, required); a forced named call keeps
"stop", as OpenAI reports it.
"""
from __future__ import annotations

from api.tool_parsers import get_parser, new_call_id, parse_named_output, parse_required_output


class ChoiceTools:
    def __init__(self, tool_choice, parser_name: str | None):
        self.named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        self.mode = "named" if self.named else tool_choice if tool_choice in ("required", "auto") else None
        self.parser = get_parser(parser_name)() if self.mode == "auto" else None
        self.called = False
        self._text: list[str] = []
        self._named_id = None

    def whole(self, text: str) -> tuple[str | None, list[dict]]:
        """content and tool_calls of a finished choice's text."""
        if self.mode == "auto":
            content, calls = self.parser.extract(text)
        elif self.mode == "required":
            calls = parse_required_output(text)
            content = None if calls else text
        else:
            calls = parse_named_output(self.named, text)
            content = None if calls else text
        self.called = bool(calls)
        return content, calls

    def feed(self, text: str) -> list[dict]:
        """Delta bodies for the next piece of the choice's text."""
        if not text:
            return []
        if self.mode == "auto":
            out = self.parser.feed(text)
            self.called = self.parser.tools_called
            return out
        if self.mode == "required":
            self._text.append(text)
            return []
        out = []
        if self._named_id is None:
            self._named_id = new_call_id()
            out.append({"tool_calls": [{"index": 0, "id": self._named_id, "type": "function",
                                        "function": {"name": self.named, "arguments": ""}}]})
            self.called = True
        out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return out

    def finish(self) -> list[dict]:
        """Delta bodies of what was held back, at the choice's end."""
        if self.mode == "auto":
            out = self.parser.finish()
            self.called = self.parser.tools_called
            return out
        if self.mode == "required":
            text = "".join(self._text)
            calls = parse_required_output(text)
            self.called = bool(calls)
            if not calls:
                return [{"content": text}] if text else []
            return [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
        return []

    def finish_reason(self, reason):
        return "tool_calls" if reason == "stop" and self.called and self.mode in ("auto", "required") else reason
