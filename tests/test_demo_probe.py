"""The demo model's decoder probes (`python -m onsight.exporter.demo.probe --motion / --onset /
--routing`): their reports' shape on a tiny run, and what they read in the shipped checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onsight.exporter.demo.train import TrainConfig

CKPT = Path(__file__).resolve().parents[1] / "engines" / "demo-checkpoint"

shipped = pytest.mark.skipif(
    not (CKPT / "model.safetensors").is_file(), reason="the shipped demo checkpoint is missing"
)


@shipped
def test_onset_probe_finds_a_begun_move_plainly_by_the_last_layer(capsys):
    from onsight.exporter.demo.probe import main

    assert main([str(CKPT), "--onset", "--streams", "32", "--steps", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["onset_tokens"] > 5
    assert set(out) == {"onset_tokens", "layer 1", "layer 2", "layer 3", "final"}
    for layer in ("layer 1", "layer 2", "layer 3", "final"):
        assert 0.0 <= out[layer]["precision_at_k"] <= 1.0
    assert out["layer 3"]["auc"] > 0.9  # the onset is plain at the last layer's input


@shipped
def test_motion_probe_reads_sustained_motion(capsys):
    from onsight.exporter.demo.probe import main

    assert main([str(CKPT), "--motion", "--streams", "16", "--steps", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["final"]["moving_recall"] > 0.6 and out["final"]["static_accuracy"] > 0.8


@shipped
def test_routing_probe_counts_the_mover_cell_kept_on_onset_frames(capsys):
    from onsight.exporter.demo.probe import main

    assert main([str(CKPT), "--routing", "--streams", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 2 and out["onset_frames"] > 5
    assert set(out) == {"onset_frames", "k", "layer 1", "layer 3"}  # the routed layers
    for layer in ("layer 1", "layer 3"):
        assert out[layer]["pooled_kept"] > 0.8  # the whole-frame token, nearly always
        assert 0.3 < out[layer]["mover_kept"] <= 1.0


def test_motion_probe_reports_every_layer(tmp_path):
    """probe --motion: per decoder layer input and at the end, recall on moving tokens,
    accuracy on static ones, and recall at a move's onset, all rates."""
    from onsight.exporter.demo.probe import probe_motion
    from onsight.exporter.demo.train import train

    torch.set_num_threads(1)
    cfg = TrainConfig(seed=3, steps=1, batch_size=2, num_frames=6, warmup=1, gate="straight")
    native = train(tmp_path / "a", cfg, "cpu", resume=False, minutes=None)
    got = probe_motion(str(native), streams=8, steps=5)
    assert set(got) == {"onset_tokens", "layer 1", "layer 2", "layer 3", "final"}
    for name in ("layer 1", "layer 2", "layer 3", "final"):
        assert set(got[name]) == {"moving_recall", "static_accuracy", "onset_recall"}
        assert all(0.0 <= v <= 1.0 for v in got[name].values())
