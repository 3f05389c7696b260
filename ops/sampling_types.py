"""What every sampler shares: a batch's per-row parameters as arrays (SamplingTensors), a step's result
(SamplerOutput, DeferredSample), and the one derivation of min-p's threshold. The numpy sampler is ops/sampling.py,
the CUDA one ops/cuda/sampling.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(slots=True)
class SamplerOutput:
    token_ids: np.ndarray  # int64[B]
    logprobs: np.ndarray | None  # float32[B]: the sampled token in the raw distribution
    top_ids: np.ndarray | None  # int32[B, N]: the N most likely raw tokens, best first
    top_logprobs: np.ndarray | None  # float32[B, N]


class DeferredSample:
    """A launched step's sampled ids, still on their way to the host: result() waits for them; ready() says, without
    waiting, whether they are there (False where the backend cannot tell)."""

    __slots__ = ("_wait", "_ready")

    def __init__(self, wait, ready=None):
        self._wait, self._ready = wait, ready

    def result(self) -> SamplerOutput:
        return self._wait()

    def ready(self) -> bool:
        return self._ready is not None and bool(self._ready())


_ROW_FIELDS = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("min_p", np.float32),
               ("repetition_penalty", np.float32), ("frequency_penalty", np.float32),
               ("presence_penalty", np.float32), ("seeds", np.uint64), ("steps", np.int64))
_TABLE_FIELDS = (("prompt_token_ids", np.int32), ("output_token_ids", np.int32),
                 ("logit_bias_ids", np.int32), ("logit_bias_values", np.float32))


@dataclass(slots=True)
class SamplingTensors:
    """Every per-row sampling parameter of a batch of B rows, as arrays (the CUDA sampler's inputs)."""
    temperature: np.ndarray  # float32[B]; 0 = greedy
    top_k: np.ndarray  # int32[B]; 0 = off
    top_p: np.ndarray  # float32[B]; 1 = off
    min_p: np.ndarray  # float32[B]; 0 = off
    repetition_penalty: np.ndarray  # float32[B]; 1 = off
    frequency_penalty: np.ndarray  # float32[B]; 0 = off
    presence_penalty: np.ndarray  # float32[B]; 0 = off
    seeds: np.ndarray  # uint64[B]
    steps: np.ndarray  # int64[B]: tokens the row has generated so far, the generator's counter
    prompt_token_ids: np.ndarray  # int32[B, Lp], -1 padded; filled only for rows with a repetition penalty
    output_token_ids: np.ndarray  # int32[B, Lo], -1 padded; filled only for rows with some penalty
    logit_bias_ids: np.ndarray  # int32[B, Nb], -1 padded, unique within a row
    logit_bias_values: np.ndarray  # float32[B, Nb]; -inf bans the token (min_tokens, stop ids)
    num_logprobs: int = -1  # top alternatives to return, the max over rows; -1 = no row wants logprobs
    # Structured output: int32[B, ceil(V / 32)], bit (id & 31) of word (id >> 5) set = token allowed (llguidance's
    # layout); rows without a grammar are all ones. None = no row is constrained (the sampler does nothing for it).
    token_mask: np.ndarray | None = None
    all_greedy: bool = field(init=False)
    no_penalties: bool = field(init=False)
    no_top_k_p: bool = field(init=False)

    def __post_init__(self):
        batch = len(self.temperature)
        for name, dtype in _ROW_FIELDS + _TABLE_FIELDS:
            value = getattr(self, name)
            ndim = 1 if (name, dtype) in _ROW_FIELDS else 2
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != ndim \
                    or value.shape[0] != batch:
                raise ValueError(f"SamplingTensors.{name} must be a {np.dtype(dtype).name} array with "
                                 f"{ndim} dims and {batch} rows, got {getattr(value, 'dtype', type(value))} "
                                 f"{getattr(value, 'shape', '')}")
        if self.token_mask is not None and (not isinstance(self.token_mask, np.ndarray)
                                            or self.token_mask.dtype != np.int32 or self.token_mask.ndim != 2
                                            or self.token_mask.shape[0] != batch
                                            or not self.token_mask.flags.c_contiguous):
            raise ValueError(f"SamplingTensors.token_mask must be a C-contiguous int32 array [{batch}, ceil(V / 32)], "
                             f"got {getattr(self.token_mask, 'dtype', type(self.token_mask))} "
                             f"{getattr(self.token_mask, 'shape', '')}")
        if self.logit_bias_ids.shape != self.logit_bias_values.shape:
            raise ValueError("SamplingTensors.logit_bias_ids and logit_bias_values must have one shape, got "
                             f"{self.logit_bias_ids.shape} and {self.logit_bias_values.shape}")
        greedy = self.temperature == 0
        self.all_greedy = bool(greedy.all())
        self.no_penalties = not ((self.repetition_penalty != 1).any() or self.frequency_penalty.any()
                                 or self.presence_penalty.any())
        self.no_top_k_p = bool((greedy | ((self.top_k == 0) & (self.top_p >= 1))).all())

    @property
    def ids_only(self) -> bool:
        """Only the sampled ids need to reach the host, and no later step needs this step's ids there: no
        logprobs, no penalty history. Such a step can be read back one step late."""
        return self.no_penalties and self.num_logprobs < 0

    @classmethod
    def build(cls, rows: Sequence[tuple], vocab_size: int, token_mask: np.ndarray | None = None) -> SamplingTensors:
        """rows: (params: SamplingParams, prompt_ids, output_ids, seed: int, banned_ids) per sequence."""
        temperature, top_k, top_p, min_p, penalties, seeds, steps = [], [], [], [], [], [], []
        num_logprobs = -1
        for params, _, output_ids, seed, _ in rows:
            greedy = params.greedy  # greedy rows ignore top-k/top-p/min-p, as in vLLM
            temperature.append(0.0 if greedy else params.temperature)
            top_k.append(0 if greedy or params.top_k >= vocab_size else params.top_k)
            top_p.append(1.0 if greedy else params.top_p)
            min_p.append(0.0 if greedy else params.min_p)
            penalties.append((params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
            seeds.append(seed % 2**64)
            steps.append(len(output_ids))
            if params.logprobs is not None:
                num_logprobs = max(num_logprobs, params.logprobs)
        penalties = np.array(penalties, np.float32).reshape(len(rows), 3)
        repetition = penalties[:, 0] != 1
        any_penalty = repetition | (penalties[:, 1] != 0) | (penalties[:, 2] != 0)
        bias_ids, bias_values = _bias_table(rows)
        return cls(np.array(temperature, np.float32), np.array(top_k, np.int32), np.array(top_p, np.float32),
                   np.array(min_p, np.float32), np.ascontiguousarray(penalties[:, 0]),
                   np.ascontiguousarray(penalties[:, 1]), np.ascontiguousarray(penalties[:, 2]),
                   np.array(seeds, np.uint64), np.array(steps, np.int64),
                   _pad_rows([row[1] for row in rows], repetition), _pad_rows([row[2] for row in rows], any_penalty),
                   bias_ids, bias_values, num_logprobs, token_mask)


def _pad_rows(seqs: list, wanted: np.ndarray) -> np.ndarray:
    """int32[B, L] holding the wanted rows' token ids, -1 elsewhere; rows without penalties cost nothing."""
    wanted = np.flatnonzero(wanted)
    table = np.full((len(seqs), max((len(seqs[i]) for i in wanted), default=0)), -1, np.int32)
    for i in wanted:
        table[i, :len(seqs[i])] = seqs[i]  # one C-level copy per row, no per-token Python
    return table


def _bias_table(rows: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
    merged = []
    for params, _, _, _, banned_ids in rows:
        if params.logit_bias or len(banned_ids):
            bias = dict(params.logit_bias or {})
            bias.update(dict.fromkeys(banned_ids, -np.inf))  # a ban wins over a user bias on the same token
            merged.append(bias)
        else:
            merged.append(None)
    width = max((len(b) for b in merged if b), default=0)
    ids = np.full((len(rows), width), -1, np.int32)
    values = np.zeros((len(rows), width), np.float32)
    for i, bias in enumerate(merged):
        if bias:
            ids[i, :len(bias)] = list(bias.keys())
            values[i, :len(bias)] = list(bias.values())
    return ids, values


def log_min_p(min_p: np.ndarray) -> np.ndarray:
    """min-p as the samplers use it, numpy's and the CUDA kernel's alike: p_j >= min_p * p_max <=> s_j >= log(min_p)
    (s: logits over temperature, less the peak), float32; -inf where min-p is off (0)."""
    with np.errstate(divide="ignore"):
        out = np.log(np.where(min_p > 0, min_p, 1)).astype(np.float32)
    out[min_p <= 0] = -np.inf
    return out
