"""cupyllm's kernel language: Pallas-style kernels over blocks, traced to a typed IR, interpreted on numpy or
lowered to CUDA C and compiled by NVRTC (disk-cached). See docs/jit.md.

    def body(x_ref, o_ref):
        x = x_ref[...]
        o_ref[...] = (x * jit.sigmoid(x)).astype(o_ref.dtype)
    jit.pallas_call(body, grid=(rows,), in_specs=[jit.BlockSpec((1, n), lambda i: (i, 0))],
                    out_specs=[jit.BlockSpec((1, n), lambda i: (i, 0))])(x, out)
"""
from ops.jit.autotune import autotune  # noqa: F401
from ops.jit.core import Launch, PallasCall, kernel_cache, pallas_call, record, set_kernel_cache  # noqa: F401
from ops.jit.dtypes import bfloat16, bool_, float8_e4m3, float16, float32, int32  # noqa: F401
from ops.jit.trace import (  # noqa: F401
    BlockSpec,
    abs,
    dim,
    exp,
    iota,
    log,
    max,
    maximum,
    mean,
    min,
    minimum,
    num_programs,
    program_id,
    rsqrt,
    sigmoid,
    sqrt,
    sum,
    tanh,
    where,
)
