"""The demo model's decoder probes (`python -m onsight.exporter.demo.probe --motion / --onset`)
on the shipped checkpoint: they run, and read what the model is known to carry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CKPT = Path(__file__).resolve().parents[1] / "engines" / "demo-checkpoint"

pytestmark = pytest.mark.skipif(
    not (CKPT / "model.safetensors").is_file(), reason="the shipped demo checkpoint is missing"
)


def test_onset_probe_finds_a_begun_move_plainly_by_the_last_layer(capsys):
    from onsight.exporter.demo.probe import main

    assert main([str(CKPT), "--onset", "--streams", "32", "--steps", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["onset_tokens"] > 5
    assert set(out) == {"onset_tokens", "layer 1", "layer 2", "layer 3", "final"}
    for layer in ("layer 1", "layer 2", "layer 3", "final"):
        assert 0.0 <= out[layer]["precision_at_k"] <= 1.0
    assert out["layer 3"]["auc"] > 0.9  # the onset is plain at the last layer's input


def test_motion_probe_reads_sustained_motion(capsys):
    from onsight.exporter.demo.probe import main

    assert main([str(CKPT), "--motion", "--streams", "16", "--steps", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["final"]["moving_recall"] > 0.6 and out["final"]["static_accuracy"] > 0.8


def test_routing_probe_counts_the_mover_cell_kept_on_onset_frames(capsys):
    from onsight.exporter.demo.probe import main

    assert main([str(CKPT), "--routing", "--streams", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 2 and out["onset_frames"] > 5
    assert set(out) == {"onset_frames", "k", "layer 1", "layer 3"}  # the routed layers
    for layer in ("layer 1", "layer 3"):
        assert out[layer]["pooled_kept"] > 0.8  # the whole-frame token, nearly always
        assert 0.3 < out[layer]["mover_kept"] <= 1.0
