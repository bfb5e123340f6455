"""Checkpoint loaders: a VideoLLM-online release, composed HF parts, and onsight's own format.

Every loader returns a `StreamingModel` in eval mode and the `tokenizer.json` to use with it.
Weights are read from safetensors (a lone `.bin` only with `weights_only=True`; a pickled PEFT
adapter is refused), so no loader runs pickled code. Every problem is a `CheckpointError`
naming the file and key at fault and what to do.

The entry points live here; the parts they read live beside them: ckpt_files (paths, JSON,
safetensors), ckpt_vision (SigLIP / CLIP towers), ckpt_llm (the transformers LLM), ckpt_adapter
(VideoLLM-online's LoRA adapter) and ckpt_parts (projector and LayerExpert files).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from onsight.exporter.ckpt_adapter import (
    adapter_tokenizer,
    check_adapter,
    merge_adapter,
    read_adapter,
)
from onsight.exporter.ckpt_files import PathLike, cfg_int, need_dir
from onsight.exporter.ckpt_llm import (
    decoder_dict,
    load_lm,
    need_llm_tokenizer,
    read_llm_config,
    vocab_rows,
)
from onsight.exporter.ckpt_parts import (
    expert_mod,
    projector_names,
    read_experts,
    read_projector,
)
from onsight.exporter.ckpt_vision import (
    VisionTower,
    load_vision_weights,
    preprocess_for,
    read_vision,
)
from onsight.exporter.config import ModelConfig, PreprocessConfig, TemplateConfig
from onsight.exporter.llm_tokenizer import compose_template, prepare_tokenizer
from onsight.exporter.model import StreamingModel, load_native, read_json
from onsight.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

FORMATS = ("videollm-online", "compose", "onsight")
# The entry points (the loaders' parts live in exporter/ckpt_*.py and are imported from there).
__all__ = [
    "FORMATS",
    "detect_format",
    "load_checkpoint",
    "load_compose",
    "load_videollm_online",
]


# ---- entry points ----


def detect_format(source: PathLike) -> str:
    """`onsight`, `videollm-online` or `compose`, from the files in the directory."""
    d = need_dir(source, "checkpoint")
    if (d / "bundle.json").is_file():
        raise CheckpointError(
            f"{d}: this is a bundle (already exported), not a checkpoint; use it as it is "
            f"(`onsight info {d}`, `onsight narrate --engine {d}`) or export a checkpoint "
            "directory"
        )
    config = d / "config.json"
    cfg = read_json(config, "transformers or onsight config") if config.is_file() else {}
    if not isinstance(cfg, dict):
        cfg = {}
    if "format_version" in cfg and "vision" in cfg:
        return "onsight"
    if (d / "adapter_config.json").is_file():
        return "videollm-online"
    if cfg.get("architectures"):
        return "compose"
    raise CheckpointError(
        f"{d}: cannot tell the checkpoint format: expected an onsight config.json, a PEFT "
        "adapter_config.json (VideoLLM-online) or a transformers config.json with "
        "'architectures'; check the path"
    )


def load_checkpoint(
    source: PathLike,
    *,
    vision: PathLike | None = None,
    projector: PathLike | None = None,
    base: PathLike | None = None,
    experts: PathLike | None = None,
    fmt: str = "auto",
) -> tuple[StreamingModel, Path]:
    """Load any supported checkpoint; returns (model in eval mode, tokenizer.json path)."""
    if fmt not in ("auto", *FORMATS):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}: use auto, {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(source)
        log.info("%s: detected format %s", source, fmt)
    unused = {"projector": projector} if fmt == "videollm-online" else {"base": base}
    if fmt == "onsight":
        unused = {"vision": vision, "projector": projector, "base": base, "experts": experts}
    for name, value in unused.items():
        if value is not None:
            log.warning("--%s %s is ignored for a %s checkpoint", name, value, fmt)
    if fmt == "onsight":
        return load_native(_need_onsight_dir(source))
    if fmt == "videollm-online":
        return load_videollm_online(source, base=base, vision=vision, experts=experts)
    return load_compose(source, vision=vision, projector=projector, experts=experts)


def load_videollm_online(
    adapter: PathLike,
    *,
    base: PathLike | None,
    vision: PathLike | None,
    experts: PathLike | None = None,
) -> tuple[StreamingModel, Path]:
    """Base Llama + PEFT LoRA adapter (holding the connector) + SigLIP, merged into one model."""
    adapter = need_dir(adapter, "VideoLLM-online adapter")
    if base is None or vision is None:
        raise CheckpointError(
            f"{adapter}: a VideoLLM-online adapter needs --base (the Llama dir it was trained "
            "on, Meta-Llama-3-8B-Instruct) and --vision (google/siglip-large-patch16-384)"
        )
    ad = read_adapter(adapter)  # before the base, which takes minutes for a real one
    vis = read_vision(vision)
    base_dir = need_dir(base, "base LLM (--base)")
    llm_cfg = read_llm_config(base_dir)
    expert_w = read_experts(experts, llm_cfg) if experts else {}
    tok_in = adapter_tokenizer(adapter, base_dir)
    lm = load_lm(base_dir, llm_cfg)
    tok = prepare_tokenizer(tok_in, vocab_rows(lm), exact=True)
    # LiveLlama keeps its connector as a top-level attribute of the causal LM, which is
    # where the adapter's modules_to_save keys (base_model.model.connector.*) point.
    h = lm.config.hidden_size
    lm.connector = nn.Sequential(nn.Linear(vis.hidden, h), nn.GELU(), nn.Linear(h, h))
    check_adapter(ad, lm, base_dir, vis)
    lm, connector = merge_adapter(lm, ad)
    cfg = ModelConfig(
        decoder=decoder_dict(llm_cfg),
        vision=vis.config(),
        # VideoLLM-online normalises with mean = std = 0.5 itself, whatever the tower's files say
        preprocess=PreprocessConfig(image_size=vis.image_size),
        mod=expert_mod(expert_w),
        template=TemplateConfig(),
        has_layer_experts=bool(expert_w),
    )
    model = _assemble(cfg, lm, vis, projector_names(connector.state_dict()), expert_w)
    log.info("loaded VideoLLM-online adapter %s over %s with %s", adapter, base_dir, vis.dir)
    return model, tok


def load_compose(
    llm: PathLike,
    *,
    vision: PathLike | None,
    projector: PathLike | None,
    experts: PathLike | None = None,
) -> tuple[StreamingModel, Path]:
    """An HF causal LM + an HF vision tower + a projector file (+ LayerExperts)."""
    llm_dir = need_dir(llm, "LLM")
    if vision is None or projector is None:
        raise CheckpointError(
            f"{llm_dir}: composing a model needs --vision (a SigLIP or CLIP dir) and "
            "--projector (a safetensors file with fc1/fc2 weights and biases)"
        )
    llm_cfg = read_llm_config(llm_dir)
    vis = read_vision(vision)
    proj = read_projector(Path(projector), vis, cfg_int(llm_cfg, "hidden_size", llm_dir))
    expert_w = read_experts(experts, llm_cfg) if experts else {}
    tok_in = need_llm_tokenizer(llm_dir)
    lm = load_lm(llm_dir, llm_cfg)
    tok = prepare_tokenizer(tok_in, vocab_rows(lm), exact=False)
    middle = proj["fc1.weight"].shape[0]
    cfg = ModelConfig(
        decoder=decoder_dict(llm_cfg),
        vision=vis.config(),
        preprocess=preprocess_for(vis),
        projector_hidden=0 if middle == lm.config.hidden_size else middle,
        mod=expert_mod(expert_w),
        template=compose_template(llm_dir, llm_cfg, tok),
        has_layer_experts=bool(expert_w),
    )
    model = _assemble(cfg, lm, vis, proj, expert_w)
    log.info("composed %s + %s + %s", llm_dir, vis.dir, projector)
    return model, tok


@torch.no_grad()
def _assemble(cfg: ModelConfig, lm: nn.Module, vis: VisionTower, proj: dict, experts: dict):
    model = StreamingModel(cfg, lm=lm)
    for key, value in proj.items():
        layer, attr = key.split(".")
        getattr(getattr(model.encoder.projector, layer), attr).copy_(value)
    for layer, parts in experts.items():
        model.decoder.experts[str(layer)].proj.weight.copy_(parts["weight"])
        model.decoder.experts[str(layer)].proj.bias.copy_(parts["bias"])
    load_vision_weights(model.encoder.tower.model, vis)
    # transformers may leave tensors in buffers mapped from the file at arbitrary offsets; CPU
    # matmuls round differently by alignment, so the same weights reloaded from onsight's
    # native file would differ in the last bit. Fresh allocations also unpin the source files.
    for p in model.parameters():
        p.data = p.data.clone()
    return model.eval()


# ---- helpers ----


def _need_onsight_dir(source: PathLike) -> Path:
    """The directory of an onsight checkpoint; a transformers model directory is named as such."""
    d = need_dir(source, "onsight checkpoint")
    config = d / "config.json"
    cfg = read_json(config, "onsight config") if config.is_file() else None
    if isinstance(cfg, dict) and "format_version" not in cfg:
        raise CheckpointError(
            f"{d}: not an onsight checkpoint (config.json has no format_version"
            + ("; it is a transformers model config" if cfg.get("architectures") else "")
            + "); use --format compose for a transformers model directory, or --format auto"
        )
    return d
