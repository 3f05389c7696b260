"""numpy version of every model op: the CPU backend and the oracle every CUDA kernel is held to.

All math is float32. Each op writes into a caller-provided `out`, with the same argument list the
CUDA launchers in ops/cuda.py take, so model code is written once against either backend.
"""
from __future__ import annotations

import math

import numpy as np

from ops.metadata import AttentionMetadata


def embedding(ids: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    # ids: [T] int32, table: [V, H], out: [T, H]
    np.take(table, ids, axis=0, out=out)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    # x: [T, H], weight: [H]
    variance = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    np.multiply(x * (1.0 / np.sqrt(variance + eps)).astype(np.float32), weight, out=out)


def add_rms_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """residual += x; out = rms_norm(residual). The fused pre-norm step between sublayers."""
    np.add(residual, x, out=residual)
    rms_norm(residual, weight, eps, out)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    # x: [T, K], weight: [N, K] row-major as stored in checkpoints, bias: [N], out: [T, N]
    np.matmul(x, weight.T, out=out)
    if bias is not None:
        out += bias


def silu_and_mul(x: np.ndarray, out: np.ndarray) -> None:
    # x: [T, 2*I] holding gate then up (merged at load), out: [T, I]
    inter = out.shape[1]
    gate, up = x[:, :inter], x[:, inter:]
    np.multiply(gate / (1.0 + np.exp(-gate)), up, out=out)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x: [T, heads, D] in the neox layout (first half / second half), cos/sin: [T, 1, D/2]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _head_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def rope_and_cache(qkv: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
                   k_cache: np.ndarray, v_cache: np.ndarray, cos_sin: np.ndarray,
                   q_norm: np.ndarray | None = None, k_norm: np.ndarray | None = None,
                   eps: float = 1e-6) -> None:
    """Rotate q and k in place in `qkv` and write k, v into the paged cache at `slot_mapping`.

    qkv: [T, (Hq + 2*Hkv) * D]; positions, slot_mapping: [T] (slot -1 = padding, not written);
    k_cache, v_cache: [num_blocks, Hkv, block_size, D]; cos_sin: [max_pos, D] (cos half, sin half).
    q_norm / k_norm: [D] per-head RMSNorm weights applied before RoPE (Qwen3), or None.
    """
    _, hkv, block_size, d = k_cache.shape
    t = qkv.shape[0]
    hq = qkv.shape[1] // d - 2 * hkv
    heads = qkv.reshape(t, hq + 2 * hkv, d)
    q, k, v = heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]
    if q_norm is not None:
        q[...] = _head_rms_norm(q, q_norm, eps)
        k[...] = _head_rms_norm(k, k_norm, eps)
    cs = cos_sin[positions]
    cos, sin = cs[:, None, : d // 2], cs[:, None, d // 2:]
    q[...] = _rotate(q, cos, sin)
    k[...] = _rotate(k, cos, sin)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    for cache, values in ((k_cache, k[valid]), (v_cache, v[valid])):
        if isinstance(cache, np.ndarray):
            cache[blocks, :, offsets] = values
        else:  # an FP8 cache (ops/quant.Fp8Cache) rounds what it stores
            cache.store(blocks, offsets, values)


def attention(qkv: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, meta: AttentionMetadata,
              scale: float, out: np.ndarray, window: int = 0) -> None:
    """Causal attention over the paged cache for a batch of variable-length query spans.

    Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1]; they are the last tokens of
    its seq_lens[b]-token context, whose K/V (this step's included) are already in the cache.
    Rows of sequences with seq_lens 0 (graph padding) are written as zeros. out: [T, Hq * D].
    window > 0: the query at position p sees positions p - window + 1 .. p only (sliding-window attention, as
    transformers masks it); blocks wholly before the first query's window may have been freed (their table
    entries are -1) and are never read.
    """
    _, hkv, block_size, d = k_cache.shape
    hq = out.shape[1] // d
    group = hq // hkv
    qsl = meta.query_start_loc
    out[...] = 0.0
    for b in range(len(meta.seq_lens)):
        start, end, ctx = int(qsl[b]), int(qsl[b + 1]), int(meta.seq_lens[b])
        if end == start or ctx == 0:
            continue
        # the first block any query of the span sees: all of them without a window
        first = max(0, ctx - (end - start) - window + 1) // block_size if window > 0 else 0
        blocks = meta.block_tables[b, first: -(-ctx // block_size)]
        # k, v: [Hkv, ctx - first * block_size, D] gathered block by block from the cache
        k, v = (_gather(cache, blocks).transpose(1, 0, 2, 3).reshape(hkv, -1, d)[:, :ctx - first * block_size]
                for cache in (k_cache, v_cache))
        q = qkv[start:end, : hq * d].reshape(end - start, hkv, group, d)
        scores = np.einsum("tkgd,ksd->kgts", q, k) * scale  # [Hkv, group, q_len, keys]
        q_pos = np.arange(ctx - (end - start), ctx)[:, None]
        k_pos = np.arange(first * block_size, ctx)[None, :]
        seen = (k_pos <= q_pos) & (k_pos > q_pos - window) if window > 0 else k_pos <= q_pos
        scores = np.where(seen, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        o = np.einsum("kgts,ksd->tkgd", probs.astype(np.float32), v)
        out[start:end] = o.reshape(end - start, hq * d)


def _gather(cache, blocks: np.ndarray) -> np.ndarray:
    return cache[blocks] if isinstance(cache, np.ndarray) else cache.gather(blocks)


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, scaling=None) -> np.ndarray:
    """The [max_positions, head_dim] table of cos (first half) and sin (second half) per position."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    # float32 products, as the reference implementation computes them
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=-1).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, s) -> np.ndarray:
    # Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth blend between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled)


def moe_route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """The experts a token goes to and their weights, from the router's logits [T, E]: softmax in float32, the top_k
    probabilities (largest first; ties to the lower expert), renormalised to sum 1 when `normalize`.
    Returns (ids int32 [T, top_k], weights float32 [T, top_k])."""
    z = logits.astype(np.float32)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    w = np.take_along_axis(p, ids, axis=1)
    if normalize:
        w /= w.sum(axis=1, keepdims=True)
    return ids, w


def moe(x: np.ndarray, router: np.ndarray, gate_up: np.ndarray, down: np.ndarray, top_k: int, normalize: bool,
        out: np.ndarray, shared: tuple | None = None) -> None:
    """A mixture-of-experts MLP. x: [T, H]; router: [E, H]; gate_up: [E, 2I, H] (gate rows, then up); down: [E, H, I];
    out: [T, H] = sum over each token's top_k experts of weight x down_e(silu(gate_e x) * up_e x), plus, with
    `shared` = (gate_up [2S, H], down [H, S], gate [1, H]), sigmoid(gate x) x the shared expert's MLP of x."""
    ids, w = moe_route(x @ router.T, top_k, normalize)
    moe_experts(x, ids, w, gate_up, down, out, shared)


def moe_experts(x: np.ndarray, ids: np.ndarray, w: np.ndarray, gate_up: np.ndarray, down: np.ndarray,
                out: np.ndarray, shared: tuple | None = None) -> None:
    """moe's experts for a routing already made (ids, weights [T, top_k], as moe_route returns them)."""
    out[...] = 0
    inter = down.shape[2]
    for e in np.unique(ids):
        rows, slot = np.nonzero(ids == e)
        h = np.empty((len(rows), inter), x.dtype)
        silu_and_mul(x[rows] @ gate_up[e].T, h)
        np.add.at(out, rows, (h @ down[e].T) * w[rows, slot, None].astype(x.dtype))
    if shared is not None:
        s_gate_up, s_down, s_gate = shared
        h = np.empty((x.shape[0], s_down.shape[1]), x.dtype)
        silu_and_mul(x @ s_gate_up.T, h)
        gate = 1.0 / (1.0 + np.exp(-(x @ s_gate.T)))
        out += gate * (h @ s_down.T)
