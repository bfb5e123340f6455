"""Checkpoint files on disk: path checks, JSON configs, and safetensors weights.

Every problem is a `CheckpointError` naming the file (and key) at fault and what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from onsight.exporter.model import read_json
from onsight.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

PathLike = str | Path
# Keys of a transformers config that say how it was saved, not what the model is.
SAVE_KEYS = ("dtype", "torch_dtype", "_name_or_path", "transformers_version")


def need_dir(path: PathLike, what: str) -> Path:
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{d}: does not exist ({what} expected there); check the path")
    if not d.is_dir():
        raise CheckpointError(f"{d}: is a file, but the {what} is a directory")
    return d


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what}); copy the complete checkpoint")
    return path


def read_config(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (a list or a number there would fail far away)."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a JSON {type(obj).__name__}, not an object ({what}); "
            "copy the file again from the checkpoint"
        )
    return obj


def cfg_int(cfg: dict, key: str, where: Path) -> int:
    try:
        return int(cfg[key])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{where / 'config.json'}: key {key!r} is missing or no number"
        ) from e


def weight_files(d: Path) -> list[Path]:
    """The weight files of a transformers model dir: single, sharded, or a lone .bin."""
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_config(index, "sharded safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: key 'weight_map' is missing or not an object")
        shards = sorted(set(weight_map.values()))
        return [need_file(d / f, f"a shard named in {index.name}") for f in shards]
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    raise CheckpointError(
        f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        "save the model with save_pretrained(..., safe_serialization=True)"
    )


def load_tensors(path: Path, keep: Callable[[str], bool] = lambda k: True) -> dict:
    """The tensors of one file whose names `keep` accepts, in their stored dtype."""
    if path.suffix == ".bin":
        log.warning("%s: no safetensors file; reading the .bin with weights_only=True", path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointError(f"{path}: not plain tensors ({e}); convert to safetensors") from e
        return {k: v for k, v in state.items() if keep(k)}
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep(k)}


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors header, without reading the (large) tensors."""
    with open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def open_safetensors(path: Path):
    """safe_open, with a truncated or foreign file reported as a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
