"""Text <-> token ids for a HF model directory: the fast tokenizer, its special tokens and chat template.

Also the incremental detokenizer that turns a stream of sampled ids into finished text chunks.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import jinja2
import tokenizers
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine import token_bound

NO_CHAT_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
    "template if the tokenizer does not define one.")
REPLACEMENT_CHAR = "\ufffd"
GIL_FREE_CHARS = 4096  # texts at least this long are encoded without holding the GIL


class TokenizerError(ValueError):
    """A model directory whose tokenizer cannot be loaded; the message names the file."""


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """A chat template that failed to compile or render, or that called raise_exception."""


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """Special tokens in tokenizer_config.json are either a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int)]
    return []


def _pick_template(value) -> str | None:
    """`chat_template` is a string, or a list of {name, template} of which we take "default"."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A HF fast tokenizer plus what tokenizer_config / generation_config say about special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, tokenizer_config: dict, model_config: dict,
                 generation_config: dict, chat_template: str | None):
        self._backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self._add_bos = bool(tokenizer_config.get("add_bos_token", False))

        names = {k: _token_text(tokenizer_config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
        self.bos_token_id = self._id_or(names["bos"], _id_list(model_config.get("bos_token_id")))
        self.pad_token_id = self._id_or(names["pad"], [])
        self.unk_token_id = self._id_or(names["unk"], [])
        gen_eos = _id_list(generation_config.get("eos_token_id"))
        cfg_eos = _id_list(model_config.get("eos_token_id"))
        self.eos_token_id = self._id_or(names["eos"], gen_eos + cfg_eos)
        primary = [] if self.eos_token_id is None else [self.eos_token_id]
        self.eos_token_ids = frozenset(primary + gen_eos + cfg_eos)
        self.bos_token = names["bos"] or self.id_to_token(self.bos_token_id)
        self.eos_token = names["eos"] or self.id_to_token(self.eos_token_id)
        self.pad_token = names["pad"] or self.id_to_token(self.pad_token_id)
        self.unk_token = names["unk"] or self.id_to_token(self.unk_token_id)

        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and entry.get("special") and str(key).isdigit():
                special.add(int(key))
        special.update(i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)
                       if i is not None)
        self.all_special_ids = frozenset(special)

    def _id_or(self, token: str | None, fallback: list[int]) -> int | None:
        token_id = self._backend.token_to_id(token) if token is not None else None
        if token_id is None and fallback:
            token_id = fallback[0]
        return token_id

    @classmethod
    def from_pretrained(cls, model_dir: str, chat_template: str | None = None,
                        use_generation_config: bool = True) -> "Tokenizer":
        """Load `model_dir`/tokenizer.json; `chat_template` (a template or a path to one) overrides the model's."""
        model_dir = os.fspath(model_dir)
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            hint = (" (the directory has a slow SentencePiece tokenizer.model: convert it once with "
                    "transformers AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")) else "")
            raise TokenizerError(f"{path}: not found; cupyllm needs a HF fast tokenizer file{hint}")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from e
        tokenizer_config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        model_config = _read_json(os.path.join(model_dir, "config.json"))
        generation_config = (_read_json(os.path.join(model_dir, "generation_config.json"))
                             if use_generation_config else {})
        if chat_template is not None and os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        if chat_template is None:
            chat_template = cls._model_chat_template(model_dir, tokenizer_config)
        return cls(backend, tokenizer_config, model_config, generation_config, chat_template)

    @staticmethod
    def _model_chat_template(model_dir: str, tokenizer_config: dict) -> str | None:
        # Newer transformers save the template beside tokenizer_config.json instead of inside it.
        template = _pick_template(tokenizer_config.get("chat_template"))
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if template is None:
            template = _pick_template(_read_json(os.path.join(model_dir, "chat_template.json")).get("chat_template"))
        return template

    def backend_json(self) -> str:
        """The fast tokenizer serialized (tokenizer.json's text): what llguidance builds its token trie from."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Encode a rendered chat prompt with add_special_tokens=False: the template adds BOS.
        A long text goes through encode_batch_fast, which lets go of the GIL while it works (encode holds it) and
        keeps no offsets: other threads, the server's event loop among them, run meanwhile."""
        if len(text) >= GIL_FREE_CHARS:
            ids = self._backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self._add_bos and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids.insert(0, self.bos_token_id)
        return ids

    def min_tokens(self, text: str) -> int:
        """At least this many ids encode `text` (engine/token_bound.py; 0 where this tokenizer gives no bound)."""
        return token_bound.min_tokens(len(text), self._chars_per_token)

    @functools.cached_property
    def _chars_per_token(self):
        return token_bound.chars_per_token(self._backend.to_str(), self._backend.get_vocab(with_added_tokens=True))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        """Text of `ids`, exactly as the fast tokenizer decodes it; ids past the vocabulary decode to nothing.

        `spaces_between_special_tokens` is accepted for API parity and ignored, as vLLM and transformers
        do for fast tokenizers: only slow SentencePiece tokenizers ever inserted those spaces.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self._backend.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, **template_kwargs) -> str:
        """Render `messages` into a prompt string with the model's (or the given) chat template.

        A message's content may be a string or a list of text parts [{"type": "text", "text": ...}];
        the parts are joined with newlines first, since most templates only handle strings.
        Extra keyword arguments (tools, documents, ...) become template variables.
        """
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise ValueError(NO_CHAT_TEMPLATE)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or "", "unk_token": self.unk_token or ""}
        variables.update(template_kwargs)
        variables["messages"] = normalize_messages(messages)
        variables["add_generation_prompt"] = add_generation_prompt
        return render_chat_template(source, variables)


def normalize_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Copies of `messages` whose list-of-text-parts content is joined into one string."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"messages[{index}] must be an object with a 'role', got {message!r:.100}")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{index}].content: only text parts are supported, got type {kind!r}")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_template_tool_call(call) for call in message["tool_calls"]]
        normalized.append(message)
    return normalized


def _template_tool_call(call):
    """An assistant message's tool call as HF chat templates expect it: OpenAI sends function.arguments as JSON
    text, the templates (Qwen's, Llama's) write `arguments | tojson`, so they get the parsed object."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call  # not JSON: the template sees the text as sent
    return {**call, "function": {**function, "arguments": arguments}}


