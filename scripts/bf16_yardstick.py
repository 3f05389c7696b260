"""How close transformers itself gets to its own fp32 logits when run in fp16 / bf16 on the test
checkpoints (weights rounded to that dtype): the yardstick tests/gpu/test_engine_gpu.py holds bf16 to.
CPU only; prints one line per (family, dtype). Usage: python scripts/bf16_yardstick.py
"""
from __future__ import annotations

import copy
import tempfile

import numpy as np
import torch

from tests.conftest import ARCHS, VOCAB, write_checkpoint

PROMPTS = 16  # the max error swings widely from prompt to prompt; the RMS error barely moves


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"error of transformers in fp16/bf16 against its own fp32 logits, {PROMPTS} prompts of 120 tokens: "
          "median [min, max]")
    for arch in ARCHS:
        _, model = write_checkpoint(tempfile.mkdtemp(), arch)
        for dtype in (torch.float16, torch.bfloat16):
            rounded = copy.deepcopy(model)
            with torch.no_grad():
                for p in rounded.parameters():
                    p.copy_(p.to(dtype).to(torch.float32))
                low_model = copy.deepcopy(rounded).to(dtype)
                stats = []
                for _ in range(PROMPTS):
                    ids = torch.tensor([rng.integers(0, VOCAB, 120).tolist()])
                    ref = rounded(ids).logits[0].numpy()
                    low = low_model(ids).logits[0].float().numpy()
                    stats.append((np.abs(low - ref).max() / np.abs(ref).max(),
                                  np.sqrt(np.mean((low - ref) ** 2) / np.mean(ref ** 2)),
                                  (low.argmax(-1) == ref.argmax(-1)).mean()))
            cols = [f"{name} {np.median(v):.2e} [{v.min():.2e}, {v.max():.2e}]"
                    for name, v in zip(("max rel", "rms rel"), np.array(stats).T[:2])]
            agree = np.array(stats)[:, 2]
            print(f"{arch:<14} {str(dtype):<15} {cols[0]}  {cols[1]}  argmax agreement {np.median(agree):.3f} "
                  f"[{agree.min():.3f}, {agree.max():.3f}]", flush=True)
    implementations(rng)


def implementations(rng, prompts: int = 12) -> None:
    """Two bf16 runs of transformers that differ only in the attention kernel (eager vs sdpa), on the same
    prompts: how far apart two sound bf16 implementations land, the margin the GPU test allows."""
    print(f"\nbf16 error ratio, eager attention over sdpa, same prompt, {prompts} prompts: [min, max]")
    for arch in ARCHS:
        _, model = write_checkpoint(tempfile.mkdtemp(), arch)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
            runs = {}
            for impl in ("eager", "sdpa"):
                runs[impl] = copy.deepcopy(model).to(torch.bfloat16)
                for m in runs[impl].modules():
                    if hasattr(m, "config"):
                        m.config._attn_implementation = impl
            ratios = []
            for _ in range(prompts):
                ids = torch.tensor([rng.integers(0, VOCAB, 120).tolist()])
                ref = model(ids).logits[0].numpy()
                err = {k: r(ids).logits[0].float().numpy() - ref for k, r in runs.items()}
                ratios.append((np.abs(err["eager"]).max() / np.abs(err["sdpa"]).max(),
                               np.sqrt(np.mean(err["eager"] ** 2) / np.mean(err["sdpa"] ** 2))))
        r = np.array(ratios)
        print(f"{arch:<14} max err ratio [{r[:, 0].min():.2f}, {r[:, 0].max():.2f}]  "
              f"rms err ratio [{r[:, 1].min():.2f}, {r[:, 1].max():.2f}]", flush=True)


if __name__ == "__main__":
    main()
