"""bundle.json as the contract: the schema is checked on load, fields agree with each other,
every file is checksummed, and `onsight build` rewrites the manifest atomically and validly.

Bundles are copies of the shipped engines/demo (never modified) edited in tmp_path.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from onsight.runtime import bundle as bundle_mod
from onsight.runtime.bundle import (
    GRAPHS,
    SCHEMA_KEYWORDS,
    bundle_schema,
    load_bundle,
    manifest_problems,
    write_manifest,
)
from onsight.runtime.errors import BundleError, ExportError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "engines" / "demo"
SCHEMA = json.loads((REPO / "runtime" / "bundle.schema.json").read_text())
REAL_MOVE = shutil.move

pytestmark = pytest.mark.skipif(
    not (DEMO / "bundle.json").is_file(), reason="the shipped demo bundle is missing"
)


@pytest.fixture()
def demo(tmp_path) -> Path:
    return Path(shutil.copytree(DEMO, tmp_path / "demo"))


def manifest(b: Path) -> dict:
    return json.loads((b / "bundle.json").read_text())


def edit(b: Path, change: Callable[[dict], object]) -> dict:
    """Rewrite bundle.json by hand (as a foreign or hand-edited bundle would have it)."""
    m = manifest(b)
    change(m)
    (b / "bundle.json").write_text(json.dumps(m))
    return m


def jsonschema_accepts(m: dict) -> bool:
    return not list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(m))


# ---- the schema, and the runtime's own check of it ----


def test_shipped_demo_bundle_conforms_to_the_schema_by_jsonschema_and_by_the_runtime():
    m = manifest(DEMO)
    jsonschema.validate(m, SCHEMA)
    assert manifest_problems(m) == []


def test_the_runtime_validator_implements_every_keyword_the_schema_uses():
    used: set[str] = set()

    def walk(schema: dict) -> None:
        used.update(schema)
        for key in ("properties",):
            for sub in schema.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                walk(schema[key])

    walk(bundle_schema())
    assert used <= SCHEMA_KEYWORDS, used - SCHEMA_KEYWORDS


BROKEN = {
    "files is a list": lambda m: m.update(files=[]),
    "a file without its sha256": lambda m: m["files"]["vision.onnx"].pop("sha256"),
    "an upper-case sha256": lambda m: m["files"]["vision.onnx"].update(
        sha256=m["files"]["vision.onnx"]["sha256"].upper()
    ),
    "a graph given as a string": lambda m: m["graphs"].update(vision="vision.onnx"),
    "no template": lambda m: m.pop("template"),
    "template.bos null": lambda m: m["template"].update(bos=None),
    "no generation.threshold": lambda m: m["generation"].pop("threshold"),
    "generation.fps 0": lambda m: m["generation"].update(fps=0),
    "image_size a string": lambda m: m["preprocess"].update(image_size="big"),
    "an unknown interpolation": lambda m: m["preprocess"].update(interpolation="lanczos9"),
    "keep_ratio 1.5": lambda m: m["mod"].update(keep_ratio=1.5),
    "format_version true": lambda m: m.update(format_version=True),
    "tensorrt without plans": lambda m: m.update(tensorrt={"precision": "fp16"}),
    "graph_overrides a list": lambda m: m.update(graph_overrides=["vision.int8.onnx"]),
    "qdq without calibration": lambda m: m.update(
        qdq={"graphs": {g: f"{g}.qdq.onnx" for g in GRAPHS}, "top1_agreement": 1.0, "steps": 1}
    ),
    "no model.parameters": lambda m: m["model"].pop("parameters"),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_runtime_validator_and_jsonschema_both_refuse_a_broken_manifest(what):
    m = manifest(DEMO)
    BROKEN[what](m)
    assert not jsonschema_accepts(m)
    assert manifest_problems(m)


# ---- format versions, unknown and optional fields ----


def test_a_bundle_from_a_newer_format_version_asks_to_upgrade_onsight(demo):
    edit(demo, lambda m: m.update(format_version=2))
    with pytest.raises(BundleError, match="newer onsight.*upgrade onsight"):
        load_bundle(demo)


@pytest.mark.parametrize("version", [0, "1", True, None])
def test_an_older_or_malformed_format_version_asks_to_re_export(demo, version):
    edit(demo, lambda m: m.update(format_version=version))
    with pytest.raises(BundleError, match="is not supported.*re-export"):
        load_bundle(demo)


def test_unknown_fields_are_ignored_and_the_bundle_runs(demo):
    from onsight.runtime.assistant import Assistant, AssistantConfig

    def add(m):
        m["from_the_future"] = {"x": 1}
        m["kv"]["later_field"] = [1, 2]
        m["io"]["later_name"] = "later_{layer}"
        m["graphs"]["frame_step"]["later"] = True

    edit(demo, add)
    with Assistant(demo, AssistantConfig(backend="onnxruntime:cpu", threads=1)) as a:
        a.push(np.zeros((48, 64, 3), np.uint8), 0.0)
        assert a.bundle.manifest["from_the_future"] == {"x": 1}


def test_missing_optional_fields_take_their_documented_defaults(demo):
    from onsight.runtime.backends import _tensorrt_ready

    def drop(m):
        for key in ("created", "tensorrt", "tokenizer", "int8", "qdq", "graph_overrides"):
            m.pop(key, None)
        m["vision"].pop("pooled_last")
        m["mod"].pop("gate")
        m["mod"].pop("keep_last")

    edit(demo, drop)
    b = load_bundle(demo)
    assert b.tokenizer_path == demo / "tokenizer.json"
    assert not _tensorrt_ready(b)


# ---- malformed and contradictory manifests: a BundleError naming the field ----


@pytest.mark.parametrize(
    "what, field",
    [
        ("files is a list", "files: expected object"),
        ("a file without its sha256", r"files\.vision\.onnx\.sha256: missing"),
        ("a graph given as a string", r"graphs\.vision: expected object"),
        ("no template", "template: missing"),
        ("template.bos null", r"template\.bos: expected string, got null"),
        ("no generation.threshold", r"generation\.threshold: missing"),
        ("an unknown interpolation", r"preprocess\.interpolation: must be one of"),
        ("tensorrt without plans", r"tensorrt\.gpu: missing.*onsight build .*--backend tensorrt"),
        ("graph_overrides a list", "graph_overrides: expected object.*--quantize int8"),
    ],
)
def test_a_malformed_manifest_is_a_bundle_error_naming_the_field(demo, what, field):
    edit(demo, BROKEN[what])
    with pytest.raises(BundleError, match=field):
        load_bundle(demo)


def test_onsight_info_on_a_malformed_bundle_exits_2_without_a_traceback(demo, capsys):
    from onsight.runtime.cli import main

    edit(demo, lambda m: m["model"].pop("parameters"))  # `onsight info` prints it
    assert main(["info", str(demo)]) == 2
    err = capsys.readouterr().err
    assert "model.parameters: missing" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m["kv"]["layers"][0].update(capacity=10), "kv.layers: does not match"),
        (lambda m: m["kv"].update(routed_layers=[1, 7]), r"kv\.routed_layers: \[1, 7\]"),
        (lambda m: m["kv"].update(routed_layers=[1]), r"kv\.routed_layers: \[1\], expected"),
        (lambda m: m["model"].update(rope_inv_freq=[1.0]), "rope_inv_freq: 1 frequencies"),
        (lambda m: m["mod"].update(k=11), r"mod\.k: 11 is more than"),
    ],
)
def test_fields_that_contradict_each_other_are_refused(demo, change, match):
    edit(demo, change)
    with pytest.raises(BundleError, match=match):
        load_bundle(demo)


def test_io_names_the_runtime_does_not_feed_are_refused(demo):
    edit(demo, lambda m: m["io"].update(past_key="cache_k_{layer}"))
    with pytest.raises(BundleError, match=r"io\.past_key: \"cache_k_\{layer\}\", but this onsight"):
        load_bundle(demo)


def test_graph_outputs_in_an_order_the_runtime_does_not_read_are_refused(demo):
    edit(demo, lambda m: m["graphs"]["frame_step"]["outputs"].reverse())
    with pytest.raises(BundleError, match=r"graphs\.frame_step\.outputs"):
        load_bundle(demo)


def test_the_graphs_take_and_give_the_names_the_backends_feed_and_read():
    """One list of names (runtime/graph_io.py) for the exporter, the check and the backends:
    the shipped graphs declare exactly what it lists, and take no input it cannot feed."""
    import onnxruntime as ort

    from onsight.runtime.graph_io import graph_io

    m = manifest(DEMO)
    io = graph_io(m["model"]["num_layers"], m["mod"]["routed_layers"])
    for g in GRAPHS:
        assert m["graphs"][g]["inputs"] == list(io[g].inputs)
        assert m["graphs"][g]["outputs"] == list(io[g].outputs)
        session = ort.InferenceSession(str(DEMO / m["graphs"][g]["file"]))
        assert [o.name for o in session.get_outputs()] == list(io[g].outputs)
        assert {i.name for i in session.get_inputs()} <= set(io[g].inputs)


@pytest.mark.parametrize(
    "field, recorded, match",
    [
        (
            "interval",
            14,
            r"token_ids\.interval = 14 for the interval token ',', but its tokenizer"
            r" \(tokenizer\.json\) gives 13",
        ),
        ("eos", 7, r"token_ids\.eos = 7 for the end-of-turn token '<\|eot_id\|>'.* gives 1;"),
        ("v", None, r"token_ids\.v = null for the vision token '<v>'.* gives 485"),
        ("sink_length", 12, r"token_ids\.sink_length = 12 for the system prompt.* gives 9"),
    ],
)
def test_token_ids_the_tokenizer_disagrees_with_are_refused_before_any_session_loads(
    demo, monkeypatch, field, recorded, match
):
    from onsight.runtime import assistant
    from onsight.runtime.assistant import Assistant

    edit(demo, lambda m: m["token_ids"].update({field: recorded}))
    monkeypatch.setattr(assistant, "make_backend", lambda *a: pytest.fail("sessions loaded"))
    with pytest.raises(BundleError, match=match + ".*re-export the bundle"):
        Assistant(demo)


def test_bundle_template_ids_are_the_ids_the_exporter_recorded(demo):
    from tokenizers import Tokenizer

    from onsight.runtime.template import build_template_ids, bundle_template_ids

    b = load_bundle(demo)
    tok = Tokenizer.from_file(str(b.tokenizer_path))
    ids = bundle_template_ids(tok, b)
    recorded = b.manifest["token_ids"]
    assert (ids.interval_id, ids.eos_id) == (recorded["interval"], recorded["eos"])
    assert len(ids.sink) == recorded["sink_length"]
    assert ids == build_template_ids(tok, b.template)  # what the exporter recorded them from


# ---- checksums ----


def test_a_graph_missing_from_files_is_refused_not_run_unverified(demo):
    edit(demo, lambda m: m["files"].pop("vision.onnx"))
    with pytest.raises(BundleError, match=r"graphs\.vision\.file names vision\.onnx.*no sha256"):
        load_bundle(demo)


def test_file_names_that_reach_outside_the_bundle_are_refused(demo):
    edit(demo, lambda m: m["graphs"]["vision"].update(file="../demo/vision.onnx"))
    with pytest.raises(BundleError, match="reaches outside the bundle"):
        load_bundle(demo)


def test_a_truncated_file_is_refused_even_without_hashing(demo):
    with open(demo / "frame_step.onnx", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BundleError, match="frame_step.onnx has 1000 bytes"):
        load_bundle(demo, verify=False)


def test_the_tokenizer_is_found_by_the_manifest_not_by_its_file_name(demo):
    from onsight.runtime.assistant import Assistant, AssistantConfig

    (demo / "tokenizer.json").rename(demo / "words.json")
    m = manifest(demo)
    m["tokenizer"] = "words.json"
    write_manifest(demo, m)
    assert "tokenizer.json" not in manifest(demo)["files"]
    with Assistant(demo, AssistantConfig(backend="onnxruntime:cpu", threads=1)) as a:
        assert a.bundle.tokenizer_path == demo / "words.json"
    (demo / "words.json").unlink()
    with pytest.raises(BundleError, match="words.json listed in bundle.json is missing"):
        load_bundle(demo)


def test_write_manifest_refuses_a_manifest_the_runtime_would_refuse(demo):
    before = (demo / "bundle.json").read_text()
    m = manifest(demo)
    m["kv"]["capacity_dense"] = "384"
    with pytest.raises(BundleError, match=r"refusing to write .*kv\.capacity_dense"):
        write_manifest(demo, m)
    m = manifest(demo)
    m["graph_overrides"] = {"vision": "vision.int8.onnx"}
    with pytest.raises(BundleError, match="names vision.int8.onnx, which the bundle lacks"):
        write_manifest(demo, m)
    assert (demo / "bundle.json").read_text() == before


def _fake_plans(b: Path, precision: str = "fp16") -> dict:
    (b / "trt").mkdir(exist_ok=True)
    plans = {}
    for g in GRAPHS:
        rel = f"trt/{g}.{precision}.plan"
        (b / rel).write_bytes(f"{g} plan".encode())
        plans[g] = rel
    return {
        "precision": precision,
        "gpu": "Orin",
        "compute_capability": "8.7",
        "tensorrt_version": "10.3.0",
        "plans": plans,
    }


def test_tensorrt_plans_are_checksummed_and_a_corrupt_plan_says_to_rebuild(demo):
    m = manifest(demo)
    m["tensorrt"] = _fake_plans(demo)
    write_manifest(demo, m)
    assert {f"trt/{g}.fp16.plan" for g in GRAPHS} <= set(manifest(demo)["files"])
    jsonschema.validate(manifest(demo), SCHEMA)
    load_bundle(demo)
    (demo / "trt" / "text_step.fp16.plan").write_bytes(b"text_step plaN")  # same size
    with pytest.raises(BundleError, match="text_step.fp16.plan does not match.*--backend tensorrt"):
        load_bundle(demo)
    (demo / "trt" / "text_step.fp16.plan").unlink()
    with pytest.raises(BundleError, match="text_step.fp16.plan .*missing.*--backend tensorrt"):
        load_bundle(demo)


# ---- `onsight build` rewrites bundle.json atomically and validly ----


def _fake_tensorrt(monkeypatch):
    """tests/fake_gpu's stand-in for TensorRT's Python API (no GPU here), each plan unlike
    any earlier build's; set `.fail_on` to a graph whose build fails."""
    import sys

    from fake_gpu import fake_tensorrt

    from onsight.runtime import trt_build

    trt = fake_tensorrt()
    trt.unique_plans = True
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_build, "gpu_info", lambda: trt_build.GpuInfo("Orin", "8.7"))
    return trt


