"""Export the three graphs of a bundle: vision, text step, frame step (MoD with static k).

Graph IO (batch 1, no batch dimension in the decoder graphs):
- vision:     frames uint8 (B, S, S, 3) -> frame_embeds (B, N, hidden)
- text_step:  input_ids (T,), position_ids (T,), dense_mask (Pd,), mod_mask (Pm,),
              past_key_i / past_value_i (Hkv, P_i, D) -> logits (vocab,), new_key_i / new_value_i (Hkv, T, D)
              where P is the attended span of the cache (dynamic, at most the capacity: the
              runtime feeds only the filled part, see runtime/kv_cache.py)
- frame_step: input_ids (Tt,), frame_embeds (N, hidden), prev_frame_embeds (N, hidden),
              position_ids (Tt+N,), masks, past -> logits, new_key_i / new_value_i
              ((Hkv, Tt+N, D) dense, (Hkv, Tt+k, D) routed), kept_i (k,) for routed layers
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from onsight.exporter.model import StreamingModel
from onsight.runtime import graph_io as io_names  # the names the runtime feeds and reads
from onsight.runtime.kv_cache import KVLayout

log = logging.getLogger(__name__)

OPSET = 18


class VisionGraph(nn.Module):
    def __init__(self, model: StreamingModel):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder(frames)


class _StepBase(nn.Module):
    def __init__(self, model: StreamingModel, layout: KVLayout):
        super().__init__()
        self.dec = model.decoder
        self.layout = layout

    def _past(self, dense_mask, mod_mask, flat):
        past = [(flat[2 * i], flat[2 * i + 1]) for i in range(self.layout.num_layers)]
        masks = [
            mod_mask if i in self.layout.routed else dense_mask
            for i in range(self.layout.num_layers)
        ]
        return past, masks


class TextStepGraph(_StepBase):
    def forward(self, input_ids, position_ids, dense_mask, mod_mask, *flat_past):
        past, masks = self._past(dense_mask, mod_mask, flat_past)
        logits, nk, nv = self.dec.text_step(input_ids, position_ids, past, masks)
        return (logits, *[t for kv in zip(nk, nv, strict=True) for t in kv])


class FrameStepGraph(_StepBase):
    def forward(
        self,
        input_ids,
        frame_embeds,
        prev_frame_embeds,
        position_ids,
        dense_mask,
        mod_mask,
        *flat_past,
    ):
        past, masks = self._past(dense_mask, mod_mask, flat_past)
        logits, nk, nv, kept = self.dec.frame_step(
            input_ids, frame_embeds, prev_frame_embeds, position_ids, past, masks
        )
        return (logits, *[t for kv in zip(nk, nv, strict=True) for t in kv], *kept)


def _example_past(layout: KVLayout, dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        torch.zeros(layout.kv_heads, layout.capacity(i), layout.head_dim, dtype=dtype)
        for i in range(layout.num_layers)
        for _ in range(2)
    ]


def _past_axes(layout: KVLayout) -> dict[str, dict[int, str]]:
    """The cache length is dynamic, per layer group: the runtime feeds its filled span."""
    dyn: dict[str, dict[int, str]] = {
        io_names.DENSE_MASK: {0: "past_dense"},
        io_names.MOD_MASK: {0: "past_mod"},
    }
    for i in range(layout.num_layers):
        axis = "past_mod" if i in layout.routed else "past_dense"
        dyn[io_names.past_key(i)] = dyn[io_names.past_value(i)] = {1: axis}
    return dyn


def _export(
    module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict
) -> None:
    """TorchScript-based exporter: fast, single file (no external data below 2 GB), and with our
    own attention (no HF mask helpers) it keeps the dynamic axes we name."""
    import shutil

    # Above 2 GB the exporter writes one file per weight beside the graph, so it always
    # exports into a scratch folder; only the graph (and one .data file) reach the bundle.
    scratch = path.parent / f".{path.stem}-export"
    scratch.mkdir(exist_ok=True)
    target = scratch / path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(target),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        if len(list(scratch.iterdir())) > 1:  # weights went to external files
            import onnx

            m = onnx.load(str(target))
            onnx.save(m, str(path), save_as_external_data=True, location=path.name + ".data")
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@torch.no_grad()
def export_graphs(
    model: StreamingModel, layout: KVLayout, out_dir: Path, dtype: torch.dtype
) -> dict[str, dict]:
    """Write vision.onnx, text_step.onnx and frame_step.onnx; returns their IO description."""
    model = model.to(dtype).eval()
    cfg = model.cfg
    L, N = layout.num_layers, cfg.tokens_per_frame
    hidden, S = cfg.llm_hidden, cfg.preprocess.image_size
    graphs: dict[str, dict] = {}
    io = io_names.graph_io(L, model.decoder.routed)

    frames = torch.zeros(2, S, S, 3, dtype=torch.uint8)
    v_in, v_out = list(io["vision"].inputs), list(io["vision"].outputs)
    _export(
        VisionGraph(model),
        (frames,),
        out_dir / "vision.onnx",
        v_in,
        v_out,
        {io_names.FRAMES: {0: "batch"}, io_names.FRAME_EMBEDS: {0: "batch"}},
    )
    graphs["vision"] = {"file": "vision.onnx", "inputs": v_in, "outputs": v_out}

    past = _example_past(layout, dtype)
    nnames = io_names.new_names(L)
    masks = (
        torch.ones(layout.capacity_dense, dtype=torch.bool),
        torch.ones(layout.capacity_mod, dtype=torch.bool),
    )
    # an example of 3 text tokens (not 1) so no dimension is frozen to the example
    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    pos = torch.tensor([0, 1, 2], dtype=torch.int64)
    t_in, t_out = list(io["text_step"].inputs), list(io["text_step"].outputs)
    dyn = {io_names.INPUT_IDS: {0: "tokens"}, io_names.POSITION_IDS: {0: "tokens"}}
    dyn.update({n: {1: "tokens"} for n in nnames})
    dyn.update(_past_axes(layout))
    _export(
        TextStepGraph(model, layout),
        (ids, pos, *masks, *past),
        out_dir / "text_step.onnx",
        t_in,
        t_out,
        dyn,
    )
    graphs["text_step"] = {"file": "text_step.onnx", "inputs": t_in, "outputs": t_out}

    emb = torch.randn(N, hidden, dtype=dtype)
    fpos = torch.arange(3 + N, dtype=torch.int64)
    f_in, f_out = list(io["frame_step"].inputs), list(io["frame_step"].outputs)
    # Vision tokens are dynamic too (from k to N), so the runtime can prefill fewer tokens of
    # a frame that barely changed (DyCoke-style pruning); MoD's top-k stays a constant k.
    dyn = {
        io_names.INPUT_IDS: {0: "text_tokens"},
        io_names.POSITION_IDS: {0: "step_tokens"},
        io_names.FRAME_EMBEDS: {0: "frame_tokens"},
        io_names.PREV_FRAME_EMBEDS: {0: "frame_tokens"},
        **_past_axes(layout),
    }
    for i in range(L):
        axis = "routed_tokens" if i in layout.routed else "step_tokens"
        dyn[io_names.new_key(i)] = {1: axis}
        dyn[io_names.new_value(i)] = {1: axis}
    _export(
        FrameStepGraph(model, layout),
        (ids, emb, torch.randn(N, hidden, dtype=dtype), fpos, *masks, *past),
        out_dir / "frame_step.onnx",
        f_in,
        f_out,
        dyn,
    )
    graphs["frame_step"] = {"file": "frame_step.onnx", "inputs": f_in, "outputs": f_out}
    return graphs
