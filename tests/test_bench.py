"""`onsight bench` runs end to end on the demo preset and writes JSON, markdown and PNG.

No timing assertions: the numbers depend on the machine (and these cores are shared).
"""

from __future__ import annotations

import json

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_demo_quick_writes_json_markdown_and_png(tmp_path):
    import logging

    from onsight.exporter import bench

    lg = logging.getLogger("onsight.exporter")
    before = (lg.level, lg.propagate, list(lg.handlers))
    out = tmp_path / "results"
    rc = bench.main(
        [
            "--preset",
            "demo",
            "--quick",
            "--iters",
            "2",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    # the bench's progress logging is undone: later code in the process logs as before
    assert (lg.level, lg.propagate, list(lg.handlers)) == before

    res = json.loads((out / "results.json").read_text())
    assert {"meta", "prefill", "kv", "peaks", "targets"} <= set(res)
    assert {"onsight r=1.0", "onsight r=0.5", "onsight r=0.2"} <= set(res["prefill"])
    for stats in res["prefill"].values():
        assert stats["n"] == 2 and stats["median_ms"] > 0
    assert res["kv"]["fit_ratio"] > 1.0  # MoD holds more frames than dense in the same bytes
    assert all(t["status"] in ("PASS", "MISS", "n/a", "info") for t in res["targets"])

    md = (out / "results.md").read_text()
    assert md.startswith("# onsight bench") and "| target |" in md
    pngs = sorted(out.glob("*.png"))
    assert pngs, "no plots written"
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC, p


def test_bench_refuses_8b_on_cpu(tmp_path, capsys):
    import onnxruntime

    from onsight.exporter import bench
    from onsight.runtime.errors import OnsightError

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a CUDA machine runs the 8b preset")
    with pytest.raises(OnsightError, match="GPU only"):
        bench.main(["--preset", "8b", "--cache-dir", str(tmp_path), "--out", str(tmp_path)])
