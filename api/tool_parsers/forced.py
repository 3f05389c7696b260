"""tool_choice "required" or a named function: structured output instead of parsing."""
from __future__ import annotations

from api.tool_parsers.base import (
    _arguments_text,
    _loads,
    new_call_id,
)

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