def test_a_tensorrt_build_names_checksummed_plans_in_a_valid_manifest(demo, monkeypatch):
    from onsight.runtime.trt_build import build_tensorrt

    _fake_tensorrt(monkeypatch)
    meta = build_tensorrt(demo, precision="fp16")
    m = load_bundle(demo).manifest
    jsonschema.validate(m, SCHEMA)
    assert m["tensorrt"] == meta
    for rel in meta["plans"].values():
        assert m["files"][rel]["bytes"] == (demo / rel).stat().st_size
    assert not [p for p in (demo / "trt").iterdir() if p.name.startswith(".")]


def test_a_failed_tensorrt_rebuild_leaves_the_earlier_plans_valid(demo, monkeypatch):
    from onsight.runtime.trt_build import build_tensorrt

    trt = _fake_tensorrt(monkeypatch)
    first = build_tensorrt(demo, precision="fp16")
    plans = {rel: (demo / rel).read_bytes() for rel in first["plans"].values()}
    trt.fail_on = "frame_step"  # vision and text_step rebuild first
    with pytest.raises(ExportError, match="failed to build frame_step"):
        build_tensorrt(demo, precision="fp16")
    assert load_bundle(demo).manifest["tensorrt"] == first
    assert {rel: (demo / rel).read_bytes() for rel in plans} == plans  # not half replaced
    assert not [p for p in (demo / "trt").iterdir() if p.name.startswith(".plans-")]


