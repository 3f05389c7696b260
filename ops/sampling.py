"""Token sampling on the numpy backend: logit bias, penalties, temperature, top-k, top-p, min-p, seeded draws.

The oracle the CUDA sampler is held to, so every per-row parameter is an array and every draw is addressable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# The random stream, exactly (the CUDA kernel computes the same words):
#   row with seed s (uint64) at step t (tokens it has generated), vocab index j:
#   (o0, o1, o2, o3) = Philox4x64-10(counter = (j // 8 + 1, t, 0, 0), key = (s, 0))
#   w = uint32 half (j % 2; 0 = low 32 bits) of o[(j // 2) % 4]
#   R = min(float32(w) * 2**-32 + 2**-33, 1 - 2**-24), in (0, 1);  E = -log1p(-R), a unit exponential
#   token = argmax over kept j of exp(s_j) / E_j      (gpt-fast's exponential race: no cumsum, no host sync)
# This is numpy's np.random.Philox(key=s, counter=t << 64).random_raw() stream read as little-endian uint32s
# (numpy bumps the counter before each block, hence the +1), so whole rows come from numpy's C generator and
# a few candidates from the vectorized copy below. 1 - R would lose the small R that make E small, hence log1p;
# the clamp keeps E finite, so a banned token (exp(s) = 0) never ties the best one.
_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)
_LO32, _U32 = np.uint64(0xFFFFFFFF), np.uint64(32)
# Below V / _SUBSET_RATIO kept tokens a row draws only their words with the numpy Philox (~30x slower per
# word than numpy's C generator, which must run over the whole row).
_SUBSET_RATIO = 32


def _mulhilo(a: np.ndarray, m: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """High and low 64 bits of a * m, from 32-bit limbs: numpy has no 128-bit product."""
    al, ah = a & _LO32, a >> _U32
    ml, mh = m & _LO32, m >> _U32
    t = al * ml
    u = ah * ml + (t >> _U32)
    v = al * mh + (u & _LO32)
    return ah * mh + (u >> _U32) + (v >> _U32), a * m


def philox4x64(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, ...]:
    """Philox4x64-10 (Random123) on uint64 arrays of one shape; array arithmetic wraps modulo 2**64."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + _W0, k1 + _W1
    return c0, c1, c2, c3


def philox_words(seeds, steps, token_ids) -> np.ndarray:
    """uint32 word w of the stream above for each (seed, step, vocab index); arguments broadcast."""
    seeds, steps, token_ids = (np.asarray(a).astype(np.uint64) for a in (seeds, steps, token_ids))
    seeds, steps, token_ids = np.broadcast_arrays(seeds, steps, token_ids)
    zero = np.zeros(token_ids.shape, np.uint64)
    out = philox4x64((token_ids >> np.uint64(3)) + np.uint64(1), steps, zero, zero, seeds, zero)
    word = np.choose(((token_ids >> np.uint64(1)) & np.uint64(3)).astype(np.intp), out)
    return ((word >> ((token_ids & np.uint64(1)) << np.uint64(5))) & _LO32).astype(np.uint32)


