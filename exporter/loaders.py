"""Checkpoint loaders: a VideoLLM-online release, composed HF parts, and onsight's own format.

Every loader returns a `StreamingModel` in eval mode and the `tokenizer.json` to use with it.
Weights are read from safetensors (a lone `.bin` only with `weights_only=True`), so no loader
runs pickled code. Every problem is a `CheckpointError` naming the file and key at fault and
what to do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from onsight.exporter.config import (
    ModConfig,
    ModelConfig,
    PreprocessConfig,
    TemplateConfig,
    VisionConfig,
)
from onsight.exporter.decoder import arch_spec
from onsight.exporter.llm_tokenizer import compose_template, prepare_tokenizer
from onsight.exporter.model import StreamingModel, load_native, read_json
from onsight.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

FORMATS = ("videollm-online", "compose", "onsight")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json")
IS_BASE = "is --base the model this adapter was trained on (Meta-Llama-3-8B-Instruct)?"
# Keys of a transformers config that say how it was saved, not what the model is.
_SAVE_KEYS = ("dtype", "torch_dtype", "_name_or_path", "transformers_version")
_VISION_KINDS = {"siglip_vision_model": "siglip", "siglip": "siglip"}
_VISION_KINDS |= {"clip_vision_model": "clip", "clip": "clip"}
# For a vision dir without preprocessor_config.json: the towers' published values.
_DEFAULT_NORM = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}

PathLike = str | Path


# ---- entry points ----


def detect_format(source: PathLike) -> str:
    """`onsight`, `videollm-online` or `compose`, from the files in the directory."""
    d = _need_dir(source, "checkpoint")
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
    adapter = _need_dir(adapter, "VideoLLM-online adapter")
    if base is None or vision is None:
        raise CheckpointError(
            f"{adapter}: a VideoLLM-online adapter needs --base (the Llama dir it was trained "
            "on, Meta-Llama-3-8B-Instruct) and --vision (google/siglip-large-patch16-384)"
        )
    for name in ADAPTER_FILES:
        _need_file(adapter / name, "part of a VideoLLM-online adapter")
    vis = _read_vision(vision)
    base_dir = _need_dir(base, "base LLM (--base)")
    llm_cfg = _read_llm_config(base_dir)
    expert_w = _read_experts(experts, llm_cfg) if experts else {}
    lm = _load_lm(base_dir, llm_cfg)
    tok = prepare_tokenizer(adapter / "tokenizer.json", _vocab_rows(lm), exact=True)
    # LiveLlama keeps its connector as a top-level attribute of the causal LM, which is
    # where the adapter's modules_to_save keys (base_model.model.connector.*) point.
    h = lm.config.hidden_size
    lm.connector = nn.Sequential(nn.Linear(vis.hidden, h), nn.GELU(), nn.Linear(h, h))
    _check_adapter(adapter, lm, base_dir, vis)
    lm, connector = _merge_adapter(lm, adapter)
    cfg = ModelConfig(
        decoder=_decoder_dict(llm_cfg),
        vision=vis.config(),
        # VideoLLM-online normalises with mean = std = 0.5 itself, whatever the tower's files say
        preprocess=PreprocessConfig(image_size=vis.image_size),
        mod=_expert_mod(expert_w),
        template=TemplateConfig(),
        has_layer_experts=bool(expert_w),
    )
    model = _assemble(cfg, lm, vis, _projector_names(connector.state_dict()), expert_w)
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
    llm_dir = _need_dir(llm, "LLM")
    if vision is None or projector is None:
        raise CheckpointError(
            f"{llm_dir}: composing a model needs --vision (a SigLIP or CLIP dir) and "
            "--projector (a safetensors file with fc1/fc2 weights and biases)"
        )
    llm_cfg = _read_llm_config(llm_dir)
    vis = _read_vision(vision)
    proj = _read_projector(Path(projector), vis, _cfg_int(llm_cfg, "hidden_size", llm_dir))
    expert_w = _read_experts(experts, llm_cfg) if experts else {}
    tok_in = _need_file(llm_dir / "tokenizer.json", "the LLM's fast tokenizer")
    lm = _load_lm(llm_dir, llm_cfg)
    tok = prepare_tokenizer(tok_in, _vocab_rows(lm), exact=False)
    middle = proj["fc1.weight"].shape[0]
    cfg = ModelConfig(
        decoder=_decoder_dict(llm_cfg),
        vision=vis.config(),
        preprocess=_preprocess(vis),
        projector_hidden=0 if middle == lm.config.hidden_size else middle,
        mod=_expert_mod(expert_w),
        template=compose_template(llm_dir, llm_cfg, tok),
        has_layer_experts=bool(expert_w),
    )
    model = _assemble(cfg, lm, vis, proj, expert_w)
    log.info("composed %s + %s + %s", llm_dir, vis.dir, projector)
    return model, tok


@torch.no_grad()
def _assemble(cfg: ModelConfig, lm: nn.Module, vis: _Vision, proj: dict, experts: dict):
    model = StreamingModel(cfg, lm=lm)
    for key, value in proj.items():
        layer, attr = key.split(".")
        getattr(getattr(model.encoder.projector, layer), attr).copy_(value)
    for layer, parts in experts.items():
        model.decoder.experts[str(layer)].proj.weight.copy_(parts["weight"])
        model.decoder.experts[str(layer)].proj.bias.copy_(parts["bias"])
    _load_vision_weights(model.encoder.tower.model, vis)
    # transformers may leave tensors in buffers mapped from the file at arbitrary offsets; CPU
    # matmuls round differently by alignment, so the same weights reloaded from onsight's
    # native file would differ in the last bit. Fresh allocations also unpin the source files.
    for p in model.parameters():
        p.data = p.data.clone()
    return model.eval()


# ---- files ----


def _need_dir(path: PathLike, what: str) -> Path:
    d = Path(path)
    if not d.exists():
        raise CheckpointError(f"{d}: does not exist ({what} expected there); check the path")
    if not d.is_dir():
        raise CheckpointError(f"{d}: is a file, but the {what} is a directory")
    return d


def _need_onsight_dir(source: PathLike) -> Path:
    """The directory of an onsight checkpoint; a transformers model directory is named as such."""
    d = _need_dir(source, "onsight checkpoint")
    config = d / "config.json"
    cfg = read_json(config, "onsight config") if config.is_file() else None
    if isinstance(cfg, dict) and "format_version" not in cfg:
        raise CheckpointError(
            f"{d}: not an onsight checkpoint (config.json has no format_version"
            + ("; it is a transformers model config" if cfg.get("architectures") else "")
            + "); use --format compose for a transformers model directory, or --format auto"
        )
    return d


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what}); copy the complete checkpoint")
    return path


def _weight_files(d: Path) -> list[Path]:
    """The weight files of a transformers model dir: single, sharded, or a lone .bin."""
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "sharded safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: key 'weight_map' is missing or not an object")
        shards = sorted(set(weight_map.values()))
        return [_need_file(d / f, f"a shard named in {index.name}") for f in shards]
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    raise CheckpointError(
        f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        "save the model with save_pretrained(..., safe_serialization=True)"
    )


def _load_tensors(path: Path, keep: Callable[[str], bool] = lambda k: True) -> dict:
    if path.suffix == ".bin":
        log.warning("%s: no safetensors file; reading the .bin with weights_only=True", path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointError(f"{path}: not plain tensors ({e}); convert to safetensors") from e
        return {k: v for k, v in state.items() if keep(k)}
    with _safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep(k)}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors header, without reading the (large) tensors."""
    with _safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _cfg_int(cfg: dict, key: str, where: Path) -> int:
    try:
        return int(cfg[key])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{where / 'config.json'}: key {key!r} is missing or no number"
        ) from e


