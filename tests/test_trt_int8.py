"""TensorRT int8 via calibrated Q/DQ graphs: written, checked and measured on CPU.

The plans themselves need TensorRT and a GPU (tests/test_device_stepper.py's gpu test and the
README say where they have run); everything before the plan is tested here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from onsight.exporter.trt_compat import check_graph
from onsight.runtime.bundle import GRAPHS, load_bundle
from onsight.runtime.cli import main
from onsight.runtime.errors import ExportError
from onsight.runtime.trt_int8 import build_qdq_graphs


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path, monkeypatch):
    # the tiny random model's logits are near ties, so int8 flips more top-1s than a trained
    # model's (the demo model's agreement is in the README)
    monkeypatch.setattr("onsight.runtime.trt_int8.MIN_AGREEMENT", 0.8)
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], dst)
    return dst


def test_qdq_graphs_are_symmetric_tensorrt_ready_and_agree_with_fp32(bundle_copy, capsys):
    assert main(["build", str(bundle_copy), "--precision", "int8", "--calibrate-only"]) == 0
    bundle = load_bundle(bundle_copy)  # the new graphs' checksums are in bundle.json
    qdq = bundle.manifest["qdq"]
    assert qdq["top1_agreement"] >= 0.8 and qdq["steps"] > 50
    assert qdq["calibration"] == {"source": "synthetic world (seed 7)", "frames": 32}
    for g in GRAPHS:
        path = bundle_copy / qdq["graphs"][g]
        assert not check_graph(path), check_graph(path)  # incl. zero points of 0
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None:
                w = inits[n.input[0]]  # an int8 weight: TensorRT wants [-127, 127]
                assert w.dtype == np.int8 and w.min() >= -127
    summary = json.loads(capsys.readouterr().out)
    assert summary["graphs"]["frame_step"] == "frame_step.qdq.onnx"


def test_a_calibration_that_breaks_the_model_writes_nothing(bundle_copy):
    before = (bundle_copy / "bundle.json").read_text()
    with pytest.raises(ExportError, match="agree with fp32 on only"):
        build_qdq_graphs(bundle_copy, frames=8, min_agreement=1.01)
    assert (bundle_copy / "bundle.json").read_text() == before
    assert not list(bundle_copy.glob("*.qdq.onnx*")) and not list(bundle_copy.glob(".qdq-*"))


def test_calibration_on_a_real_video(bundle_copy, shared_videos):
    video = next(iter(sorted(shared_videos.glob("*.mp4"))))
    result = build_qdq_graphs(bundle_copy, video, frames=12)
    assert result["calibration"]["source"] == str(video)
    assert result["top1_agreement"] >= 0.8


def test_int8_calibration_options_give_clear_errors(bundle_copy, tmp_path, capsys):
    assert main(["build", str(bundle_copy), "--calibrate-only"]) == 2
    assert "--precision int8" in capsys.readouterr().err
    missing = tmp_path / "nope.mp4"
    args = ["build", str(bundle_copy), "--precision", "int8", "--calibrate-only"]
    assert main([*args, "--calibration-video", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
