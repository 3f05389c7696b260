"""Tool-call parsers (api/tool_parsers/): extract() on whole outputs, feed()/finish() on any split of them.

The streaming tests check the module's promise: for every split of a text into deltas, the streamed
calls (names, concatenated argument fragments) and the concatenated content equal extract()'s.
Random splits come from numpy with a printed seed (TOOL_PARSERS_SEED=<n> replays one) and from
hypothesis, which also builds the texts out of markers, marker prefixes, valid and broken calls.
"""
from __future__ import annotations

import os
import re

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.tool_parsers import (
    PARSERS,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    get_parser,
    parse_named_output,
    parse_required_output,
    tool_call_schema,
)

try:
    import jsonschema
except ImportError:  # not in the venv: a small validator for the keywords tool_call_schema uses
    jsonschema = None

CALL_ID = re.compile(r"call_[0-9a-f]{24}")
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
SEED = int(os.environ.get("TOOL_PARSERS_SEED") or np.random.SeedSequence().entropy % 2**32)


# ---------------------------------------------------------------------------------------------
# helpers


def stream(cls, pieces):
    """Feed `pieces` to a fresh parser; (content, [(name, arguments)], fragments, parser), checking fragment shapes."""
    parser = cls()
    fragments = []
    for piece in pieces:
        fragments += parser.feed(piece)
    fragments += parser.finish()
    content, calls = [], []
    for f in fragments:
        assert len(f) == 1, f
        if "content" in f:
            assert isinstance(f["content"], str) and f["content"], f
            content.append(f["content"])
            continue
        (tc,) = f["tool_calls"]
        index = tc["index"]
        if "id" in tc:  # the call's first fragment: id, type and name, empty arguments
            assert index == len(calls), (index, fragments)
            assert tc["type"] == "function" and tc["function"]["arguments"] == ""
            assert set(tc) == {"index", "id", "type", "function"}
            calls.append([tc["function"]["name"], ""])
        else:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            assert index == len(calls) - 1, "arguments go to the call just announced"
            calls[index][1] += tc["function"]["arguments"]
    assert parser.tools_called == bool(calls)
    return "".join(content), [tuple(c) for c in calls], fragments, parser


def extract(cls, text):
    parser = cls()
    content, calls = parser.extract(text)
    assert content is None or (content and content == content.strip())
    for c in calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function"
        assert set(c["function"]) == {"name", "arguments"}
        assert isinstance(orjson.loads(c["function"]["arguments"]), dict)
    assert parser.tools_called == bool(calls)
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls], calls


def random_split(text, rng, max_piece=8):
    pieces, i = [], 0
    while i < len(text):
        n = int(rng.integers(1, max_piece + 1))
        pieces.append(text[i:i + n])
        i += n
    return pieces


def assert_stream_matches(cls, text, pieces):
    content, calls, _ = extract(cls, text)
    s_content, s_calls, _, _ = stream(cls, pieces)
    assert s_calls == calls, (text, pieces)
    assert s_content == (content or ""), (text, pieces)


def args(obj) -> str:
    return orjson.dumps(obj).decode()


def hermes_block(name, arguments, sep="\n"):
    return f"<tool_call>{sep}" + orjson.dumps({"name": name, "arguments": arguments}).decode() + f"{sep}</tool_call>"


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_errors():
    assert set(PARSERS) == {"hermes", "llama3_json", "mistral"}
    assert get_parser("hermes") is HermesToolParser
    assert get_parser("llama3_json") is Llama3JsonToolParser
    assert get_parser("mistral") is MistralToolParser
    for bad in ("qwen", "", None):
        with pytest.raises(ValueError) as e:
            get_parser(bad)
        for name in PARSERS:
            assert name in str(e.value)


def test_feed_after_finish_is_an_error_and_finish_is_idempotent():
    p = HermesToolParser()
    p.feed("hi")
    assert p.finish() == []  # "hi" went out at feed
    assert p.finish() == []
    with pytest.raises(RuntimeError):
        p.feed("more")


# ---------------------------------------------------------------------------------------------
# hermes


def test_hermes_single_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    content, calls, raw = extract(HermesToolParser, text)
    assert content is None
    assert calls == [("get_weather", '{"city":"Paris","days":3}')]
    assert CALL_ID.fullmatch(raw[0]["id"])


