"""`onsight export` / `build` refuse broken checkpoints, bad flags and unwritable outputs with
an `onsight: error:` the user can act on (exit 2), and leave no partial output behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import llama_config
from safetensors.torch import load_file, save_file

from onsight.exporter.config import ModConfig, ModelConfig, PreprocessConfig, VisionConfig
from onsight.exporter.model import StreamingModel, load_native, save_native
from onsight.runtime.bundle import load_bundle
from onsight.runtime.cli import main
from onsight.runtime.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO / "engines" / "demo-checkpoint"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A copy of the shipped native checkpoint, to break on purpose."""
    if not (DEMO_CKPT / "model.safetensors").is_file():
        pytest.skip("engines/demo-checkpoint is missing")
    return Path(shutil.copytree(DEMO_CKPT, tmp_path / "ck"))


def _export(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["export", *map(str, argv)])
    return rc, capsys.readouterr().err


def _no_partial(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name]


def _edit_weights(ckpt: Path, keep) -> None:
    path = ckpt / "model.safetensors"
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if keep(k)}, str(path), {"format": "onsight"})


def _edit_config(ckpt: Path, edit) -> None:
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


# ---- broken native checkpoints ----


def test_untied_checkpoint_without_lm_head_is_refused(ckpt, tmp_path, capsys):
    _edit_weights(ckpt, lambda k: "lm_head" not in k)
    rc, err = _export(capsys, ckpt, "--out", tmp_path / "o")
    assert rc == 2 and "onsight: error:" in err
    assert "missing tensors 'decoder.lm.lm_head.weight'" in err and "tie_word_embeddings" in err
    assert not (tmp_path / "o").exists()
    _no_partial(tmp_path)


def test_tied_checkpoint_without_lm_head_loads_with_the_embedding_as_head(tmp_path, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    cfg = ModelConfig(
        decoder={**llama_config(vocab), "tie_word_embeddings": True},
        vision=VisionConfig(kind="tiny", hidden_size=32, tiny_channels=(8, 16)),
        preprocess=PreprocessConfig(image_size=32),
        mod=ModConfig(keep_ratio=0.2, layers=(1, 3), router="novelty"),
    )
    torch.manual_seed(0)
    native = save_native(StreamingModel(cfg).eval(), tok, tmp_path / "tied")
    _edit_weights(native, lambda k: "lm_head" not in k)
    model, _ = load_native(native)
    lm = model.decoder.lm
    assert torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)
    saved = load_file(str(native / "model.safetensors"))
    assert torch.equal(lm.lm_head.weight, saved["decoder.lm.model.embed_tokens.weight"])


def test_missing_and_unexpected_tensors_are_named(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    gone = sorted(k for k in state if "layers.2.mlp" in k)
    state = {k: v for k, v in state.items() if k not in gone}
    state["decoder.extra.weight"] = torch.zeros(2)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_native(ckpt)
    msg = str(info.value)
    assert "model.safetensors" in msg and "'decoder.extra.weight'" in msg
    assert "unexpected tensor" in msg and "missing tensors" in msg
    assert any(k in msg for k in gone)


def test_truncated_native_weights_are_a_checkpoint_error(ckpt, tmp_path, capsys):
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(1_000_000)
    rc, err = _export(capsys, ckpt, "--out", tmp_path / "o")
    assert rc == 2
    assert f"{ckpt / 'model.safetensors'}: not a readable safetensors file" in err
    assert "internal error" not in err


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda c: c["decoder"].update(hidden_size="128"), 'decoder.hidden_size is "128", '),
        (lambda c: c["preprocess"].update(mean=[0.5, 0.5]), "expected a list of 3 numbers"),
        (lambda c: c["vision"].update(use_pooled=1), "vision.use_pooled is 1, expected true"),
        (lambda c: c["mod"].update(layers="1,3"), 'mod.layers is "1,3", expected a list'),
        (lambda c: c["decoder"].pop("num_hidden_layers"), "decoder.num_hidden_layers is missing"),
        (lambda c: c.update(format_version=99), "written by a newer onsight"),
    ],
)
def test_config_json_with_a_wrong_value_names_the_field(ckpt, tmp_path, capsys, edit, said):
    _edit_config(ckpt, edit)
    rc, err = _export(capsys, ckpt, "--out", tmp_path / "o")
    assert rc == 2 and said in err and "internal error" not in err
    assert str(ckpt / "config.json") in err


def test_newer_format_version_says_upgrade(ckpt):
    _edit_config(ckpt, lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="upgrade onsight") as info:
        load_native(ckpt)
    assert "re-save" not in str(info.value)


# ---- what the source is ----


def test_a_bundle_is_not_a_checkpoint(tiny_bundle, tmp_path, capsys):
    rc, err = _export(capsys, tiny_bundle[0], "--out", tmp_path / "o")
    assert rc == 2 and "this is a bundle (already exported)" in err
    assert "cannot tell" not in err


