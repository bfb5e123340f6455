"""The vision tower of a checkpoint: a SigLIP or CLIP directory (a vision-only model, or a whole
SiglipModel / CLIPModel of which only `.vision_model` is used)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from onsight.exporter.ckpt_files import (
    SAVE_KEYS,
    PathLike,
    load_tensors,
    need_dir,
    read_config,
    weight_files,
)
from onsight.exporter.config import PreprocessConfig, VisionConfig
from onsight.runtime.errors import CheckpointError

_VISION_KINDS = {"siglip_vision_model": "siglip", "siglip": "siglip"}
_VISION_KINDS |= {"clip_vision_model": "clip", "clip": "clip"}
# For a vision dir without preprocessor_config.json: the towers' published values.
_DEFAULT_NORM = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclass(frozen=True)
class VisionTower:
    dir: Path
    kind: str  # "siglip" | "clip"
    hf_config: dict  # the tower's config alone (a full SigLIP/CLIP config's vision_config)
    hidden: int
    image_size: int

    def config(self) -> VisionConfig:
        # live1+: the pooled token + a 3x3 average-pooled patch grid, 10 tokens per frame
        return VisionConfig(
            self.kind, self.hidden, grid=3, use_pooled=True, hf_config=self.hf_config
        )


def read_vision(path: PathLike) -> VisionTower:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    d = need_dir(path, "vision tower (--vision)")
    cfg_path = d / "config.json"
    cfg = read_config(cfg_path, "the vision tower's transformers config")
    model_type = cfg.get("model_type")
    kind = _VISION_KINDS.get(model_type)
    if kind is None:
        raise CheckpointError(
            f"{cfg_path}: model_type {model_type!r} is not a supported vision tower; "
            f"supported: {', '.join(_VISION_KINDS)}"
        )
    # A full SiglipModel / CLIPModel nests the tower's config; only .vision_model is used.
    sub = cfg.get("vision_config", {}) if model_type in ("siglip", "clip") else cfg
    if not isinstance(sub, dict):
        raise CheckpointError(f"{cfg_path}: key 'vision_config' is not an object")
    hf = {k: v for k, v in sub.items() if k not in SAVE_KEYS}
    cls = SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig
    try:
        c = cls(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid {kind} vision config ({e})") from e
    return VisionTower(d, kind, hf, c.hidden_size, c.image_size)


def preprocess_for(vis: VisionTower) -> PreprocessConfig:
    """Image size from the tower; mean/std from preprocessor_config.json, else the tower's."""
    mean, std = _DEFAULT_NORM[vis.kind]
    pre_path = vis.dir / "preprocessor_config.json"
    if pre_path.is_file():
        pre = read_config(pre_path, "image processor config")
        mean = tuple(float(x) for x in pre.get("image_mean", mean))
        std = tuple(float(x) for x in pre.get("image_std", std))
        if len(mean) != 3 or len(std) != 3:
            raise CheckpointError(f"{pre_path}: image_mean and image_std need 3 values each")
    return PreprocessConfig(image_size=vis.image_size, mean=mean, std=std)


def load_vision_weights(tower: nn.Module, vis: VisionTower) -> None:
    """Copy the `vision_model.*` tensors (a full SigLIP/CLIP file also holds a text model)."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(vis.dir):
        state.update(load_tensors(f, lambda k: k.startswith("vision_model.")))
    expected = tower.state_dict()
    # Older checkpoints store position_ids, which transformers now rebuilds itself.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    hint = "are config.json and the weights from the same checkpoint?"
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{vis.dir}: tensor {missing[0]!r} is missing; {hint}")
    for k, v in state.items():
        if k not in expected or v.shape != expected[k].shape:
            want = tuple(expected[k].shape) if k in expected else "no such tensor"
            raise CheckpointError(
                f"{vis.dir}: tensor {k!r} has shape {tuple(v.shape)}, the config implies "
                f"{want}; {hint}"
            )
    # load_state_dict copies into the float32 parameters: bf16 / fp16 files are upcast
    tower.load_state_dict(state, strict=True)
