"""What the demo model's frame tokens know: linear probes for shape and colour per grid cell.

`python -m onsight.exporter.demo.probe CHECKPOINT` freezes the checkpoint's frame encoder,
trains a linear head on its tokens (the tower's, before the projector) to predict which
colours and shapes each 3x3 cell holds (the training scene targets), and reports the accuracy
on other streams for cells holding exactly one object. It is how the first demo model's
weakness was found: its tokens told colours apart 99% of the time but shapes only 58%.

`--motion` probes the decoder instead: at the input of each decoder layer (and at the end),
a linear head on the vision tokens' states predicts "this token shows a moving object" (the
training change targets), and reports its recall on moving tokens, its accuracy on static
ones that show an object, and its recall at the onset of a move: the acting object's token
on the frame a move is narrated at. Onset is what naming the mover needs, and what the MoD
demo model lacks (engines/demo-checkpoint/TRAINING.md, session 7).

`--onset` asks the question directly: a linear head per layer input fitted on "a move began
here in the last two frames" (the frames a move is narrated on), scored by AUC and by the
precision of its top-scored tokens. It showed that the full-compute twin carries the onset no
earlier or more plainly than the MoD model does (TRAINING.md, session 12). `--routing` says
how often each routed layer keeps the mover's cell on those frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onsight.exporter.demo.data import frame_targets
from onsight.exporter.model import load_native
from onsight.runtime.synthetic import curriculum, generate_stream
from onsight.runtime.synthetic.grammar import COLOURS, SHAPES

TRAIN_SEEDS = range(5000, 5300)  # streams the probe is fitted on
TEST_SEEDS = range(900000, 900040)  # streams it is scored on


def _frames(seeds: range, num_frames: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    world = curriculum(2)
    frames, targets = [], []
    for s in seeds:
        stream = generate_stream(s, num_frames, world)
        frames.append(stream.frames)
        targets += [frame_targets(st, world.width, world.height) for st in stream.states]
    return torch.from_numpy(np.concatenate(frames)), torch.from_numpy(np.stack(targets))


@torch.no_grad()
def _tokens(encoder: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    return torch.cat([encoder.tokens(frames[i : i + 512]) for i in range(0, len(frames), 512)])


def probe(checkpoint: str, steps: int = 1500, seed: int = 0) -> dict[str, float]:
    """Per-cell linear-probe accuracy of shape and colour (cells with exactly one object)."""
    torch.manual_seed(seed)
    model, _ = load_native(checkpoint)
    encoder = model.encoder.eval()
    x_train, y_train = _frames(TRAIN_SEEDS)
    x_test, y_test = _frames(TEST_SEEDS)
    t_train, t_test = _tokens(encoder, x_train), _tokens(encoder, x_test)
    if model.cfg.vision.pooled_last:  # the targets list the pooled token first
        t_train, t_test = t_train.roll(1, dims=1), t_test.roll(1, dims=1)
    head = nn.Linear(t_train.shape[-1], y_train.shape[-1])
    opt = torch.optim.AdamW(head.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(t_train), (256,))
        loss = F.binary_cross_entropy_with_logits(head(t_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = head(t_test)
    result = {}
    c, s = len(COLOURS), len(SHAPES)
    for name, lo, hi in (("colour", 0, c), ("shape", c, c + s)):
        truth = y_test[..., lo:hi]
        single = truth.sum(-1) == 1
        single[:, 0] = False  # the pooled token covers the whole frame, not one cell
        right = out[..., lo:hi].argmax(-1) == truth.argmax(-1)
        result[f"{name}_accuracy"] = float(right[single].float().mean())
    result["cells"] = int(single.sum())
    return result


@torch.no_grad()
def _motion_states(model, tokenizer: Path, streams: int, seed: int) -> dict[str, torch.Tensor]:
    """Vision-token states per layer input (and "final"), with moving / occupied / onset
    labels, over training-world streams (8 per batch, 24 frames)."""
    from onsight.exporter.demo.objective import batched_hidden, in_token_order, rms_normalise
    from onsight.exporter.demo.train import make_source, to_tensors
    from onsight.exporter.demo.train_config import TrainConfig
    from onsight.runtime.synthetic.grammar import EVENT_KINDS, EventKind

    model = model.eval()
    layers = len(model.decoder.layers)
    src = make_source(str(tokenizer), TrainConfig(seed=seed, batch_size=8), 10)
    out: dict[str, list[torch.Tensor]] = {}
    move = EVENT_KINDS.index(EventKind.MOVE)
    for step in range(max(1, streams // 8)):
        b = in_token_order(to_tensors(src.batch(step, 2), "cpu"), model.cfg.vision.pooled_last)
        taps: dict[int, torch.Tensor | None] = {i: None for i in range(1, layers)}
        final = batched_hidden(model, b["ids"], b["frames"], b["frame_pos"], taps=taps)
        fp = b["frame_pos"].flatten(1)
        for name, h in [*((f"layer {i}", taps[i]) for i in range(1, layers)), ("final", final)]:
            xv = rms_normalise(h.gather(1, fp[..., None].expand(-1, -1, h.shape[-1])))
            out.setdefault(name, []).append(xv.reshape(-1, h.shape[-1]))
        out.setdefault("moving", []).append(b["change"][..., -1].reshape(-1) > 0)
        out.setdefault("occupied", []).append(
            b["aux"][..., : len(COLOURS)].amax(-1).reshape(-1) > 0
        )
        onset = (b["change"][..., move] > 0) & (b["actor"] > 0)
        out.setdefault("onset", []).append(onset.reshape(-1))
        out.setdefault("begun", []).append(b["onset"].reshape(-1) > 0)  # data.onset_targets
    return {k: torch.cat(v) for k, v in out.items()}


def probe_motion(checkpoint: str, streams: int = 64, steps: int = 600) -> dict[str, object]:
    """Per decoder layer input: recall on moving tokens, accuracy on static occupied ones, and
    recall on onset tokens (the mover's token on its move's event frame)."""
    torch.manual_seed(0)
    model, tok = load_native(checkpoint)
    data = _motion_states(model, tok, streams, seed=555)
    y, occ, onset = data.pop("moving"), data.pop("occupied"), data.pop("onset")
    data.pop("begun")
    fit = torch.arange(len(y)) < int(0.7 * len(y))
    test = ~fit
    result: dict[str, object] = {"onset_tokens": int((onset & test).sum())}
    for name, x in data.items():
        head = nn.Linear(x.shape[1], 1)
        opt = torch.optim.Adam(head.parameters(), 1e-2)
        for _ in range(steps):
            logits = head(x[fit]).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logits, y[fit].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            said = head(x[test]).squeeze(-1) > 0
        yt, ot, on = y[test], occ[test], onset[test]
        result[name] = {
            "moving_recall": float((said & yt & ot).sum() / (yt & ot).sum().clamp(min=1)),
            "static_accuracy": float((~said & ~yt & ot).sum() / (~yt & ot).sum().clamp(min=1)),
            "onset_recall": float((said & on).sum() / on.sum().clamp(min=1)),
        }
    return result


def probe_onset(checkpoint: str, streams: int = 96, steps: int = 600) -> dict[str, object]:
    """Per decoder layer input: how plainly the grid tokens say "a move began here in the last
    two frames" (data.onset_targets, the frames a move is narrated on): a linear probe fitted
    on 70% of the tokens, scored on the rest by AUC and by precision at the number of
    positives (the share of the top-scored tokens that are onset tokens)."""
    torch.manual_seed(0)
    model, tok = load_native(checkpoint)
    data = _motion_states(model, tok, streams, seed=777)
    y = data.pop("begun")
    for label in ("moving", "occupied", "onset"):
        data.pop(label)
    grid = torch.arange(len(y)) % model.cfg.tokens_per_frame != (
        model.cfg.tokens_per_frame - 1 if model.cfg.vision.pooled_last else 0
    )
    y = y[grid]
    fit = torch.arange(len(y)) < int(0.7 * len(y))
    result: dict[str, object] = {"onset_tokens": int(y[~fit].sum())}
    for name, x in data.items():
        x = x[grid]
        head = nn.Linear(x.shape[1], 1)
        opt = torch.optim.Adam(head.parameters(), 1e-2)
        weight = torch.tensor(10.0)  # about 1 token in 100 is an onset
        for _ in range(steps):
            logits = head(x[fit]).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logits, y[fit].float(), pos_weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = head(x[~fit]).squeeze(-1)
        yt = y[~fit]
        pos, neg = score[yt], score[~yt]
        top = score.topk(int(yt.sum())).indices
        result[name] = {
            "auc": float((pos[:, None] > neg[None, :]).float().mean()),
            "precision_at_k": float(yt[top].float().mean()),
        }
    return result


def routing_at_onsets(checkpoint: str, streams: int = 96) -> dict[str, object]:
    """Per routed layer: on the frames of a just-begun move (data.onset_targets), how often its
    LayerExpert keeps the mover's cell, and the pooled token, among its top k."""
    from onsight.exporter.demo.objective import batched_hidden, in_token_order
    from onsight.exporter.demo.train import make_source, to_tensors
    from onsight.exporter.demo.train_config import TrainConfig

    model, tok = load_native(checkpoint)
    model = model.eval()
    dec = model.decoder
    n = model.cfg.tokens_per_frame
    pooled = n - 1 if model.cfg.vision.pooled_last else 0
    src = make_source(str(tok), TrainConfig(seed=777, batch_size=8), n)
    frames, mover, kept_pooled = 0, {}, {}
    with torch.no_grad():
        for step in range(max(1, streams // 8)):
            b = in_token_order(to_tensors(src.batch(step, 2), "cpu"), model.cfg.vision.pooled_last)
            scores: list[torch.Tensor] = []
            batched_hidden(model, b["ids"], b["frames"], b["frame_pos"], router_scores=scores)
            onset = b["onset"].clone()
            onset[..., pooled] = 0
            begun = onset.amax(-1) > 0  # (B, F)
            frames += int(begun.sum())
            for layer, s in zip(dec.routed, scores):
                kept = torch.zeros_like(onset).scatter(-1, s.topk(dec.k, -1).indices, 1.0)
                name = f"layer {layer}"
                hit = (kept * onset).amax(-1) > 0
                mover[name] = mover.get(name, 0) + int(hit[begun].sum())
                kept_pooled[name] = kept_pooled.get(name, 0) + int(kept[..., pooled][begun].sum())
    return {
        "onset_frames": frames,
        "k": dec.k,
        **{
            name: {
                "mover_kept": mover[name] / max(1, frames),
                "pooled_kept": kept_pooled[name] / max(1, frames),
            }
            for name in mover
        },
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m onsight.exporter.demo.probe", description=__doc__)
    p.add_argument("checkpoint", help="native checkpoint directory (e.g. engines/demo-checkpoint)")
    p.add_argument("--steps", type=int, default=1500, help="probe training steps")
    p.add_argument(
        "--motion",
        action="store_true",
        help="probe the decoder's vision-token states for motion and its onset, per layer",
    )
    p.add_argument(
        "--onset",
        action="store_true",
        help="probe the decoder's vision-token states for a move begun in the last two frames "
        "(AUC, precision at k), per layer",
    )
    p.add_argument(
        "--streams", type=int, help="--motion / --onset: training-world streams (64 / 96)"
    )
    p.add_argument(
        "--routing",
        action="store_true",
        help="how often each routed layer keeps a just-begun move's mover cell (and the pooled "
        "token) on its frames",
    )
    a = p.parse_args(argv)
    if a.routing:
        print(json.dumps(routing_at_onsets(a.checkpoint, a.streams or 96), indent=2))
        return 0
    if a.onset:
        out = probe_onset(a.checkpoint, a.streams or 96, min(a.steps, 600))
        print(json.dumps(out, indent=2))
        return 0
    if a.motion:
        print(json.dumps(probe_motion(a.checkpoint, a.streams or 64, min(a.steps, 600)), indent=2))
        return 0
    print(json.dumps(probe(a.checkpoint, a.steps), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
