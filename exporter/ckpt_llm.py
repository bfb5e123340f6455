"""The decoder LLM of a checkpoint: a transformers causal LM directory (Llama, Qwen2, Mistral),
single-file or sharded safetensors in any stored dtype, loaded in float32."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from onsight.exporter.ckpt_files import (
    SAVE_KEYS,
    need_file,
    open_safetensors,
    read_config,
    weight_files,
)
from onsight.exporter.decoder import ARCHITECTURES, arch_spec
from onsight.runtime.errors import CheckpointError

log = logging.getLogger(__name__)

# Tensors older checkpoints store that transformers now computes: not a sign of a wrong config.
_HARMLESS_EXTRA = ("rotary_emb.inv_freq",)
# Slow-tokenizer files from which transformers can write the tokenizer.json onsight reads.
_SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt")
# Sizes transformers would take as given (a string, a float) and fail on far into loading.
_SIZE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def read_llm_config(d: Path) -> dict:
    """config.json of the LLM, checked by building its transformers config (no weights)."""
    import transformers

    path = d / "config.json"
    cfg = read_config(path, "the LLM's transformers config")
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
        raise CheckpointError(
            f"{path}: key 'architectures' is {json.dumps(archs)}, expected a list like "
            f'["LlamaForCausalLM"]; supported: {", ".join(ARCHITECTURES)}'
        )
    try:
        spec = arch_spec(archs[0])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: key 'architectures': {e}") from None
    if "quantization_config" in cfg:
        raise CheckpointError(
            f"{path}: key 'quantization_config': quantized weights cannot be exported; "
            "use the original fp16/bf16 checkpoint (onsight quantizes at build time)"
        )
    for key in _SIZE_KEYS:
        value = cfg.get(key)
        if key in cfg and not (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            raise CheckpointError(
                f"{path}: key {key!r} is {json.dumps(value)}, expected a whole number >= 1"
            )
    try:  # e.g. a rope_scaling without the keys its rope_type needs
        getattr(transformers, spec.config_class)(
            **{k: v for k, v in cfg.items() if k != "model_type"}
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a valid {spec.config_class} ({e}); fix the named key or copy the "
            "config.json the model was released with"
        ) from e
    return cfg


def decoder_dict(cfg: dict) -> dict:
    # The model is loaded in float32; the saved dtype would only mislead a rebuild.
    return {k: v for k, v in cfg.items() if k not in SAVE_KEYS}


def load_lm(d: Path, cfg: dict) -> nn.Module:
    """The causal LM in float32, every tensor of config.json loaded from the files and no other."""
    import transformers
    from safetensors import SafetensorError

    cls = getattr(transformers, arch_spec(cfg["architectures"][0]).model_class)
    # clear errors naming the file before transformers' own: a missing or truncated file
    for f in weight_files(d):
        if f.suffix == ".safetensors":
            with open_safetensors(f):  # reads the header and checks it against the file's size
                pass
    try:
        lm, info = cls.from_pretrained(
            str(d), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{d}: transformers could not load the LLM ({e})") from e
    # transformers fills missing tensors with random values and only warns; refuse that.
    tied = lm.config.tie_word_embeddings
    bad = [k for k in info["missing_keys"] if not (tied and k == "lm_head.weight")]
    bad += [str(k) for k in info.get("mismatched_keys", [])]
    # the head without the embedding (else the file is truncated or foreign): untied on purpose?
    if "lm_head.weight" in bad and not any("embed_tokens" in k for k in bad):
        more = f" (and {len(bad) - 1} other tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{d}: tensor 'lm_head.weight'{more} is missing (the output head: with "
            "tie_word_embeddings false in config.json it has weights of its own); copy the "
            "complete checkpoint, or set tie_word_embeddings true only if the model was "
            "trained with its head tied to embed_tokens"
        )
    if bad:
        raise CheckpointError(f"{d}: tensor {bad[0]!r} is missing or mis-shaped for config.json")
    # ... and drops tensors the config has no place for (more layers, biases): also refuse.
    extra = sorted(k for k in info["unexpected_keys"] if not k.endswith(_HARMLESS_EXTRA))
    if extra:
        raise CheckpointError(
            f"{d}: tensor {extra[0]!r} ({len(extra)} in all) is in the weights but has no "
            "place in the model config.json describes, so it would be dropped; config.json "
            "and the weights do not belong together (compare num_hidden_layers, "
            "attention_bias, architectures)"
        )
    _warn_sliding_window(d, lm.config)
    return lm.eval()


def sliding_window(config) -> int | None:
    """The attention window a transformers config trains its layers with, or None for full
    attention: Mistral-7B-v0.1's 4096, but not Qwen2's window when no layer uses it
    (use_sliding_window false, or max_window_layers covering every layer)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and "sliding_attention" not in layer_types:
        return None
    max_pos = getattr(config, "max_position_embeddings", None) or 0
    if not window or (max_pos and window >= max_pos):  # no position is ever out of reach
        return None
    return int(window)


def _warn_sliding_window(d: Path, config) -> None:
    """onsight attends over its whole KV cache; a sliding-window model (Mistral-7B-v0.1) was
    trained to see only the last `sliding_window` positions, the same only for a cache no
    longer than that (`onsight export` holds --kv-capacity to it)."""
    window = sliding_window(config)
    if window:
        log.warning(
            "%s: sliding_window %d: this model attends to the last %d positions only, onsight "
            "to its whole KV cache; export with --kv-capacity %d or less to match it",
            d / "config.json",
            window,
            window,
            window,
        )


def vocab_rows(lm: nn.Module) -> int:
    return int(lm.get_input_embeddings().weight.shape[0])


def need_llm_tokenizer(d: Path) -> Path:
    """tokenizer.json (onsight reads only the fast tokenizer's file) or an error saying how to
    write it from the slow tokenizer's files, when the directory has those."""
    path = d / "tokenizer.json"
    if path.is_file():
        return path
    slow = [n for n in _SLOW_TOKENIZER_FILES if (d / n).is_file()]
    if not slow:
        return need_file(path, "the LLM's fast tokenizer")
    raise CheckpointError(
        f"{path}: missing; onsight reads the fast tokenizer's tokenizer.json, and {d} has only "
        f'{", ".join(slow)}. Write it once with: python -c "from transformers import '
        f"AutoTokenizer; AutoTokenizer.from_pretrained('{d}').backend_tokenizer.save("
        f"'{path}')\""
    )
