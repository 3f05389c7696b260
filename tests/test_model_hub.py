"""engine.loader.resolve_model_path: a local directory as given, a Hub repo id through huggingface_hub (its cache,
a revision, HF_HOME / HF_HUB_OFFLINE, a download when online).

The caches here are laid out as huggingface_hub lays them out (blobs, snapshots of symlinks, refs), and every test
first checks with the library's own readers (scan_cache_dir, try_to_load_from_cache) that it sees them so. Nothing
reaches the network: offline tests set HF_HUB_OFFLINE, and the download test replaces snapshot_download.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import RevisionNotFoundError, filter_repo_objects

from engine.loader import HUB_FILES, HUB_IGNORED, ModelNotFoundError, resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=("main",)) -> Path:
    """One snapshot of `repo_id` in huggingface_hub's cache layout: each file's bytes in blobs/<sha256>, the
    snapshot's files relative symlinks to them, refs/<name> holding the commit hash (no newline, as the library
    writes it). Returns the snapshot directory."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        path = storage / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)
    return snapshot


def checkpoint_files(directory: str) -> dict[str, bytes]:
    return {name: (Path(directory) / name).read_bytes() for name in os.listdir(directory)
            if (Path(directory) / name).is_file()}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty huggingface_hub cache of this test's own, offline; the working directory holds no org/ folder."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache


@pytest.fixture
def tiny(checkpoint):
    """The files of a tiny Qwen2 checkpoint (conftest writes it with transformers) and its directory."""
    directory, _ = checkpoint("qwen2_tied")
    return checkpoint_files(directory), directory


def test_the_cache_built_here_is_what_huggingface_hub_sees(hub, tiny):
    files, _ = tiny
    snapshot = cache_snapshot(hub, "org/tiny", COMMIT_A, files)
    (repo,) = scan_cache_dir(hub).repos  # raises CorruptedCacheException on a layout it does not accept
    (revision,) = repo.revisions
    assert (repo.repo_id, revision.commit_hash, set(revision.refs)) == ("org/tiny", COMMIT_A, {"main"})
    assert {f.file_name for f in revision.files} == set(files)
    assert try_to_load_from_cache("org/tiny", "config.json", cache_dir=hub) == str(snapshot / "config.json")


def test_a_cached_model_is_served_by_its_id_offline(hub, tiny):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    files, directory = tiny
    snapshot = cache_snapshot(hub, "org/tiny", COMMIT_A, files)
    assert resolve_model_path("org/tiny") == str(snapshot)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = np.random.default_rng(0).integers(0, 1000, 12).tolist()
    by_id = LLMEngine(EngineConfig(model="org/tiny", device="numpy", max_model_len=128)).generate([prompt], params)
    by_dir = LLMEngine(EngineConfig(model=directory, device="numpy", max_model_len=128)).generate([prompt], params)
    assert by_id[0].outputs[0].token_ids == by_dir[0].outputs[0].token_ids
    assert len(by_id[0].outputs[0].token_ids) == 8