def test_hermes_several_calls_with_text_before():
    text = ("I'll look both up.\n\n" + hermes_block("get_weather", {"city": "Paris"}) + "\n"
            + hermes_block("get_time", {"tz": "Europe/Paris"}) + "\n")
    content, calls, raw = extract(HermesToolParser, text)
    assert content == "I'll look both up."
    assert calls == [("get_weather", '{"city":"Paris"}'), ("get_time", '{"tz":"Europe/Paris"}')]
    assert raw[0]["id"] != raw[1]["id"]


def test_hermes_text_between_and_after_is_content():
    text = "A " + hermes_block("f", {}) + " B " + hermes_block("g", {"x": 1}) + " C"
    content, calls, _ = extract(HermesToolParser, text)
    assert content == "A  B  C"
    assert [c[0] for c in calls] == ["f", "g"]


def test_hermes_no_call_is_plain_content():
    assert extract(HermesToolParser, "  Just an answer.\n") == ("Just an answer.", [], [])
    assert extract(HermesToolParser, "") == (None, [], [])
    assert extract(HermesToolParser, " \n ") == (None, [], [])


@pytest.mark.parametrize("body", [
    '{"name": "f", "arguments": {"a": 1}',  # missing brace
    "{'name': 'f', 'arguments': {}}",  # python dict, not JSON
    '{"arguments": {"a": 1}}',  # no name
    '{"name": "", "arguments": {}}',  # empty name
    '{"name": 3, "arguments": {}}',
    '{"name": "f", "arguments": [1, 2]}',  # arguments not an object
    '{"name": "f", "arguments": "not json"}',
    '["f", {}]',
    '{"name": "f", "arguments": {"x": NaN}}',
    "",
])
def test_hermes_malformed_block_stays_content(body):
    text = f"Before <tool_call>\n{body}\n</tool_call>"
    content, calls, _ = extract(HermesToolParser, text)
    assert calls == []
    assert content == text.strip()
    assert_stream_matches(HermesToolParser, text, list(text))


def test_hermes_one_malformed_block_does_not_spoil_the_others():
    bad = "<tool_call>\n{oops}\n</tool_call>"
    text = hermes_block("f", {"a": 1}) + "\n" + bad + "\n" + hermes_block("g", {})
    content, calls, _ = extract(HermesToolParser, text)
    assert calls == [("f", '{"a":1}'), ("g", "{}")]
    assert content == bad


def test_hermes_unicode_and_nested_arguments():
    arguments = {"query": "café 東京 😀 \u2028 \"quoted\" \\ back",
                 "filters": {"range": {"from": 1, "to": [2, 3.5]},
                             "tags": ["ß", {"deep": {"deeper": None, "flag": True}}]},
                 "braces": "}{][ </tool_call>"}
    text = "Sure — " + hermes_block("search", arguments)
    content, calls, _ = extract(HermesToolParser, text)
    # a "</tool_call>" inside a string value closes the block (the marker is what delimits), so
    # this call is malformed: keep it as a separate check below
    assert calls == [] and content == text
    del arguments["braces"]
    text = "Sure — " + hermes_block("search", arguments)
    content, calls, _ = extract(HermesToolParser, text)
    assert content == "Sure —"
    assert calls == [("search", args(arguments))]
    assert orjson.loads(calls[0][1]) == arguments
    assert "東京" in calls[0][1] and "😀" in calls[0][1]  # UTF-8 kept, not \u-escaped


def test_hermes_arguments_as_json_string_and_missing():
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1]}"}</tool_call><tool_call>{"name": "g"}</tool_call>'
    assert extract(HermesToolParser, text)[1] == [("f", '{"a":[1]}'), ("g", "{}")]
    text = '<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>'
    assert extract(HermesToolParser, text)[1] == [("f", '{"a":1}')]


def test_hermes_unterminated_call_that_parses_is_a_call():
    text = 'Ok.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n'
    content, calls, _ = extract(HermesToolParser, text)
    assert content == "Ok." and calls == [("f", '{"a":1}')]
    s_content, s_calls, _, _ = stream(HermesToolParser, [text])
    assert s_calls == calls and s_content == "Ok."
    text = 'Ok.\n<tool_call>\n{"name": "f", "argu'
    assert extract(HermesToolParser, text)[:2] == (text.strip(), [])
    assert_stream_matches(HermesToolParser, text, list(text))


