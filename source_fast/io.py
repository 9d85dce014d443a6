"""Results on disk: atomic writes, safetensors factors with a validated manifest; model checkpoints read from
torch.save files, safetensors files and Hugging Face model directories.

Every file is written as: temp file in the same directory → flush + fsync → os.replace → fsync the
directory, so a crash leaves either the old file or the new one, never a torn one. A stored file
records the configuration hash it was computed under; loading it under another configuration
raises (unless the caller asked to overwrite), and a truncated or corrupt file is reported, never
silently counted as done.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = "1"


class StoreMismatchError(ValueError):
    """A stored result was computed under a different configuration."""


class CorruptStoreError(ValueError):
    """A stored file exists but cannot be read or fails validation."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict, **info: Any) -> None:
    """Atomically write tensors as safetensors with metadata (format version, config hash, config,
    dtypes and any extra info such as layer names or segment ids)."""
    from safetensors.torch import save

    meta = {
        "format_version": FORMAT_VERSION,
        "config_hash": config_hash(config),
        "config": json.dumps(config, sort_keys=True, default=str),
        "dtypes": json.dumps({k: str(v.dtype) for k, v in tensors.items()}, sort_keys=True),
        "info": json.dumps(info, sort_keys=True, default=str),
    }
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data)


def load_tensors(path: str | os.PathLike, config: dict | None = None,
                 expected_keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and validate a file written by `save_tensors`. Raises CorruptStoreError when it cannot be
    read or lacks keys, StoreMismatchError when its config hash differs from `config`'s."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CorruptStoreError(f"stored file {str(path)!r} is unreadable or truncated ({exc}); delete it or pass "
                                "overwrite=True to recompute") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptStoreError(f"stored file {str(path)!r} has format_version {meta.get('format_version')!r}, "
                                f"expected {FORMAT_VERSION!r}")
    if config is not None and meta.get("config_hash") != config_hash(config):
        stored = json.loads(meta.get("config", "{}"))
        diff = sorted(k for k in set(stored) | set(config) if stored.get(k) != json.loads(
            json.dumps(config.get(k), default=str)))
        raise StoreMismatchError(f"stored file {str(path)!r} was computed with a different configuration "
                                 f"(differs in: {diff}); use another output_dir or overwrite=True")
    if expected_keys is not None:
        missing = [k for k in expected_keys if k not in tensors]
        if missing:
            raise CorruptStoreError(f"stored file {str(path)!r} lacks tensors {missing[:5]}")
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CorruptStoreError(f"stored file {str(path)!r}: tensor {k!r} contains non-finite values")
    return tensors, {"config": json.loads(meta.get("config", "{}")), "info": json.loads(meta.get("info", "{}"))}


