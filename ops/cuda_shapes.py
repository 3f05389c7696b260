"""The shapes the CUDA backend's kernels take, without CuPy: the launchers and the start-up check
(CudaBackend.unsupported, asked with one rank's shapes before any weight moves) share these rules, and the CPU tests
can hold a model to them."""
from __future__ import annotations

from ops.moe_layout import moe_shape_problem

MAX_HEAD_DIM = 128  # at 256 the decode kernel's Q and O fragments (192 registers) spill: 460 bytes a thread on sm_90a


def head_dim_problem(head_dim: int) -> str | None:
    """Why ops/kernels/attention_{decode,prefill}.cu cannot run heads of this size, or None. They are specialised
    at compile time for any multiple of 16 (their mma k-step) up to MAX_HEAD_DIM: 64, 80, 96, 112, 128, ..."""
    if head_dim % 16 or not 16 <= head_dim <= MAX_HEAD_DIM:
        return (f"head_dim {head_dim}: the attention kernels take a multiple of 16 up to {MAX_HEAD_DIM} "
                "(256 would spill the decode kernel's registers)")
    return None


def cuda_shape_problem(config) -> str | None:
    """Why the CUDA kernels cannot run a model of `config`'s shapes (a ModelConfig, one rank's), or None."""
    problem = head_dim_problem(config.head_dim)
    if problem is None and config.moe is not None:
        problem = moe_shape_problem(config.hidden_size, config.moe.intermediate_size)
    return problem