def test_hermes_holds_back_marker_prefix():
    p = HermesToolParser()
    assert p.feed("Hello <tool") == [{"content": "Hello"}]  # the space waits for what follows
    assert p.feed("_ca") == []
    out = p.feed('ll>\n{"name": "f", "arguments": {}}')
    assert out == []  # inside the block: nothing until it closes
    out = p.feed("\n</tool_call>")
    assert [list(f) for f in out] == [["tool_calls"], ["tool_calls"]]
    assert out[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert out[1]["tool_calls"][0] == {"index": 0, "function": {"arguments": "{}"}}
    assert p.finish() == [] and p.tools_called


def test_hermes_marker_prefix_that_never_completes_becomes_content():
    p = HermesToolParser()
    assert p.feed("a <tool") == [{"content": "a"}]
    assert p.finish() == [{"content": " <tool"}]
    assert not p.tools_called
    p = HermesToolParser()
    assert p.feed("x <tool") == [{"content": "x"}]
    assert p.feed("box> y") == [{"content": " <toolbox> y"}]  # decided as soon as it diverges
    p = HermesToolParser()
    assert p.feed("<") == [] and p.feed("<") == [{"content": "<"}]  # only the last "<" may start a marker


def test_hermes_content_streams_promptly():
    p = HermesToolParser()
    assert p.feed("The answer") == [{"content": "The answer"}]
    assert p.feed(" is 42.") == [{"content": " is 42."}]
    assert p.feed("\n") == []  # trailing whitespace waits
    assert p.feed("Bye") == [{"content": "\nBye"}]
    assert p.finish() == []


# ---------------------------------------------------------------------------------------------
# llama3_json


def test_llama3_single_call_with_and_without_tag():
    obj = '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "celsius"}}'
    for text in (obj, "<|python_tag|>" + obj, "  \n" + obj + "\n", "<|python_tag|> " + obj):
        content, calls, raw = extract(Llama3JsonToolParser, text)
        assert content is None, text
        assert calls == [("get_weather", '{"city":"San Francisco","unit":"celsius"}')]
        assert CALL_ID.fullmatch(raw[0]["id"])


def test_llama3_arguments_key_also_accepted():
    text = '{"name": "f", "arguments": {"x": [1, 2]}}'
    assert extract(Llama3JsonToolParser, text)[1] == [("f", '{"x":[1,2]}')]


def test_llama3_several_calls():
    text = ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}};'
            '<|python_tag|>{"name": "c", "parameters": {"s": ";"}}\n{"name": "d", "parameters": {}}')
    content, calls, _ = extract(Llama3JsonToolParser, text)
    assert content is None
    assert calls == [("a", '{"x":1}'), ("b", "{}"), ("c", '{"s":";"}'), ("d", "{}")]


def test_llama3_text_first_is_all_content():
    text = 'Sure! {"name": "f", "parameters": {}}'
    assert extract(Llama3JsonToolParser, text)[:2] == (text, [])
    p = Llama3JsonToolParser()
    assert p.feed("Sure") == [{"content": "Sure"}]  # not a call: streams at once


def test_llama3_json_that_is_not_a_call_is_content():
    for text in ('{"answer": 42}', '{"name": "f", "parameters": 3}', "[1, 2]", '{"name": "f", "parameters": {}',
                 '{"name": "f", "parameters": {"x": NaN}}', "<|python_tag|>brave_search.call(query=\"x\")"):
        assert extract(Llama3JsonToolParser, text)[:2] == (text, []), text
        assert_stream_matches(Llama3JsonToolParser, text, list(text))


def test_llama3_failure_after_a_call_keeps_the_call():
    text = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {oops}} tail'
    content, calls, _ = extract(Llama3JsonToolParser, text)
    assert calls == [("a", "{}")]
    assert content == '{"name": "b", "parameters": {oops}} tail'
    text = '{"name": "a", "parameters": {}}\nThat is all.'
    assert extract(Llama3JsonToolParser, text)[:2] == ("That is all.", [("a", "{}")])


