"""VideoLLM-online's PEFT LoRA adapter: its files, every tensor checked against the base
before peft sees it, and the merge into a plain causal LM plus the trained connector.

peft's own failures on a wrong or incomplete adapter are opaque or silent (unmatched and
missing keys are skipped with a warning, leaving a LoRA at its initial, no-op value), so each
problem is reported here by file and key.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from onsight.exporter.ckpt_files import need_file, read_config, tensor_shapes
from onsight.exporter.ckpt_vision import VisionTower
from onsight.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

IS_BASE = "is --base the model this adapter was trained on (Meta-Llama-3-8B-Instruct)?"
PREFIX = "base_model.model."  # peft's prefix of every saved key
# LiveLlama's connector, Linear -> GELU -> Linear (nn.Sequential), saved by modules_to_save
CONNECTOR_TENSORS = ("0.weight", "0.bias", "2.weight", "2.bias")


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter directory, its config and its tensors' shapes (header only)."""

    dir: Path
    config: dict  # adapter_config.json
    shapes: dict[str, tuple[int, ...]]  # adapter_model.safetensors: key -> shape

    @property
    def weights(self) -> Path:
        return self.dir / "adapter_model.safetensors"


def read_adapter(adapter: Path) -> Adapter:
    """The adapter's config and weights header, checked before the (large) base is loaded;
    a pickled adapter is refused, never read."""
    weights = adapter / "adapter_model.safetensors"
    pickled = adapter / "adapter_model.bin"
    if not weights.is_file() and pickled.is_file():
        raise CheckpointError(
            f"{pickled}: a pickled adapter (older peft); onsight unpickles nothing and reads "
            "only adapter_model.safetensors. If you trust the file, convert it once in that "
            'directory: python -c "import torch; from safetensors.torch import save_file; '
            "save_file(torch.load('adapter_model.bin', weights_only=True), "
            "'adapter_model.safetensors')\""
        )
    need_file(weights, "part of a VideoLLM-online adapter")
    cfg_path = adapter / "adapter_config.json"
    cfg = read_config(cfg_path, "PEFT adapter config")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: key peft_type is {cfg.get('peft_type')!r}; use LoRA")
    if "connector" not in (cfg.get("modules_to_save") or []):
        raise CheckpointError(
            f"{cfg_path}: key modules_to_save lacks 'connector', so the adapter holds no "
            "trained connector; is this a VideoLLM-online adapter?"
        )
    shapes = tensor_shapes(weights)
    _check_connector_complete(weights, shapes)
    return Adapter(adapter, cfg, shapes)


def adapter_tokenizer(adapter: Path, base_dir: Path) -> Path:
    """The adapter's tokenizer.json, else the base's: VideoLLM-online builds its tokenizer
    from the base LLM's and adds `<v>` (prepare_tokenizer does the same to a copy)."""
    own = adapter / "tokenizer.json"
    if own.is_file():
        return own
    base = base_dir / "tokenizer.json"
    if not base.is_file():
        raise CheckpointError(
            f"{own}: missing, and the base has none either ({base}); copy the adapter's "
            "tokenizer.json (VideoLLM-online releases ship one) or the base's"
        )
    log.info(
        "%s has no tokenizer.json; using the base's %s, as VideoLLM-online does", adapter, base
    )
    return base


def _saved_name(path: str) -> str:
    """The base model's name for a saved tensor: modules_to_save copies and the saved
    `lm_head` base layer map onto the base's own tensors."""
    return re.sub(r"modules_to_save\.(default\.)?|base_layer\.", "", path)


