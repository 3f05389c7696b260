"""Tensor parallelism (issue #15): Megatron-style sharding of the decoder over `world` ranks, one per GPU.

Each rank holds
- q/k/v and gate/up by output rows: its query heads (Hq / world), its KV heads (Hkv / world, or one head
  replicated on world / Hkv ranks when there are fewer KV heads than ranks) and its I / world of the MLP;
- o_proj and down by input columns: each rank's product is a partial sum, all-reduced before the residual add
  (o_proj's bias, Llama's, on rank 0 only, so the sum holds it once);
- embedding and lm_head by vocabulary rows: an id outside the rank's rows reads a zero row appended to its table,
  and the all-reduce of the embeddings gives every rank the full rows; each rank's logits are its vocabulary
  slice, all-gathered;
- the norms whole;
- a mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) as vLLM shards it under TP: every expert on every rank,
  each expert's gate/up by rows and its down by input columns like a dense MLP (I / world of each expert's
  intermediate size), Qwen2-MoE's shared expert likewise, the router and the shared expert's gate [1, H] whole.
  The router's logits come from replicated weights and the same x on every rank, so every rank routes every token
  alike; each rank's MoE output is then a partial sum over its intermediate slice, all-reduced after the MLP as
  the dense one is.

The model runs the same code on every rank (LlamaModel with `tp`), on its rank_config: the per-rank head and
MLP counts. A Communicator all-reduces and all-gathers: ThreadGroup for the numpy backend (ranks as threads of
one process, what the CPU tests run), NCCL on the GPU.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from engine.config import ConfigError, ModelConfig


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int
    world: int
    comm: Any  # all_reduce(x) in place, all_gather(x) -> the ranks' x concatenated along the last axis

    def check(self, c: ModelConfig) -> None:
        """Refuse a model that does not split evenly over the ranks, naming the dimension (config.json's field)."""
        w, m = self.world, c.moe
        dims = [("num_attention_heads", c.num_attention_heads), ("intermediate_size", c.intermediate_size),
                ("vocab_size", c.vocab_size)]
        if m is not None and c.architecture != "MixtralForCausalLM":  # Mixtral's experts have intermediate_size
            dims.append(("moe_intermediate_size", m.intermediate_size))
        if m is not None and m.shared_intermediate_size:
            dims.append(("shared_expert_intermediate_size", m.shared_intermediate_size))
        for name, value in dims:
            if value % w:
                raise ConfigError(f"tensor parallelism over {w} ranks needs {name} divisible by {w}; it is {value}")
        kv = c.num_key_value_heads
        if kv % w and w % kv:
            raise ConfigError(f"tensor parallelism over {w} ranks needs num_key_value_heads ({kv}) to divide "
                              f"{w} or be a multiple of it")

    def rank_config(self, c: ModelConfig) -> ModelConfig:
        """The shapes one rank computes: its heads, its MLP columns (each expert's too), its vocabulary rows."""
        self.check(c)
        w, m = self.world, c.moe
        if m is not None:
            m = replace(m, intermediate_size=m.intermediate_size // w,
                        shared_intermediate_size=m.shared_intermediate_size // w)
        return replace(c, num_attention_heads=c.num_attention_heads // w,
                       num_key_value_heads=max(c.num_key_value_heads // w, 1),
                       intermediate_size=c.intermediate_size // w, vocab_size=c.vocab_size // w, moe=m)

    def vocab_rows(self, vocab: int) -> tuple[int, int]:
        """The rows [lo, hi) of a `vocab`-row embedding or lm_head this rank holds."""
        return self.rank * vocab // self.world, (self.rank + 1) * vocab // self.world

    def _kv_heads(self, c: ModelConfig) -> tuple[int, int]:
        kv, w = c.num_key_value_heads, self.world
        if kv >= w:
            return self.rank * kv // w, (self.rank + 1) * kv // w
        head = self.rank // (w // kv)  # fewer KV heads than ranks: each is replicated on w / kv ranks
        return head, head + 1

    def shard(self, c: ModelConfig, name: str, tensor: np.ndarray) -> np.ndarray:
        """This rank's part of checkpoint tensor `name` (full model config `c`)."""
        r, w, d = self.rank, self.world, c.head_dim
        rows = lambda lo, hi: tensor[lo:hi]  # noqa: E731
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            return rows(r * c.q_size // w, (r + 1) * c.q_size // w)
        if any(name.endswith(f"self_attn.{p}_proj.{k}") for p in "kv" for k in ("weight", "bias")):
            lo, hi = self._kv_heads(c)
            return rows(lo * d, hi * d)
        if name.endswith("self_attn.o_proj.weight"):
            return tensor[:, r * c.q_size // w:(r + 1) * c.q_size // w]
        if name.endswith("self_attn.o_proj.bias"):
            return tensor if r == 0 else np.zeros_like(tensor)
        split = _mlp_split(c, name)
        if split is not None:
            size, axis = split
            lo, hi = r * size // w, (r + 1) * size // w
            return rows(lo, hi) if axis == 0 else tensor[:, lo:hi]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            lo, hi = self.vocab_rows(c.vocab_size)
            return rows(lo, hi)
        return tensor  # norms, q/k norms, the MoE router and shared expert gate: whole on every rank

    def local_ids(self, xp, ids, vocab_local: int):
        """Embedding-table rows of `ids` on this rank: id - first row where the rank holds it, else the zero row
        appended after its vocab_local rows."""
        lo = self.rank * vocab_local
        return xp.where((ids >= lo) & (ids < lo + vocab_local), ids - lo, vocab_local).astype(ids.dtype)


def _mlp_split(c: ModelConfig, name: str) -> tuple[int, int] | None:
    """How an MLP weight splits: (its intermediate size, 0: by rows (gate, up) or 1: by columns (down)), for the
    dense MLP, each expert (Mixtral's w1/w3/w2, Qwen's gate/up/down_proj) and Qwen2-MoE's shared expert; None for
    anything else (a router, the shared expert's gate, the attention and norms)."""
    if name.endswith(("gate_proj.weight", "up_proj.weight", ".w1.weight", ".w3.weight")):
        axis = 0
    elif name.endswith(("down_proj.weight", ".w2.weight")):
        axis = 1
    else:
        return None
    if ".experts." in name:
        return c.moe.intermediate_size, axis
    if ".mlp.shared_expert." in name:
        return c.moe.shared_intermediate_size, axis
    return (c.intermediate_size, axis) if ".mlp." in name else None


def sharded_fetch(fetch_host: Callable[[str], Any], c: ModelConfig, tp: TensorParallel, to_backend, xp=np):
    """A LlamaModel.load_weights fetch for rank tp.rank: each checkpoint tensor read whole (fetch_host: on the host,
    or with xp = cupy on the device, as dummy weights are made), its rank's part taken (TensorParallel.shard),
    merged names concatenated along the first axis, then moved to the backend (to_backend); the embedding gets its
    zero row for ids other ranks hold."""

    def fetch(*names: str):
        parts = [tp.shard(c, n, xp.asarray(fetch_host(n))) for n in names]
        if names == ("model.embed_tokens.weight",):
            parts.append(xp.zeros((1, parts[0].shape[1]), parts[0].dtype))
        return to_backend(xp.ascontiguousarray(xp.concatenate(parts) if len(parts) > 1 else parts[0]))
    return fetch


class ThreadGroup:
    """A Communicator for ranks run as threads of one process on the numpy backend (the CPU tests): each
    collective waits for every rank, then combines in rank order, so every rank gets the same bits."""

    def __init__(self, world: int, timeout: float = 60.0):
        self.world = world
        self._barrier = threading.Barrier(world, timeout=timeout)
        self._slots: list[Any] = [None] * world

    def for_rank(self, rank: int) -> "_ThreadRank":
        return _ThreadRank(self, rank)

    def _exchange(self, rank: int, x) -> list:
        self._slots[rank] = x
        self._barrier.wait()
        got = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return got


@dataclass(slots=True)
class _ThreadRank:
    group: ThreadGroup
    rank: int

    def all_reduce(self, x) -> None:
        parts = self.group._exchange(self.rank, x.copy())
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        x[...] = total

    def all_gather(self, x):
        return np.concatenate(self.group._exchange(self.rank, x), axis=-1)
