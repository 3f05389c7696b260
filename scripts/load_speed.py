"""Checkpoint loading speed: writes a random fp16 safetensors checkpoint with a config.json's shapes (into
the page cache: this times the host copies and the upload, not the disk), then starts an engine from it
with the GPU loader (pinned staging, async copies, rounding on the device) and with the plain host path
(float32 on the host, pageable copies) it replaced. Usage: python scripts/load_speed.py perf/configs/qwen2.5-0.5b
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.config import EngineConfig, ModelConfig
from engine.demo import write_demo_tokenizer
from engine.llm_engine import LLMEngine
from engine.models.llama import expected_shapes
from engine.safetensors import save_file


def write_checkpoint(config_dir: str, out: str) -> float:
    shutil.copy(Path(config_dir) / "config.json", out)
    write_demo_tokenizer(out)
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)
               for name, shape in expected_shapes(ModelConfig.from_pretrained(out)).items()}
    save_file(tensors, str(Path(out) / "model.safetensors"))
    return sum(t.nbytes for t in tensors.values()) / 1e9


def start(path: str) -> float:
    engine = LLMEngine(EngineConfig(model=path, dtype="float16", max_model_len=1024, enforce_eager=True,
                                    num_kv_blocks=64))
    return engine.stage_times["weights"]


def main() -> None:
    out = tempfile.mkdtemp()
    gb = write_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "perf/configs/qwen2.5-0.5b", out)
    start(out)  # warm: kernels, CUDA context, the file in the page cache
    new = min(start(out) for _ in range(2))
    import cupy as cp

    from ops.backend import merging
    from ops.cuda import CudaBackend
    CudaBackend.weight_loader = lambda self, w: contextlib.nullcontext(  # the host path, merged on the device
        merging(lambda name: self.weight(w.get(name)), cp))
    old = min(start(out) for _ in range(2))
    result = dict(bench="weight_load", checkpoint_gb=round(gb, 3), gpu_loader_s=round(new, 3),
                  gpu_loader_gbps=round(gb / new, 2), host_path_s=round(old, 3), host_path_gbps=round(gb / old, 2))
    print(json.dumps(result))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.1f} s)")