def test_llama3_unicode_and_nested():
    params = {"text": "naïve façade — 你好 🚀", "opts": {"a": {"b": {"c": [1, {"d": "}"}]}}, "e": "\"{\\"}}
    text = "<|python_tag|>" + orjson.dumps({"name": "translate", "parameters": params}).decode()
    content, calls, _ = extract(Llama3JsonToolParser, text)
    assert content is None and calls == [("translate", args(params))]
    assert orjson.loads(calls[0][1]) == params


def test_llama3_holds_back_tag_prefix_and_open_object():
    p = Llama3JsonToolParser()
    assert p.feed(" <|py") == []
    assert p.feed("thon_tag|>{\"name\": \"f\", ") == []
    out = p.feed('"parameters": {}}')
    assert out[0]["tool_calls"][0]["function"]["name"] == "f"
    assert p.finish() == []
    p = Llama3JsonToolParser()
    assert p.feed("<|py") == []
    assert p.finish() == [{"content": "<|py"}]
    p = Llama3JsonToolParser()
    assert p.feed("<|pyx") == [{"content": "<|pyx"}]


# ---------------------------------------------------------------------------------------------
# mistral


def test_mistral_single_and_several_calls():
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    content, calls, raw = extract(MistralToolParser, text)
    assert content is None and calls == [("get_weather", '{"city":"Paris"}')]
    assert MISTRAL_ID.fullmatch(raw[0]["id"])
    text = ('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}, '
            '{"name": "c", "arguments": {"l": [[1], [2]]}}]')
    content, calls, raw = extract(MistralToolParser, text)
    assert content is None and calls == [("a", '{"x":1}'), ("b", "{}"), ("c", '{"l":[[1],[2]]}')]
    assert all(MISTRAL_ID.fullmatch(c["id"]) for c in raw)


def test_mistral_text_before_and_after():
    text = 'Let me check the weather. [TOOL_CALLS] [{"name": "f", "arguments": {}}] Done'
    assert extract(MistralToolParser, text)[:2] == ("Let me check the weather.  Done", [("f", "{}")])


