"""OpenAI request parsing and validation: a JSON body becomes SamplingParams plus what the response needs.

Every problem raises APIError carrying the HTTP status and an OpenAI-shaped error body; field
types are checked here, value ranges by SamplingParams (its ValueError becomes a 400 too).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from engine.sampling_params import SamplingParams, StructuredOutputs

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs; OpenAI allows 0..20 too
MAX_N = 128  # choices per prompt; a bound so one request cannot queue thousands of sequences
INT64 = (-(2 ** 63), 2 ** 63 - 1)
RESERVED_TEMPLATE_VARS = ("messages", "add_generation_prompt", "chat_template")

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 408: "RequestTimeoutError", 413: "RequestEntityTooLargeError",
               417: "ExpectationFailedError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error the client sees as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers  # extra response headers, e.g. Retry-After on a 503

    def to_dict(self) -> dict:
        return {"error": {"message": _utf8(self.message), "type": ERROR_TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())


def _utf8(text: str) -> str:
    """`text` made encodable: a message quoting raw header or path bytes may hold lone surrogates,
    which orjson (rightly) refuses to write."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object."""
    if not raw:
        raise APIError("The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(f"The request body must be a JSON object, got {_json_type(body)}.")
    return body


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


# Typed field readers: null or absent means "not given" and returns `default`.
def _int(body: dict, name: str, default=None, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(f"'{name}' must be an integer, got {_json_type(value)} {value!r:.50}", param=name)
    lo = INT64[0] if lo is None else lo
    hi = INT64[1] if hi is None else hi
    if not lo <= value <= hi:
        raise APIError(f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _float(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(f"'{name}' must be a number, got {_json_type(value)} {value!r:.50}", param=name)
    return float(value)


def _bool(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{name}' must be a boolean, got {_json_type(value)} {value!r:.50}", param=name)
    return value


def _str(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise APIError(f"'{name}' must be a string, got {_json_type(value)} {value!r:.50}", param=name)
    return value


def _object(body: dict, name: str) -> dict | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise APIError(f"'{name}' must be an object, got {_json_type(value)}", param=name)
    return value


def _int_list(value, name: str) -> list[int]:
    if not isinstance(value, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise APIError(f"'{name}' must be a list of integers", param=name)
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError("'stop' must be a string or a list of strings", param="stop")
    if any(not s for s in stop):
        raise APIError("'stop' strings must not be empty", param="stop")
    return stop or None


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = _object(body, "logit_bias")
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(f"'logit_bias' keys must be token ids, got {key!r:.50}", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(f"'logit_bias' values must be numbers in [-100, 100], got {value!r:.50} for {key}",
                           param="logit_bias")
        out[token_id] = float(value)
    return out


def _reject(body: dict, name: str, what: str, allowed=(None,)) -> None:
    """A field whose feature cupyllm does not have yet: a 400 that says so, never silently ignored."""
    if body.get(name) not in allowed:
        raise APIError(f"'{name}' is not supported yet: {what}", param=name)


def _stream_options(body: dict, stream: bool) -> bool:
    options = _object(body, "stream_options")
    if options is None:
        return False
    if not stream:
        raise APIError("Stream options can only be defined when `stream=True`.", param="stream_options")
    _reject(options, "continuous_usage_stats", "usage is sent once, in the last chunk", (None, False))
    return bool(_bool(options, "include_usage", False))


def _sampling_kwargs(body: dict) -> dict:
    """The sampling fields common to completions and chat, as SamplingParams keyword arguments."""
    _reject(body, "use_beam_search", "beam search is not implemented", (None, False))
    kw = dict(
        n=_int(body, "n", None, 1, MAX_N),
        temperature=_float(body, "temperature"),
        top_p=_float(body, "top_p"),
        top_k=_int(body, "top_k"),
        min_p=_float(body, "min_p"),
        presence_penalty=_float(body, "presence_penalty"),
        frequency_penalty=_float(body, "frequency_penalty"),
        repetition_penalty=_float(body, "repetition_penalty"),
        seed=_int(body, "seed", None, INT64[0], 2 ** 64 - 1),
        stop=_stop(body),
        stop_token_ids=(None if body.get("stop_token_ids") is None
                        else _int_list(body["stop_token_ids"], "stop_token_ids")),
        min_tokens=_int(body, "min_tokens", None, 0),
        ignore_eos=_bool(body, "ignore_eos"),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output"),
        skip_special_tokens=_bool(body, "skip_special_tokens"),
        spaces_between_special_tokens=_bool(body, "spaces_between_special_tokens"),
        logit_bias=_logit_bias(body),
    )
    _str(body, "user")  # accepted for OpenAI parity: an end-user id, used for nothing
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != (kw["n"] or 1):
        raise APIError("'best_of' is not supported yet: only best_of equal to n", param="best_of")
    kw["structured_outputs"] = structured_outputs(body)
    return {k: v for k, v in kw.items() if v is not None}


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(body: dict) -> StructuredOutputs | None:
    """The output constraint of a request, from whichever one field gives it: OpenAI's `response_format`, vLLM's
    `structured_outputs` object, or vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`.
    Its grammar is compiled (and a bad one refused) by the serving layer, off the event loop."""
    given = {}
    fmt = _object(body, "response_format")
    if fmt is not None and fmt.get("type", "text") != "text":
        given["response_format"] = _response_format(fmt)
    so = _object(body, "structured_outputs")
    if so is not None:
        known = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")
        unknown = sorted(set(so) - set(known) - {"backend", "whitespace_pattern", "structural_tag"})
        if unknown:
            raise APIError(f"'structured_outputs' has unknown fields {unknown}; allowed: {', '.join(known)}",
                           param="structured_outputs")
        _reject(so, "structural_tag", "structural tags")
        _reject(so, "whitespace_pattern", "a custom whitespace pattern (disable_any_whitespace is)")
        given["structured_outputs"] = {k: so[k] for k in known if so.get(k) is not None}
    for name, kind in _GUIDED.items():
        if body.get(name) is not None:
            given[name] = {kind: body[name]}
    _reject(body, "guided_whitespace_pattern", "a custom whitespace pattern")
    if not given:
        return None
    if len(given) > 1:
        raise APIError(f"give one output constraint, not several: got {', '.join(given)}", param=next(iter(given)))
    (param, fields), = given.items()
    if isinstance(fields.get("choice"), list):
        fields["choice"] = tuple(fields["choice"])
    try:
        return StructuredOutputs(**fields)
    except ValueError as e:
        raise APIError(str(e).replace("structured_outputs", param, 1), param=param) from None


def _response_format(fmt: dict) -> dict:
    kind = fmt.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError("'response_format' of type json_schema needs 'json_schema': {name, schema: an object, "
                           "strict}", param="response_format")
        return {"json": spec.get("schema") or {"type": "object"}}  # no schema: any JSON object, as vLLM does
    raise APIError(f"'response_format' type must be one of text, json_object, json_schema; got {kind!r:.50}",
                   param="response_format")


def make_sampling_params(kwargs: dict) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise APIError(str(e)) from None


@dataclass(slots=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # each a text or token ids
    max_tokens: int | None  # None: up to the context length
    sampling: dict  # SamplingParams keyword arguments, max_tokens still to be settled
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None


def _prompt_logprobs(body: dict, stream: bool) -> int | None:
    """vLLM's `prompt_logprobs`: the logprob of every prompt token and this many best alternatives (0..20). Like
    vLLM, refused with stream=true unless 0 (a stream's chunks have no field for them)."""
    value = _int(body, "prompt_logprobs", None, 0, MAX_LOGPROBS)
    if stream and value:
        raise APIError("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
    return value


def parse_completion(body: dict) -> CompletionRequest:
    _reject(body, "suffix", "insertion (suffix) is not implemented")
    stream = bool(_bool(body, "stream", False))
    echo = bool(_bool(body, "echo", False))
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    prompt_logprobs = _prompt_logprobs(body, stream)
    sampling = _sampling_kwargs(body)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    if prompt_logprobs is None and echo and logprobs is not None:
        prompt_logprobs = logprobs  # the echoed prompt's logprobs, with as many alternatives (vLLM does the same)
    if prompt_logprobs is not None:
        sampling["prompt_logprobs"] = prompt_logprobs
    max_tokens = 16
    if "max_tokens" in body:  # an explicit null means up to the context length, as in vLLM
        max_tokens = _int(body, "max_tokens", None, 1)
    return CompletionRequest(_str(body, "model"), _prompts(body.get("prompt")), max_tokens, sampling,
                             stream, _stream_options(body, stream), echo, logprobs)


def _prompts(prompt) -> list[str | list[int]]:
    """`prompt` as a string, a list of strings, a list of token ids, or a list of token-id lists."""
    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if is_ids(prompt):
            return [prompt]
        if all(is_ids(p) for p in prompt):
            return list(prompt)
    if prompt is None:
        raise APIError("'prompt' is required", param="prompt")
    raise APIError("'prompt' must be a non-empty string, list of strings, list of token ids, "
                   "or list of non-empty token-id lists", param="prompt")


@dataclass(slots=True)
class ChatRequest:
    model: str | None
    messages: list
    max_tokens: int | None
    sampling: dict
    stream: bool = False
    include_usage: bool = False
    add_generation_prompt: bool = True
    template_kwargs: dict = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    tools: list | None = None  # the function tools the chat template sees (None: no tools, or tool_choice none)
    tool_choice: str | dict = "none"  # "none", "auto", "required" or {"type": "function", "function": {"name"}}


def _tools(body: dict) -> tuple[list | None, str | dict, bool]:
    """tools, tool_choice (default "auto" with tools, "none" without) and parallel_tool_calls, checked."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise APIError("'tools' must be a list of {type: function, function: {name, description, parameters}}",
                           param="tools")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if (not isinstance(tool, dict) or tool.get("type", "function") != "function"
                    or not isinstance(function, dict)):
                raise APIError(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}", param="tools")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise APIError(f"tools[{i}].function.name must be a non-empty string", param="tools")
            if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
                raise APIError(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
    tools = tools or None
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    named = isinstance(choice, dict)
    if not named and choice not in ("none", "auto", "required"):
        raise APIError(f"'tool_choice' must be none, auto, required or {{type: function, function: {{name}}}}; got "
                       f"{choice!r:.80}", param="tool_choice")
    if (named or choice == "required") and not tools:
        raise APIError("'tool_choice' that forces a tool call needs 'tools'", param="tool_choice")
    parallel = _bool(body, "parallel_tool_calls", True)
    return tools, choice, parallel


def _forced_tool_schema(tools: list, choice, parallel: bool) -> StructuredOutputs:
    """The constraint that makes a "required" or named tool_choice's output parse (api/tool_parsers/forced.py)."""
    from api.tool_parsers import tool_call_schema
    try:
        schema = tool_call_schema(tools, choice)
    except ValueError as e:
        raise APIError(str(e), param="tool_choice") from None
    if not parallel and choice == "required":
        schema = {**schema, "maxItems": 1}
    return StructuredOutputs(json=schema, disable_any_whitespace=True)


def parse_chat(body: dict) -> ChatRequest:
    tools, tool_choice, parallel = _tools(body)
    _reject(body, "functions", "function calling is not implemented")
    _reject(body, "function_call", "function calling is not implemented", (None, "none"))
    _reject(body, "chat_template", "a per-request chat template; the server's --chat-template is used")
    _reject(body, "continue_final_message", "continuing the final message", (None, False))
    _reject(body, "echo", "echo in chat completions", (None, False))
    _reject(body, "prompt_logprobs", "prompt logprobs in chat completions (/v1/completions has them)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    stream = bool(_bool(body, "stream", False))
    logprobs = bool(_bool(body, "logprobs", False))
    top_logprobs = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise APIError("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    sampling = _sampling_kwargs(body)
    if logprobs:
        sampling["logprobs"] = top_logprobs or 0
    if tool_choice == "required" or isinstance(tool_choice, dict):
        if "structured_outputs" in sampling:
            raise APIError("a tool_choice that forces a tool call constrains the output itself: give no "
                           "response_format or structured_outputs with it", param="tool_choice")
        sampling["structured_outputs"] = _forced_tool_schema(tools, tool_choice, parallel)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    template_kwargs = _object(body, "chat_template_kwargs") or {}
    if not all(isinstance(k, str) and k.isidentifier() and k not in RESERVED_TEMPLATE_VARS for k in template_kwargs):
        raise APIError("'chat_template_kwargs' keys must be identifiers other than "
                       f"{', '.join(RESERVED_TEMPLATE_VARS)}", param="chat_template_kwargs")
    return ChatRequest(_str(body, "model"), messages, _int(body, name, None, 1), sampling, stream,
                       _stream_options(body, stream), bool(_bool(body, "add_generation_prompt", True)),
                       template_kwargs, logprobs, top_logprobs or 0, tools if tool_choice != "none" else None,
                       tool_choice)


def parse_tokenize(body: dict) -> dict:
    """/tokenize: {prompt, add_special_tokens} or {messages, add_generation_prompt, chat_template_kwargs}."""
    out = {"model": _str(body, "model"), "return_token_strs": bool(_bool(body, "return_token_strs", False))}
    if body.get("messages") is not None:
        chat = parse_chat({"messages": body["messages"], **{k: body[k] for k in
                           ("add_generation_prompt", "chat_template_kwargs", "chat_template") if k in body}})
        out.update(messages=chat.messages, add_generation_prompt=chat.add_generation_prompt,
                   template_kwargs=chat.template_kwargs,
                   add_special_tokens=bool(_bool(body, "add_special_tokens", False)))
        return out
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError("'prompt' must be a string (or send 'messages')", param="prompt")
    out.update(prompt=prompt, add_special_tokens=bool(_bool(body, "add_special_tokens", True)))
    return out


def parse_detokenize(body: dict) -> tuple[str | None, list[int]]:
    tokens = body.get("tokens")
    if tokens is None:
        raise APIError("'tokens' is required", param="tokens")
    return _str(body, "model"), _int_list(tokens, "tokens")
