"""What the demo model's frame tokens know: linear probes for shape and colour per grid cell.

`python -m onsight.exporter.demo.probe CHECKPOINT` freezes the checkpoint's frame encoder,
trains a linear head on its tokens (the tower's, before the projector) to predict which
colours and shapes each 3x3 cell holds (the training scene targets), and reports the accuracy
on other streams for cells holding exactly one object. It is how the first demo model's
weakness was found: its tokens told colours apart 99% of the time but shapes only 58%.
"""

from __future__ import annotations

import argparse
import json
import sys

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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m onsight.exporter.demo.probe", description=__doc__)
    p.add_argument("checkpoint", help="native checkpoint directory (e.g. engines/demo-checkpoint)")
    p.add_argument("--steps", type=int, default=1500, help="probe training steps")
    a = p.parse_args(argv)
    print(json.dumps(probe(a.checkpoint, a.steps), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
