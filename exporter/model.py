"""The streaming MoD video LLM: frame encoder + ModDecoder, and onsight's native format."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from onsight.exporter.config import ModelConfig
from onsight.exporter.decoder import ModDecoder, build_hf_lm
from onsight.exporter.vision import FrameEncoder
from onsight.runtime.errors import CheckpointError
from onsight.runtime.files import current_umask

log = logging.getLogger(__name__)


class StreamingModel(nn.Module):
    """Vision tower + projector + decoder LLM with LayerExperts; PyTorch reference."""

    def __init__(self, cfg: ModelConfig, lm: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = FrameEncoder(cfg)
        self.decoder = ModDecoder(lm if lm is not None else build_hf_lm(cfg.decoder), cfg)

    def with_config(self, cfg: ModelConfig) -> StreamingModel:
        """The same weights under other MoD settings (keep ratio, routed layers, router)."""
        new = StreamingModel.__new__(StreamingModel)
        nn.Module.__init__(new)
        new.cfg = cfg
        new.encoder = self.encoder
        experts = self.decoder.experts
        new.decoder = ModDecoder(self.decoder.lm, cfg)
        # only trained experts carry over: a layer newly routed under the new settings has
        # none (its gate would be a random Linear), so it routes without a gate
        new.decoder.experts = nn.ModuleDict(
            {name: e for name, e in experts.items() if name in new.decoder.experts}
        )
        return new.eval()

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> (B, N, hidden)."""
        return self.encoder(frames)


# ---- onsight's native format: config.json + model.safetensors + tokenizer.json ----


def staging_dir(out: Path, tag: str = "") -> Path:
    """An empty sibling of `out` to write into and then rename onto `out` (atomic publish).

    mkdtemp makes it private (0700); it gets what a plain mkdir would under the user's umask
    (0755 under the usual 022), so the published bundle or checkpoint is as readable by other
    users (a robot's service account, a shared board) as any directory the user creates.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def save_native(
    model: StreamingModel,
    tokenizer_json: str | Path,
    out_dir: str | Path,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write atomically: a temporary sibling directory renamed into place. `extra_files`
    ({name: text}) go in with the rest, e.g. the training config of a demo model."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose another directory or delete it")
    tmp = staging_dir(out)
    try:
        (tmp / "config.json").write_text(model.cfg.to_json())
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "onsight"})
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_native(path: str | Path) -> tuple[StreamingModel, Path]:
    """Load an onsight checkpoint directory; returns (model, tokenizer.json path)."""
    from safetensors.torch import load_file

    d = Path(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / name).is_file():
            raise CheckpointError(
                f"{d / name}: missing; an onsight checkpoint directory holds config.json, "
                "model.safetensors and tokenizer.json"
            )
    cfg = ModelConfig.load(d / "config.json")
    model = StreamingModel(cfg)
    state = load_file(str(d / "model.safetensors"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    # Tied embeddings are stored once; accept their absence.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing:
        raise CheckpointError(
            f"{d / 'model.safetensors'}: missing tensor {missing[0]!r} (and {len(missing) - 1} more)"
        )
    for k, v in state.items():
        if k not in expected:
            raise CheckpointError(
                f"{d / 'model.safetensors'}: unexpected tensor {k!r}; does config.json match?"
            )
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{d / 'model.safetensors'}: tensor {k!r} has shape {tuple(v.shape)}, config.json "
                f"implies {tuple(expected[k].shape)}; the config and weights do not belong together"
            )
    model.load_state_dict(state, strict=False)
    return model.eval(), d / "tokenizer.json"


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
