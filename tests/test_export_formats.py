"""Export the tiny VideoLLM-online and compose fixtures at r = 1 and r = 0.2 through the CLI path."""

from __future__ import annotations

import onnx
import pytest
from test_loaders import ck  # noqa: F401 - the session fixture of tiny checkpoints

from onsight.exporter.bundle_writer import ExportOptions, export_bundle
from onsight.exporter.loaders import load_checkpoint
from onsight.exporter.trt_compat import check_graph
from onsight.runtime.cli import main as cli_main


@pytest.mark.parametrize("r", [1.0, 0.2])
def test_export_videollm_online_release(ck, tmp_path, r):  # noqa: F811
    model, tok = load_checkpoint(ck.adapter, base=ck.base, vision=ck.siglip)
    out, manifest = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(keep_ratio=r, kv_capacity=512)
    )
    assert manifest["parity"]["passed"]
    assert (
        manifest["template"]["interval_token"] == ","
        and manifest["generation"]["threshold"] == 0.725
    )
    assert manifest["token_ids"]["v"] == manifest["model"]["vocab_size"]  # outside the embedding
    for g in ("vision", "text_step", "frame_step"):
        onnx.checker.check_model(onnx.load(str(out / f"{g}.onnx")))
        assert check_graph(out / f"{g}.onnx") == []


@pytest.mark.parametrize("r", [1.0, 0.2, None])
def test_export_compose_with_experts(ck, tmp_path, r):  # noqa: F811
    model, tok = load_checkpoint(
        ck.base, vision=ck.siglip_vision, projector=ck.proj, experts=ck.experts
    )
    out, manifest = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(keep_ratio=r, kv_capacity=512)
    )
    assert manifest["parity"]["passed"]
    assert manifest["mod"]["router"] == "learned"
    # experts without --keep-ratio route at VideoLLM-MoD's r, not at 1 (no saving)
    assert manifest["mod"]["keep_ratio"] == (0.2 if r is None else r)


def test_cli_export_videollm_online(ck, tmp_path, capsys):  # noqa: F811
    rc = cli_main(
        [
            "export",
            str(ck.adapter),
            "--base",
            str(ck.base),
            "--vision",
            str(ck.siglip),
            "--out",
            str(tmp_path / "e"),
            "--keep-ratio",
            "0.2",
            "--kv-capacity",
            "512",
        ]
    )
    assert rc == 0
    assert "keep ratio 0.2" in capsys.readouterr().out


def test_cli_unknown_format_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 10)
    rc = cli_main(["export", str(tmp_path / "junk"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "error" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
