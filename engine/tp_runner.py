"""Tensor parallelism in the engine (issue #15): `tensor_parallel_size` N > 1 makes the ModelRunner rank 0 of N.

The scheduler, the tokenizer, sampling and everything above the runner stay in the engine's process, once. Rank 0
runs its shard in-process; ranks 1..N-1 are worker processes (engine/tp_workers.RankGroup), each building the same
ModelRunner on its own shard (RunnerRank): sharded weights, a KV cache of its own KV heads with the same blocks,
on CUDA its own decode graphs, captured in step with rank 0's. Each step rank 0 sends the packed inputs
(ModelRunner.prepare's arrays, after its placeholder ids are filled in on the numpy backend) through shared memory;
every rank runs the forward, the all-reduces and the logits all-gather meet in the model, and only rank 0 samples
(its logits are the whole vocabulary).

On CUDA (written without a two-GPU machine; tests/gpu/test_tp_gpu.py checks it): worker r selects GPU r, the
collectives are NCCL (ops/cuda/nccl.py), and a decode graph's step is a REPLAY command: every rank stages the same
packed inputs and launches its graph of the same size; inside each graph rank 0 broadcasts its input ids (where
one step ahead left a placeholder, only rank 0's device has the id) before the forward.
"""
from __future__ import annotations

import numpy as np

from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.parallel import TensorParallel
from engine.tp_workers import FORWARD, LOGITS, REPLAY, RankGroup, command_words, pack_rows, pack_step, unpack_step


def refuse_unsupported(mc: ModelConfig, cfg: EngineConfig) -> None:
    """What tensor parallelism does not cover yet, refused by name before any process starts."""
    world = cfg.tensor_parallel_size
    TensorParallel(0, world, None).check(mc)
    if cfg.speculative_config is not None:
        raise ConfigError(f"speculative decoding with tensor_parallel_size {world} is not implemented yet; drop "
                          "speculative_config or run with tensor_parallel_size 1")
    if "fp8" in (cfg.quantization, mc.quantization) or cfg.kv_cache_dtype != "auto":
        raise ConfigError(f"fp8 weights or KV cache with tensor_parallel_size {world} are not implemented yet (the "
                          "per-channel and per-head scales are not sharded); use an unquantized model and "
                          "kv_cache_dtype auto, or tensor_parallel_size 1")


def start_ranks(mc: ModelConfig, cfg: EngineConfig, backend) -> RankGroup:
    """Rank 0's group: ranks 1.. started, each loading its shard while rank 0 loads its own."""
    refuse_unsupported(mc, cfg)
    world, s = cfg.tensor_parallel_size, cfg.scheduler
    max_blocks = -(-s.max_model_len // cfg.cache.block_size)
    words = command_words(s.max_num_batched_tokens, s.max_num_seqs, max_blocks)
    # The numpy backend's collectives: a step's hidden states [T, H], or a logits slice of the most rows at once
    # (the sampled rows of a step, or a pass of prompt logprobs)
    from engine.model_runner import PROMPT_LOGPROB_ROWS
    rows = max(s.max_num_seqs, PROMPT_LOGPROB_ROWS)
    capacity = max(s.max_num_batched_tokens * mc.hidden_size, rows * mc.vocab_size // world)
    dtype = getattr(backend, "requested_dtype", None) or backend.dtype_name
    return RankGroup(world, RunnerRank(mc, cfg, backend.name, dtype), backend.name, capacity, words)


def rank_zero_runner(mc: ModelConfig, cfg: EngineConfig, backend, weights):
    """The engine's ModelRunner as rank 0 of cfg.tensor_parallel_size: the other ranks started first."""
    from engine.model_runner import ModelRunner
    return ModelRunner(mc, cfg, backend, weights, ranks=RankCommands(start_ranks(mc, cfg, backend)))


class RankCommands:
    """What rank 0's ModelRunner sends before running each part of a step itself."""

    def __init__(self, group: RankGroup):
        self.group = group

    def forward(self, ids, positions, meta) -> None:
        self.group.command(pack_step(FORWARD, ids, positions, meta))

    def replay(self, ids, positions, meta) -> None:
        self.group.command(pack_step(REPLAY, ids, positions, meta))

    def logits(self, rows: np.ndarray) -> None:
        self.group.command(pack_rows(rows))


class RunnerRank:
    """A worker's spec: the engine's ModelRunner on this rank's shard (picklable: configs and names only)."""

    def __init__(self, mc: ModelConfig, cfg: EngineConfig, device: str, dtype: str):
        self.mc, self.cfg, self.device, self.dtype = mc, cfg, device, dtype

    def build(self, tp: TensorParallel) -> "RunnerRank":
        from engine.loader import CheckpointWeights, DummyWeights
        from engine.model_runner import ModelRunner
        from ops.backend import get_backend

        backend = get_backend(self.device, self.dtype)  # on CUDA the worker has selected GPU `rank` already
        weights = DummyWeights(self.cfg.seed) if self.cfg.load_format == "dummy" else \
            CheckpointWeights(self.mc.model_path)
        with weights:
            self.runner = ModelRunner(self.mc, self.cfg, backend, weights, tp=tp)
        self.hidden = None
        return self

    def run(self, op: int, words: np.ndarray) -> None:
        r = self.runner
        if op == FORWARD:
            self.hidden = r.model.forward(*r.upload(*unpack_step(words)), r.kv_caches)
        elif op == REPLAY:
            r.graphs.replay(*unpack_step(words))
        elif op == LOGITS:
            r.model.compute_logits(self.hidden[r.backend.from_host(words[2:])])
        else:
            raise ValueError(f"unknown tensor-parallel command {op}")
