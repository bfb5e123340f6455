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
from onsight.runtime.errors import CheckpointError, ExportError
from onsight.runtime.files import current_umask, file_above

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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}", dir=out.parent))
        tmp.chmod(0o777 & ~current_umask())
    except OSError as e:
        raise write_error(out, e) from e
    return tmp


def write_error(out: Path, e: OSError) -> ExportError:
    """An OSError while writing `out` (or its hidden staging sibling), said in terms of `out`:
    a read-only or full disk, a file where a directory should be, no permission."""
    blocker = file_above(out)
    reason = f"{blocker} is a file, not a directory" if blocker else e.strerror or str(e)
    return ExportError(f"cannot write {out}: {reason}; choose another --out")


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
    """Load an onsight checkpoint directory; returns (model in eval mode, tokenizer.json path).

    Every tensor the config implies must be in model.safetensors, and nothing else: a tensor
    left out would keep its random initial value and the export would narrate noise.
    """
    d = Path(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / name).is_file():
            raise CheckpointError(
                f"{d / name}: missing; an onsight checkpoint directory holds config.json, "
                "model.safetensors and tokenizer.json"
            )
    cfg = ModelConfig.load(d / "config.json")
    model = StreamingModel(cfg)
    weights = d / "model.safetensors"
    state = read_safetensors(weights)
    expected = model.state_dict()
    _check_native_keys(weights, state, expected)
    model.load_state_dict(state, strict=False)
    return model.eval(), d / "tokenizer.json"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or foreign file is a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); copy the checkpoint again"
        ) from e


def _check_native_keys(
    weights: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming them.

    A key may be absent only when its tensor is shared with one that is present (the same
    storage in the model): tied embeddings (tie_word_embeddings: lm_head is embed_tokens)
    and the decoder's own references to the LLM's embedding and head.
    """
    present_storage = {expected[k].data_ptr() for k in state if k in expected} - {0}
    missing = sorted(
        k for k in set(expected) - set(state) if expected[k].data_ptr() not in present_storage
    )
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensor{'s' * (len(missing) > 1)} {_names(missing)}")
        head_alone = not any("embed" in k for k in missing)  # else the head was tied to it
        if head_alone and any(k.endswith("lm_head.weight") for k in missing):
            problems[-1] += (
                " (the output head: with tie_word_embeddings false it has weights of its own)"
            )
    if unexpected:
        problems.append(f"unexpected tensor{'s' * (len(unexpected) > 1)} {_names(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{weights}: {'; '.join(problems)}; config.json and the weights do not belong "
            "together (or the file is incomplete): save the checkpoint again"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{weights}: tensor {k!r} has shape {tuple(v.shape)}, config.json "
                f"implies {tuple(expected[k].shape)}; the config and weights do not belong together"
            )


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