def _fail_after(n: int, real: Callable) -> Callable:
    """shutil.move that moves `n` files and then fails (a full disk, a kill)."""
    calls = []

    def move(src, dst):
        if len(calls) >= n:
            raise OSError(28, "No space left on device")
        calls.append(dst)
        return real(src, dst)

    return move


@pytest.fixture()
def fast_calibration(monkeypatch):
    """build_qdq_graphs without onnxruntime's quantizer: each run writes 'Q/DQ graphs' with
    new content, so a rerun replaces files bundle.json lists."""
    from onsight.runtime import trt_int8

    runs = []

    def qdq_graph(src, dst, feeds):
        dst.write_bytes(Path(src).read_bytes() + f"run {len(runs)}".encode())

    def agreement(fp32, qdq, pixels):
        runs.append(1)
        return {"top1_agreement": 1.0, "steps": 10}

    monkeypatch.setattr(trt_int8, "calibration_frames", lambda b, v, n: np.zeros((n, 64, 64, 3)))
    monkeypatch.setattr(trt_int8, "OrtSessions", lambda *a, **k: None)
    monkeypatch.setattr(trt_int8, "record_inputs", lambda s, p: {g: [] for g in GRAPHS})
    monkeypatch.setattr(trt_int8, "qdq_graph", qdq_graph)
    monkeypatch.setattr(trt_int8, "top1_agreement", agreement)
    return trt_int8