def test_a_missing_source_does_not_exist(tmp_path, capsys):
    rc, err = _export(capsys, tmp_path / "nosuch", "--out", tmp_path / "o")
    assert rc == 2 and "nosuch: does not exist" in err


def test_format_onsight_on_a_transformers_dir_suggests_compose(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    rc, err = _export(capsys, hf, "--format", "onsight", "--out", tmp_path / "o")
    assert rc == 2 and "not an onsight checkpoint" in err and "--format compose" in err
    assert "format_version None" not in err


# ---- flags checked before the checkpoint loads ----


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--keep-ratio", "2"], "--keep-ratio 2.0: must be in [0, 1]"),
        (["--fps", "0"], "--fps 0.0: the sampling rate must be positive"),
        (["--keep-text-tokens", "-1"], "--keep-text-tokens -1: give 0 or more"),
        (["--kv-capacity", "0"], "--kv-capacity 0: give a positive"),
        (["--out-exists"], "already exists; choose another --out"),
        (["--out-under-a-file"], "afile is a file, not a directory; choose another --out"),
    ],
)
def test_export_flags_are_checked_before_loading(tmp_path, capsys, monkeypatch, flags, said):
    import onsight.exporter.loaders as loaders

    def never(*a, **k):
        raise AssertionError("the checkpoint was loaded before the flags were checked")

    monkeypatch.setattr(loaders, "load_checkpoint", never)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "o"
    if flags == ["--out-exists"]:
        out.mkdir()
        flags = []
    elif flags == ["--out-under-a-file"]:
        out, flags = tmp_path / "afile" / "b", []
    rc, err = _export(capsys, tmp_path / "any-checkpoint", "--out", out, *flags)
    assert rc == 2 and said in err and "loading" not in err


# ---- unwritable outputs ----


def test_read_only_place_for_out_is_an_export_error(ckpt, tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".o.partial-x"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    rc, err = _export(capsys, ckpt, "--out", tmp_path / "o")
    assert rc == 2
    assert f"cannot write {tmp_path / 'o'}: Read-only file system; choose another --out" in err
    assert ".partial-" not in err


def test_full_disk_during_export_removes_the_partial_bundle(ckpt, tmp_path, capsys, monkeypatch):
    import onsight.exporter.bundle_writer as bw

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bw, "export_graphs", full)
    rc, err = _export(capsys, ckpt, "--out", tmp_path / "o")
    assert rc == 2 and "No space left on device; choose another --out" in err
    assert not (tmp_path / "o").exists()
    _no_partial(tmp_path)


def test_losing_a_race_for_the_same_out_leaves_the_winner(ckpt, tmp_path, capsys, monkeypatch):
    import onsight.exporter.bundle_writer as bw

    out = tmp_path / "o"
    real = bw.run_parity

    def other_export_finishes_first(*a, **k):
        out.mkdir()
        (out / "bundle.json").write_text("{}")  # the other export's bundle
        return real(*a, **k)

    monkeypatch.setattr(bw, "run_parity", other_export_finishes_first)
    rc, err = _export(capsys, ckpt, "--out", out)
    assert rc == 2 and "created while this export ran" in err and "choose another --out" in err
    assert [p.name for p in out.iterdir()] == ["bundle.json"]
    _no_partial(tmp_path)


