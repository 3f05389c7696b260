"""The CUDA C sources in ops/kernels/, as NVRTC gets them (no CuPy here: CPU tests compile them with nvcc)."""
from __future__ import annotations

import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.M)


def kernel_source(filename: str) -> str:
    """`ops/kernels/<filename>` with each `#include "x.cuh"` replaced by that header's text (each header
    once): NVRTC gets one string without include paths, and CuPy's cache key (the source) covers the
    headers too, so editing a header recompiles every kernel that uses it."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (KERNEL_DIR / name).read_text().replace("#pragma once\n", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)
    return expand(filename)
