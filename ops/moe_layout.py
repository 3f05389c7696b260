"""The grouped-GEMM layout of the GPU's mixture-of-experts MLP (ops/cuda/moe.py), without CuPy: the bounds of the
routing kernel and the tile shapes, shared by the launcher, the config check and the CPU tests."""
from __future__ import annotations

MAX_EXPERTS, MAX_TOP_K = 256, 16  # ops/kernels/moe_route.cu's MAX_E / MAX_K: a warp's registers hold a token's


def moe_shape_problem(hidden: int, intermediate: int) -> str | None:
    """Why the grouped GEMM cannot run an expert of these sizes, or None: its 16-byte loads take rows of a multiple
    of 8 halves (under tensor parallelism `intermediate` is one rank's part)."""
    if hidden % 8 or intermediate % 8:
        return f"hidden size {hidden} and expert intermediate size {intermediate} must be multiples of 8"
    return None


def tile_rows(pairs: int, num_experts: int) -> int:
    """Rows of a grouped-GEMM tile: 16 while experts get a few rows each (decode), 64 once they average 32."""
    return 64 if pairs >= 32 * num_experts else 16


def max_tiles(pairs: int, num_experts: int, bm: int) -> int:
    """A bound on sum over experts of ceil(rows_e / bm) whatever the routing: each nonempty expert wastes < 1 tile."""
    return pairs // bm + min(num_experts, pairs) + 1