def philox_row_words(seed: int, step: int, vocab_size: int) -> np.ndarray:
    """The words of vocab indices 0..V-1 of one row, from numpy's C Philox: uint32[V]."""
    raw = np.random.Philox(key=int(seed), counter=int(step) << 64).random_raw(-(-vocab_size // 8) * 4)
    return raw.view("<u4")[:vocab_size]  # x86 and arm64 are little-endian: low half first


def neg_exponentials(words: np.ndarray) -> np.ndarray:
    """-E for words w, float32; negated so the race is one argmin and saves two passes over the vocab."""
    r = words.astype(np.float32)
    r *= np.float32(-(2.0 ** -32))
    r -= np.float32(2.0 ** -33)
    np.maximum(r, np.float32(-1 + 2.0 ** -24), out=r)
    with np.errstate(divide="ignore"):
        np.log1p(r, out=r)
    return r


@dataclass(slots=True)
class SamplerOutput:
    token_ids: np.ndarray  # int64[B]
    logprobs: np.ndarray | None  # float32[B]: the sampled token in the raw distribution
    top_ids: np.ndarray | None  # int32[B, N]: the N most likely raw tokens, best first
    top_logprobs: np.ndarray | None  # float32[B, N]


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
        if self.logit_bias_ids.shape != self.logit_bias_values.shape:
            raise ValueError("SamplingTensors.logit_bias_ids and logit_bias_values must have one shape, got "
                             f"{self.logit_bias_ids.shape} and {self.logit_bias_values.shape}")
        greedy = self.temperature == 0
        self.all_greedy = bool(greedy.all())
        self.no_penalties = not ((self.repetition_penalty != 1).any() or self.frequency_penalty.any()
                                 or self.presence_penalty.any())
        self.no_top_k_p = bool((greedy | ((self.top_k == 0) & (self.top_p >= 1))).all())

    @classmethod
    def build(cls, rows: Sequence[tuple], vocab_size: int) -> SamplingTensors:
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
                   bias_ids, bias_values, num_logprobs)


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


def _flat_keys(table: np.ndarray, rows: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """row * V + id for the valid (>= 0) ids of the chosen rows: indices into logits.reshape(-1)."""
    valid = table >= 0
    if rows is not None:
        valid &= rows[:, None]
    ids = table[valid]
    if ids.size and ids.max() >= vocab_size:
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
    return np.nonzero(valid)[0].astype(np.int64) * vocab_size + ids


def _bias_entries(t: SamplingTensors, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    valid = t.logit_bias_ids >= 0
    return _flat_keys(t.logit_bias_ids, None, vocab_size), t.logit_bias_values[valid]


def _penalty_entries(t: SamplingTensors, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys of tokens seen in prompt or output (repetition), and unique output keys with their counts."""
    repetition = t.repetition_penalty != 1
    seen = np.concatenate([_flat_keys(t.prompt_token_ids, repetition, vocab_size),
                           _flat_keys(t.output_token_ids, repetition, vocab_size)])
    counted = (t.frequency_penalty != 0) | (t.presence_penalty != 0)
    output_keys, counts = np.unique(_flat_keys(t.output_token_ids, counted, vocab_size), return_counts=True)
    return seen, output_keys, counts


def _penalize(flat: np.ndarray, t: SamplingTensors, vocab_size: int, entries: tuple) -> None:
    seen, output_keys, counts = entries
    values = flat[seen]  # gathered before the scatter, so a token seen twice is still penalized once
    penalty = t.repetition_penalty[seen // vocab_size]
    flat[seen] = np.where(values > 0, values / penalty, values * penalty)
    values = flat[output_keys]
    rows = output_keys // vocab_size
    values -= t.frequency_penalty[rows] * counts.astype(np.float32)  # vLLM's two subtractions, in its order
    values -= t.presence_penalty[rows]
    flat[output_keys] = values


def _check_logits(logits: np.ndarray, t: SamplingTensors) -> None:
    if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.ndim != 2 \
            or not logits.flags.c_contiguous or logits.shape[0] != len(t.temperature):
        raise ValueError(f"logits must be a C-contiguous float32 array [{len(t.temperature)}, V], got "
                         f"{getattr(logits, 'dtype', type(logits))} {getattr(logits, 'shape', '')}")


def apply_logit_bias(logits: np.ndarray, t: SamplingTensors) -> None:
    """logits[b, id] += bias in place, for each row's (id, bias) pairs; -inf bans the token."""
    _check_logits(logits, t)
    keys, values = _bias_entries(t, logits.shape[1])
    logits.reshape(-1)[keys] += values


def apply_penalties(logits: np.ndarray, t: SamplingTensors) -> None:
    """vLLM's penalties in place: repetition on prompt+output tokens, then frequency, then presence on output."""
    _check_logits(logits, t)
    if not t.no_penalties:
        _penalize(logits.reshape(-1), t, logits.shape[1], _penalty_entries(t, logits.shape[1]))


def sample(logits: np.ndarray, t: SamplingTensors) -> SamplerOutput:
    """One token per row of logits: float32[B, V], left as it was on return (bias and penalties are undone)."""
    _check_logits(logits, t)
    batch, vocab_size = logits.shape
    flat = logits.reshape(-1)
    bias = _bias_entries(t, vocab_size) if t.logit_bias_ids.size else None
    penalties = None if t.no_penalties else _penalty_entries(t, vocab_size)
    touched = [bias[0]] if bias else []
    touched += [penalties[0], penalties[1]] if penalties else []
    touched = np.concatenate(touched) if touched else None
    raw_touched = flat[touched] if touched is not None else None
    log_norm, top_ids, top_logprobs = _raw_logprobs(logits, t.num_logprobs)  # of the raw logits, like vLLM
    try:
        if bias:
            flat[bias[0]] += bias[1]
        if penalties:
            _penalize(flat, t, vocab_size, penalties)
        token_ids = _choose(logits, t)
    finally:
        if touched is not None:
            flat[touched] = raw_touched
    logprobs = None
    if log_norm is not None:
        logprobs = (logits[np.arange(batch), token_ids] - log_norm).astype(np.float32)
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)


def _raw_logprobs(logits: np.ndarray, num: int) -> tuple:
    """log Z per row (float64) and the num best raw tokens with their logprobs; Nones when num < 0."""
    if num < 0:
        return None, None, None
    peak = logits.max(axis=1)
    shifted = logits - peak[:, None]
    np.exp(shifted, out=shifted)
    log_norm = peak.astype(np.float64) + np.log(shifted.sum(axis=1).astype(np.float64))
    if num == 0:
        return log_norm, None, None
    num = min(num, logits.shape[1])
    top = np.argpartition(logits, logits.shape[1] - num, axis=1)[:, -num:]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1), axis=1)
    top_logprobs = np.take_along_axis(logits, top, axis=1) - log_norm[:, None]
    return log_norm, top.astype(np.int32), top_logprobs.astype(np.float32)


def _choose(logits: np.ndarray, t: SamplingTensors) -> np.ndarray:
    """Greedy rows take the argmax (lowest id on ties); the others race. Returns int64[B]."""
    if t.all_greedy:
        return logits.argmax(axis=1)
    greedy = t.temperature == 0
    token_ids = np.empty(len(logits), np.int64)
    for i in np.flatnonzero(greedy):
        token_ids[i] = logits[i].argmax()  # a view per row: copying the rows out would cost a pass
    rows = np.flatnonzero(~greedy)
    x = logits if len(rows) == len(logits) else logits[rows]
    token_ids[rows] = _sample_rows(x, t.temperature[rows], t.top_k[rows], t.top_p[rows], t.min_p[rows],
                                   t.seeds[rows], t.steps[rows])
    return token_ids


def _scaled(x: np.ndarray, peak: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """s = (x - max) / T in float32, these two rounding steps exactly: <= 0, so exp(s) cannot overflow."""
    s = x - peak[:, None]
    s /= temperature[:, None]
    return s


def _sample_rows(x, temperature, top_k, top_p, min_p, seeds, steps) -> np.ndarray:
    """Exponential race over each row's kept set {j : s_j >= tau}; x: float32[R, V] processed logits."""
    rows, vocab_size = x.shape
    peak = x.max(axis=1)
    top_k = np.where(top_k < vocab_size, top_k, 0).astype(np.int64)
    log_min_p = np.log(np.where(min_p > 0, min_p, 1)).astype(np.float32)
    log_min_p[min_p <= 0] = -np.inf
    tau = log_min_p.copy()  # min-p: p_j >= min_p * p_max  <=>  s_j >= log(min_p)
    token_ids = np.empty(rows, np.int64)
    dense = np.ones(rows, bool)
    cut = np.flatnonzero((top_k > 0) | (top_p < 1) | (min_p > 0))
    if len(cut):
        cand_ids, cand_s, cut_tau, complete = _cut(x[cut] if len(cut) < rows else x, peak[cut],
                                                   temperature[cut], top_k[cut], top_p[cut], log_min_p[cut])
        tau[cut] = cut_tau
        keep = cand_s >= cut_tau[:, None]
        small = complete & (keep.sum(axis=1) * _SUBSET_RATIO < vocab_size)
        if small.any():
            token_ids[cut[small]] = _race_subset(cand_ids[small], cand_s[small], keep[small],
                                                 seeds[cut[small]], steps[cut[small]])
            dense[cut[small]] = False
    for i in np.flatnonzero(dense):  # one row at a time keeps the [V] temporaries in cache
        s = _scaled(x[i:i + 1], peak[i:i + 1], temperature[i:i + 1])[0]
        score = np.exp(s)
        score /= neg_exponentials(philox_row_words(seeds[i], steps[i], vocab_size))
        if tau[i] > -np.inf:
            score[s < tau[i]] = 1.0  # scores of kept tokens are <= 0
        token_ids[i] = score.argmin()
    return token_ids


def _race_subset(cand_ids, cand_s, keep, seeds, steps) -> np.ndarray:
    """The race over candidate columns: only the kept tokens' words are generated."""
    r, c = np.nonzero(keep)
    score = np.ones(keep.shape, np.float32)
    score[r, c] = np.exp(cand_s[r, c]) / neg_exponentials(philox_words(seeds[r], steps[r], cand_ids[r, c]))
    return cand_ids[np.arange(len(keep)), score.argmin(axis=1)]


def _cut(x, peak, temperature, top_k, top_p, log_min_p) -> tuple:
    """Thresholds tau [S] of rows with top-k, top-p or min-p, from their best M tokens sorted by logit.

    A group of tied tokens is kept or dropped whole, so tau is a value and the kept set is {s >= tau}:
    top-k keeps s >= the k-th largest s; top-p, over the top-k set renormalized, keeps a value v while the
    mass of tokens with s > v is < top_p; min-p keeps s >= log(min_p); tau is the largest of the three.
    Returns candidate ids and scaled logits [S, M] best first, tau, and whether {s >= tau} lies inside M.
    """
    rows, vocab_size = x.shape
    need = np.where(top_k > 0, top_k + 1, vocab_size)  # k + 1 shows whether the k-th value ties past k
    mass = np.zeros(rows)
    bound = np.full(rows, np.inf, np.float32)  # unbounded rows: every token with s >= bound is among the M
    unbounded = np.flatnonzero(top_k == 0)
    if len(unbounded):
        # Every token with p < (1 - top_p) / V can go: together they weigh < 1 - top_p, so the top-p set is
        # inside {s >= log((1 - top_p) * Z / V)}; min-p gives its own bound.
        s = _scaled(x[unbounded], peak[unbounded], temperature[unbounded])
        mass[unbounded] = np.exp(s).sum(axis=1, dtype=np.float64)
        p = top_p[unbounded].astype(np.float64)
        with np.errstate(divide="ignore"):
            c = np.where(p < 1, np.log((1 - p) * mass[unbounded] / vocab_size), -np.inf).astype(np.float32)
        bound[unbounded] = np.maximum(c, log_min_p[unbounded])
        need[unbounded] = (s >= bound[unbounded, None]).sum(axis=1)
    m = int(need.max())
    if m < vocab_size:
        ids = np.argpartition(x, vocab_size - m, axis=1)[:, vocab_size - m:]
    else:
        ids = np.broadcast_to(np.arange(vocab_size), x.shape)
    xv = np.take_along_axis(x, ids, axis=1)
    order = np.argsort(xv, axis=1)[:, ::-1]
    ids = np.take_along_axis(ids, order, axis=1)
    s_top = _scaled(np.take_along_axis(xv, order, axis=1), peak, temperature)  # [S, M], descending
    row = np.arange(rows)
    in_k = np.where(top_k > 0, top_k, m)
    weights = np.exp(s_top)
    weights[np.arange(m)[None, :] >= in_k[:, None]] = 0
    kth = s_top[row, in_k - 1]
    tie_rows = np.flatnonzero((top_k > 0) & (top_k < m) & (s_top[row, np.minimum(top_k, m - 1)] == kth))
    extra = np.zeros(rows)
    for i in tie_rows:  # the k-th value ties past k: count the whole group, it may run beyond M
        s = _scaled(x[i:i + 1], peak[i:i + 1], temperature[i:i + 1])[0]
        extra[i] = np.exp(kth[i]) * (np.count_nonzero(s >= kth[i]) - top_k[i])
    mass = np.where(top_k > 0, weights.sum(axis=1, dtype=np.float64) + extra, mass)
    before = np.cumsum(weights, axis=1, dtype=np.float64)  # mass strictly before each column
    before = np.concatenate([np.zeros((rows, 1)), before[:, :-1]], axis=1)
    kept_p = np.count_nonzero((before < (top_p.astype(np.float64) * mass)[:, None]) & (weights > 0), axis=1)
    count = np.where(top_p < 1, np.minimum(np.maximum(kept_p, 1), in_k), in_k)
    tau = np.where((top_k > 0) | (top_p < 1), s_top[row, count - 1], -np.inf)
    tau = np.maximum(tau, log_min_p)
    complete = (m == vocab_size) | (tau > s_top[:, -1]) | (tau >= bound)
    return ids, s_top, tau, complete