def test_an_interrupted_recalibration_leaves_a_loadable_bundle(demo, fast_calibration, monkeypatch):
    trt_int8 = fast_calibration
    trt_int8.build_qdq_graphs(demo, frames=2)
    jsonschema.validate(load_bundle(demo).manifest, SCHEMA)
    m = manifest(demo)
    m["tensorrt"] = _fake_plans(demo, "int8")  # plans built from these Q/DQ graphs
    write_manifest(demo, m)

    monkeypatch.setattr(trt_int8.shutil, "move", _fail_after(1, REAL_MOVE))
    with pytest.raises(OSError):
        trt_int8.build_qdq_graphs(demo, frames=2)
    m = load_bundle(demo).manifest  # every listed file matches its checksum
    assert not m.get("qdq") and not m.get("tensorrt")  # both unlisted before files changed

    monkeypatch.setattr(trt_int8.shutil, "move", REAL_MOVE)
    trt_int8.build_qdq_graphs(demo, frames=2)
    m = load_bundle(demo).manifest
    jsonschema.validate(m, SCHEMA)
    assert m["qdq"]["graphs"]["vision"] == "vision.qdq.onnx"
    assert not [p for p in demo.iterdir() if p.name.startswith(".qdq-")]


@pytest.fixture()
def fast_quantize(monkeypatch):
    """quantize_bundle without onnxruntime's quantizer and the agreement replay."""
    from onsight.exporter import quantize

    runs = []

    def quantize_graph(src, dst):
        runs.append(1)
        dst.write_bytes(Path(src).read_bytes()[:1000] + f"run {len(runs)}".encode())

    monkeypatch.setattr(quantize, "_quantize_graph", quantize_graph)
    monkeypatch.setattr(
        quantize, "top1_agreement", lambda d, int8_files: {"top1_agreement": 1.0, "steps": 10}
    )
    return quantize


