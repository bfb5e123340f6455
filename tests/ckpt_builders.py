"""Tiny random-weight checkpoints in the on-disk formats the loaders read.

A VideoLLM-online release (base Llama dir + PEFT LoRA adapter + full SigLIP dir), composed
parts (projector and LayerExpert safetensors files), built with the same libraries that wrote
the real ones (transformers' and peft's save_pretrained).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from builders import llama_config, save_hf_lm
from torch import nn

LORA_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
]
BOS, EOS, V = "<|begin_of_text|>", "<|eot_id|>", "<v>"


def tokenizer_without_v(tokenizer_json: Path, out_dir: Path) -> Path:
    """The builders' tokenizer as a base LLM ships it: no `<v>`."""
    raw = json.loads(Path(tokenizer_json).read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != V]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(raw))
    return out_dir / "tokenizer.json"


def save_tokenizer_files(
    out_dir: Path, tokenizer_json: Path, bos: str | None = BOS, eos: str = EOS
) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as transformers writes."""
    from transformers import PreTrainedTokenizerFast

    extra = {"additional_special_tokens": [V]} if _has_v(tokenizer_json) else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), bos_token=bos, eos_token=eos, **extra
    )
    tok.save_pretrained(out_dir)


def _has_v(tokenizer_json: Path) -> bool:
    return any(
        t["content"] == V for t in json.loads(Path(tokenizer_json).read_text())["added_tokens"]
    )


def save_llm(
    out_dir: Path,
    vocab: int,
    tokenizer_json: Path,
    arch: str = "LlamaForCausalLM",
    layers: int = 4,
    hidden: int = 64,
    bos: str | None = BOS,
    seed: int = 0,
) -> Path:
    """An HF LLM dir: config.json, model.safetensors and the tokenizer files."""
    cfg = llama_config(vocab, arch, layers)
    cfg["hidden_size"] = hidden
    save_hf_lm(out_dir, cfg, tokenizer_json, seed=seed)
    save_tokenizer_files(out_dir, tokenizer_json, bos=bos)
    return out_dir


def save_llm_as_released(
    out_dir: Path,
    vocab: int,
    tokenizer_json: Path,
    arch: str = "LlamaForCausalLM",
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    random_biases: bool = False,
    bos: str | None = BOS,
    seed: int = 0,
    **config: object,
) -> Path:
    """An HF LLM dir as real ones are released: any supported architecture with its own config
    class, extra config keys as given (rope_scaling, sliding_window, tie_word_embeddings),
    weights stored in `dtype` (bf16 like Llama-3), sharded with model.safetensors.index.json
    when `max_shard_size` is given, and the tokenizer files."""
    import transformers

    from onsight.exporter.decoder import arch_spec

    cfg = {**llama_config(vocab, arch), **config}
    cfg.pop("model_type")
    spec = arch_spec(arch)
    torch.manual_seed(seed)
    config_obj = getattr(transformers, spec.config_class)(**cfg)
    model = getattr(transformers, spec.model_class)(config_obj)
    if random_biases:  # transformers starts biases at zero, where a dropped one would not show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.5)
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size or "5GB")
    save_tokenizer_files(out_dir, tokenizer_json, bos=bos)
    return out_dir


# The text half of a whole SigLIP / CLIP release, which the loaders must skip.
TINY_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=16,
)


def _tiny_tower(hidden: int, image_size: int) -> dict[str, int]:
    return dict(
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )


def save_full_siglip(
    out_dir: Path,
    hidden: int = 48,
    image_size: int = 32,
    seed: int = 3,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """A whole SiglipModel (text + vision), as google/siglip-large-patch16-384 is released."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    vision = _tiny_tower(hidden, image_size)
    model = SiglipModel(SiglipConfig(text_config=TINY_TEXT, vision_config=vision)).to(dtype)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size or "5GB")
    return out_dir