def _read_manifest(path: Path) -> dict | None:
    """A score store's JSON manifest, None when there is none; CorruptStoreError when it cannot be read."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"score manifest {str(path)!r} is unreadable ({exc}); pass overwrite=True") from exc


class ScoreStore:
    """A score matrix on disk, written in column blocks (blocks of training examples), resumable.

    Layout in ``directory``: ``<name>.npy`` (numpy memmap of the scores), ``<name>.done.npy`` (one
    byte per block) and ``<name>.json`` (manifest: config, shape, dtype, block size; written
    atomically). A block's scores are flushed to disk *before* its done byte is set and flushed, so
    a crash at any point leaves every block marked done complete; blocks are written, never added
    to, so recomputing an unmarked block is idempotent. Reopening under another configuration raises
    StoreMismatchError unless ``overwrite=True``; unreadable or inconsistent files raise
    CorruptStoreError (or are recreated with ``overwrite=True``).
    """

    def __init__(self, directory: str | os.PathLike, name: str, shape: tuple[int, ...], dtype: str, block: int,
                 config: dict, *, overwrite: bool = False):
        import numpy as np
        from numpy.lib.format import open_memmap

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shape, self.block = tuple(int(s) for s in shape), int(block)
        self.num_blocks = (self.shape[-1] + self.block - 1) // self.block
        self.paths = {k: self.directory / f"{name}{suffix}" for k, suffix in
                      (("scores", ".npy"), ("done", ".done.npy"), ("manifest", ".json"))}
        manifest = {"format_version": FORMAT_VERSION, "config_hash": config_hash(config), "config": config,
                    "shape": list(self.shape), "dtype": dtype, "block": self.block}
        manifest = json.loads(json.dumps(manifest, default=str))
        existing = _read_manifest(self.paths["manifest"])
        reuse = existing is not None and not overwrite
        if reuse and existing != manifest:
            if existing.get("config_hash") != manifest["config_hash"]:
                raise StoreMismatchError(f"scores in {str(self.directory)!r} ({name}) were computed with a different "
                                         "configuration; use another output_dir or overwrite=True")
            raise CorruptStoreError(f"score manifest {str(self.paths['manifest'])!r} disagrees with the request "
                                    f"(shape/dtype/block): {existing.get('shape')} vs {list(self.shape)}")
        if reuse:
            try:
                self.scores = open_memmap(self.paths["scores"], mode="r+")
                self.done = open_memmap(self.paths["done"], mode="r+")
            except Exception as exc:
                raise CorruptStoreError(f"stored scores in {str(self.directory)!r} ({name}) are unreadable ({exc}); "
                                        "pass overwrite=True to recompute") from exc
            if self.scores.shape != self.shape or str(self.scores.dtype) != dtype or \
                    self.done.shape != (self.num_blocks,):
                raise CorruptStoreError(f"stored scores {str(self.paths['scores'])!r} have shape {self.scores.shape} "
                                        f"/ dtype {self.scores.dtype}, expected {self.shape} / {dtype}")
        else:
            for path in self.paths.values():
                if path.exists():
                    path.unlink()
            self.scores = open_memmap(self.paths["scores"], mode="w+", dtype=np.dtype(dtype), shape=self.shape)
            self.done = open_memmap(self.paths["done"], mode="w+", dtype=np.uint8, shape=(self.num_blocks,))
            self.scores.flush()
            self.done.flush()
            _fsync_dir(self.directory)
            atomic_write_json(self.paths["manifest"], manifest)

    def columns(self, b: int) -> slice:
        return slice(b * self.block, min((b + 1) * self.block, self.shape[-1]))

    def pending(self) -> list[int]:
        return [b for b in range(self.num_blocks) if not self.done[b]]

    def write(self, b: int, values) -> None:
        self.scores[..., self.columns(b)] = values
        self.scores.flush()  # data first ...
        self.done[b] = 1
        self.done.flush()  # ... then its done byte

    def complete(self) -> bool:
        return bool(self.done.all())


class BlockFileStore:
    """Blocks of scores whose shapes differ (per-token scores: each block of training examples has its own token
    count) on disk, resumable: ``<name>/block_<b>.safetensors`` per finished block, each written atomically by
    `save_tensors` with the configuration, and ``<name>.json`` (manifest: config, number of blocks). A block is done
    when its file loads under the same configuration; an unreadable one is recomputed (with a warning). Reopening
    under another configuration raises StoreMismatchError unless ``overwrite=True``, which removes the blocks."""

    def __init__(self, directory: str | os.PathLike, name: str, num_blocks: int, config: dict, *,
                 overwrite: bool = False):
        self.directory = Path(directory) / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.num_blocks, self.config = int(num_blocks), config
        self.manifest_path = Path(directory) / f"{name}.json"
        manifest = json.loads(json.dumps({"format_version": FORMAT_VERSION, "config_hash": config_hash(config),
                                          "config": config, "num_blocks": self.num_blocks}, default=str))
        existing = None if overwrite else _read_manifest(self.manifest_path)
        if existing is not None and existing != manifest and not overwrite:
            raise StoreMismatchError(f"scores in {str(self.directory)!r} were computed with a different configuration "
                                     "or block count; use another output_dir or overwrite=True")
        if existing != manifest or overwrite:
            for path in self.directory.glob("block_*.safetensors"):
                path.unlink()
            atomic_write_json(self.manifest_path, manifest)

    def path(self, b: int) -> Path:
        return self.directory / f"block_{b}.safetensors"

    def read(self, b: int) -> torch.Tensor | None:
        """Block b's scores, or None when it is not done (no file, or one that cannot be read: recomputed)."""
        if not self.path(b).exists():
            return None
        try:
            tensors, _ = load_tensors(self.path(b), self.config, expected_keys=["scores"])
        except CorruptStoreError as exc:
            warnings.warn(f"{exc}: recomputing block {b}", RuntimeWarning, stacklevel=2)
            return None
        return tensors["scores"]

    def write(self, b: int, scores: torch.Tensor) -> None:
        save_tensors(self.path(b), {"scores": scores}, self.config, block=b)


