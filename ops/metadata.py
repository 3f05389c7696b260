"""AttentionMetadata: where each sequence's tokens sit in a step's batch and in the paged KV cache.

One instance per step, passed explicitly to every attention call (no global context).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: Any  # int32[B+1]: rows of sequence b are query_start_loc[b]:query_start_loc[b+1]
    seq_lens: Any  # int32[B]: context length including this step's tokens (0 = padding row)
    block_tables: Any  # int32[B, max_blocks]: physical block ids, padded with 0
    slot_mapping: Any  # int32[T]: cache slot of each token, -1 = padding (not written)
    max_query_len: int
    max_seq_len: int