# Some of the legacy keys older transformers wrote into every nested config of the
# openai/clip-vit-* releases (each PretrainedConfig attribute, nulls included).
_LEGACY_CONFIG_KEYS = dict(
    _name_or_path="",
    add_cross_attention=False,
    architectures=None,
    bad_words_ids=None,
    chunk_size_feed_forward=0,
    diversity_penalty=0.0,
    do_sample=False,
    early_stopping=False,
    id2label={"0": "LABEL_0", "1": "LABEL_1"},
    label2id={"LABEL_0": 0, "LABEL_1": 1},
    is_decoder=False,
    length_penalty=1.0,
    max_length=20,
    num_beams=1,
    output_attentions=False,
    pruned_heads={},
    return_dict=True,
    temperature=1.0,
    top_k=50,
    torch_dtype=None,
    torchscript=False,
    transformers_version=None,
    use_bfloat16=False,
)


def save_full_clip(out_dir: Path, hidden: int = 48, image_size: int = 32, seed: int = 7) -> Path:
    """A whole CLIPModel (text + vision + projections) whose config.json nests the vision
    config with legacy keys, as the openai/clip-vit-* releases do."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = {**_tiny_tower(hidden, image_size), "hidden_act": "quick_gelu"}
    text = TINY_TEXT
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(cfg).save_pretrained(out_dir)
    raw = json.loads((out_dir / "config.json").read_text())
    raw["vision_config"] = {**_LEGACY_CONFIG_KEYS, **raw["vision_config"]}
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return out_dir


def make_connector(vision_hidden: int, hidden: int) -> nn.Sequential:
    """LiveLlama's connector: Linear -> exact GELU -> Linear."""
    return nn.Sequential(nn.Linear(vision_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def save_videollm_adapter(
    out_dir: Path,
    base_dir: Path,
    vision_hidden: int,
    tokenizer_json: Path,
    seed: int = 4,
    target_modules: list[str] | str = LORA_TARGETS,
) -> Path:
    """A PEFT LoRA adapter over the base with the connector in modules_to_save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lm.connector = make_connector(vision_hidden, lm.config.hidden_size)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=target_modules,
        modules_to_save=["connector"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(lm, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # peft starts lora_B (an embedding's lora_embedding_A) at zero, so merging would be
            # a no-op, and the saved connector as a copy of the base's; make them all
            # trained-looking so the test can see them applied.
            if "lora_B" in name or "lora_embedding" in name or "modules_to_save" in name:
                p.normal_(0.0, 0.05)
    with warnings.catch_warnings():  # peft notes that it saves lm_head's base weights too
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(out_dir)
    save_tokenizer_files(out_dir, tokenizer_json)
    return out_dir


def save_projector(
    path: Path,
    vision_hidden: int,
    llm_hidden: int,
    middle: int | None = None,
    naming: str = "fc",
    seed: int = 5,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """naming: `fc` (fc1.*, fc2.*), `seq` (0.*, 2.*), `connector` (connector.0.*), `llava`
    (model.mm_projector.0.*, as LLaVA's mlp2x_gelu mm_projector.bin) or `mm_projector`
    (mm_projector.0.*). A path ending in .bin is written with torch.save, as LLaVA's is."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    middle = middle or llm_hidden
    first, second = {
        "fc": ("fc1", "fc2"),
        "seq": ("0", "2"),
        "connector": ("connector.0", "connector.2"),
        "llava": ("model.mm_projector.0", "model.mm_projector.2"),
        "mm_projector": ("mm_projector.0", "mm_projector.2"),
    }[naming]
    tensors = {
        f"{first}.weight": torch.randn(middle, vision_hidden) * 0.1,
        f"{first}.bias": torch.randn(middle) * 0.1,
        f"{second}.weight": torch.randn(llm_hidden, middle) * 0.1,
        f"{second}.bias": torch.randn(llm_hidden) * 0.1,
    }
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if Path(path).suffix == ".bin":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path))
    return path


def save_experts(
    path: Path, layers: tuple[int, ...], hidden: int, naming: str = "layers", seed: int = 6
) -> Path:
    """naming: `layers` (layers.{i}.weight) or `proj` ({i}.proj.weight)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    fmt = "layers.{}.{}" if naming == "layers" else "{}.proj.{}"
    tensors = {}
    for i in layers:
        tensors[fmt.format(i, "weight")] = torch.randn(1, hidden)
        tensors[fmt.format(i, "bias")] = torch.randn(1)
    save_file(tensors, str(path))
    return path


def copy_dir(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a checkpoint dir to break on purpose, leaving out the named files."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in drop])
    return dst


def edit_json(path: Path, **changes: object) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj, indent=2))