def test_mistral_single_object_and_v11_form():
    text = '[TOOL_CALLS] {"name": "f", "arguments": {"a": 1}}'
    assert extract(MistralToolParser, text)[:2] == (None, [("f", '{"a":1}')])
    text = 'Hi [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS] {}'
    assert extract(MistralToolParser, text)[:2] == ("Hi", [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")])


@pytest.mark.parametrize("tail", [
    ' [{"name": "f", "arguments": {"a": 1}]',  # bracket mismatch
    ' [{"name": "f", "arguments": {}}, {"arguments": {}}]',  # one bad element spoils the list
    " []",
    ' [{"name": "f", "arguments": {}}',  # never closes
    " hello world",
    "f[ARGS]not json",
    "f[ARG",
    "f g[ARGS]{}",
    "",
])
def test_mistral_malformed_is_content_from_the_marker(tail):
    text = "Before. [TOOL_CALLS]" + tail
    content, calls, _ = extract(MistralToolParser, text)
    assert calls == [] and content == text.strip()
    assert_stream_matches(MistralToolParser, text, list(text))


def test_mistral_failure_after_a_good_list():
    text = '[TOOL_CALLS][{"name": "a", "arguments": {}}] and [TOOL_CALLS] [{"bad": 1}] [TOOL_CALLS][{"name": "b"}]'
    content, calls, _ = extract(MistralToolParser, text)
    assert calls == [("a", "{}")]
    assert content == 'and [TOOL_CALLS] [{"bad": 1}] [TOOL_CALLS][{"name": "b"}]'


def test_mistral_unicode_nested_and_ids():
    arguments = {"msg": "Grüße aus Zürich 🇨🇭", "meta": {"a": [{"b": {"c": "]["}}], "n": -1.5e-3}}
    text = "[TOOL_CALLS] " + orjson.dumps([{"name": "send", "arguments": arguments}]).decode()
    content, calls, raw = extract(MistralToolParser, text)
    assert content is None and calls == [("send", args(arguments))]
    _, _, fragments, _ = stream(MistralToolParser, list(text))
    ids = [f["tool_calls"][0]["id"] for f in fragments if "tool_calls" in f and "id" in f["tool_calls"][0]]
    assert len(ids) == 1 and MISTRAL_ID.fullmatch(ids[0])


def test_mistral_holds_back_marker_prefix():
    p = MistralToolParser()
    assert p.feed("Checking [TOOL") == [{"content": "Checking"}]
    assert p.feed("_CALLS] [{") == []
    out = p.feed('"name": "f", "arguments": {}}]')
    assert len(out) == 2 and out[0]["tool_calls"][0]["function"]["name"] == "f"
    p = MistralToolParser()
    assert p.feed("a [x]") == [{"content": "a [x]"}]  # "[x" cannot become the marker
    assert p.feed(" [") == []
    assert p.finish() == [{"content": " ["}]


# ---------------------------------------------------------------------------------------------
# streaming == extract, on chosen texts split at random


HERMES_TEXTS = [
    "plain answer with < and <tool and </tool_call> in it",
    "Let me call.\n" + hermes_block("f", {"a": "é😀", "b": {"c": [1, 2, {"d": None}]}}) + "\n"
    + hermes_block("g", {}) + "\n",
    hermes_block("f", {"a": 1}) + " mid " + "<tool_call>\n{bad json}\n</tool_call>" + " end <tool",
    "<tool_call><tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>",
    'x<tool_call>\n{"name": "f", "arguments": {"a": "</tool"}}\n</tool_call>y',
    '<tool_call>{"name": "f", "arguments": {"s": "\\u00e9\\n\\"x\\""}}',
]
LLAMA_TEXTS = [
    '<|python_tag|>{"name": "f", "parameters": {"a": "}{", "b": [1, {"c": "\\"}"}]}}',
    ' {"name": "a", "parameters": {}} ;  <|python_tag|>{"name": "b", "parameters": {"x": "é"}};',
    '{"name": "a", "parameters": {}}; <|python_tag|>  oops {',
    '{"name": "a", "parameters": {}} trailing words',
    "Plain text, no calls; {not json}",
    '{"answer": "not a call"} and more',
    "<|python_tag|>",
    "<|python_ta",
]
MISTRAL_TEXTS = [
    'Intro [TOOL_CALLS] [{"name": "a", "arguments": {"x": "[TOOL_CALLS]"}}, {"name": "b", "arguments": {}}] outro',
    '[TOOL_CALLS]a[ARGS]{"x": {"y": "}"}}[TOOL_CALLS]b[ARGS]{}',
    'text [TOOL_CALLS] {"name": "f", "arguments": "{\\"k\\": 1}"}',
    'a [b] [TOOL [TOOL_CALLS]] tail',
    '[TOOL_CALLS][{"name": "a", "arguments": {}}] [TOOL_CALLS] oops [TOOL_CALLS][{"name": "b", "arguments": {}}]',
    "ends with [TOOL_CALLS",
]


@pytest.mark.parametrize("cls,texts", [(HermesToolParser, HERMES_TEXTS), (Llama3JsonToolParser, LLAMA_TEXTS),
                                       (MistralToolParser, MISTRAL_TEXTS)], ids=["hermes", "llama3_json", "mistral"])
def test_streaming_random_splits_equal_extract(cls, texts):
    print(f"TOOL_PARSERS_SEED={SEED}")
    rng = np.random.default_rng(SEED)
    for text in texts:
        assert_stream_matches(cls, text, [text])
        assert_stream_matches(cls, text, list(text))
        for _ in range(30):
            max_piece = int(rng.integers(1, 24))
            assert_stream_matches(cls, text, random_split(text, rng, max_piece))


def test_streamed_arguments_equal_extract_arguments_exactly():
    text = "Thinking done.\n" + hermes_block("f", {"x": "ü", "y": [1, 2.5, True]})
    _, calls, _ = extract(HermesToolParser, text)
    content, s_calls, fragments, _ = stream(HermesToolParser, random_split(text, np.random.default_rng(SEED), 3))
    assert s_calls == calls == [("f", '{"x":"ü","y":[1,2.5,true]}')]
    assert content == "Thinking done."
    assert all("content" in f for f in fragments[:-2])  # content first, then the call's two fragments


# ---------------------------------------------------------------------------------------------
# hypothesis: texts built from markers, marker prefixes, calls and noise, split anywhere


NOISE = st.lists(st.sampled_from(list(" \n\tab;:,é😀<>/[]{}\"\\|_") + ["tool_call", "TOOL_CALLS", "ARGS"]),
                 max_size=6).map("".join)
ARG_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=3), max_leaves=6)
ARGS_OBJ = st.dictionaries(st.text(max_size=4), ARG_VALUES, max_size=3)
NAMES = st.sampled_from(["f", "get_weather", "a.b-c_1"])


