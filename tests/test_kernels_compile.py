"""Every ops/kernels/*.cu compiles with nvcc for A100, L4/L40 and H100, and the decode-path kernels
do not spill registers. Runs on the CPU (no GPU needed); skipped where nvcc is not installed.

A file may list the specialisations to check on a line `// nvcc-variants: -DT=half; -DT=__nv_bfloat16`
(variants separated by ';'); without one, its defaults are compiled.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ops.kernel_source import kernel_source

KERNEL_DIR = Path(__file__).resolve().parent.parent / "ops" / "kernels"
KERNELS = sorted(KERNEL_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_89", "sm_90a")
# Kernels a decode step runs: a spill there costs local-memory traffic every token.
DECODE_PATH = {"embedding.cu", "norm.cu", "rope_cache.cu", "activation.cu", "attention_decode.cu", "sampling.cu"}
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def _variants(path: Path) -> list[list[str]]:
    m = re.search(r"^//\s*nvcc-variants:(.*)$", path.read_text(), re.M)
    if not m:
        return [[]]
    return [v.split() for v in m.group(1).split(";") if v.strip()]


def _spills_allowed(path: Path) -> set[tuple[str, str]]:
    """(arch, defines) pairs a file allows to spill, each named with its reason on a line
    `// nvcc-spills-allowed: sm_80 -DT=half -DSLIDING=1 (why)`."""
    allowed = set()
    for m in re.finditer(r"^//\s*nvcc-spills-allowed:\s*(\S+)\s+([^(]*?)\s*\(", path.read_text(), re.M):
        allowed.add((m.group(1), m.group(2)))
    return allowed


def _compile(path: Path, arch: str, defines: list[str]) -> str:
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-c", "-o", "/dev/null", *defines, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    return proc.stderr  # ptxas -v reports go to stderr


def test_kernels_compile_as_nvrtc_gets_them(tmp_path):
    """kernel_source pastes the headers in: each file compiles alone, away from ops/kernels/."""
    for path in KERNELS:
        alone = tmp_path / path.name
        alone.write_text(kernel_source(path.name))
        assert '#include "' not in alone.read_text()
        _compile(alone, "sm_90a", _variants(path)[0])


def test_there_are_kernels_to_check():
    assert KERNELS, f"no .cu files under {KERNEL_DIR}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_without_decode_path_spills(path, arch):
    allowed = _spills_allowed(path)
    for defines in _variants(path):
        report = _compile(path, arch, defines)
        if path.name not in DECODE_PATH or (arch, " ".join(defines)) in allowed:
            continue
        spills = [line for line in report.splitlines()
                  if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
        assert not spills, f"{path.name} {arch} {' '.join(defines)} spills registers:\n" + "\n".join(spills)
