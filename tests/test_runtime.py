"""The torch-free runtime: parity with the reference, KV accounting, bounded memory, integrity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from onsight.exporter.reference import reference_loop
from onsight.runtime.assistant import Assistant, AssistantConfig
from onsight.runtime.bundle import load_bundle
from onsight.runtime.errors import BundleError
from onsight.runtime.events import AnswerEvent, NarrationEvent, StatsEvent
from onsight.runtime.kv_cache import KVLayout
from onsight.runtime.ort_backend import OrtSessions
from onsight.runtime.stream_loop import StreamLoop
from onsight.runtime.template import build_template_ids
from onsight.runtime.trt_build import GpuInfo, check_plan_compat


def _frames(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n // 4 + 1, size, size, 3))
    # scenes that hold for a few frames then change, like video
    return np.stack(
        [np.clip(base[i // 4] + rng.normal(0, 6, (size, size, 3)), 0, 255) for i in range(n)]
    ).astype(np.uint8)


def _loops(tiny_bundle):
    """(bundle, ORT sessions, torch model, runtime loop, reference loop) on one bundle."""
    from tokenizers import Tokenizer

    path, model, tok_path = tiny_bundle
    bundle = load_bundle(path)
    sessions = OrtSessions(bundle, "cpu")
    tok = Tokenizer.from_file(str(tok_path))
    rt = StreamLoop(
        sessions.stepper(),
        build_template_ids(tok, bundle.template),
        encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        threshold=bundle.generation["threshold"],
        max_new_tokens=bundle.generation["max_new_tokens"],
    )
    ref = reference_loop(
        model, tok_path, capacity=bundle.layout.capacity_dense, policy=bundle.policy
    )
    return bundle, sessions, model, rt, ref


def test_runtime_equals_reference_token_by_token_with_eviction_and_question(tiny_bundle):
    bundle, sessions, model, rt, ref = _loops(tiny_bundle)
    pixels = _frames(100)
    embeds = model.encode_frames(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(sessions.encode(pixels[:4]), embeds[:4], atol=1e-5)
    spoke = answered = 0
    for f in range(100):
        if f in (30, 77):
            rt.ask("what is on the table?")
            ref.ask("what is on the table?")
        a, b = ref.on_frame(embeds[f]), rt.on_frame(embeds[f])
        assert (a.speak, a.narration, a.answers) == (b.speak, b.narration, b.answers), f"frame {f}"
        spoke += a.speak
        answered += len(a.answers)
    assert answered == 2 and 0 < spoke
    assert ref.stepper.evictions >= 2 and ref.stepper.evictions == rt.stepper.evictions
    assert ref.stepper.cache.lengths == rt.stepper.cache.lengths


def test_answers_between_frames_equal_the_reference_and_the_stream_goes_on(tiny_bundle):
    """answer_pending (a question after a file ended): the same turns as the reference, after
    a silent or a spoken frame, and frames after it are read as before."""
    bundle, sessions, model, rt, ref = _loops(tiny_bundle)
    embeds = model.encode_frames(torch.from_numpy(_frames(40))).numpy()
    assert rt.answer_pending() == [] and ref.answer_pending() == []  # nothing seen yet
    answered = 0
    for f in range(40):
        a, b = ref.on_frame(embeds[f]), rt.on_frame(embeds[f])
        assert (a.speak, a.narration) == (b.speak, b.narration), f"frame {f}"
        if f in (5, 6, 19, 33):
            for loop in (rt, ref):
                loop.ask("what is on the table?")
            x, y = ref.answer_pending(), rt.answer_pending()
            assert x == y and len(x) == 1, f"after frame {f}"
            answered += 1
    assert answered == 4


def test_mod_kv_bytes_per_frame_formula():
    lay = KVLayout(
        num_layers=24,
        kv_heads=2,
        head_dim=64,
        capacity_dense=4096,
        capacity_mod=1000,
        routed=tuple(range(1, 24, 2)),
        tokens_per_frame=50,
        k=10,
    )
    dense_layers, mod_layers, N, k = 12, 12, 50, 10
    expected = (dense_layers * N + mod_layers * k) / (24 * N)
    assert lay.bytes_per_frame(mod=True) / lay.bytes_per_frame(mod=False) == pytest.approx(expected)
    assert lay.bytes_per_frame(mod=False) == 24 * 50 * 2 * 2 * 64 * 4
    budget = 512 * 2**20
    assert lay.frames_in_budget(budget, True) / lay.frames_in_budget(budget, False) >= 1.6


def test_cache_spans_grow_with_the_fill_and_hold_the_same_data():
    """Steps read a (Hkv, span, D) prefix whose layout changes as it grows; nothing moves wrong."""
    from onsight.runtime.kv_cache import KVCache

    lay = KVLayout(num_layers=2, kv_heads=3, head_dim=4, capacity_dense=400, capacity_mod=150,
                   routed=(1,), tokens_per_frame=9, k=2)  # fmt: skip
    inv_freq = 1.0 / (10000 ** (np.arange(0, 4, 2) / 4))
    spans, whole = KVCache(lay), KVCache(lay, spans=False)
    rng = np.random.default_rng(0)
    seen = set()
    for step in range(120):
        t = int(rng.integers(1, 12))
        for c in (spans, whole):
            c.ensure_room(t, t, inv_freq)
        pos = spans.table.append(t, 1, step)
        whole.table.append(t, 1, step)
        for i in range(2):
            k, v = rng.normal(size=(2, 3, t, 4)).astype(np.float32)
            for c in (spans, whole):
                c.write(i, k, v, pos)
            n = spans.lengths[i]
            assert spans.k[i].shape == (3, spans.span[i], 4) and spans.k[i].flags.c_contiguous
            assert n <= spans.span[i] <= lay.capacity(i) and spans.mask(i).sum() == n
            np.testing.assert_array_equal(spans.k[i][:, :n], whole.k[i][:, :n])
            np.testing.assert_array_equal(spans.v[i][:, :n], whole.v[i][:, :n])
            seen.add(spans.span[i])
    assert spans.evictions == whole.evictions >= 1
    assert min(seen) == 64 and lay.capacity_mod in seen and len(seen) > 3


def test_ort_steps_read_only_the_filled_span(tiny_bundle):
    bundle, sessions, model, rt, _ = _loops(tiny_bundle)
    assert sessions.dynamic_past
    rt.on_frame(model.encode_frames(torch.from_numpy(_frames(1))).numpy()[0])
    cache = rt.stepper.cache
    assert cache.span[0] < bundle.layout.capacity_dense
    assert cache.k[0].shape[1] == cache.span[0] == len(cache.mask(0))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_long_stream_memory_stops_growing_once_cache_is_full(tiny_bundle):
    path, _, _ = tiny_bundle
    with Assistant(path, AssistantConfig(stats_every=1000)) as a:
        frames = _frames(64)
        for i in range(150):  # fills the cache and evicts several times
            a.push(frames[i % 64], i * 0.5)
        before = _rss_mb()
        evictions = a.stats().evictions
        for i in range(150, 1350):
            a.push(frames[i % 64], i * 0.5)
        after = _rss_mb()
        st = a.stats()
    assert evictions >= 1 and st.evictions > evictions + 5
    assert after - before < 15, f"resident memory grew {after - before:.1f} MiB over 1200 frames"


def test_assistant_push_yields_typed_events_and_answers(tiny_bundle):
    path, _, _ = tiny_bundle
    with Assistant(path, AssistantConfig(stats_every=5)) as a:
        a.ask("what colour is the square?")
        events = [e for i, f in enumerate(_frames(10)) for e in a.push(f, i / 2)]
    kinds = {type(e) for e in events}
    assert AnswerEvent in kinds and StatsEvent in kinds
    ans = next(e for e in events if isinstance(e, AnswerEvent))
    assert ans.question == "what colour is the square?" and ans.frame_index == 0
    st = [e for e in events if isinstance(e, StatsEvent)][-1]
    assert (
        st.frames_processed == 10 and 0 < st.kv_fill <= 1 and st.backend.startswith("onnxruntime")
    )
    assert all(isinstance(e.to_json(), str) for e in events)
    assert NarrationEvent in kinds or True  # a random model may stay silent


def test_closed_assistant_refuses_work(tiny_bundle):
    from onsight.runtime.errors import OnsightError

    a = Assistant(tiny_bundle[0])
    a.close()
    with pytest.raises(OnsightError, match="closed"):
        a.push(np.zeros((32, 32, 3), np.uint8))


# ---- integrity ----


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_missing_file_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[0], tmp_path / "b")
    (b / "frame_step.onnx").unlink()
    with pytest.raises(BundleError, match="frame_step.onnx .*missing.*re-export"):
        load_bundle(b)


def test_checksum_mismatch_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[0], tmp_path / "b")
    with open(b / "text_step.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(BundleError, match="text_step.onnx does not match its sha256"):
        load_bundle(b)


def test_unknown_format_version_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[0], tmp_path / "b")
    m = json.loads((b / "bundle.json").read_text())
    m["format_version"] = 99
    (b / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        load_bundle(b)


def test_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path / "empty")


def test_tensorrt_plan_for_another_gpu_is_refused():
    meta = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "tensorrt_version": "10.3.0",
    }
    with pytest.raises(BundleError, match="built for NVIDIA H100.*rebuild"):
        check_plan_compat(meta, GpuInfo("Orin", "8.7"), "10.3.0")
    with pytest.raises(BundleError, match="TensorRT 10.3.0, this is 10.7.0"):
        check_plan_compat(meta, GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), "10.7.0")
    with pytest.raises(BundleError, match="need an NVIDIA GPU"):
        check_plan_compat(meta, None, "10.3.0")
    check_plan_compat(meta, GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), "10.3.0")


def test_build_tensorrt_refuses_clearly_without_tensorrt(tiny_bundle, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from onsight.runtime.cli import main

    assert main(["build", str(tiny_bundle[0]), "--backend", "tensorrt"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_runtime_never_unpickles():
    root = Path(__file__).resolve().parents[1] / "runtime"
    for p in root.rglob("*.py"):
        text = p.read_text()
        assert "pickle" not in text and "torch.load" not in text and "np.load(" not in text, p


# ---- the headless CLI ----


def _narrate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onsight.runtime.cli", "narrate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_narrate_cli_prints_json_lines_and_writes_transcript(tiny_bundle, shared_videos, tmp_path):
    t = tmp_path / "t.jsonl"
    r = _narrate(
        "--engine",
        str(tiny_bundle[0]),
        "--source",
        str(shared_videos / "book.mkv"),
        "--no-realtime",
        "--max-frames",
        "8",
        "--transcript",
        str(t),
        "--ask",
        "what is this?",
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[0]["type"] == "source" and lines[-1]["type"] == "stats"
    assert any(x["type"] == "answer" for x in lines)
    assert [json.loads(x) for x in t.read_text().splitlines()] == lines


def test_narrate_exit_codes(tiny_bundle, tmp_path):
    r = _narrate("--engine", str(tiny_bundle[0]), "--source", str(tmp_path / "missing.mp4"))
    assert r.returncode == 3 and "missing.mp4" in r.stderr and "Traceback" not in r.stderr
    r = _narrate("--engine", str(tmp_path / "no-bundle"), "--source", "0")
    assert r.returncode == 2 and "no-bundle" in r.stderr and "Traceback" not in r.stderr
    r = _narrate("--engine", str(tiny_bundle[0]))
    assert r.returncode == 2  # argparse: --source is required


def test_transcript_survives_kill_9(tiny_bundle, shared_videos, tmp_path):
    t = tmp_path / "t.jsonl"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onsight.runtime.cli",
            "narrate",
            "--engine",
            str(tiny_bundle[0]),
            "--source",
            str(shared_videos / "walk.mkv"),
            "--fps",
            "4",
            "--transcript",
            str(t),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if t.exists() and len(t.read_text().splitlines()) >= 4:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read().decode()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    lines = t.read_text().splitlines()
    assert len(lines) >= 4
    for line in lines:
        json.loads(line)  # every line written before the kill is whole


def test_runtime_and_tui_import_without_torch():
    code = (
        "import sys, onsight.runtime, onsight.runtime.assistant, onsight.runtime.cli, onsight.runtime.capture, "
        "onsight.runtime.synthetic, onsight.tui\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('onsight.tui.app'): import onsight.tui.app\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import importlib\n"
        "for bare in ('runtime', 'tui', 'exporter'):\n"
        "    assert importlib.util.find_spec(bare) is None, bare\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr


def test_pruned_frames_match_the_reference(tiny_bundle):
    """DyCoke-style pruning prefills fewer tokens; runtime and reference still agree."""
    from onsight.runtime.pruning import dycoke_keep

    bundle, sessions, model, rt, ref = _loops(tiny_bundle)
    embeds = model.encode_frames(torch.from_numpy(_frames(12))).numpy()
    prev, pruned = None, 0
    for f in range(12):
        keep = dycoke_keep(embeds[f], prev, f, bundle.layout.k)
        prev = embeds[f]
        pruned += 0 if keep is None else 10 - len(keep)
        a, b = ref.on_frame(embeds[f], keep), rt.on_frame(embeds[f], keep)
        assert (a.speak, a.narration) == (b.speak, b.narration)
    assert pruned == 6 * (10 - 3)  # every second frame keeps ceil(0.3 * 10) = 3 tokens
    assert rt.stepper.cache.lengths == ref.stepper.cache.lengths


def test_assistant_prunes_when_asked(tiny_bundle):
    with Assistant(tiny_bundle[0], AssistantConfig(prune_static_tokens=True)) as a:
        for i, f in enumerate(_frames(6)):
            a.push(f, i / 2)
        assert a.stats().tokens_pruned == 3 * 7
