"""A train-demo run's files: the saved training state (written atomically, read back with
weights_only), and warm starts (`--init-from`) from a run or from a native checkpoint."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from onsight.exporter.config import ModelConfig
from onsight.exporter.demo.train_config import TrainConfig
from onsight.exporter.model import StreamingModel
from onsight.runtime.errors import OnsightError

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


# ---- checkpoints: tensors and plain numbers only, loaded with weights_only=True ----


def save_state(path: Path, model, aux_head, opt, step: int, tcfg: TrainConfig) -> None:
    state = {
        "model": model.state_dict(),
        "aux": aux_head.state_dict() if aux_head is not None else {},
        "optim": opt.state_dict(),
        "step": step,
        "train_config": json.dumps(asdict(tcfg)),
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def warm_start(model: StreamingModel, heads: nn.Module | None, run_dir: Path) -> None:
    """Start from another run's latest weights (not its optimizer or schedule).

    Tensors the earlier model lacks must be residual tower blocks, the tower's position
    embedding, or decoder layers (and their LayerExperts) past the earlier model's depth.
    Tower blocks and the position embedding start at zero; a new
    decoder layer keeps its random init except its two output projections (attention o_proj,
    MLP down_proj), which start at zero, so that it adds nothing to the residual stream. Either
    way the warm-started model computes exactly what the earlier one did (up to its routing,
    when `mod_layers` differs from the earlier run's: then the LayerExperts start fresh).
    """
    weights, old_layers, aux, step = _warm_source(run_dir)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Routed elsewhere than the earlier run (--mod-layers): its LayerExperts on layers this
    # model does not route are dropped, and this model's on the others keep their init.
    rerouted = [k for k in missing + unexpected if _is_expert(k)]
    if rerouted:
        log.info(
            "routed layers differ from %s: %d router tensors start fresh", run_dir, len(rerouted)
        )
    missing = [k for k in missing if not _is_expert(k)]
    unexpected = [k for k in unexpected if not _is_expert(k)]
    foreign = [k for k in missing if not _is_tower_block(k) and _new_layer(k, old_layers) < 0]
    if foreign or unexpected:
        raise OnsightError(
            f"--init-from {run_dir}: its model does not match this one (missing {foreign[:3]}, "
            f"unexpected {unexpected[:3]}); use the same --keep-ratio / --full-compute, and "
            "--decoder-layers at least the earlier run's"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k in missing:
            if k not in params:
                continue  # a buffer
            if _is_tower_block(k) or k.endswith(("o_proj.weight", "down_proj.weight")):
                params[k].zero_()
    if heads is not None and aux:
        # a head this run lacks, or has with another shape (--change-target), starts fresh
        own = heads.state_dict()
        fresh = sorted(
            {k.split(".")[0] for k, v in aux.items() if k in own and own[k].shape != v.shape}
        )
        if fresh:
            log.info("auxiliary heads %s differ from %s's: they start fresh", fresh, run_dir)
        heads.load_state_dict(
            {k: v for k, v in aux.items() if k in own and own[k].shape == v.shape}, strict=False
        )
    log.info(
        "weights from %s (step %s); %d new tensors (tower blocks at zero, new decoder layers "
        "as identity)",
        run_dir,
        step,
        len(missing),
    )


def is_native_dir(path: Path) -> bool:
    """An onsight native checkpoint (config.json, model.safetensors, tokenizer.json)."""
    return all((path / n).is_file() for n in ("config.json", "model.safetensors", "tokenizer.json"))


def _warm_source(path: Path) -> tuple[dict[str, torch.Tensor], int, dict, str]:
    """(weights, decoder depth, auxiliary heads' state or {}, step) of a train-demo run
    directory or of a native checkpoint (e.g. engines/demo-checkpoint, which keeps no
    auxiliary heads: they start fresh)."""
    if (path / STATE_FILE).is_file():
        state = load_state(path / STATE_FILE)
        layers = TrainConfig.from_json(state["train_config"]).decoder_layers
        return state["model"], layers, state.get("aux") or {}, str(state["step"])
    from safetensors.torch import load_file

    cfg = ModelConfig.load(path / "config.json")
    layers = int(cfg.decoder.get("num_hidden_layers", 0))
    return load_file(str(path / "model.safetensors")), layers, {}, "native"


def _new_layer(name: str, old_layers: int) -> int:
    """The index of the decoder layer (or its LayerExpert) a tensor belongs to, when that
    layer is past an earlier model's depth; -1 otherwise."""
    m = re.search(r"(?:\.layers\.|\.experts\.)(\d+)\.", name)
    return int(m.group(1)) if m and int(m.group(1)) >= old_layers else -1


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _is_tower_block(name: str) -> bool:
    # residual blocks sit after the 2 x len(tiny_channels) strided conv / GELU modules; the
    # patch position embedding is new tower state of the same kind (it starts at zero)
    return (".tower.convs." in name and ".conv." in name) or name.endswith(".tower.pos")
