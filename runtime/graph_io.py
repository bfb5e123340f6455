"""The names of the graphs' inputs and outputs, in one place: the exporter gives them, the
manifest check enforces them, the backends and the TensorRT build feed and read them.

Format version 1 fixes every name. The per-layer and mask names are also recorded in each
bundle's `io` block (RUNTIME_IO); a bundle that declares others is refused on load rather
than fed the wrong tensors (manifest_check.consistency_problems).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# bundle.json's `io` block as this onsight writes and requires it
RUNTIME_IO = {
    "past_key": "past_key_{layer}",
    "past_value": "past_value_{layer}",
    "new_key": "new_key_{layer}",
    "new_value": "new_value_{layer}",
    "kept": "kept_{layer}",
    "masks": {"dense": "dense_mask", "mod": "mod_mask"},
}

FRAMES = "frames"  # vision input: uint8 (B, S, S, 3)
FRAME_EMBEDS = "frame_embeds"  # vision output (B, N, hidden); frame_step input (N, hidden)
PREV_FRAME_EMBEDS = "prev_frame_embeds"  # frame_step input (N, hidden), for the novelty router
INPUT_IDS = "input_ids"  # text tokens (T,)
POSITION_IDS = "position_ids"  # positions of the step's tokens
LOGITS = "logits"  # (vocab,) of the step's last position
DENSE_MASK = RUNTIME_IO["masks"]["dense"]  # valid cache slots of the dense layers
MOD_MASK = RUNTIME_IO["masks"]["mod"]  # ... and of the routed layers


def past_key(layer: int) -> str:
    return RUNTIME_IO["past_key"].format(layer=layer)


def past_value(layer: int) -> str:
    return RUNTIME_IO["past_value"].format(layer=layer)


def new_key(layer: int) -> str:
    return RUNTIME_IO["new_key"].format(layer=layer)


def new_value(layer: int) -> str:
    return RUNTIME_IO["new_value"].format(layer=layer)


def kept(layer: int) -> str:
    return RUNTIME_IO["kept"].format(layer=layer)


def past_names(num_layers: int) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ...: the cache inputs, in the graphs' order."""
    return [n for i in range(num_layers) for n in (past_key(i), past_value(i))]


def new_names(num_layers: int) -> list[str]:
    """new_key_0, new_value_0, new_key_1, ...: the new K/V outputs, in the graphs' order."""
    return [n for i in range(num_layers) for n in (new_key(i), new_value(i))]


@dataclass(frozen=True)
class GraphIO:
    """One graph's input and output names, in the order the exporter declares them (the
    onnxruntime backend reads outputs by position)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_io(num_layers: int, routed_layers: Iterable[int]) -> dict[str, GraphIO]:
    """Every graph's IO for a model of `num_layers` layers, routers on `routed_layers`."""
    past, new = past_names(num_layers), new_names(num_layers)
    masks = (DENSE_MASK, MOD_MASK)
    return {
        "vision": GraphIO((FRAMES,), (FRAME_EMBEDS,)),
        "text_step": GraphIO((INPUT_IDS, POSITION_IDS, *masks, *past), (LOGITS, *new)),
        "frame_step": GraphIO(
            (INPUT_IDS, FRAME_EMBEDS, PREV_FRAME_EMBEDS, POSITION_IDS, *masks, *past),
            (LOGITS, *new, *(kept(i) for i in routed_layers)),
        ),
    }