def test_revision_branch_tag_or_commit_offline(hub):
    a = cache_snapshot(hub, "org/m", COMMIT_A, {"config.json": b'{"v": 1}'}, refs=("main",))
    b = cache_snapshot(hub, "org/m", COMMIT_B, {"config.json": b'{"v": 2}'}, refs=("v2", "dev"))
    assert {r.commit_hash for (repo,) in [scan_cache_dir(hub).repos] for r in repo.revisions} == {COMMIT_A, COMMIT_B}
    assert resolve_model_path("org/m") == str(a)  # refs/main, though the other snapshot is newer
    assert resolve_model_path("org/m", revision="v2") == str(b)
    assert resolve_model_path("org/m", revision="dev") == str(b)
    assert resolve_model_path("org/m", revision=COMMIT_A) == str(a)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path("org/m", revision="v3")
    assert "revision 'v3'" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_offline_miss_names_every_place_and_writes_nothing(hub, tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path("org/absent")
    message = str(e.value)
    assert str(tmp_path / "org" / "absent") in message and str(hub) in message
    assert "HF_HUB_OFFLINE is set: nothing was downloaded" in message and "hf download org/absent" in message
    assert list(hub.iterdir()) == []


def test_a_local_directory_wins_and_needs_no_huggingface_hub(hub, tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now raises ImportError
    assert resolve_model_path("org/name") == "org/name"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelNotFoundError, match="needs huggingface_hub"):
        resolve_model_path("org/other")


def test_a_path_that_is_not_a_repo_id_is_not_looked_up(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up on the Hub"))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path(str(tmp_path / "no" / "such" / "model"))
    assert str(tmp_path / "no" / "such" / "model") in str(e.value) and "models--" not in str(e.value)


def test_online_downloads_only_what_the_engine_reads(hub, tiny, monkeypatch):
    """The one seam: huggingface_hub.snapshot_download. Online, it is asked for the revision with the
    engine's file patterns; here it fills the cache as the library would and returns the snapshot."""
    files, _ = tiny
    calls, library = [], huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(cache_snapshot(hub, repo_id, COMMIT_B, files, refs=(kwargs["revision"] or "main",)))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = resolve_model_path("org/tiny", revision="v1")
    assert path == str(hub / "models--org--tiny" / "snapshots" / COMMIT_B)
    ((repo_id, kwargs),) = calls
    assert (repo_id, kwargs["revision"], kwargs["local_files_only"]) == ("org/tiny", "v1", False)
    # what those patterns keep of a typical repo, filtered by the library's own matcher
    repo = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "README.md", ".gitattributes",
            "consolidated.safetensors", "original/consolidated.00.pth", "original/params.json",
            "onnx/model.safetensors", "special_tokens_map.json"]
    kept = list(filter_repo_objects(repo, allow_patterns=kwargs["allow_patterns"],
                                    ignore_patterns=kwargs["ignore_patterns"]))
    assert kept == repo[:8]
    assert (kwargs["allow_patterns"], kwargs["ignore_patterns"]) == (list(HUB_FILES), list(HUB_IGNORED))
    # the library, offline, finds what was fetched: a later start needs no network
    monkeypatch.setattr(huggingface_hub, "snapshot_download", library)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("org/tiny", revision="v1") == path


def test_hub_errors_become_model_not_found(hub, monkeypatch):
    def missing_revision(repo_id, **kwargs):
        error = RevisionNotFoundError.__new__(RevisionNotFoundError)  # its __init__ wants an HTTP response
        Exception.__init__(error, "404 Client Error: Revision Not Found")
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing_revision)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_path("org/m", revision="nope")
    assert "the Hub has no revision 'nope'" in str(e.value) and "Revision Not Found" in str(e.value)
    assert isinstance(e.value.__cause__, RevisionNotFoundError)


def test_hf_home_and_hf_hub_offline_from_the_environment(tmp_path):
    """In a fresh process, as `cupyllm serve` starts: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import."""
    snapshot = cache_snapshot(tmp_path / "hf-home" / "hub", "org/m", COMMIT_A, {"config.json": b"{}"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", "from engine.loader import resolve_model_path as r; "
                          "print(r('org/m')); print(r('org/m', revision='main'))"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(snapshot)] * 2


def test_serve_revision_flag_resolves_that_snapshot(hub):
    from api import cli

    a = cache_snapshot(hub, "org/m", COMMIT_A, {"config.json": b"{}"})
    b = cache_snapshot(hub, "org/m", COMMIT_B, {"config.json": b"{}"}, refs=("v2",))
    args = lambda *argv: cli.build_parser().parse_args(["serve", *argv])  # noqa: E731
    assert cli.engine_config(args("org/m")).model == "org/m"  # the engine resolves it, at main
    assert cli.engine_config(args("org/m", "--revision", "v2")).model == str(b)
    assert cli.engine_config(args("--model", "org/m", "--revision", "main")).model == str(a)
    with pytest.raises(cli.CLIError, match="revision"):
        cli.engine_config(args("--revision", "v2"))
