"""Tool calling through the server with the official openai client: tool_choice required / a named function (the
output is constrained, so the arguments always validate against the function's schema), auto with the hermes parser,
parallel_tool_calls, streamed deltas that assemble into the non-streamed calls, the tools reaching the chat template,
and 400s for bad tools."""
from __future__ import annotations

import json

import jsonschema
import pytest

from engine.demo import demo_model_dir
from engine.tokenizer import Tokenizer
from tests.test_server import openai_client, serve_demo

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "maximum": 9}}}
TIME = {"type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
# A template that shows the tool names and the assistant's earlier calls, as Qwen's does (much abridged).
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function') | map(attribute='name') "
    "| join(', ') }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("tools") / "template.jinja"
    template.write_text(TEMPLATE)
    yield from serve_demo(tmp_path_factory, ["--served-model-name", "demo", "--max-model-len", "512",
                                             "--chat-template", str(template), "--enable-auto-tool-choice",
                                             "--tool-call-parser", "hermes"])


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def _assembled(stream) -> tuple[list[dict], str, str | None]:
    """Tool calls put together from streamed deltas (by index), the streamed content, the finish reason."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or d.id
            if d.function is not None:
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


def _check_calls(calls) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_calls_a_tool_with_valid_arguments(server, client, rng, parallel):
    # A random model would go on listing calls: bias it toward closing the list, as a trained one would.
    ids = server.post("/tokenize", {"prompt": "}]", "add_special_tokens": False})["tokens"]
    bias = {str(i): 5 for i in ids}
    for _ in range(5):
        common = dict(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0,
                      seed=int(rng.integers(2**31)), max_tokens=300, parallel_tool_calls=parallel, logit_bias=bias)
        r = client.chat.completions.create(**common)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        _check_calls(calls)
        streamed, content, finish = _assembled(client.chat.completions.create(**common, stream=True))
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_a_named_function_is_called_with_arguments_that_validate(client, rng):
    for _ in range(5):
        common = dict(model="demo", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=int(rng.integers(2**31)),
                      tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=100)
        r = client.chat.completions.create(**common)
        choice = r.choices[0]
        assert choice.finish_reason == "stop" and choice.message.content is None  # as OpenAI reports a forced call
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time"
        _check_calls([call])
        streamed, content, _ = _assembled(client.chat.completions.create(**common, stream=True))
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
            [("get_time", json.loads(call.function.arguments))]


HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def test_auto_parses_the_models_own_tool_call_format(client):
    """The random demo model is made to write a hermes tool call (a regex of exactly that text): auto tool choice
    turns it into tool_calls, whole and streamed."""
    regex = "".join("\\" + ch if ch in "{}[]()+*?.|^$\\" else ch for ch in HERMES)
    common = dict(model="demo", messages=MESSAGES, tools=TOOLS, max_tokens=100, temperature=1.0, seed=3,
                  extra_body={"guided_regex": regex})
    r = client.chat.completions.create(**common)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    streamed, content, finish = _assembled(client.chat.completions.create(**common, stream=True))
    assert finish == "tool_calls" and content == ""
    assert ([(c["name"], json.loads(c["arguments"])) for c in streamed]
            == [("get_weather", {"city": "Paris", "days": 2})])
    plain = client.chat.completions.create(**{**common, "tool_choice": "none"})  # none: the text stays content
    assert plain.choices[0].message.content == HERMES and not plain.choices[0].message.tool_calls


def test_the_chat_template_sees_the_tools_unless_tool_choice_is_none(server):
    def prompt_tokens(**extra):
        body = {"model": "demo", "messages": MESSAGES, "max_tokens": 1, **extra}
        return server.post("/v1/chat/completions", body)["usage"]["prompt_tokens"]
    bare = prompt_tokens()
    assert prompt_tokens(tools=TOOLS) > bare
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == bare


def test_earlier_tool_calls_reach_the_template_as_objects():
    """OpenAI sends a past call's arguments as JSON text; templates write `arguments | tojson`, so they get the
    object (else the prompt would hold a doubly quoted string)."""
    tok = Tokenizer.from_pretrained(demo_model_dir(), chat_template=TEMPLATE)
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = tok.apply_chat_template(messages, tools=TOOLS)
    assert '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>' in text \
        or '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "Tools: get_weather, get_time" in text and "sunny" in text


BAD = [
    ({"tools": {"type": "function"}}, "'tools' must be a list"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name must be a non-empty string"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "parameters must be a JSON schema"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "'tool_choice' must be none, auto, required"),
    ({"tool_choice": "required"}, "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "constrains the output"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m for _, m in BAD])
def test_bad_tools_get_a_400(server, fields, message):
    status, raw = server.request("POST", "/v1/chat/completions", {"model": "demo", "messages": MESSAGES, **fields})
    assert status == 400, raw
    assert message in json.loads(raw)["error"]["message"]