def test_an_interrupted_int8_requantization_leaves_a_loadable_bundle(
    demo, fast_quantize, monkeypatch
):
    quantize = fast_quantize
    quantize.quantize_bundle(demo)
    m = load_bundle(demo).manifest
    jsonschema.validate(m, SCHEMA)
    assert set(m["graph_overrides"]) == set(GRAPHS)

    monkeypatch.setattr(quantize.shutil, "move", _fail_after(1, REAL_MOVE))
    with pytest.raises(OSError):
        quantize.quantize_bundle(demo)
    m = load_bundle(demo).manifest  # every listed file matches its checksum
    assert not m.get("graph_overrides") and not m.get("int8")


def test_a_stray_file_under_an_int8_name_cannot_break_the_bundle(demo, fast_quantize, monkeypatch):
    quantize = fast_quantize
    (demo / "text_step.int8.onnx").write_bytes(b"left by an interrupted build")
    write_manifest(demo, manifest(demo))  # listed, as every top-level file is
    monkeypatch.setattr(quantize.shutil, "move", _fail_after(2, REAL_MOVE))
    with pytest.raises(OSError):
        quantize.quantize_bundle(demo)
    load_bundle(demo)


# ---- the exporter writes the contract ----


def test_an_exported_bundle_names_its_tokenizer_and_conforms(tiny_bundle):
    m = manifest(tiny_bundle[0])
    jsonschema.validate(m, SCHEMA)
    assert manifest_problems(m) == []
    assert m["tokenizer"] == "tokenizer.json" and m["io"] == bundle_mod.RUNTIME_IO
