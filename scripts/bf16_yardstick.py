"""How close transformers itself gets to its own fp32 logits when run in fp16 / bf16 on the test
checkpoints (weights rounded to that dtype): the yardstick tests/gpu/test_engine_gpu.py holds bf16 to.
CPU only; prints one line per (family, dtype). Usage: python scripts/bf16_yardstick.py
"""
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import ARCHS, VOCAB, write_checkpoint  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    for arch in ARCHS:
        _, model = write_checkpoint(tempfile.mkdtemp(), arch)
        for dtype in (torch.float16, torch.bfloat16):
            rounded = copy.deepcopy(model)
            with torch.no_grad():
                for p in rounded.parameters():
                    p.copy_(p.to(dtype).to(torch.float32))
                ids = torch.tensor([rng.integers(0, VOCAB, 120).tolist()])
                ref = rounded(ids).logits[0].numpy()
                low = copy.deepcopy(rounded).to(dtype)(ids).logits[0].float().numpy()
            rel = np.abs(low - ref).max() / np.abs(ref).max()
            agree = (low.argmax(-1) == ref.argmax(-1)).mean()
            print(f"{arch:<14} {str(dtype):<15} max rel err {rel:.2e}  argmax agreement {agree:.3f}", flush=True)


if __name__ == "__main__":
    main()
