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


TILE_OFFSET_CHECK = r"""
#include "mma.cuh"
#include <cstdio>
// For every row of a tile of CH chunks, tile_offset<CH> must put the row's chunks on its own CH slots, each once.
template <int CH> int check() {
    int bad = 0;
    for (int row = 0; row < 64; ++row) {
        int seen[CH] = {0};
        for (int c = 0; c < CH; ++c) {
            const int off = tile_offset<CH>(row, c);
            const int slot = off / 16 - row * CH;
            if (off % 16 || slot < 0 || slot >= CH || seen[slot]++) ++bad;
            // head_dim 16 * 2^k: the XOR swizzle the kernels have always used
            if ((CH & (CH - 1)) == 0 && slot != (c ^ (row & ((CH < 8 ? CH : 8) - 1)))) ++bad;
        }
    }
    printf("CH %d: %d bad\n", CH, bad);
    return bad;
}
int main() {
    return check<2>() + check<4>() + check<6>() + check<8>() + check<10>() + check<12>() + check<14>() + check<16>()
        + check<20>() + check<24>() != 0;
}
"""


def test_the_tile_swizzle_is_a_permutation_for_every_head_dim(tmp_path):
    """head_dim 16 to 192 in steps of 16 (CH = head_dim / 8 chunks a row): the host build of mma.cuh's tile_offset,
    compiled by nvcc and run here, places each row's chunks on distinct slots of that row."""
    src = tmp_path / "tile_offset.cu"
    src.write_text(TILE_OFFSET_CHECK)
    exe = tmp_path / "tile_offset"
    cmd = [NVCC, "-std=c++17", f"-I{KERNEL_DIR}", "-o", str(exe), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.count(": 0 bad") == 10, run.stdout + run.stderr
