"""Structured outputs through the server, as vLLM users send them (official openai client, the demo model on the
numpy backend): response_format json_object / json_schema, vLLM's structured_outputs object and guided_* fields, in
completions and chat, streamed and not, temperature 1 over many seeds: every output validates. Bad constraints get
a 400 naming the problem, and the server keeps serving."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.test_server import openai_client, serve_demo

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
          "properties": {"city": {"type": "string", "maxLength": 8}, "rank": {"type": "integer", "maximum": 99}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_demo(tmp_path_factory, ["--served-model-name", "demo", "--max-model-len", "512"])


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _closing_bias(server) -> dict:
    """Bias toward the tokens that close a JSON string or object, so a random model ends an open object."""
    ids = server.post("/tokenize", {"prompt": '"}', "add_special_tokens": False})["tokens"]
    return {str(i): 6 for i in ids}


# (name, request fields, check of the output text)
FORMS = [
    ("json_schema", {"response_format": {"type": "json_schema",
                                         "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}},
     lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ("json_object", {"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict) or 1 / 0),
    ("structured_outputs.regex", {"structured_outputs": {"regex": r"[A-Z][a-z]{1,6} [0-9]{2}"}},
     lambda t: re.fullmatch(r"[A-Z][a-z]{1,6} [0-9]{2}", t) or 1 / 0),
    ("structured_outputs.json", {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     lambda t: jsonschema.validate(json.loads(t), SCHEMA) or re.search(r"\s", t.replace(" ", "")) is None or 1 / 0),
    ("guided_json", {"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ("guided_regex", {"guided_regex": "(ab|cd)+!"}, lambda t: re.fullmatch("(ab|cd)+!", t) or 1 / 0),
    ("guided_choice", {"guided_choice": ["left", "right", "up"]}, lambda t: t in ("left", "right", "up") or 1 / 0),
    ("guided_grammar", {"guided_grammar": 'start: "x" DIGIT+ "y"\nDIGIT: /[0-9]/'},
     lambda t: re.fullmatch("x[0-9]+y", t) or 1 / 0),
]


@pytest.mark.parametrize("name, fields, check", FORMS, ids=[f[0] for f in FORMS])
def test_every_form_validates_in_completions_and_chat_streamed_or_not(server, client, rng, name, fields, check):
    bias = _closing_bias(server) if name == "json_object" else None
    extra = {**fields, **({"logit_bias": bias} if bias else {})}
    for i in range(4):
        seed = int(rng.integers(2**31))
        common = dict(model="demo", max_tokens=160, temperature=1.0, seed=seed, extra_body=extra)
        whole = client.completions.create(prompt=f"Answer {i}:", **common)
        text = whole.choices[0].text
        assert whole.choices[0].finish_reason == "stop", (name, text)
        check(text)
        streamed = client.completions.create(prompt=f"Answer {i}:", stream=True, **common)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == text  # same seed, same output
        chat = client.chat.completions.create(messages=[{"role": "user", "content": f"Question {i}"}], **common)
        assert chat.choices[0].finish_reason == "stop"
        check(chat.choices[0].message.content)
        pieces = client.chat.completions.create(messages=[{"role": "user", "content": f"Question {i}"}],
                                                stream=True, **common)
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == chat.choices[0].message.content


BAD = [
    ({"structured_outputs": {"regex": "[0-9"}}, "invalid regex"),
    ({"guided_json": {"type": "nonsense"}}, "invalid json"),
    ({"guided_json": '{"type": '}, "not valid JSON"),
    ({"guided_grammar": "start: missing"}, "invalid grammar"),
    ({"guided_choice": []}, "non-empty list"),
    ({"guided_choice": "yes"}, "list of strings"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}, "json_schema"),
    ({"response_format": {"type": "yaml"}}, "must be one of text, json_object, json_schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "not several"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"structured_outputs": {"rgx": "a"}}, "unknown fields"),
]


@pytest.mark.parametrize("fields, message", BAD, ids=[m for _, m in BAD])
def test_bad_constraints_get_a_400_that_names_the_problem(server, fields, message):
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions",
                                                              {"messages": [{"role": "user", "content": "hi"}]})):
        status, raw = server.request("POST", path, {**body, **fields, "max_tokens": 4})
        assert status == 400, raw
        error = json.loads(raw)["error"]
        assert message in error["message"] and error["type"] == "BadRequestError", error
    ok = server.post("/v1/completions", {"prompt": "still", "max_tokens": 3, "ignore_eos": True})
    assert ok["usage"]["completion_tokens"] == 3
    server.wait_idle()