def test_other_os_errors_are_user_errors_and_the_rest_internal(monkeypatch, capsys):
    import onsight.runtime.info as info

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/bundle.json")

    monkeypatch.setattr(info, "describe", denied)
    assert main(["info", "b"]) == 2
    assert capsys.readouterr().err.strip() == "onsight: error: /some/bundle.json: Permission denied"

    def bug(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr(info, "describe", bug)
    assert main(["info", "b"]) == 1
    assert "internal error: ValueError: boom" in capsys.readouterr().err


# ---- build ----


def test_build_quantize_int8_without_backend_says_which_backend(tiny_bundle, capsys):
    assert main(["build", str(tiny_bundle[0]), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--backend onnxruntime --quantize int8" in err and "not installed" not in err


def test_build_onnxruntime_refuses_a_precision_it_ignores(tiny_bundle, capsys):
    argv = ["build", str(tiny_bundle[0]), "--backend", "onnxruntime", "--quantize", "int8"]
    assert main([*argv, "--precision", "fp16"]) == 2
    assert "--precision fp16 is for --backend tensorrt" in capsys.readouterr().err


def test_interrupted_int8_build_publishes_no_graph_overrides(tiny_bundle, tmp_path, monkeypatch):
    import onsight.exporter.quantize as quantize

    b = Path(shutil.copytree(tiny_bundle[0], tmp_path / "b"))
    before = (b / "bundle.json").read_text()

    def interrupted(*a, **k):  # Ctrl-C at "[4/4] measuring top-1 agreement"
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "top1_agreement", interrupted)
    argv = ["build", str(b), "--backend", "onnxruntime", "--quantize", "int8"]
    assert main(argv) == 130
    assert (b / "bundle.json").read_text() == before
    assert "graph_overrides" not in load_bundle(b).manifest  # verified, and fp32 only
    assert not [p.name for p in b.iterdir() if p.name.startswith(".int8-")]
    monkeypatch.undo()
    assert main(argv) == 0  # a rerun completes, and publishes overrides with their check
    m = load_bundle(b).manifest
    assert set(m["graph_overrides"]) == {"vision", "text_step", "frame_step"}
    assert m["int8"]["top1_agreement"] >= 0.8


def test_interrupted_int8_rebuild_leaves_a_bundle_that_verifies(tiny_bundle, tmp_path, monkeypatch):
    import onsight.exporter.quantize as quantize

    b = Path(shutil.copytree(tiny_bundle[0], tmp_path / "b"))
    argv = ["build", str(b), "--backend", "onnxruntime", "--quantize", "int8"]
    assert main(argv) == 0
    real_move = shutil.move
    moved: list[str] = []

    def move_one_then_interrupt(src, dst):  # Ctrl-C while the new int8 graphs move in
        if moved:
            raise KeyboardInterrupt
        moved.append(src)
        return real_move(src, dst)

    monkeypatch.setattr(quantize.shutil, "move", move_one_then_interrupt)
    assert main(argv) == 130
    m = load_bundle(b).manifest  # every listed checksum still matches its file
    assert "graph_overrides" not in m and "int8" not in m


def test_replace_swaps_a_bundle_only_once_the_new_one_passed(ckpt, tmp_path, capsys, monkeypatch):
    """--replace: a failed export leaves the old bundle as it was; a good one takes its place
    and leaves nothing beside it; without --replace the error names it; a folder that is not
    a bundle is never replaced."""
    import onsight.exporter.bundle_writer as bw

    out = tmp_path / "o"
    assert _export(capsys, ckpt, "--out", out, "--fps", "2")[0] == 0
    old = (out / "bundle.json").read_text()
    rc, err = _export(capsys, ckpt, "--out", out, "--fps", "3")
    assert rc == 2 and "already exists" in err and "pass --replace" in err

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(bw, "export_graphs", full)
        rc, err = _export(capsys, ckpt, "--out", out, "--fps", "3", "--replace")
    assert rc == 2 and "No space left on device" in err
    assert (out / "bundle.json").read_text() == old
    assert _export(capsys, ckpt, "--out", out, "--fps", "3", "--replace")[0] == 0
    assert load_bundle(out).generation["fps"] == 3.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []
    (tmp_path / "notes").mkdir()
    rc, err = _export(capsys, ckpt, "--out", tmp_path / "notes", "--replace")
    assert rc == 2 and "only replaces an onsight bundle" in err and "has no bundle.json" in err


def _two_bundles(tmp_path: Path) -> tuple[Path, Path]:
    out, new = tmp_path / "o", tmp_path / ".o.partial-x"
    for d, text in ((out, "old"), (new, "new")):
        d.mkdir()
        (d / "bundle.json").write_text(text)
    return new, out


def _siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("stop", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()])
def test_a_swap_stopped_between_its_renames_puts_the_old_bundle_back(tmp_path, monkeypatch, stop):
    import os

    from onsight.exporter import bundle_writer as bw
    from onsight.runtime.errors import ExportError

    new, out = _two_bundles(tmp_path)
    real, calls = os.rename, []

    def second_fails(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise stop
        return real(a, b)

    monkeypatch.setattr(bw.os, "rename", second_fails)
    expected = ExportError if isinstance(stop, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as e:
        bw._swap(new, out)
    if expected is ExportError:
        assert "cannot replace" in str(e.value) and "the bundle there is unchanged" in str(e.value)
    assert (out / "bundle.json").read_text() == "old"
    assert _siblings(tmp_path) == [".o.partial-x", "o"]  # the staging dir is the caller's


def test_a_swap_that_cannot_put_the_old_bundle_back_says_where_it_is(tmp_path, monkeypatch):
    import os

    from onsight.exporter import bundle_writer as bw
    from onsight.runtime.errors import ExportError

    new, out = _two_bundles(tmp_path)
    real, calls = os.rename, []

    def another_export_wins(a, b):
        calls.append(1)
        if len(calls) == 2:  # another export publishes `out` between the two renames
            os.mkdir(out)
            (out / "bundle.json").write_text("theirs")
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        return real(a, b)

    monkeypatch.setattr(bw.os, "rename", another_export_wins)
    with pytest.raises(ExportError, match="kept in") as e:
        bw._swap(new, out)
    kept = Path(str(e.value).rsplit("kept in ", 1)[1])
    assert (kept / "bundle.json").read_text() == "old"
    assert (out / "bundle.json").read_text() == "theirs"


def test_replace_refuses_a_symlink_and_says_to_give_the_real_path(tmp_path):
    from onsight.exporter.bundle_writer import check_out
    from onsight.runtime.errors import ExportError

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "bundle.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ExportError, match="does not replace a symlink.*own path"):
        check_out(tmp_path / "link", replace=True)
    assert check_out(tmp_path / "real", replace=True) == tmp_path / "real"
