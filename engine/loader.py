"""Find a model's directory (a local path, or a Hugging Face Hub repo through huggingface_hub: its cache, and a
download when online) and read its safetensors weights (one file, an index of shards, or loose files) through
memory maps."""
from __future__ import annotations

import glob
import json
import os
import re
import zlib

import numpy as np

from engine.safetensors import FLOAT_DTYPES, SafetensorsError, SafetensorsFile, to_float32
from ops.storage import WeightsError  # the backends' weight loaders raise it too

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
MAX_LISTED = 20  # a checkpoint for another architecture would otherwise print hundreds of lines

# A Hub repo id: "org/name" with the characters the Hub allows; anything else is a local path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model directory needs from a Hub repo, and all that is downloaded: the weights (one file, or shards and
# their index), config.json, the tokenizer with its chat template, the generation defaults.
HUB_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")
# The top level only (original/ or onnx/ folders hold other formats), and not Mistral's consolidated.safetensors
# (a second copy of the weights under other tensor names, which the loader would not read anyway).
HUB_IGNORED = ("*/*", "consolidated*")


class ModelNotFoundError(ValueError):
    """Neither a local directory nor a Hub snapshot found or fetched; the message says every place looked."""


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local directory as given; else the snapshot directory of Hub repo `org/name` at `revision` (a branch, tag
    or commit; default main), through huggingface_hub: with HF_HUB_OFFLINE set, the cached snapshot only; else
    the revision asked of the Hub and the HUB_FILES the cache lacks downloaded. The cache is huggingface_hub's
    (HF_HUB_CACHE, HF_HOME). huggingface_hub is imported only here: local directories need no Hub library."""
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return local
    looked = f"{os.path.abspath(local)} (no such directory)"
    if not _REPO_ID.match(model):
        raise ModelNotFoundError(f"model {model!r} not found: {looked}; nor is it a Hugging Face repo id (org/name). "
                                 "Pass a local directory holding config.json and *.safetensors, or a Hub id")
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ModelNotFoundError(
            f"model {model!r}: {looked}, and serving a Hub model by id needs huggingface_hub, which is not "
            "installed: `pip install 'huggingface_hub>=0.23'`, or pass the model's local directory") from None
    offline = bool(constants.HF_HUB_OFFLINE)
    at = f"revision {revision or 'main'!r}"
    try:
        return huggingface_hub.snapshot_download(model, revision=revision, allow_patterns=list(HUB_FILES),
                                                 ignore_patterns=list(HUB_IGNORED), local_files_only=offline)
    except RevisionNotFoundError as e:
        reason, error = f"the Hub has no {at}", e
    except RepositoryNotFoundError as e:  # GatedRepoError included
        reason, error = ("no such repository on the Hub, or a private or gated one: log in (`hf auth login`) or "
                         "set HF_TOKEN"), e
    except LocalEntryNotFoundError as e:  # not cached (or only partly), and no download
        reason, error = ("not cached, and HF_HUB_OFFLINE is set: nothing was downloaded" if offline else
                         "not cached, and the Hub could not be reached"), e
    except HfHubHTTPError as e:
        reason, error = "the Hub refused the request", e
    raise ModelNotFoundError(
        f"model {model!r} not found. Looked in:\n  - {looked}\n"
        f"  - the Hugging Face cache {constants.HF_HUB_CACHE}, for {model} at {at}: {reason}\n"
        f"huggingface_hub said: {error}\n"
        "Pass a local directory holding config.json and *.safetensors, or fetch the model first "
        f"(`hf download {model}`; older huggingface_hub: `huggingface-cli download {model}`), with HF_HUB_CACHE "
        "or HF_HOME pointing at the cache it fills.") from error


class CheckpointWeights:
    """The tensors of a model directory's safetensors files, each file opened once as a memory map.

    `get` widens to float32 (the CPU path); `get_raw` hands out the stored bits without a copy
    (the GPU path uploads fp16/bf16 as they are). Use as a context manager or call `close()`.
    """

    def __init__(self, model_dir: str):
        self.model_dir = str(model_dir)
        self.paths, index_map = _find_weight_files(self.model_dir)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}  # tensor name -> path of the file holding it
        try:
            for path in self.paths:
                self._open(path)
            if index_map is not None:
                self._check_index(index_map)
        except BaseException:
            self.close()
            raise

    def _open(self, path: str) -> None:
        try:
            file = SafetensorsFile(path)
        except SafetensorsError as e:
            raise WeightsError(str(e)) from e
        self._files[path] = file
        for name in file.tensors:
            if name in self._where:
                raise WeightsError(
                    f"tensor {name!r} is stored twice, in {self._where[name]} and in {path}; "
                    "cannot tell which one the model should use")
            self._where[name] = path

    def _check_index(self, index_map: dict[str, str]) -> None:
        # The index is what transformers trusts; a shard that disagrees means a half-copied checkpoint.
        for name, shard in index_map.items():
            path = os.path.join(self.model_dir, shard)
            if self._where.get(name) != path:
                raise WeightsError(
                    f"{os.path.join(self.model_dir, INDEX_FILE)} places tensor {name!r} in {path}, "
                    "but that shard has no such tensor"
                    + (f" (it is in {self._where[name]})" if name in self._where else ""))

    def __enter__(self) -> "CheckpointWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory maps. Each is unmapped once no array returned by `get_raw` still uses it."""
        self._files.clear()
        self._where.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> tuple[str, str, tuple[int, ...]]:
        """(path of the file holding it, safetensors dtype name, shape)."""
        path = self._path_of(name)
        tensor = self._files[path].tensors[name]
        return path, tensor.dtype, tensor.shape

    def get(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array (BF16 and F16 widened exactly)."""
        raw, dtype = self.get_raw(name)
        return to_float32(raw, dtype)

    def get_raw(self, name: str) -> tuple[np.ndarray, str]:
        """A read-only zero-copy view of the stored bits (uint16 for BF16) and its dtype name."""
        path, dtype, _ = self.info(name)
        if dtype not in FLOAT_DTYPES:
            raise WeightsError(_dtype_message(path, name, dtype))
        return self._files[path].get(name), dtype

    def is_fp8(self, name: str) -> bool:
        return name in self._where and self.info(name)[1] == "F8_E4M3"

    def get_fp8(self, name: str) -> tuple[np.ndarray, np.ndarray, float | None]:
        """An F8_E4M3 weight [N, K]: (its codes, a zero-copy uint8 view; float32 scale per row [N] from
        `<name>_scale`, per tensor or per channel; the static `input_scale` beside it, or None)."""
        path, dtype, shape = self.info(name)
        if dtype != "F8_E4M3":
            raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype}, not F8_E4M3")
        scale = self.get(name + "_scale").reshape(-1)
        if scale.size not in (1, shape[0]):
            raise WeightsError(f"{self.info(name + '_scale')[0]}: {name + '_scale'!r} has {scale.size} values; "
                               f"expected 1 (per tensor) or {shape[0]} (per output channel)")
        input_name = name[: -len("weight")] + "input_scale"
        input_scale = float(self.get(input_name).reshape(-1).max()) if input_name in self._where else None
        return self._files[path].get(name), np.broadcast_to(scale, (shape[0],)).astype(np.float32), input_scale

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise one WeightsError listing every missing tensor, wrong shape and non-float dtype.

        Tensors not in `expected` are ignored: a checkpoint with tied embeddings may still carry
        `lm_head.weight`, and the model simply does not ask for it.
        """
        missing = [name for name in expected if name not in self._where]
        problems = []
        for name, shape in expected.items():
            if name not in self._where:
                continue
            path, dtype, got = self.info(name)
            if tuple(got) != tuple(shape):
                problems.append(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
            if dtype == "F8_E4M3" and name + "_scale" not in self._where:
                problems.append(f"{path}: tensor {name!r} is F8_E4M3 but the checkpoint has no {name + '_scale'!r}")
            elif dtype not in FLOAT_DTYPES and dtype != "F8_E4M3":
                problems.append(_dtype_message(path, name, dtype))
        if not missing and not problems:
            return
        lines = [f"{self.model_dir}: the checkpoint does not match the model"]
        if missing:
            lines.append(f"  {len(missing)} missing tensor(s), searched {', '.join(self.paths)}:")
            lines += _capped([f"    {name}" for name in missing])
        if problems:
            lines.append(f"  {len(problems)} tensor(s) with the wrong shape or dtype:")
            lines += _capped([f"    {p}" for p in problems])
        raise WeightsError("\n".join(lines))

    def _path_of(self, name: str) -> str:
        path = self._where.get(name)
        if path is None:
            searched = ", ".join(self.paths) if self._files else "nothing (closed)"
            raise WeightsError(f"tensor {name!r} not found in {self.model_dir} (searched {searched})")
        return path


def _dtype_message(path: str, name: str, dtype: str) -> str:
    return (f"{path}: tensor {name!r} has dtype {dtype}; weights must be one of "
            f"{', '.join(FLOAT_DTYPES)}")


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_LISTED:
        return lines
    return lines[:MAX_LISTED] + [f"    ... and {len(lines) - MAX_LISTED} more"]


def _find_weight_files(model_dir: str) -> tuple[list[str], dict[str, str] | None]:
    """model.safetensors, else the shards its index names, else every *.safetensors in the dir;
    with the index's weight_map when one is used."""
    if not os.path.isdir(model_dir):
        raise WeightsError(f"{model_dir}: not a directory; expected a model directory with *.safetensors")
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    index_map = _read_index(model_dir)
    if index_map is not None:
        return _shard_paths(model_dir, index_map), index_map
    found = sorted(glob.glob(os.path.join(glob.escape(model_dir), "*.safetensors")))
    if found:
        return found, None
    message = f"{model_dir}: no *.safetensors weights found; cupyllm only loads safetensors checkpoints"
    torch_files = [f for f in TORCH_FILES if os.path.exists(os.path.join(model_dir, f))]
    if torch_files:
        message += (f". It holds {', '.join(torch_files)} (a pickled PyTorch checkpoint, which cupyllm does "
                    "not unpickle): convert it once with transformers, e.g. `AutoModelForCausalLM."
                    "from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`")
    raise WeightsError(message)


def _read_index(model_dir: str) -> dict[str, str] | None:
    """The index's weight_map (tensor name -> shard file name), or None without an index file."""
    path = os.path.join(model_dir, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(
            f"{path}: not a valid index, expected JSON with a 'weight_map' object ({e!r})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{path}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _shard_paths(model_dir: str, index_map: dict[str, str]) -> list[str]:
    shards = list(dict.fromkeys(index_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
    if missing:
        held = {s: [n for n, f in index_map.items() if f == s] for s in missing}
        listed = "\n".join(
            f"  - {os.path.join(model_dir, s)} (holds {len(held[s])} tensor(s), e.g. {held[s][0]!r})"
            for s in missing)
        raise WeightsError(
            f"{os.path.join(model_dir, INDEX_FILE)} names {len(missing)} shard(s) that are missing "
            f"(an incomplete download?):\n{listed}")
    return [os.path.join(model_dir, s) for s in shards]


class DummyWeights:
    """vLLM's `--load-format dummy`: every tensor the model reads drawn from a seeded normal, no files.

    The backend generates each tensor where it lives (on the GPU for the CUDA backend), from
    `spec(name)`; norms are centred on 1 so activations keep a sane scale through the layers.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.shapes: dict[str, tuple[int, ...]] = {}

    def __enter__(self) -> "DummyWeights":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        self.shapes = dict(expected)

    def spec(self, name: str) -> tuple[tuple[int, ...], int, float, float]:
        """(shape, seed, mean, std) of tensor `name`."""
        seed = (self.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        if name.endswith("norm.weight"):
            return self.shapes[name], seed, 1.0, 0.05
        return self.shapes[name], seed, 0.0, 0.02

    def get(self, name: str) -> np.ndarray:
        shape, seed, mean, std = self.spec(name)
        return np.random.default_rng(seed).normal(mean, std, shape).astype(np.float32)