# What a Hugging Face model directory (`save_pretrained`, a Trainer's checkpoint-<step>/) holds, in preference order:
# one file, or shards listed by an index whose "weight_map" maps each tensor to its shard.
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "adapter_model.safetensors", "adapter_model.bin")  # the last two: a PEFT adapter's weights only


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A model's state_dict from a file or a directory, on the CPU.

    A directory is read as a Hugging Face model directory (its first of model.safetensors, a sharded
    model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json, or a PEFT adapter's
    adapter_model.safetensors / .bin); a ``.safetensors`` file with safetensors; anything else with
    ``torch.load(weights_only=True)``. What such files leave out (tied weights written once, a PEFT adapter's
    frozen base model, the adapter name in its keys) the analyzer restores against its model (`match_to_model`)."""
    path = Path(path)
    if path.is_dir():
        for name in _HF_WEIGHTS:
            if (path / name).is_file():
                return _load_weights_file(path / name)
        raise FileNotFoundError(f"directory {str(path)!r} holds none of {list(_HF_WEIGHTS)} (a Hugging Face model "
                                f"directory); found {sorted(p.name for p in path.iterdir())[:10]}")
    if not path.exists():
        raise FileNotFoundError(f"file {str(path)!r} does not exist")
    return _load_weights_file(path)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_load_weights_file(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def tied_names(model_state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The names of a state_dict that are one tensor (tied weights: GPT-2's lm_head.weight and
    transformer.wte.weight), each group in the state_dict's order; a name alone is a group of one."""
    by_storage: dict[tuple, list[str]] = {}
    for key, tensor in model_state.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        by_storage.setdefault(where if tensor.numel() else key, []).append(key)
    return list(by_storage.values())


def fill_aliases(by_name: dict, groups: list[list[str]]) -> dict:
    """`by_name` with each name it lacks that shares a group with a name it has (tied weights: `tied_names`) given
    that name's entry; a new dict."""
    filled = dict(by_name)
    for names in groups:
        present = [n for n in names if n in by_name]
        for name in names:
            if name not in filled and present:
                filled[name] = by_name[present[0]]
    return filled


def fill_tied(state: dict, model_state: dict[str, torch.Tensor]) -> dict:
    """`state` with the keys it lacks that are aliases in the model (`tied_names`) taken from the alias it has."""
    if all(k in state for k in model_state):
        return state
    return fill_aliases(state, tied_names(model_state))


COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts before its module's state_dict keys


def match_to_model(state: dict, model_state: dict[str, torch.Tensor], *, constant: set[str] = frozenset(),
                   adapter_names: tuple[str, ...] = ()) -> dict:
    """A checkpoint's tensors under the model's state_dict keys, with what a saved file may leave out restored:
    the "_orig_mod." prefix of a torch.compile'd module's state_dict dropped; tied weights (`fill_tied`); the
    adapter name PEFT removes from an adapter's keys ("…lora_A.weight" for the model's "…lora_A.default.weight",
    one of `adapter_names`; DoRA's "…lora_magnitude_vector" for "…lora_magnitude_vector.default.weight"); and the
    `constant` keys it lacks (parameters frozen in the model, and buffers: they did not train, as a PEFT adapter's
    base model), taken from `model_state`."""
    if state and all(k.startswith(COMPILED_PREFIX) for k in state) and \
            not any(k.startswith(COMPILED_PREFIX) for k in model_state):  # saved from a torch.compile'd module
        state = {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}
    state = fill_tied(state, model_state)
    unknown = [k for k in state if k not in model_state]
    if unknown and adapter_names:
        saved_as: dict[str, list[str]] = {}
        for key in model_state:
            for name in adapter_names:
                if f".{name}." in key:
                    short = key.replace(f".{name}.", ".", 1)
                    if key.endswith(f".lora_magnitude_vector.{name}.weight"):  # PEFT saves DoRA's without ".weight"
                        short = short.removesuffix(".weight")
                    saved_as.setdefault(short, []).append(key)
        state = dict(state)
        for key in unknown:
            targets = saved_as.get(key, [])
            if len(targets) == 1 and targets[0] not in state:
                state[targets[0]] = state.pop(key)
    missing = [k for k in model_state if k not in state and k in constant]
    return {**state, **{k: model_state[k] for k in missing}} if missing else state