def _dump(obj):
    return orjson.dumps(obj).decode()


def _broken(s):
    return st.integers(0, max(0, len(s) - 1)).map(lambda k: s[:k])


CALL_OBJ = st.builds(lambda n, a, key: {"name": n, key: a}, NAMES, ARGS_OBJ,
                     st.sampled_from(["arguments", "parameters"]))
CALL_JSON = CALL_OBJ.map(_dump)
MISTRAL_LIST = st.lists(st.builds(lambda n, a: {"name": n, "arguments": a}, NAMES, ARGS_OBJ), max_size=3).map(_dump)

HERMES_ATOMS = st.one_of(
    NOISE, st.sampled_from(["<tool_call>", "</tool_call>", "<tool", "</tool_c", "\n"]),
    st.builds(lambda j, ws: f"<tool_call>{ws}{j}{ws}</tool_call>", CALL_JSON, st.sampled_from(["", "\n", " "])),
    CALL_JSON.flatmap(_broken).map(lambda j: f"<tool_call>\n{j}\n</tool_call>"),
    CALL_JSON.map(lambda j: f"<tool_call>\n{j}"))
LLAMA_ATOMS = st.one_of(
    NOISE, st.sampled_from(["<|python_tag|>", "<|python", ";", " ", "\n", "{", "}"]), CALL_JSON,
    CALL_JSON.flatmap(_broken), st.just('{"answer": 1}'))
MISTRAL_ATOMS = st.one_of(
    NOISE, st.sampled_from(["[TOOL_CALLS]", "[TOOL_CALLS] ", "[TOOL", "[ARGS]", "[ARG", "[", "]", " "]), MISTRAL_LIST,
    MISTRAL_LIST.flatmap(_broken), CALL_JSON,
    st.builds(lambda n, a: f"[TOOL_CALLS]{n}[ARGS]{_dump(a)}", NAMES, ARGS_OBJ))


def _texts_and_splits(atoms):
    def split(text):
        return st.lists(st.integers(0, len(text)), max_size=12).map(
            lambda cuts: [text[i:j] for i, j in zip([0] + sorted(cuts), sorted(cuts) + [len(text)])])
    return st.lists(atoms, max_size=8).map("".join).flatmap(lambda t: st.tuples(st.just(t), split(t)))


@pytest.mark.parametrize("cls,atoms", [(HermesToolParser, HERMES_ATOMS), (Llama3JsonToolParser, LLAMA_ATOMS),
                                       (MistralToolParser, MISTRAL_ATOMS)], ids=["hermes", "llama3_json", "mistral"])
def test_streaming_equals_extract_hypothesis(cls, atoms):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_texts_and_splits(atoms))
    def check(case):
        text, pieces = case
        assert "".join(pieces) == text
        assert_stream_matches(cls, text, pieces)
    check()


@settings(max_examples=200, deadline=None)
@given(st.lists(CALL_OBJ, min_size=1, max_size=3), st.sampled_from(["", "<|python_tag|>"]),
       st.sampled_from([";", "; ", "\n", ";\n<|python_tag|>"]), st.lists(st.integers(0, 400), max_size=10))
def test_llama3_valid_runs_hypothesis(objs, tag, sep, cuts):
    text = tag + sep.join(_dump(o) for o in objs)
    content, calls, _ = extract(Llama3JsonToolParser, text)
    assert content is None
    assert [c[0] for c in calls] == [o["name"] for o in objs]
    assert [orjson.loads(c[1]) for c in calls] == [o.get("arguments", o.get("parameters")) for o in objs]
    cuts = sorted(min(c, len(text)) for c in cuts)
    assert_stream_matches(Llama3JsonToolParser, text, [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])])


