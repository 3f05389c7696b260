"""Loads ops/kernels/*.cu as CuPy RawModules, specialised by -D defines, compiled once per machine.

CuPy's on-disk kernel cache makes a second start load each module in well under a millisecond;
`load_module` is memoised so each (file, defines) pair compiles at most once per process.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ops.kernel_source import kernel_source

# numpy dtype -> the CUDA C type name the kernels are specialised with (-DT=...)
CUDA_TYPES = {np.dtype(np.float16): "half", np.dtype(np.float32): "float"}


def cuda_type(dtype) -> str:
    """The C type for an activation/weight dtype; uint16 arrays hold bfloat16 bits."""
    dtype = np.dtype(dtype)
    if dtype == np.uint16:
        return "__nv_bfloat16"
    return CUDA_TYPES[dtype]


@functools.cache
def load_module(filename: str, defines: tuple[tuple[str, object], ...] = ()) -> cp.RawModule:
    """Compile (or load from CuPy's cache) `ops/kernels/<filename>` with `-DNAME=VALUE` per define."""
    source = kernel_source(filename)
    options = ("-std=c++17",) + tuple(f"-D{name}={value}" for name, value in defines)
    module = cp.RawModule(code=source, options=options)
    module.compile()  # now, not at the first launch: a launch may be inside a graph capture
    return module


def get_kernel(filename: str, name: str, **defines) -> cp.RawKernel:
    return load_module(filename, tuple(sorted(defines.items()))).get_function(name)
