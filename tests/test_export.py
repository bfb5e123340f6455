"""`onsight export` / `onsight info`: bundles, parity, atomicity, TensorRT compatibility, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builders import llama_config

from onsight.exporter.bundle_writer import ExportOptions, export_bundle
from onsight.exporter.config import ModConfig, ModelConfig, PreprocessConfig, VisionConfig
from onsight.exporter.model import StreamingModel, save_native
from onsight.exporter.trt_compat import check_graph
from onsight.runtime.bundle import load_bundle
from onsight.runtime.errors import ExportError
from onsight.runtime.info import describe

SCHEMA = Path(__file__).resolve().parents[1] / "runtime" / "bundle.schema.json"


@pytest.fixture(scope="module")
def native_ckpt(tmp_path_factory, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    cfg = ModelConfig(
        decoder=llama_config(vocab),
        vision=VisionConfig(kind="tiny", hidden_size=32, tiny_channels=(8, 16)),
        preprocess=PreprocessConfig(image_size=32),
        mod=ModConfig(keep_ratio=0.2, layers=(1, 3), router="learned"),
        has_layer_experts=True,
    )
    torch.manual_seed(0)
    model = StreamingModel(cfg).eval()
    return save_native(model, tok, tmp_path_factory.mktemp("ckpt") / "native")


@pytest.fixture(scope="module")
def native_model(native_ckpt):
    from onsight.exporter.model import load_native

    return load_native(native_ckpt)


def _validate_schema(manifest: dict) -> None:
    import jsonschema

    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize("r", [1.0, 0.2])
def test_export_native_bundle_is_valid_and_parity_checked(native_model, tmp_path, r):
    model, tok = native_model
    out, manifest = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(keep_ratio=r, kv_capacity=512)
    )
    for g in ("vision", "text_step", "frame_step"):
        m = onnx.load(str(out / f"{g}.onnx"))
        onnx.checker.check_model(m, full_check=True)
        onnx.shape_inference.infer_shapes(m, strict_mode=True)
        assert check_graph(out / f"{g}.onnx") == [], "graph must stay TensorRT-parsable"
    p = manifest["parity"]
    assert p["passed"] and p["max_abs_logit_error"] < 1e-4 and p["same_tokens"] and p["steps"] > 8
    _validate_schema(json.loads((out / "bundle.json").read_text()))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir, not mkdtemp's 0700
    b = load_bundle(out)
    assert b.layout.k == (2 if r < 1 else 10)
    assert b.layout.routed == ((1, 3) if r < 1 else ())
    if r < 1:
        assert b.layout.capacity_mod < b.layout.capacity_dense


def test_logits_output_is_last_position_only(native_model, tmp_path):
    model, tok = native_model
    out, _ = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(keep_ratio=0.2, kv_capacity=512)
    )
    for g in ("text_step", "frame_step"):
        m = onnx.load(str(out / f"{g}.onnx"))
        logits = next(o for o in m.graph.output if o.name == "logits")
        dims = logits.type.tensor_type.shape.dim
        assert len(dims) == 1 and dims[0].dim_value == model.cfg.decoder["vocab_size"]


def test_frame_step_static_topk(native_model, tmp_path):
    model, tok = native_model
    out, _ = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(keep_ratio=0.2, kv_capacity=512)
    )
    m = onnx.load(str(out / "frame_step.onnx"))
    assert sum(n.op_type == "TopK" for n in m.graph.node) == 2  # one per routed layer


def test_fp16_export_passes_its_tolerance(native_model, tmp_path):
    model, tok = native_model
    _, manifest = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(keep_ratio=0.2, kv_capacity=512, dtype="fp16")
    )
    assert manifest["parity"]["passed"] and manifest["kv"]["dtype"] == "float16"


def test_interrupted_export_leaves_no_bundle(native_model, tmp_path, monkeypatch):
    import onsight.exporter.bundle_writer as bw

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bw, "run_parity", boom)
    model, tok = native_model
    with pytest.raises(KeyboardInterrupt):
        export_bundle(model, tok, tmp_path / "b", ExportOptions(kv_capacity=512))
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_writes_nothing(native_model, tmp_path, monkeypatch):
    import onsight.exporter.bundle_writer as bw

    monkeypatch.setattr(
        bw,
        "run_parity",
        lambda *a, **k: {
            "passed": False,
            "max_abs_logit_error": 1.0,
            "tolerance": 1e-4,
            "same_decisions": False,
            "same_tokens": False,
        },
    )
    model, tok = native_model
    with pytest.raises(ExportError, match="parity failed"):
        export_bundle(model, tok, tmp_path / "b", ExportOptions(kv_capacity=512))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "opts,match",
    [
        (ExportOptions(keep_ratio=1.5), "must be in"),
        (ExportOptions(keep_ratio=-0.1), "must be in"),  # 0 is valid: early exit
        (ExportOptions(tokens_per_frame="1+9x9"), "do not fit the tower"),
        (ExportOptions(tokens_per_frame="banana"), "tokens-per-frame"),
        (ExportOptions(kv_capacity=10), "too small"),
        (ExportOptions(kv_capacity=10**6), "trained positions"),
        (ExportOptions(mod_layers="1,99"), "do not exist"),
        (ExportOptions(mod_layers="from:9"), "from:E"),
    ],
)
def test_bad_export_options_give_clear_errors(native_model, tmp_path, opts, match):
    model, tok = native_model
    with pytest.raises(ExportError, match=match):
        export_bundle(model, tok, tmp_path / "b", opts)
    assert not (tmp_path / "b").exists()


def test_existing_output_directory_is_refused(native_model, tmp_path):
    model, tok = native_model
    (tmp_path / "b").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(model, tok, tmp_path / "b", ExportOptions(kv_capacity=512))


def test_tokens_per_frame_option_changes_grid(native_model, tmp_path):
    model, tok = native_model
    out, manifest = export_bundle(
        model,
        tok,
        tmp_path / "b",
        ExportOptions(tokens_per_frame="1+2x2", keep_ratio=0.5, kv_capacity=512),
    )
    assert manifest["vision"]["tokens_per_frame"] == 5 and manifest["mod"]["k"] == 3
    assert manifest["parity"]["passed"]


def _onsight(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "onsight.runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_cli_export_and_info(native_ckpt, tmp_path):
    out = tmp_path / "engines" / "tiny"
    r = _onsight(
        "export", str(native_ckpt), "--out", str(out), "--keep-ratio", "0.2", "--kv-capacity", "512"
    )
    assert r.returncode == 0, r.stderr
    assert "[1/4]" in r.stderr and "parity" in r.stderr
    assert "keep ratio 0.2 (k=2)" in r.stdout
    r = _onsight("info", str(out))
    assert r.returncode == 0 and "frames that fit" in r.stdout and "parity    passed" in r.stdout
    r = _onsight("export", str(native_ckpt), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


def test_info_reports_mod_kv_savings(native_model, tmp_path):
    model, tok = native_model
    out, _ = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(keep_ratio=0.2, kv_capacity=512)
    )
    text = describe(out)
    assert "MoD" in text and "0.60x" in text  # (2 dense * 10 + 2 routed * 2) / (4 * 10)
    b = load_bundle(out)
    assert np.isclose(
        b.layout.bytes_per_frame(True) / b.layout.bytes_per_frame(False), (2 * 10 + 2 * 2) / 40
    )


def test_int8_build_records_agreement_and_the_runtime_uses_it(tiny_bundle, tmp_path):
    import shutil

    from onsight.runtime.cli import main
    from onsight.runtime.ort_backend import OrtSessions

    path, _, _ = tiny_bundle
    b = tmp_path / "b"
    shutil.copytree(path, b)
    assert main(["build", str(b), "--backend", "onnxruntime", "--quantize", "int8"]) == 0
    bundle = load_bundle(b)  # checksums of the added graphs are in the manifest
    m = bundle.manifest
    assert set(m["graph_overrides"]) == {"vision", "text_step", "frame_step"}
    assert m["int8"]["top1_agreement"] >= 0.8 and m["int8"]["steps"] > 50
    assert m["int8"]["bytes_int8"] < m["int8"]["bytes_fp32"]
    quantized = onnx.load(str(b / m["graph_overrides"]["frame_step"]))
    assert any(
        n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in quantized.graph.node
    )
    assert OrtSessions(bundle, "cpu").name.endswith(":int8")
    assert not OrtSessions(bundle, "cpu", use_overrides=False).name.endswith(":int8")


def test_straight_through_gate_exports_with_parity(native_model, tmp_path):
    """A model trained with --gate straight exports graphs that give kept tokens the whole
    update (parity with the PyTorch reference), and bundle.json says which gate it has."""
    model, tok = native_model
    straight = model.with_config(
        model.cfg.replace(mod=dataclasses.replace(model.cfg.mod, gate="straight"))
    )
    out, manifest = export_bundle(straight, tok, tmp_path / "b", ExportOptions(kv_capacity=256))
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_error"] < 1e-4
    written = json.loads((out / "bundle.json").read_text())
    assert written["mod"]["gate"] == "straight"
    _validate_schema(written)


def test_routing_the_even_layers_exports_with_parity(native_model, tmp_path):
    """--mod-layers interleaved-even routes layers 0, 2: the first layer routes the frame
    tokens as they come from the projector, and the graphs still match the reference."""
    model, tok = native_model
    opts = ExportOptions(kv_capacity=256, mod_layers="interleaved-even", router="uniform")
    out, manifest = export_bundle(model, tok, tmp_path / "b", opts)
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_error"] < 1e-4
    written = json.loads((out / "bundle.json").read_text())
    assert written["mod"]["routed_layers"] == [0, 2]
    _validate_schema(written)


def test_pooled_last_exports_with_parity(native_model, tmp_path):
    """VisionConfig.pooled_last: the vision graph emits the pooled token after the grid cells
    (the frame's last token, kept by keep_last), parity holds, and bundle.json says so."""
    import onnxruntime as ort

    model, tok = native_model
    last = StreamingModel(
        model.cfg.replace(
            vision=dataclasses.replace(model.cfg.vision, pooled_last=True),
            mod=dataclasses.replace(model.cfg.mod, keep_last=True),
        )
    )
    last.load_state_dict(model.state_dict())
    last.eval()
    out, manifest = export_bundle(last, tok, tmp_path / "b", ExportOptions(kv_capacity=256))
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_error"] < 1e-4
    written = json.loads((out / "bundle.json").read_text())
    assert written["vision"]["pooled_last"] is True and written["mod"]["keep_last"] is True
    _validate_schema(written)
    size = model.cfg.preprocess.image_size
    frames = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: frames})[0]
    with torch.no_grad():
        first = model.encoder(torch.from_numpy(frames)).numpy()
    np.testing.assert_allclose(got, np.roll(first, -1, axis=1), atol=1e-5)


