"""SamplingParams: how one request wants its tokens chosen, with vLLM's names, defaults and meanings.

Everything is checked in __post_init__; a bad value raises ValueError naming the field, the value and the range.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS). vLLM also raises temperatures in
# (0, 0.01) to 0.01 to dodge overflow; cupyllm's sampler subtracts the row max before dividing, so it keeps
# the temperature the user asked for.
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20  # OpenAI's ceiling for top_logprobs
MAX_STOP_STRINGS = 64  # each one is searched in the detokenized text every step
MAX_LOGIT_BIAS = 100.0  # OpenAI: bias values in [-100, 100]
_MAX_SEED = 2**64  # seeds key a 64-bit counter-based generator; negatives wrap modulo 2**64


def _is_int(value) -> bool:
    # numbers.Integral takes numpy integers too; bool is an int to Python but never a count or an id
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """Checks a finite number inside a range and returns it as float; the message spells out the range."""
    shown = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {shown}, got {value!r}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        raise ValueError(f"{name} must be in {shown}, got {value!r}")
    return float(value)


def _token_ids(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of token ids (integers >= 0), got {values!r}")
    ids = tuple(values)
    for token_id in ids:
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"{name} must contain only integers >= 0, got {token_id!r}")
    return tuple(int(token_id) for token_id in ids)


_GUIDE_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """vLLM's StructuredOutputsParams: exactly one constraint on the output. json: a JSON schema (an object, or its
    JSON text); regex; choice: the output is one of these strings; grammar: Lark or GBNF/EBNF; json_object: any
    JSON object; disable_any_whitespace: JSON output without optional whitespace. engine/structured.py compiles it
    (llguidance) and checks it is valid."""
    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False  # JSON without optional whitespace (vLLM's option of the same name)

    def __post_init__(self):
        given = [k for k in _GUIDE_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r:.80}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not hasattr(self.choice, "__iter__"):
                raise ValueError(f"structured_outputs.choice must be a list of strings, got {self.choice!r:.80}")
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r:.80}")
            object.__setattr__(self, "choice", choice)
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def kind(self) -> str:
        return next(k for k in _GUIDE_KINDS if getattr(self, k) not in (None, False))


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0  # subtracted once from every token already in the output; [-2, 2]
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output; [-2, 2]
    repetition_penalty: float = 1.0  # > 0; divides positive / multiplies negative logits of seen tokens
    temperature: float = 1.0  # >= 0; below SAMPLING_EPS means greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off; -1 is accepted for off and stored as 0
    min_p: float = 0.0  # [0, 1]; 0 = off
    seed: int | None = None
    stop: tuple[str, ...] | str | None = None  # stored as a tuple
    stop_token_ids: tuple[int, ...] | None = None  # stored as a tuple
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives per token; 0 = only the sampled token's
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (no prefix-cache hits)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputs | None = None  # a grammar the output must follow (engine/structured.py)

    def __post_init__(self):
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        self.n = int(self.n)
        self.presence_penalty = _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                                          lo_open=True, hi_open=True)
        self.temperature = _number("temperature", self.temperature, 0.0, math.inf, hi_open=True)
        self.top_p = _number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        self.top_k = max(int(self.top_k), 0)
        self.min_p = _number("min_p", self.min_p, 0.0, 1.0)
        self._check_seed()
        self._check_stops()
        self._check_lengths()
        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
            self.logprobs = int(self.logprobs)
        if self.prompt_logprobs is not None:
            if not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, "
                                 f"got {self.prompt_logprobs!r}")
            self.prompt_logprobs = int(self.prompt_logprobs)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_logit_bias()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise ValueError("structured_outputs must be a StructuredOutputs, got "
                             f"{type(self.structured_outputs).__name__}")
        if self.greedy and self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling (temperature 0), got {self.n}")

    def _check_seed(self):
        if self.seed is None:
            return
        if not _is_int(self.seed) or not -(2**63) <= self.seed < _MAX_SEED:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        self.seed = None if self.seed == -1 else int(self.seed)  # vLLM and OpenAI clients send -1 for none

    def _check_stops(self):
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}")
        self.stop = stop
        self.stop_token_ids = () if self.stop_token_ids is None else _token_ids("stop_token_ids",
                                                                                  self.stop_token_ids)

    def _check_lengths(self):
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        self.max_tokens = None if self.max_tokens is None else int(self.max_tokens)
        self.min_tokens = int(self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

    def _check_logit_bias(self):
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
        for token_id, bias in self.logit_bias.items():
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token_id!r}")
            _number(f"logit_bias[{token_id}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        self.logit_bias = {int(token_id): float(bias) for token_id, bias in self.logit_bias.items()}

    @property
    def greedy(self) -> bool:
        """Argmax decoding: top_p, top_k, min_p and seed do not matter."""
        return self.temperature < SAMPLING_EPS

    def validate_against_vocab(self, vocab_size: int) -> None:
        """The checks that need the model: every token id named by the request must exist."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or ())):
            check_token_ids(ids, vocab_size, name)


def check_token_ids(ids, vocab_size: int, what: str) -> None:
    """The one check of token ids from a request (prompt ids, stop_token_ids, logit_bias, ids to detokenize): integers
    in [0, vocab_size), else a ValueError naming `what` and the first offenders."""
    bad = [t for t in ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids in '{what}' must be in [0, {vocab_size}); got {bad[:8]} (outside the vocabulary)")
