"""Paged KV blocks: allocation with reference counts, and prefix caching over full blocks.

A full block is known by a hash chain over its tokens and its predecessors'; a cached block whose
last user is gone stays in an LRU list and is reused by a later request with the same prefix, or
evicted (oldest first) when a fresh block is needed.

Sliding window (window > 0, a model whose every layer attends to the last `window` positions only): a block
wholly before the window of the next positions to compute is never read again; allocate() releases it (its
table entry becomes -1; released as any freed block, so it stays cached for a later request with its prefix).
"""
from __future__ import annotations

from collections import OrderedDict, deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True, window: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # guards against hash collisions
        self.free_ids: deque[int] = deque(range(num_blocks))  # free, holding nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently used first
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running sequences (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else 0
            hashes.append(hash((parent, tuple(tokens[i * bs:(i + 1) * bs]))))
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`, leaving at least one token to compute. None for a
        request with prompt logprobs (as in vLLM): they need the logits of every prompt position. Its full blocks
        are still cached for others."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hits = []
        for i, h in enumerate(self._block_hashes(seq, max_blocks)[:max_blocks]):
            block_id = self.cached.get(h)
            if block_id is None or self.block_tokens[block_id] != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens, first adopting `cached_blocks` (a prefix
        from find_cached_prefix, only for a sequence that holds no blocks). All or nothing. Blocks that
        fill up are cached, except with speculative proposals (seq.num_spec) in them: those may be rejected."""
        bs = self.block_size
        if cached_blocks:
            assert not seq.block_table and seq.num_computed_tokens == 0
        elif self.window:
            self._release_before(seq, seq.num_computed_tokens - self.window + 1)
        computed = seq.num_computed_tokens + len(cached_blocks) * bs
        need = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(cached_blocks)
        if need > 0:  # the common decode step needs no new block: skip the count
            reusable = sum(1 for b in cached_blocks if b in self.evictable)
            if need > self.num_free_blocks - reusable:
                return False
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]
            self.ref_counts[block_id] += 1
        seq.block_table.extend(cached_blocks)
        seq.num_computed_tokens = computed
        seq.num_cached_tokens += len(cached_blocks) * bs
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        end = computed + num_new_tokens
        if self.enable_prefix_caching and end // bs > computed // bs:  # a block fills up (1 decode step in 16)
            self._register_full_blocks(seq, computed, min(end, seq.num_tokens - seq.num_spec))
        return True

    def rollback(self, seq: Sequence, verified_from: int) -> None:
        """After a verify step: positions verified_from .. num_computed_tokens - 1 hold accepted tokens (cache the
        blocks they fill), positions past them rejected proposals, whose slots later steps overwrite; blocks
        beyond what the sequence's tokens need go back."""
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, verified_from, seq.num_computed_tokens)
        keep = self.blocks_needed(seq.num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            self.ref_counts[block_id] -= 1  # never cached (proposals), so free for anyone
            if self.ref_counts[block_id] == 0:
                self.free_ids.append(block_id)
        del seq.block_table[keep:]

    def _release_before(self, seq: Sequence, position: int) -> None:
        """Release seq's blocks that hold only positions before `position` (the first one a query still sees)."""
        upto = min(max(position, 0) // self.block_size, len(seq.block_table))
        for i in range(seq.num_released_blocks, upto):
            self._unref(seq.block_table[i])
            seq.block_table[i] = -1
        seq.num_released_blocks = max(seq.num_released_blocks, upto)

    def _unref(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            if self.block_hash[block_id] is not None:
                self.evictable[block_id] = None
            else:
                self.free_ids.append(block_id)

    def _take_free_block(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block_id]]
            self.block_hash[block_id] = self.block_tokens[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def _register_full_blocks(self, seq: Sequence, start: int, end: int) -> None:
        # Blocks that become full in this step are cached now, before the forward runs: a sequence
        # scheduled later in the same step (a sibling of n > 1) reads K/V written earlier in the
        # same layer pass. The scheduler never preempts a sequence once scheduled in a step.
        bs = self.block_size
        first, last = start // bs, end // bs
        if last <= first:
            return
        hashes = self._block_hashes(seq, last)
        for i in range(first, last):
            block_id, h = seq.block_table[i], hashes[i]
            if self.block_hash[block_id] is None and h not in self.cached:
                self.cached[h] = block_id
                self.block_hash[block_id] = h
                self.block_tokens[block_id] = tuple(seq.token_ids[i * bs:(i + 1) * bs])

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; tail blocks first so that LRU eviction takes them before shared heads."""
        for block_id in reversed(seq.block_table[seq.num_released_blocks:]):
            self._unref(block_id)
        seq.block_table = []
        seq.num_released_blocks = 0

    def token_replaced(self, seq: Sequence, position: int) -> None:
        """The token at `position` changed (a placeholder got its id): if its block was already full and
        cached under the placeholder's hash, uncache it, and recompute the chain from there when needed."""
        i = position // self.block_size
        if i < len(seq.block_hashes):
            block_id = self.cached.pop(seq.block_hashes[i], None)
            if block_id is not None:
                self.block_hash[block_id] = self.block_tokens[block_id] = None
                if block_id in self.evictable:  # free and now holding nothing reusable
                    del self.evictable[block_id]
                    self.free_ids.append(block_id)
            del seq.block_hashes[i:]

    def drop_hashes(self, seq: Sequence) -> None:
        """Forget the cache entries of `seq`'s blocks (their K/V may be wrong after a failed step)."""
        for block_id in seq.block_table[seq.num_released_blocks:]:
            h = self.block_hash[block_id]
            if h is not None:
                del self.cached[h]
                self.block_hash[block_id] = self.block_tokens[block_id] = None
