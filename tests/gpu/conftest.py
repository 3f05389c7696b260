"""tests/gpu runs where CuPy sees a CUDA device; elsewhere none of its files is collected (each imports CuPy and
touches the device at import)."""
from __future__ import annotations


def _device_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, or CuPy without a driver or device
        return 0


HAS_GPU = _device_count() > 0
if not HAS_GPU:
    collect_ignore_glob = ["test_*.py"]
