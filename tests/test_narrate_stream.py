"""`onsight narrate` on a real network stream that drops and comes back, and on bad sources."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FFMPEG = shutil.which("ffmpeg")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(video: Path, url: str) -> subprocess.Popen:
    cmd = [
        FFMPEG,
        "-nostdin",
        "-loglevel",
        "error",
        "-re",
        "-stream_loop",
        "-1",
        "-i",
        str(video),
        "-c",
        "copy",
        "-f",
        "mpegts",
        "-listen",
        "1",
        url,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines()]


def _wait(path: Path, cond, timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = _lines(path)
        if cond(lines):
            return lines
        time.sleep(0.3)
    raise AssertionError(
        f"timed out; transcript has {[x['type'] + ':' + x.get('status', '') for x in _lines(path)]}"
    )


@pytest.mark.slow
@pytest.mark.skipif(FFMPEG is None, reason="ffmpeg not installed (apt-get install ffmpeg)")
def test_narrate_survives_stream_server_restart(tiny_bundle, shared_videos, tmp_path):
    url = f"http://127.0.0.1:{_port()}/live.ts"
    t = tmp_path / "t.jsonl"
    server = _serve(shared_videos / "walk.mkv", url)
    time.sleep(1.0)
    narrate = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onsight.runtime.cli",
            "narrate",
            "--engine",
            str(tiny_bundle[0]),
            "--source",
            url,
            "--fps",
            "4",
            "--transcript",
            str(t),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def statuses(lines):
            return [x.get("status") for x in lines if x["type"] == "source"]

        _wait(
            t,
            lambda ls: "opened" in statuses(ls) and sum(x["type"] == "stats" for x in ls) >= 1,
            60,
        )
        server.kill()
        server.wait(10)
        _wait(t, lambda ls: "reconnecting" in statuses(ls), 30)
        server = _serve(shared_videos / "walk.mkv", url)
        lines = _wait(
            t,
            lambda ls: (
                "resumed" in statuses(ls)
                and any(
                    x["type"] == "stats"
                    for x in ls[[x.get("status") for x in ls].index("resumed") :]
                )
            ),
            60,
        )
        assert narrate.poll() is None, narrate.stderr.read().decode()
    finally:
        narrate.send_signal(signal.SIGINT)
        try:
            narrate.wait(20)
        except subprocess.TimeoutExpired:
            narrate.kill()
        server.kill()
    resumed = next(x for x in lines if x.get("status") == "resumed")
    assert resumed["gap_seconds"] > 0.5
    stats = [x for x in lines if x["type"] == "stats"]
    assert stats[-1]["frames_processed"] > stats[0]["frames_processed"]
    assert _lines(t)[: len(lines)] == lines  # nothing written was lost


@pytest.mark.parametrize("source", ["/dev/video99", "garbage", "rtsp://127.0.0.1:1/none"])
def test_narrate_bad_sources_exit_3(tiny_bundle, tmp_path, source):
    if source == "garbage":
        bad = tmp_path / "x.mp4"
        bad.write_bytes(bytes(range(256)) * 64)
        source = str(bad)
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "onsight.runtime.cli",
            "narrate",
            "--engine",
            str(tiny_bundle[0]),
            "--source",
            source,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stderr
    assert source in r.stderr and "Traceback" not in r.stderr
    assert time.time() - t0 < 30
