"""The composed format's extra files: the projector (connector) and the LayerExpert routers."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from onsight.exporter.ckpt_files import PathLike, cfg_int, load_tensors, need_file
from onsight.exporter.ckpt_vision import VisionTower
from onsight.exporter.config import ModConfig
from onsight.runtime.errors import CheckpointError

MOD_KEEP_RATIO = 0.2  # VideoLLM-MoD's r: what LayerExperts route at unless --keep-ratio says
_PROJECTOR_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
# The names a Linear -> GELU -> Linear is saved under: onsight's fc1/fc2, an nn.Sequential's
# 0/2, under any module prefix ending in VideoLLM-online's `connector.`, `projector.` or
# LLaVA's `mm_projector.` (mlp2x_gelu: `model.mm_projector.0.weight` in mm_projector.bin).
_PROJECTOR_FORMS = "fc1.*/fc2.*, 0.*/2.*, connector.0.*/2.*, or [model.]mm_projector.0.*/2.*"


def projector_name(key: str) -> str:
    """`connector.0.*`, `model.mm_projector.2.*`, `0.*`/`2.*` or `fc1.*`/`fc2.*` -> fc1/fc2."""
    k = re.sub(r"^(?:.*\.)?(?:connector|projector|mm_projector)\.", "", key)  # drop any prefix
    return re.sub(r"^0\.", "fc1.", re.sub(r"^2\.", "fc2.", k))


def projector_names(tensors: dict) -> dict[str, torch.Tensor]:
    """The tensors under onsight's projector names, in float32."""
    return {projector_name(key): value.float() for key, value in tensors.items()}


def read_projector(path: Path, vis: VisionTower, llm_hidden: int) -> dict[str, torch.Tensor]:
    raw = load_tensors(need_file(path, "projector (--projector)"))
    found = ", ".join(sorted(raw)[:12]) + (f" ... ({len(raw)} in all)" if len(raw) > 12 else "")
    # A tensor with no place in Linear -> GELU -> Linear (a third layer as in LLaVA's
    # mlp3x_gelu, a norm) would be dropped, and the projector would compute something else
    # than it was trained to.
    extra = sorted(k for k in raw if projector_name(k) not in _PROJECTOR_KEYS)
    if extra:
        raise CheckpointError(
            f"{path}: key {extra[0]!r} has no place in onsight's projector, Linear (fc1) -> "
            f"GELU -> Linear (fc2); found {found}. A projector file holds exactly the two "
            f"layers' weights and biases, named {_PROJECTOR_FORMS}"
        )
    by_name: dict[str, list[str]] = {}
    for key in raw:
        by_name.setdefault(projector_name(key), []).append(key)
    for name, keys in by_name.items():
        if len(keys) > 1:  # e.g. both fc1.weight and 0.weight: which is the trained one?
            raise CheckpointError(
                f"{path}: keys {sorted(keys)} all name the projector's {name}; a projector "
                f"file uses one naming ({_PROJECTOR_FORMS})"
            )
    tensors = projector_names(raw)
    for key in _PROJECTOR_KEYS:
        if key not in tensors:
            raise CheckpointError(
                f"{path}: key {key!r} is missing (found {found}); a projector file holds the "
                f"two layers' weights and biases, named {_PROJECTOR_FORMS}"
            )
    mid = tensors["fc1.weight"].shape[0]
    want = {
        "fc1.weight": ((mid, vis.hidden), f"in = the vision tower's hidden size ({vis.dir})"),
        "fc1.bias": ((mid,), "fc1.weight's rows"),
        "fc2.weight": ((llm_hidden, mid), "out = the LLM's hidden_size"),
        "fc2.bias": ((llm_hidden,), "the LLM's hidden_size"),
    }
    for key, (shape, why) in want.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{path}: key {key!r} has shape {tuple(tensors[key].shape)}, expected {shape} "
                f"({why}); was this projector trained for these --vision and LLM?"
            )
    return tensors


def read_experts(path: PathLike, llm_cfg: dict) -> dict[int, dict[str, torch.Tensor]]:
    """LayerExpert routers: `layers.{i}.weight/bias` or `{i}.proj.weight/bias`."""
    path = need_file(Path(path), "LayerExpert weights (--experts)")
    hidden = cfg_int(llm_cfg, "hidden_size", path.parent)
    n_layers = cfg_int(llm_cfg, "num_hidden_layers", path.parent)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(path).items():
        m = re.fullmatch(r"(?:.*experts\.)?(?:layers\.)?(\d+)\.(?:proj\.)?(weight|bias)", key)
        if m is None:
            raise CheckpointError(f"{path}: key {key!r} is not layers.<i>.weight/bias")
        layer, kind = int(m[1]), m[2]
        if layer >= n_layers:
            raise CheckpointError(
                f"{path}: key {key!r} names layer {layer}; the LLM has {n_layers}"
            )
        want = (1, hidden) if kind == "weight" else (1,)
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"{path}: key {key!r} has shape {tuple(value.shape)}, expected {want} "
                f"(the LLM's hidden_size is {hidden})"
            )
        out.setdefault(layer, {})[kind] = value.float()
    if not out:
        raise CheckpointError(f"{path}: holds no LayerExpert tensors")
    incomplete = [i for i, parts in out.items() if len(parts) != 2]
    if incomplete:
        raise CheckpointError(f"{path}: layers {incomplete} lack a weight or bias; need both")
    return out


def expert_mod(experts: dict) -> ModConfig:
    """Routing by the given LayerExperts at VideoLLM-MoD's r (no experts: dense)."""
    if not experts:
        return ModConfig()
    return ModConfig(keep_ratio=MOD_KEEP_RATIO, layers=tuple(sorted(experts)), router="learned")
