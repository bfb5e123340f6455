"""TensorRT int8 via calibrated Q/DQ graphs: written, checked and measured on CPU.

The plans themselves need TensorRT and a GPU (tests/test_device_stepper.py's gpu test and the
README say where they have run); everything before the plan is tested here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from onsight.exporter.trt_compat import check_graph
from onsight.runtime.bundle import GRAPHS, load_bundle
from onsight.runtime.cli import main
from onsight.runtime.errors import ExportError, OnsightError
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
        # Q/DQ only where a quantized op reads (other readers of that same tensor share it);
        # the quantized ops' outputs (residual sums, gates, the logits) stay float
        for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
            readers = {n.op_type for n in model.graph.node if dq.output[0] in n.input}
            assert readers & {"MatMul", "Gemm", "Conv"}, (g, dq.name, readers)
        assert not {o.name for o in model.graph.output} & {
            o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output
        }
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None:
                w = inits[n.input[0]]  # an int8 weight: TensorRT wants [-127, 127]
                assert w.dtype == np.int8 and w.min() >= -127
    summary = json.loads(capsys.readouterr().out)
    assert summary["graphs"]["frame_step"] == "frame_step.qdq.onnx"
    from onsight.runtime.info import describe

    assert "TensorRT int8 graphs calibrated on 32 frames" in describe(bundle_copy)


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


def test_int8_plans_are_built_strongly_typed_from_the_qdq_graphs(bundle_copy, monkeypatch):
    """The build logic against a stand-in for TensorRT's Python API (no GPU here): each graph
    is parsed from its Q/DQ file into a strongly typed network, without precision flags."""
    import sys

    from fake_gpu import fake_tensorrt

    from onsight.runtime import trt_build

    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_build, "gpu_info", lambda: trt_build.GpuInfo("Orin", "8.7"))
    meta = trt_build.build_tensorrt(bundle_copy, precision="int8")
    assert trt.networks == [1 << 1] * 3  # STRONGLY_TYPED, no precision flags
    assert trt.parsed == [f"{g}.qdq.onnx" for g in GRAPHS]
    assert all(not config.flags for config in trt.configs)
    assert meta["precision"] == "int8" and (bundle_copy / "trt" / "frame_step.int8.plan").is_file()
    assert load_bundle(bundle_copy).manifest["tensorrt"]["gpu"] == "Orin"


def test_eval_scores_the_qdq_graphs_of_the_demo_bundle(tmp_path):
    from onsight.exporter.demo.evaluate import evaluate

    demo = Path(__file__).resolve().parents[1] / "engines" / "demo"
    if not (demo / "bundle.json").is_file():
        pytest.skip("engines/demo is missing")
    b = tmp_path / "demo"
    shutil.copytree(demo, b)
    with pytest.raises(OnsightError, match="--calibrate-only"):
        evaluate(b, streams=1, frames=10, qdq=True)
    build_qdq_graphs(b, frames=8)
    report = evaluate(b, streams=2, frames=30, qdq=True)
    assert report["narration"]["kind"]["f1"] > 0.5  # the int8 graphs still narrate