def check_adapter(ad: Adapter, lm: nn.Module, base_dir: Path, vis: VisionTower) -> None:
    """Match the adapter's targets and every tensor against the base (with `lm.connector`
    attached) before peft sees them."""
    cfg_path = ad.dir / "adapter_config.json"
    modules = dict(lm.named_modules())
    targets = ad.config.get("target_modules")
    if isinstance(targets, str):  # peft's regex form, as VideoLLM-online's release has it
        unmatched = [] if any(re.fullmatch(targets, n) for n in modules) else [targets]
    else:
        leaves = {name.rsplit(".", 1)[-1] for name in modules}
        unmatched = [t for t in targets or [] if t not in leaves]
    if unmatched or not targets:
        raise CheckpointError(
            f"{cfg_path}: key target_modules names {unmatched or targets!r}, which the base at "
            f"{base_dir} does not have; {IS_BASE}"
        )
    params = {n: tuple(p.shape) for n, p in lm.named_parameters()}
    shapes = ad.shapes
    # The LLM's own keys first: a wrong base also breaks the connector's output width.
    for key in sorted(shapes, key=lambda k: ".connector." in k):
        where = f"{ad.weights}: key {key}"
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


def _check_connector_complete(weights: Path, shapes: dict) -> None:
    """Every tensor of the connector: peft would keep a missing one at its random initial value."""
    stored = {_saved_name(k.removeprefix(PREFIX)) for k in shapes}
    missing = [f"connector.{n}" for n in CONNECTOR_TENSORS if f"connector.{n}" not in stored]
    if len(missing) == len(CONNECTOR_TENSORS):
        raise CheckpointError(f"{weights}: no {PREFIX}connector.* tensors; incomplete")
    if missing:
        raise CheckpointError(
            f"{weights}: key {PREFIX}{missing[0]} is missing, so the trained connector is "
            "incomplete; copy the complete adapter_model.safetensors"
        )


def _adapter_key_problem(
    key: str, shape: tuple, modules: dict, params: dict, base_dir: Path
) -> str | None:
    """What is wrong with one adapter tensor against the base, or None."""
    path = key.removeprefix(PREFIX)
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
        if isinstance(module, nn.Embedding) and rest in ("embedding_A", "embedding_B"):
            # peft's LoRA of an embedding: A is (r, rows), B is (width, r)
            rows, width = module.num_embeddings, module.embedding_dim
            dim, want = (1, rows) if rest == "embedding_A" else (0, width)
            if shape[dim] != want:
                return (
                    f"has shape {shape}, but {name} of the base at {base_dir} is "
                    f"{rows} x {width}; {IS_BASE}"
                )
            return None
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
    name = _saved_name(path)
    if name not in params:
        return f"names {name!r}, which the base at {base_dir} does not have; {IS_BASE}"
    if shape != params[name]:
        return f"has shape {shape}, expected {params[name]}; {IS_BASE}"
    return None


def merge_adapter(lm: nn.Module, ad: Adapter) -> tuple[nn.Module, nn.Module]:
    """Apply and merge the LoRA weights; returns (plain causal LM, trained connector)."""
    from peft import PeftModel, get_peft_model_state_dict

    try:
        with warnings.catch_warnings():  # reported below as an error, by file and key
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_lm = PeftModel.from_pretrained(lm, str(ad.dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ad.dir}: peft could not apply the adapter ({e})") from e
    # The keys peft would save for this config are the ones the file must hold; a LoRA pair
    # it lacks stays at peft's initialisation (lora_B = 0), so that layer is silently unadapted.
    # (The saved lm_head base layer is optional: without it the base's own is used.)
    expected = get_peft_model_state_dict(peft_lm, save_embedding_layers=False)
    missing = sorted(set(expected) - set(ad.shapes))
    if missing:
        raise CheckpointError(
            f"{ad.weights}: key {missing[0]} is missing "
            f"({len(missing)} of the {len(expected)} tensors adapter_config.json implies), so "
            "those layers would stay unadapted; copy the complete adapter"
        )
    merged = peft_lm.merge_and_unload()
    connector = merged.connector
    del merged.connector  # it lives on as the StreamingModel's projector
    return merged.eval(), connector