def _raise_exception(message: str):
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which corrupts tool schemas in a prompt.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, except that touching an unsafe attribute fails at once instead of rendering ""."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@functools.cache
def _environment() -> _TemplateEnvironment:
    env = _TemplateEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from e


def render_chat_template(source: str, variables: dict) -> str:
    """Render a chat template in the sandbox; every failure becomes a ChatTemplateError (a ValueError)."""
    template = _compile(source)
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused: it tried an unsafe operation ({e})") from e
    except Exception as e:  # a user-supplied template can fail in any way; report it as a bad request
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


class IncrementalDetokenizer:
    """Turns sampled ids into text chunks whose concatenation is exactly `tokenizer.decode(output_ids)`.

    Each `add` decodes only a window of the latest tokens: `prefix_offset` marks where the window
    starts (the token before the last emitted chunk, so that tokenizers which treat a leading space
    specially see the same context twice) and `read_offset` where the last emitted chunk ended. Text is
    held back while it ends in U+FFFD, i.e. inside an unfinished UTF-8 character.

    `prompt_ids` are accepted for interface parity but not decoded: prompt context would change the
    first token's leading space for SentencePiece tokenizers and so break equality with `decode`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._ids: list[int] = []  # output ids that contribute text
        self._prefix_offset = 0
        self._read_offset = 0
        self._chunks: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens, self.spaces_between_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one sampled id; returns the text it finished, possibly ""."""
        token_id = int(token_id)
        # Skipped specials and ids past the vocabulary decode to nothing, so they never enter the window.
        if not 0 <= token_id < self.tokenizer.vocab_size or (
                self.skip_special_tokens and token_id in self.tokenizer.all_special_ids):
            return ""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (an unfinished character decodes to U+FFFD)."""
        return self._emit(final=True) if self._read_offset < len(self._ids) else ""

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        chunk = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if chunk:
            self._chunks.append(chunk)
        return chunk

    @property
    def text(self) -> str:
        """All text emitted so far (not including held-back bytes)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""
