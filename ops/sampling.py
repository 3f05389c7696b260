"""Token sampling on the numpy backend: logit bias, penalties, temperature, top-k, top-p, min-p, seeded draws.

The oracle the CUDA sampler is held to, so every per-row parameter is an array and every draw is addressable.
"""
from __future__ import annotations

import numpy as np

from ops.philox import neg_exponentials, philox_row_words, philox_words
from ops.sampling_types import SamplerOutput, SamplingTensors, log_min_p

# Below V / _SUBSET_RATIO kept tokens a row draws only their words with the numpy Philox (~200 ns a word,
# ~100x numpy's C generator, which must run over the whole row but costs ~0.75 ms a 152K row all told).
_SUBSET_RATIO = 32
# Top-k, top-p and top-N look first at group maxima: group g of a row is {g + i * (V // _GROUPS)}, and the
# k-th largest group max bounds the k-th largest logit from below, so a sort of ~k * _GROUPS values replaces
# a partition of the whole row (numpy's argpartition costs ~0.5 ms per 152K row).
_GROUPS = 64
_SCRATCH_ROWS = 4  # rows per pass of _exp_sums: 2.4 MB of scratch at a 152K vocabulary


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


def apply_token_mask(logits, mask: np.ndarray) -> None:
    """logits[b, id] = -inf in place wherever bit id of row b of `mask` (int32[B, ceil(V / 32)]) is clear."""
    vocab_size = logits.shape[1]
    if mask.shape != (len(logits), -(-vocab_size // 32)):
        raise ValueError(f"token_mask must have shape [{len(logits)}, {-(-vocab_size // 32)}] for logits "
                         f"{logits.shape}, got {mask.shape}")
    allowed = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    logits[allowed == 0] = -np.inf


def sample(logits: np.ndarray, t: SamplingTensors) -> SamplerOutput:
    """One token per row of logits: float32[B, V]. Bias and penalties are undone on return; a token mask stays
    applied (tokens a grammar forbids are -inf, also in the logprobs, as in vLLM)."""
    _check_logits(logits, t)
    if t.token_mask is not None:
        apply_token_mask(logits, t.token_mask)
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
    sums = _exp_sums(logits, np.arange(len(logits)), peak, None, np.float32)
    log_norm = peak.astype(np.float64) + np.log(sums.astype(np.float64))
    if num == 0:
        return log_norm, None, None
    group_max = _group_max(logits)
    candidates = _group_candidates(group_max, _kth_largest(group_max, np.full(len(logits), num)),
                                   logits.shape[1])
    values = np.take_along_axis(logits, candidates, axis=1)
    top = np.take_along_axis(candidates, np.argsort(-values, axis=1)[:, :num], axis=1)
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


def _exp_sums(x: np.ndarray, rows: np.ndarray, peak: np.ndarray, temperature: np.ndarray | None,
              dtype) -> np.ndarray:
    """sum_j exp(s_j) over each row of x[rows], accumulated in `dtype`: s = _scaled(x[rows], peak, temperature), the
    same two rounding steps (temperature None: x - peak alone). A few rows at a time through one buffer: a [rows, V]
    copy would take fresh pages from the kernel, a fault each 4 KB (docs/performance.md)."""
    sums = np.empty(len(rows), dtype)
    part = np.empty((min(len(rows), _SCRATCH_ROWS), x.shape[1]), np.float32)
    for start in range(0, len(rows), _SCRATCH_ROWS):
        chunk = slice(start, start + _SCRATCH_ROWS)
        buf = part[:len(rows[chunk])]
        np.take(x, rows[chunk], axis=0, out=buf)
        np.subtract(buf, peak[chunk, None], out=buf)
        if temperature is not None:
            np.divide(buf, temperature[chunk, None], out=buf)
        np.exp(buf, out=buf)
        sums[chunk] = buf.sum(axis=1, dtype=dtype)
    return sums


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
    log_min_ps = log_min_p(min_p)
    tau = log_min_ps.copy()
    token_ids = np.empty(rows, np.int64)
    dense = np.ones(rows, bool)
    cut = np.flatnonzero((top_k > 0) | (top_p < 1) | (min_p > 0))
    for part, ids, cand_s, part_tau, complete in _cut(x, cut, peak[cut], temperature[cut], top_k[cut],
                                                      top_p[cut], log_min_ps[cut]):
        r = cut[part]
        tau[r] = part_tau
        keep = cand_s >= part_tau[:, None]
        small = complete & (keep.sum(axis=1) * _SUBSET_RATIO < vocab_size)
        if small.any():
            token_ids[r[small]] = _race_subset(ids[small], cand_s[small], keep[small], seeds[r[small]],
                                               steps[r[small]])
            dense[r[small]] = False
    # One row at a time keeps the [V] temporaries in cache; reusing them keeps the allocator from handing each
    # row fresh pages (a page fault per 4 KB: 40% of the time, and a cost that differs from one VM to another).
    s, score, race = (np.empty(vocab_size, np.float32) for _ in range(3))
    for i in np.flatnonzero(dense):
        np.subtract(x[i], peak[i], out=s)
        s /= temperature[i]  # = _scaled's two rounding steps
        np.exp(s, out=score)
        score /= neg_exponentials(philox_row_words(seeds[i], steps[i], vocab_size), out=race)
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


def _group_max(x: np.ndarray) -> np.ndarray:
    """[R, V // _GROUPS] maxima of the strided groups (strided so numpy reduces whole rows at a time)."""
    width = x.shape[1] // _GROUPS
    return x[:, :width * _GROUPS].reshape(len(x), _GROUPS, width).max(axis=1)


def _kth_largest(values: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The k[r]-th largest of each row of values; -inf where k exceeds the row."""
    cols = values.shape[1]
    ranked = np.sort(values, axis=1)
    kth = ranked[np.arange(len(values)), np.clip(cols - k, 0, max(cols - 1, 0))] if cols else np.zeros(len(k))
    return np.where(k <= cols, kth, -np.inf).astype(values.dtype)


def _group_candidates(group_max: np.ndarray, bound: np.ndarray, vocab_size: int) -> np.ndarray:
    """Ids [R, M] of every token in a group whose max is >= bound[r], and of the tail past the last group.

    Any token >= bound is among them. Rows that need fewer groups than the neediest get extra ones.
    """
    rows, width = group_max.shape
    wanted = int((group_max >= bound[:, None]).sum(axis=1).max(initial=0))
    if wanted == width:
        return np.broadcast_to(np.arange(vocab_size), (rows, vocab_size))
    groups = np.argpartition(group_max, width - wanted, axis=1)[:, width - wanted:] if wanted else \
        np.empty((rows, 0), np.intp)  # every token >= bound is in the tail
    ids = (groups[:, :, None] + np.arange(_GROUPS) * width).reshape(rows, -1)
    tail = np.broadcast_to(np.arange(width * _GROUPS, vocab_size), (rows, vocab_size - width * _GROUPS))
    return np.concatenate([ids, tail], axis=1)


def _top_p_bound(mass: np.ndarray, group_max: np.ndarray, top_p: np.ndarray, log_min_p: np.ndarray) -> np.ndarray:
    """A lower bound on tau for rows without top-k; mass: their Z = sum exp(s) [P], group_max: [P, V // 64] (s's
    group maxima, <= 0).

    Any c with mass(s >= c) >= top_p * Z bounds top-p's threshold from below. The group maxima are distinct
    tokens, so their mass above c is a lower bound on mass(s >= c); with 1-nat buckets of -s (bucket b holds
    s in (-(b + 1), -b]) the first b whose running mass reaches top_p * Z gives c = -(b + 1).
    """
    rows = len(group_max)
    buckets = np.minimum(-group_max, 63).astype(np.int64)  # the last bucket also holds everything below -63
    buckets += np.arange(rows)[:, None] * 64
    hist = np.bincount(buckets.ravel(), weights=np.exp(group_max).ravel(), minlength=rows * 64)
    first = np.count_nonzero(np.cumsum(hist.reshape(rows, 64), axis=1) < (top_p * mass)[:, None], axis=1)
    edge = np.where((top_p < 1) & (first < 63), -(first + 1.0), -np.inf).astype(np.float32)
    return np.maximum(edge, log_min_p)


def _cut(x, cut, peak, temperature, top_k, top_p, log_min_p) -> list[tuple]:
    """Thresholds tau of the rows cut of x that use top-k, top-p or min-p, and their candidate tokens.

    A group of tied tokens is kept or dropped whole, so tau is a value and the kept set is {s >= tau}:
    top-k keeps s >= the k-th largest s; top-p, over the top-k set renormalized, keeps a value v while the
    mass of tokens with s > v is < top_p; min-p keeps s >= log(min_p); tau is the largest of the three.
    Rows whose candidates span most of the vocab go in a second part, so they do not widen the others.
    Returns per part: (positions in cut, candidate ids [n, M], their s, tau [n], {s >= tau} inside them [n]).
    """
    if not len(cut):
        return []
    group_max = _scaled(_group_max(x)[cut], peak, temperature)
    bound = _kth_largest(group_max, top_k)  # <= the k-th largest s; meaningless where top-k is off
    mass = np.zeros(len(cut))
    unbounded = np.flatnonzero(top_k == 0)
    if len(unbounded):
        mass[unbounded] = _exp_sums(x, cut[unbounded], peak[unbounded], temperature[unbounded], np.float64)
        bound[unbounded] = _top_p_bound(mass[unbounded], group_max[unbounded], top_p[unbounded], log_min_p[unbounded])
    wide = (group_max >= bound[:, None]).sum(axis=1) * 4 > group_max.shape[1]
    parts = [part for part in (np.flatnonzero(~wide), np.flatnonzero(wide)) if len(part)]
    return [(part, *_thresholds(x, cut[part], peak[part], temperature[part], top_k[part], top_p[part],
                                log_min_p[part], group_max[part], bound[part], mass[part])) for part in parts]


def _thresholds(x, rows, peak, temperature, top_k, top_p, log_min_p, group_max, bound, mass) -> tuple:
    vocab_size = x.shape[1]
    ids = _group_candidates(group_max, bound, vocab_size)
    cand_x = x[rows] if ids.shape[1] == vocab_size else x[rows[:, None], ids]
    cand_s = _scaled(cand_x, peak, temperature)
    s_top = np.sort(cand_s, axis=1)[:, ::-1]  # [n, M] best first
    m = s_top.shape[1]
    row = np.arange(len(rows))
    in_k = np.where(top_k > 0, top_k, m)
    kth = s_top[row, in_k - 1]
    count = in_k
    if (top_p < 1).any():
        span = int(in_k.max())  # columns past every row's k cannot be kept
        weights = np.exp(s_top[:, :span])
        if (top_k > 0).any():
            weights[np.arange(span)[None, :] >= in_k[:, None]] = 0
            # Tokens tied with the k-th stay, so they weigh in top-p's renormalization; all are candidates.
            tied_past_k = np.count_nonzero(cand_s >= kth[:, None], axis=1) - in_k
            mass = np.where(top_k > 0, weights.sum(axis=1, dtype=np.float64) + np.exp(kth) * tied_past_k, mass)
        # Column j is kept while the mass before it, cumsum[j - 1], is < top_p * mass; the zero weights
        # (past k, or exp underflow) sit at the end and are never kept.
        cumsum = np.cumsum(weights, axis=1, dtype=np.float64)
        kept_p = 1 + np.count_nonzero(cumsum[:, :-1] < (top_p.astype(np.float64) * mass)[:, None], axis=1)
        kept_p = np.minimum(kept_p, np.count_nonzero(weights, axis=1))
        count = np.where(top_p < 1, np.minimum(kept_p, in_k), in_k)
    tau = np.where((top_k > 0) | (top_p < 1), s_top[row, count - 1], -np.inf)
    tau = np.maximum(tau, log_min_p)
    return ids, cand_s, tau, (m == vocab_size) | (tau >= bound)