# ---------------------------------------------------------------------------------------------
# tool_choice: the structured-output schema, and parsing what it constrains


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters
]

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _valid(schema: dict, value) -> bool:
    """The few JSON Schema keywords tool_call_schema and TOOLS use."""
    t = schema.get("type")
    if t == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return False
    elif t == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
    elif t is not None and not isinstance(value, _TYPES[t]):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if "anyOf" in schema and not any(_valid(s, value) for s in schema["anyOf"]):
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        if any(k in value and not _valid(s, value[k]) for k, s in props.items()):
            return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return False
        if "items" in schema and not all(_valid(schema["items"], v) for v in value):
            return False
    return True


def valid(schema: dict, value) -> bool:
    if jsonschema is None:
        return _valid(schema, value)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def test_required_schema_accepts_call_lists_only():
    schema = tool_call_schema(TOOLS, "required")
    assert schema["type"] == "array" and schema["minItems"] == 1
    branches = schema["items"]["anyOf"]
    assert [b["properties"]["name"]["enum"] for b in branches] == [["get_weather"], ["get_time"], ["ping"]]
    assert branches[0]["properties"]["parameters"] == TOOLS[0]["function"]["parameters"]
    assert branches[2]["properties"]["parameters"] == {"type": "object", "properties": {}}
    good = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {"tz": "UTC"}},
            {"name": "ping", "parameters": {}}]
    assert valid(schema, good) and valid(schema, good[:1])
    for bad in ([], {"name": "ping", "parameters": {}}, [{"name": "nope", "parameters": {}}],
                [{"name": "get_weather", "parameters": {}}],  # city required
                [{"name": "get_weather", "parameters": {"city": 3}}],
                [{"name": "get_time", "parameters": {"tz": "UTC", "extra": 1}}],
                [{"name": "get_weather"}], [{"parameters": {"city": "x"}}],
                [{"name": "ping", "parameters": {}, "other": 1}]):
        assert not valid(schema, bad), bad


def test_named_schema_is_the_functions_parameters():
    choice = {"type": "function", "function": {"name": "get_time"}}
    schema = tool_call_schema(TOOLS, choice)
    assert schema == TOOLS[1]["function"]["parameters"]
    assert valid(schema, {"tz": "UTC"}) and not valid(schema, {}) and not valid(schema, {"tz": "UTC", "x": 1})
    assert tool_call_schema(TOOLS, {"type": "function", "function": {"name": "ping"}}) == {
        "type": "object", "properties": {}}


def test_schema_unconstrained_and_errors():
    assert tool_call_schema(TOOLS, "auto") is None
    assert tool_call_schema(TOOLS, "none") is None
    assert tool_call_schema(TOOLS, None) is None
    with pytest.raises(ValueError, match="nope"):
        tool_call_schema(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError):
        tool_call_schema([], "required")
    with pytest.raises(ValueError):
        tool_call_schema(TOOLS, "sometimes")
    with pytest.raises(ValueError):
        tool_call_schema([{"type": "function"}], "required")
    with pytest.raises(ValueError):
        tool_call_schema(TOOLS, {"type": "function", "function": {}})


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}},
                                    {"type": "function", "function": {"name": "ping"}}])
def test_schemas_compile_in_llguidance(choice):
    """The structured-output backend (engine/structured.py uses llguidance) takes them without warnings."""
    llguidance = pytest.importorskip("llguidance")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(tool_call_schema(TOOLS, choice))
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar) == (False, [])


def test_parse_constrained_outputs():
    text = '[{"name": "get_weather", "parameters": {"city": "Zürich"}}, {"name": "ping", "parameters": {}}]'
    calls = parse_required_output(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city":"Zürich"}'), ("ping", "{}")]
    assert all(CALL_ID.fullmatch(c["id"]) and c["type"] == "function" for c in calls)
    assert parse_required_output('[{"name": "get_weather", "parameters": {"ci') == []
    assert parse_required_output('{"name": "ping", "parameters": {}}') == []
    (call,) = parse_named_output("get_time", ' {"tz": "UTC"} ')
    assert call["function"] == {"name": "get_time", "arguments": '{"tz":"UTC"}'}
    assert parse_named_output("get_time", '{"tz": ') == []
    assert parse_named_output("get_time", "[1]") == []