# ---- vision tower ----


@dataclass(frozen=True)
class _Vision:
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


def _read_vision(path: PathLike) -> _Vision:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    d = _need_dir(path, "vision tower (--vision)")
    cfg_path = d / "config.json"
    cfg = read_json(cfg_path, "the vision tower's transformers config")
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
    hf = {k: v for k, v in sub.items() if k not in _SAVE_KEYS}
    cls = SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig
    try:
        c = cls(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid {kind} vision config ({e})") from e
    return _Vision(d, kind, hf, c.hidden_size, c.image_size)


def _preprocess(vis: _Vision) -> PreprocessConfig:
    """Image size from the tower; mean/std from preprocessor_config.json, else the tower's."""
    mean, std = _DEFAULT_NORM[vis.kind]
    pre_path = vis.dir / "preprocessor_config.json"
    if pre_path.is_file():
        pre = read_json(pre_path, "image processor config")
        mean = tuple(float(x) for x in pre.get("image_mean", mean))
        std = tuple(float(x) for x in pre.get("image_std", std))
        if len(mean) != 3 or len(std) != 3:
            raise CheckpointError(f"{pre_path}: image_mean and image_std need 3 values each")
    return PreprocessConfig(image_size=vis.image_size, mean=mean, std=std)


def _load_vision_weights(tower: nn.Module, vis: _Vision) -> None:
    """Copy the `vision_model.*` tensors (a full SigLIP/CLIP file also holds a text model)."""
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(vis.dir):
        state.update(_load_tensors(f, lambda k: k.startswith("vision_model.")))
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
    tower.load_state_dict(state, strict=True)


# ---- decoder LLM ----


def _read_llm_config(d: Path) -> dict:
    path = d / "config.json"
    cfg = read_json(path, "the LLM's transformers config")
    try:
        arch_spec((cfg.get("architectures") or [""])[0])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: key 'architectures': {e}") from None
    if "quantization_config" in cfg:
        raise CheckpointError(
            f"{path}: key 'quantization_config': quantized weights cannot be exported; "
            "use the original fp16/bf16 checkpoint (onsight quantizes at build time)"
        )
    return cfg


def _decoder_dict(cfg: dict) -> dict:
    # The model is loaded in float32; the saved dtype would only mislead a rebuild.
    return {k: v for k, v in cfg.items() if k not in _SAVE_KEYS}


def _load_lm(d: Path, cfg: dict) -> nn.Module:
    import transformers
    from safetensors import SafetensorError

    cls = getattr(transformers, arch_spec(cfg["architectures"][0]).model_class)
    # clear errors naming the file before transformers' own: a missing or truncated file
    for f in _weight_files(d):
        if f.suffix == ".safetensors":
            with _safetensors(f):  # reads the header and checks it against the file's size
                pass
    try:
        lm, info = cls.from_pretrained(
            str(d), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{d}: transformers could not load the LLM ({e})") from e
    # transformers fills missing tensors with random values and only warns; refuse that.
    tied = lm.config.tie_word_embeddings
    bad = [k for k in info["missing_keys"] if not (tied and k == "lm_head.weight")]
    bad += [str(k) for k in info.get("mismatched_keys", [])]
    if bad:
        raise CheckpointError(f"{d}: tensor {bad[0]!r} is missing or mis-shaped for config.json")
    return lm.eval()


def _vocab_rows(lm: nn.Module) -> int:
    return int(lm.get_input_embeddings().weight.shape[0])


# ---- VideoLLM-online's adapter ----


def _check_adapter(adapter: Path, lm: nn.Module, base_dir: Path, vis: _Vision) -> None:
    """Match the adapter's config and every tensor against the base before peft sees them.

    peft's own failures on a wrong base are opaque or silent (unmatched keys are skipped
    with a warning), so each mismatch is reported here by file and key.
    """
    cfg_path = adapter / "adapter_config.json"
    cfg = read_json(cfg_path, "PEFT adapter config")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: key peft_type is {cfg.get('peft_type')!r}; use LoRA")
    modules = dict(lm.named_modules())
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # peft's regex form
        unmatched = [] if any(re.fullmatch(targets, n) for n in modules) else [targets]
    else:
        leaves = {name.rsplit(".", 1)[-1] for name in modules}
        unmatched = [t for t in targets or [] if t not in leaves]
    if unmatched or not targets:
        raise CheckpointError(
            f"{cfg_path}: key target_modules names {unmatched or targets!r}, which the base at "
            f"{base_dir} does not have; {IS_BASE}"
        )
    if "connector" not in (cfg.get("modules_to_save") or []):
        raise CheckpointError(
            f"{cfg_path}: key modules_to_save lacks 'connector', so the adapter holds no "
            "trained connector; is this a VideoLLM-online adapter?"
        )
    weights = adapter / "adapter_model.safetensors"
    shapes = _tensor_shapes(weights)
    if not any(".connector." in k for k in shapes):
        raise CheckpointError(f"{weights}: no base_model.model.connector.* tensors; incomplete")
    params = {n: tuple(p.shape) for n, p in lm.named_parameters()}
    # The LLM's own keys first: a wrong base also breaks the connector's output width.
    for key in sorted(shapes, key=lambda k: ".connector." in k):
        where = f"{weights}: key {key}"
        problem = _adapter_key_problem(key, shapes[key], modules, params, base_dir)
        if problem is None:
            continue
        if key.endswith("connector.0.weight") and shapes[key][1] != vis.hidden:
            problem = (
                f"has shape {shapes[key]}, but its input width must be the vision tower's "
                f"hidden size, {vis.hidden} at {vis.dir}; is --vision "
                "google/siglip-large-patch16-384?"
            )
        raise CheckpointError(f"{where} {problem}")


def _adapter_key_problem(
    key: str, shape: tuple, modules: dict, params: dict, base_dir: Path
) -> str | None:
    """What is wrong with one adapter tensor against the base, or None."""
    path = key.removeprefix("base_model.model.")
    layer = re.search(r"(?:^|\.)layers\.(\d+)\.", path)
    n_layers = len(modules.get("model.layers", ()))
    if layer and int(layer[1]) >= n_layers:
        return (
            f"refers to layer {layer[1]} but the base at {base_dir} has {n_layers} layers; "
            + IS_BASE
        )
    if ".lora_" in path:
        name, _, rest = path.partition(".lora_")
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            return (
                f"targets {name!r}, which is no linear layer of the base at {base_dir}; {IS_BASE}"
            )
        dim, want = (1, module.in_features) if rest.startswith("A.") else (0, module.out_features)
        if rest[:2] in ("A.", "B.") and shape[dim] != want:
            return (
                f"has shape {shape}, but {name} of the base at {base_dir} is "
                f"{module.in_features} -> {module.out_features}; {IS_BASE}"
            )
        return None
    # modules_to_save copies and the saved lm_head base layer map onto the base's own tensors
    name = re.sub(r"modules_to_save\.(default\.)?|base_layer\.", "", path)
    if name not in params:
        return f"names {name!r}, which the base at {base_dir} does not have; {IS_BASE}"
    if shape != params[name]:
        return f"has shape {shape}, expected {params[name]}; {IS_BASE}"
    return None


def _merge_adapter(lm: nn.Module, adapter: Path) -> tuple[nn.Module, nn.Module]:
    """Apply and merge the LoRA weights; returns (plain causal LM, trained connector)."""
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(lm, str(adapter), is_trainable=False).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{adapter}: peft could not apply the adapter ({e})") from e
    connector = merged.connector
    del merged.connector  # it lives on as the StreamingModel's projector
    return merged.eval(), connector


# ---- projector and LayerExperts files ----


def _projector_names(tensors: dict) -> dict[str, torch.Tensor]:
    """`connector.0.*`, `0.*`/`2.*` (an nn.Sequential) or `fc1.*`/`fc2.*` -> fc1/fc2."""
    out = {}
    for key, value in tensors.items():
        k = re.sub(r"^(?:.*\.)?(?:connector|projector)\.", "", key)  # drop any module prefix
        out[re.sub(r"^0\.", "fc1.", re.sub(r"^2\.", "fc2.", k))] = value.float()
    return out


def _read_projector(path: Path, vis: _Vision, llm_hidden: int) -> dict[str, torch.Tensor]:
    tensors = _projector_names(_load_tensors(_need_file(path, "projector (--projector)")))
    for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        if key not in tensors:
            raise CheckpointError(
                f"{path}: key {key!r} is missing (found {sorted(tensors)[:6]}); a projector "
                "file holds fc1.weight, fc1.bias, fc2.weight and fc2.bias"
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
    return {k: tensors[k] for k in want}


def _read_experts(path: PathLike, llm_cfg: dict) -> dict[int, dict[str, torch.Tensor]]:
    """LayerExpert routers: `layers.{i}.weight/bias` or `{i}.proj.weight/bias`."""
    path = _need_file(Path(path), "LayerExpert weights (--experts)")
    hidden = _cfg_int(llm_cfg, "hidden_size", path.parent)
    n_layers = _cfg_int(llm_cfg, "num_hidden_layers", path.parent)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _load_tensors(path).items():
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


MOD_KEEP_RATIO = 0.2  # VideoLLM-MoD's r: what LayerExperts route at unless --keep-ratio says


def _expert_mod(experts: dict) -> ModConfig:
    """Routing by the given LayerExperts at VideoLLM-MoD's r (no experts: dense)."""
    if not experts:
        return ModConfig()
    return ModConfig(keep_ratio=MOD_KEEP_RATIO, layers=tuple(sorted(experts)), router="learned")
