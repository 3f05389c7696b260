"""The on-disk kernel cache: a generated source compiles once per GPU architecture and compile options, keyed by
the SHA-256 of all three, so a second process start loads cubins and compiles nothing. No CuPy at import.

Layout of the directory ($CUPYLLM_KERNEL_CACHE, default ~/.cache/cupyllm/kernels): <key>.cubin, <key>.cu (the
source, for reading), <key>.json (kernel name, arch, options, size, when). `cupyllm kernels --list/--clear`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

Compiler = Callable[[str, str, str, tuple], bytes]  # (source, kernel name, arch, options) -> cubin


def default_dir() -> Path:
    env = os.environ.get("CUPYLLM_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cupyllm" / "kernels"


def cache_key(source: str, arch: str, options: tuple) -> str:
    h = hashlib.sha256()
    for part in (source, arch, *options):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def nvrtc_compile(source: str, name: str, arch: str, options: tuple) -> bytes:
    """Compile with NVRTC (through CuPy's binding) straight to a cubin for `arch` (e.g. sm_90)."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram(source, f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *options])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC could not compile the generated kernel {name}:\n{nvrtc.getProgramLog(prog)}"
                               ) from e
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


class KernelCache:
    def __init__(self, directory: Path | str | None = None, compiler: Compiler | None = None):
        self.directory = Path(directory) if directory is not None else default_dir()
        self.compiler = compiler or nvrtc_compile
        self.hits = self.misses = 0
        self.compile_seconds = 0.0

    def get(self, source: str, name: str, arch: str, options: tuple = ()) -> bytes:
        """The cubin of `source`: from disk if compiled before (anywhere, any process), else compiled and stored."""
        key = cache_key(source, arch, options)
        path = self.directory / f"{key}.cubin"
        try:
            binary = path.read_bytes()
            self.hits += 1
            return binary
        except OSError:
            pass
        t0 = time.perf_counter()
        binary = self.compiler(source, name, arch, options)
        self.compile_seconds += time.perf_counter() - t0
        self.misses += 1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            meta = {"name": name, "arch": arch, "options": list(options), "bytes": len(binary), "created": time.time()}
            _write(self.directory / f"{key}.cu", source.encode())
            _write(self.directory / f"{key}.json", json.dumps(meta).encode())
            _write(path, binary)  # last: a .cubin present means the entry is whole
        except OSError:
            pass  # a read-only or full disk costs a recompile next start, never a failure now
        return binary

    def entries(self) -> list[dict]:
        out = []
        for meta_path in sorted(self.directory.glob("*.json")):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            meta["key"] = meta_path.stem
            meta["complete"] = (self.directory / f"{meta_path.stem}.cubin").exists()
            out.append(meta)
        return out

    def clear(self) -> int:
        """Remove every entry; returns how many cubins went."""
        removed = 0
        for path in list(self.directory.glob("*")):
            if path.suffix in (".cubin", ".cu", ".json", ".tmp"):
                removed += path.suffix == ".cubin"
                path.unlink(missing_ok=True)
        return removed


def _write(path: Path, data: bytes) -> None:
    """Atomic: another process never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
