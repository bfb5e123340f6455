"""The README's commands, and the mistakes a new user makes with them: each refusal is a short
`onsight: error:` message that says what to pass, with the documented exit code (2 bad
arguments or bundle), never a traceback. Uses the shipped engines/demo read-only."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onsight.runtime.cli import main
from onsight.runtime.errors import OnsightError
from onsight.runtime.transcript import Transcript

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "engines" / "demo"
DEMO_CKPT = REPO / "engines" / "demo-checkpoint"


def refused(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI, expect a short error with `code`; return the message."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("onsight: error:"), err
    assert 1 <= len(err.strip().splitlines()) <= 3, err
    return err


def test_info_on_bundle_json_names_the_bundle_folder(capsys):
    err = refused(capsys, ["info", str(DEMO / "bundle.json")])
    assert "pass the bundle's folder" in err and str(DEMO) in err
    assert "does not exist" not in err


def test_info_on_a_junk_file_says_it_is_a_file_not_a_bundle(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.write_text("hello")
    err = refused(capsys, ["info", str(junk)])
    assert "is a file, not a bundle" in err and "does not exist" not in err


def test_info_on_a_checkpoint_dir_says_export_it_first(capsys):
    err = refused(capsys, ["info", str(DEMO_CKPT)])
    assert "is a checkpoint, not a bundle" in err and "onsight export" in err


def test_narrate_with_a_video_as_engine_says_the_video_goes_to_source(tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 64)
    err = refused(capsys, ["narrate", "--engine", str(video), "--source", "demo"])
    assert "--source" in err and "--engine" in err


def test_narrate_with_a_checkpoint_as_engine_says_export_it_first(capsys):
    err = refused(capsys, ["narrate", "--engine", str(DEMO_CKPT), "--source", "demo"])
    assert "export it first" in err


def test_assistant_on_a_checkpoint_dir_says_export_it_first():
    """The embedding API and `onsight run` open bundles through load_bundle: they get the
    same advice as the commands."""
    from onsight.runtime.assistant import Assistant
    from onsight.runtime.errors import BundleError

    with pytest.raises(BundleError, match="is a checkpoint, not a bundle; export it first"):
        Assistant(DEMO_CKPT)


def test_a_missing_int8_graph_says_to_run_build_again(tmp_path):
    from onsight.runtime.bundle import load_bundle
    from onsight.runtime.errors import BundleError

    b = tmp_path / "b"
    shutil.copytree(DEMO, b)
    manifest = json.loads((b / "bundle.json").read_text())
    (b / "vision.int8.onnx").write_bytes(b"")
    manifest["graph_overrides"] = {"vision": "vision.int8.onnx"}
    manifest["files"]["vision.int8.onnx"] = {"bytes": 0, "sha256": "0"}
    (b / "bundle.json").write_text(json.dumps(manifest))
    (b / "vision.int8.onnx").unlink()
    with pytest.raises(BundleError, match="--backend onnxruntime --quantize int8` again"):
        load_bundle(b)


def test_build_on_a_checkpoint_dir_is_refused_before_building(capsys):
    argv = ["build", str(DEMO_CKPT), "--backend", "onnxruntime", "--quantize", "int8"]
    assert "is a checkpoint, not a bundle" in refused(capsys, argv)
    assert not any(DEMO_CKPT.glob("*.onnx"))


def test_export_to_an_existing_file_or_an_empty_out_is_refused(tmp_path, capsys):
    pytest.importorskip("torch")
    f = tmp_path / "taken"
    f.write_text("x")
    err = refused(capsys, ["export", str(DEMO_CKPT), "--out", str(f)])
    assert "is a file" in err and f.read_text() == "x"
    err = refused(capsys, ["export", str(DEMO_CKPT), "--out", ""])
    assert "--out is empty" in err


def _not_a_demo_bundle(tmp_path: Path) -> Path:
    """The demo bundle's graphs under another model's prompt (bundle.json is not checksummed)."""
    b = tmp_path / "other"
    shutil.copytree(DEMO, b)
    m = json.loads((b / "bundle.json").read_text())
    m["template"]["system_prompt"] = "A multimodal AI assistant is helping users."
    (b / "bundle.json").write_text(json.dumps(m))
    return b


def test_eval_refuses_a_bundle_not_trained_by_train_demo(tmp_path, capsys):
    pytest.importorskip("torch")
    b = _not_a_demo_bundle(tmp_path)
    t = time.perf_counter()
    err = refused(capsys, ["eval", "--engine", str(b), "--streams", "1"])
    assert "not a demo model" in err and "engines/demo" in err
    assert time.perf_counter() - t < 30  # refused up front, not after narrating streams


def test_eval_accepts_the_demo_bundle_by_path_and_by_default_from_anywhere(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from onsight.exporter.demo.evaluate import check_demo_bundle

    check_demo_bundle(str(DEMO))
    monkeypatch.chdir(tmp_path)  # eval's default --engine engines/demo, outside the checkout
    check_demo_bundle("engines/demo")


def test_eval_on_a_checkpoint_dir_says_export_it_first(capsys):
    pytest.importorskip("torch")
    err = refused(capsys, ["eval", "--engine", str(DEMO_CKPT)])
    assert "is a checkpoint, not a bundle" in err


def test_transcript_refuses_to_append_to_a_file_that_is_not_json_lines(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)))
    before = video.read_bytes()
    with pytest.raises(OnsightError, match="not an onsight transcript"):
        Transcript(video)
    assert video.read_bytes() == before


def test_transcript_drops_a_half_written_last_line_so_appended_lines_parse(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"type": "source"}\n{"type": "narration", "te')  # a kill -9 mid-line
    with Transcript(path) as t:
        t.append('{"type": "stats"}')
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["source", "stats"]


def test_transcript_keeps_a_whole_last_line_that_lacks_its_newline(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"type": "source"}\n{"type": "narration"}')
    with Transcript(path) as t:
        t.append('{"type": "stats"}')
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["source", "narration", "stats"]


def test_transcript_keeps_a_last_line_longer_than_the_tail_it_reads_first(tmp_path):
    """Only the last 64 KiB were read: a longer last event (a long answer) had no line
    start in them and the transcript was refused as not JSON lines."""
    from onsight.runtime.transcript import TAIL_BYTES

    path = tmp_path / "out.jsonl"
    long = json.dumps({"type": "answer", "text": "a" * (2 * TAIL_BYTES)})
    path.write_text('{"type": "source"}\n' + long + "\n")
    with Transcript(path) as t:
        t.append('{"type": "stats"}')
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["source", "answer", "stats"]


def test_transcript_drops_a_cut_short_first_line(tmp_path):
    """A run killed while writing its first event left one half line, which was refused as
    not a transcript; a half line that is no event of ours still is."""
    path = tmp_path / "out.jsonl"
    path.write_text('{"type": "sou')
    with Transcript(path) as t:
        t.append('{"type": "stats"}')
    assert [json.loads(x)["type"] for x in path.read_text().splitlines()] == ["stats"]
    other = tmp_path / "other.txt"
    other.write_text('{"name": "not ours')
    with pytest.raises(OnsightError, match="not an onsight transcript"):
        Transcript(other)
    assert other.read_text() == '{"name": "not ours'


@pytest.mark.timeout(120)
def test_ctrl_c_during_narrate_exits_130_and_leaves_a_valid_transcript(tmp_path):
    out = tmp_path / "out.jsonl"
    # a terminal's Ctrl-C: SIGINT raises KeyboardInterrupt even if this process ignores it
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from onsight.runtime.cli import main; sys.exit(main())"
    )
    argv = [sys.executable, "-c", code, "narrate", "--engine", str(DEMO), "--source", "demo"]
    argv += ["--max-frames", "120", "--transcript", str(out)]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            if out.is_file() and out.read_text().count("\n") >= 2:  # realtime: 2 frames/s
                break
            time.sleep(0.1)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err
    lines = out.read_text().splitlines()
    assert len(lines) >= 2 and all(isinstance(json.loads(x), dict) for x in lines)


def test_bench_refuses_bad_numbers_and_backends_before_measuring(capsys):
    from onsight.exporter import bench

    for argv in (["--iters", "0"], ["--e2e-frames", "0"], ["--budget-mb", "-1"],
                 ["--speak-every", "0"], ["--backend", "foo"], ["--preset", "0.5B"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


def test_bench_refuses_a_missing_or_unreadable_video_before_building(tmp_path):
    from onsight.exporter import bench

    with pytest.raises(OnsightError, match="does not exist"):
        bench.parse_args(["--video", str(tmp_path / "cam.mp4")])
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(OnsightError, match="gives no frame"):
        bench.parse_args(["--video", str(text)])


def test_bench_refuses_an_out_that_is_a_file_and_an_engine_that_is_a_checkpoint(tmp_path):
    from onsight.exporter import bench

    f = tmp_path / "results"
    f.write_text("x")
    with pytest.raises(OnsightError, match="is a file"):
        bench.parse_args(["--out", str(f)])
    with pytest.raises(OnsightError, match="is a file, not a directory"):
        bench.parse_args(["--out", str(f / "sub")])
    with pytest.raises(OnsightError, match="is a checkpoint, not a bundle"):
        bench.parse_args(["--engine", str(DEMO_CKPT)])


def test_readme_documents_every_exit_code_the_cli_uses():
    readme = (REPO / "README.md").read_text()
    for code in ("0 done", "2 bad arguments or bundle", "3 source failure", "130 interrupted"):
        assert code in " ".join(readme.split()), code
