"""Tiny random-weight checkpoints in the exact on-disk formats of the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = [
    "A multimodal AI assistant is helping users with some activities.",
    "Below is their conversation, interleaved with the list of video frames received by the assistant.",
    "User: what is on the table? Assistant: a red cup and a blue book.",
    "a person walks in from the left, picks up the bottle, puts it down.",
    "[,,,] the scene goes dark. the lights come back on.",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 320) -> tuple[Path, int]:
    """Byte-level BPE with Llama-3's special tokens and `<v>` appended last.

    Returns (tokenizer.json path, the LLM's vocab size = id of `<v>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    n = tok.get_vocab_size()
    tok.add_special_tokens(["<v>"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path, n


def llama_config(vocab: int, arch: str = "LlamaForCausalLM", layers: int = 4) -> dict:
    base = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        architectures=[arch],
        bos_token_id=0,
        eos_token_id=1,
    )
    if arch == "Qwen2ForCausalLM":
        base["model_type"] = "qwen2"
    else:
        base["model_type"] = "llama"
    return base


def save_hf_lm(out_dir: Path, cfg: dict, tokenizer_json: Path, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    arch = cfg["architectures"][0]
    conf_cls = transformers.Qwen2Config if arch == "Qwen2ForCausalLM" else transformers.LlamaConfig
    model = getattr(transformers, arch)(
        conf_cls(**{k: v for k, v in cfg.items() if k != "model_type"})
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return out_dir


def siglip_config(image_size: int = 32, patch: int = 8) -> dict:
    return dict(
        model_type="siglip_vision_model",
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        num_channels=3,
    )


def save_siglip(out_dir: Path, seed: int = 1, image_size: int = 32) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = {k: v for k, v in siglip_config(image_size).items() if k != "model_type"}
    SiglipVisionModel(SiglipVisionConfig(**cfg)).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_clip(out_dir: Path, seed: int = 2, image_size: int = 32) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )
    CLIPVisionModel(cfg).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))