def test_keep_last_always_routes_the_decision_token(native_model, tmp_path):
    """keep_last: every routed layer keeps each frame's last vision token (where the speak
    decision is read) as one of its k, whichever router chooses the rest; the graphs do the
    same (parity) and bundle.json says so."""
    from onsight.exporter.reference import TorchStepper

    model, tok = native_model
    mod = dataclasses.replace(model.cfg.mod, keep_last=True)
    keep = model.with_config(model.cfg.replace(mod=mod))
    N, k = keep.cfg.tokens_per_frame, keep.cfg.k
    hidden = keep.decoder.embed.weight.shape[1]
    kept_seen = []

    class Spy(TorchStepper):
        def run_frame(self, *args):
            out = super().run_frame(*args)
            kept_seen.append(out[3])
            return out

    for router in ("learned", "random", "uniform"):
        m = keep.with_config(keep.cfg.replace(mod=dataclasses.replace(mod, router=router)))
        stepper = Spy(m, capacity=256)
        rng = np.random.default_rng(1)
        for f in range(6):
            stepper.frame([], rng.standard_normal((N, hidden)).astype(np.float32) * 3, f)
    assert len(kept_seen) == 18
    for per_layer in kept_seen:
        assert len(per_layer) == 2
        for idx in per_layer:
            assert len(idx) == k and N - 1 in idx.tolist()
    out, manifest = export_bundle(keep, tok, tmp_path / "b", ExportOptions(kv_capacity=256))
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_error"] < 1e-4
    assert check_graph(out / "frame_step.onnx") == [], "graph must stay TensorRT-parsable"
    written = json.loads((out / "bundle.json").read_text())
    assert written["mod"]["keep_last"] is True and written["mod"]["k"] == k
    _validate_schema(written)


def test_cli_export_defaults_the_cache_to_the_trained_positions(native_ckpt, tmp_path, capsys):
    """No --kv-capacity: 4096 tokens, or the model's trained positions if fewer (2048 here),
    instead of refusing its own default; nonsense numbers are refused, saying what to give."""
    from onsight.runtime.cli import main as cli_main

    assert cli_main(["export", str(native_ckpt), "--out", str(tmp_path / "b")]) == 0
    assert load_bundle(tmp_path / "b").manifest["kv"]["capacity_dense"] == 2048
    for flag, said in (
        ("--fps=-2", "sampling rate must be positive"),
        ("--keep-text-tokens=-1", "give 0 or more"),
    ):
        rc = cli_main(["export", str(native_ckpt), "--out", str(tmp_path / "c"), flag])
        assert rc == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
