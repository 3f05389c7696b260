"""The sampler's random stream: counter-based Philox4x64-10, addressable by (seed, step, vocab index).

The numpy sampler draws from it and the CUDA sampler computes the same words, so a seeded request
gives the same tokens on either backend and in any batch.
"""
from __future__ import annotations

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
_MASK64 = 2**64 - 1
_LO32, _U32 = np.uint64(0xFFFFFFFF), np.uint64(32)
_M = np.array([[0xD2E7470EE14C6C93], [0xCA5A826395121157]], np.uint64)  # multipliers M0, M1
_W = np.array([[0x9E3779B97F4A7C15], [0xBB67AE8584CAA73B]], np.uint64)  # key increments W0, W1
_M_LO, _M_HI = _M & _LO32, _M >> _U32


def philox4x64(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, ...]:
    """Philox4x64-10 (Random123) on uint64 arrays of one shape; array arithmetic wraps modulo 2**64.

    The two multiply lanes run stacked, (c0, c2) against (M0, M1), halving numpy calls; the 64x64 -> 128-bit
    product is built from 32-bit limbs, numpy having no 128-bit integers.
    """
    shape = np.shape(c0)
    a, b, key = (np.stack([np.ravel(x), np.ravel(y)]) for x, y in ((c0, c2), (c1, c3), (k0, k1)))
    for _ in range(10):
        al, ah = a & _LO32, a >> _U32
        t = al * _M_LO
        u = ah * _M_LO + (t >> _U32)
        v = al * _M_HI + (u & _LO32)
        hi = ah * _M_HI + (u >> _U32) + (v >> _U32)
        a, b = hi[::-1] ^ b ^ key, (a * _M)[::-1]  # (hi1 ^ c1 ^ k0, hi0 ^ c3 ^ k1), (lo1, lo0)
        key = key + _W
    return a[0].reshape(shape), b[0].reshape(shape), a[1].reshape(shape), b[1].reshape(shape)


def _philox_word(seed: int, step: int, j: int) -> int:
    """One word in plain Python ints: the stream's definition, and faster than numpy for a handful."""
    c0, c1, c2, c3, k0, k1 = j // 8 + 1, step, 0, 0, seed, 0
    for _ in range(10):
        p0, p1 = 0xD2E7470EE14C6C93 * c0, 0xCA5A826395121157 * c2
        c0, c1, c2, c3 = (p1 >> 64) ^ c1 ^ k0, p1 & _MASK64, (p0 >> 64) ^ c3 ^ k1, p0 & _MASK64
        k0, k1 = (k0 + 0x9E3779B97F4A7C15) & _MASK64, (k1 + 0xBB67AE8584CAA73B) & _MASK64
    return ((c0, c1, c2, c3)[j // 2 % 4] >> (32 * (j % 2))) & 0xFFFFFFFF


def philox_words(seeds, steps, token_ids) -> np.ndarray:
    """uint32 word w of the stream above for each (seed, step, vocab index); arguments broadcast."""
    seeds, steps, token_ids = (np.asarray(a).astype(np.uint64) for a in (seeds, steps, token_ids))
    seeds, steps, token_ids = np.broadcast_arrays(seeds, steps, token_ids)
    if token_ids.size <= 16:  # numpy's ~120 us of per-call overhead outweighs ~4 us per word in Python
        words = map(_philox_word, seeds.ravel().tolist(), steps.ravel().tolist(), token_ids.ravel().tolist())
        return np.fromiter(words, np.uint32, token_ids.size).reshape(token_ids.shape)
    zero = np.zeros(token_ids.shape, np.uint64)
    out = philox4x64((token_ids >> np.uint64(3)) + np.uint64(1), steps, zero, zero, seeds, zero)
    word = np.choose(((token_ids >> np.uint64(1)) & np.uint64(3)).astype(np.intp), out)
    return ((word >> ((token_ids & np.uint64(1)) << np.uint64(5))) & _LO32).astype(np.uint32)


def philox_row_words(seed: int, step: int, vocab_size: int) -> np.ndarray:
    """The words of vocab indices 0..V-1 of one row, from numpy's C Philox: uint32[V]."""
    raw = np.random.Philox(key=int(seed), counter=int(step) << 64).random_raw(-(-vocab_size // 8) * 4)
    return raw.view("<u4")[:vocab_size]  # x86 and arm64 are little-endian: low half first


def neg_exponentials(words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """-E for words w, float32 (into `out` when given); negated so the race is one argmin and saves two passes
    over the vocab."""
    if out is None:
        r = words.astype(np.float32)
    else:
        r = out
        np.copyto(r, words, casting="unsafe")  # the same rounding as astype
    r *= np.float32(-(2.0 ** -32))
    r -= np.float32(2.0 ** -33)
    np.maximum(r, np.float32(-1 + 2.0 ** -24), out=r)
    with np.errstate(divide="ignore"):
        np.log1p(r, out=r)
    return r
