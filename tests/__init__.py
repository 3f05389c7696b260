"""CPU tests (CI). The numpy backend runs tiny matrices, where OpenBLAS's thread pool only adds
contention with the engine thread (measured: 10x slower streams); `cupyllm serve` caps it too."""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
