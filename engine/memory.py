"""KV-cache sizing from measured GPU memory: a profile forward at the largest token budget, then
gpu_memory_utilization x total, minus what is in use (weights), minus the profile's peak.
"""
from __future__ import annotations

import logging

import numpy as np

from ops.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def paged_cache(backend, c, num_blocks: int, block_size: int, dtype=None):
    """One allocation for all layers of model config `c`, [layers, k/v, blocks, Hkv, block_size, D], and each layer's
    (K, V) views."""
    cache = backend.zeros((c.num_hidden_layers, 2, num_blocks, c.num_key_value_heads, block_size, c.head_dim), dtype)
    return cache, [(cache[i, 0], cache[i, 1]) for i in range(c.num_hidden_layers)]


def cache_bytes_per_block(c, block_size: int, itemsize: int) -> int:
    """K and V of one block in every layer of model config `c`."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * block_size * c.head_dim * itemsize


def kv_bytes_per_block(runner, kv_cache_dtype: str = "auto") -> int:
    """The target's K and V of one block in every layer (the model dtype's bytes an element, or one: an E4M3
    code), and a draft model's beside them."""
    itemsize = 1 if kv_cache_dtype != "auto" else np.dtype(runner.backend.dtype).itemsize
    draft = runner.draft.bytes_per_block(runner.block_size) if runner.draft is not None else 0
    return cache_bytes_per_block(runner.config, runner.block_size, itemsize) + draft


def profile_peak_bytes(runner, num_tokens: int) -> int:
    """Device bytes a prefill of `num_tokens` tokens (one sequence) needs beyond what is allocated now."""
    b, c, bs = runner.backend, runner.config, runner.block_size
    blocks = -(-num_tokens // bs)
    k = b.zeros((blocks, c.num_key_value_heads, bs, c.head_dim))
    caches = [(k, k)] * c.num_hidden_layers  # one scratch cache: only the memory profile matters
    pos = np.arange(num_tokens, dtype=np.int32)
    meta = AttentionMetadata(b.from_host(np.array([0, num_tokens], np.int32)),
                             b.from_host(np.array([num_tokens], np.int32)),
                             b.from_host(np.arange(blocks, dtype=np.int32)[None, :]), b.from_host(pos),
                             max_query_len=num_tokens, max_seq_len=num_tokens)
    b.release_cached_memory()
    b.synchronize()
    before = b.memory_used()
    hidden = runner.model.forward(b.from_host(np.zeros(num_tokens, np.int32)), b.from_host(pos), meta, caches)
    runner.model.compute_logits(hidden[-1:])
    b.synchronize()
    peak = b.memory_used() - before  # the pool keeps every freed block: what it holds is the peak
    del hidden, caches, k, meta
    b.release_cached_memory()
    return peak


def kv_blocks_from_memory(runner, cfg) -> int:
    b = runner.backend
    tokens = min(cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_model_len)
    peak = profile_peak_bytes(runner, tokens)
    free, total = b.memory_info()
    budget = cfg.gpu_memory_utilization * total - (total - free) - peak
    per_block = kv_bytes_per_block(runner, cfg.kv_cache_dtype)
    # More blocks than 4x every sequence at full length only feed the prefix cache, and each costs
    # Python-side bookkeeping: a tiny model on a big GPU would otherwise get millions.
    s = cfg.scheduler
    blocks = min(int(budget // per_block), 4 * s.max_num_seqs * -(-s.max_model_len // runner.block_size))
    logger.info("memory: %.2f GiB total, %.2f GiB in use after weights, %.2f GiB activation peak "
                "(%d tokens): %d KV blocks%s (%.2f GiB), %.1f sequences of %d tokens", total / 2**30,
                (total - free) / 2**30, peak / 2**30, tokens, blocks,
                " of fp8 e4m3 (a byte an element, half the model dtype's)" if cfg.kv_cache_dtype != "auto" else "",
                blocks * per_block / 2**30,
                blocks * runner.block_size / cfg.scheduler.max_model_len, cfg.scheduler.max_model_len)
    if blocks < 1:
        raise RuntimeError(f"no GPU memory left for the KV cache: {budget / 2**30:.2f} GiB after weights and "
                           f"activations at gpu_memory_utilization {cfg.gpu_memory_utilization}; raise it, "
                           "or lower max_num_batched_tokens")
    return blocks
