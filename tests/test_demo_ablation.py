"""The paper's tables in miniature: baseline routers (random, uniform), the early-exit variant,
and `onsight eval --ablations`' table, on tiny models."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from onsight.exporter.config import ModConfig

REPO = Path(__file__).resolve().parents[1]


def _frame_kept(model, frame: torch.Tensor, prev: torch.Tensor, start: int) -> list[list[int]]:
    """Kept indices per routed layer for one frame at positions start.. (empty cache)."""
    dec = model.decoder
    L, N = len(dec.layers), frame.shape[0]
    empty = torch.zeros(dec.num_kv_heads, 0, dec.head_dim)
    with torch.no_grad():
        _, _, _, kept = dec.frame_step(
            torch.tensor([5], dtype=torch.int64),
            frame,
            prev,
            torch.arange(start, start + 1 + N, dtype=torch.int64),
            [(empty, empty)] * L,
            [torch.zeros(0, dtype=torch.bool)] * L,
        )
    return [k.tolist() for k in kept]


@pytest.mark.parametrize("router", ["random", "uniform"])
def test_baseline_routers_keep_k_distinct_tokens_deterministically(tiny_tokenizer, router):
    from conftest import make_tiny_model

    _, vocab = tiny_tokenizer
    base = make_tiny_model(vocab)
    model = base.with_config(base.cfg.replace(mod=ModConfig(0.2, (1, 3), router)))
    k, N = model.cfg.k, model.cfg.tokens_per_frame
    torch.manual_seed(0)
    frames = torch.randn(3, N, model.cfg.llm_hidden)
    picks = [_frame_kept(model, frames[f], frames[f - 1], 50 + 20 * f) for f in range(3)]
    for per_layer in picks:
        for idx in per_layer:
            assert len(idx) == k == len(set(idx)) and all(0 <= i < N for i in idx)
    # the choice depends on nothing but positions: other frame contents, same picks
    assert _frame_kept(model, -frames[1], frames[2], 70) == picks[1]
    if router == "uniform":
        assert all(idx == [0, 5] for per_layer in picks for idx in per_layer)  # 10 tokens, k=2
    else:
        assert len({tuple(idx) for per_layer in picks for idx in per_layer}) > 1


@pytest.mark.parametrize(
    "opts",
    [
        dict(keep_ratio=0.2, router="random"),
        dict(keep_ratio=0.2, router="uniform"),
        dict(keep_ratio=0.0, mod_layers="from:2", router="uniform"),  # early exit
    ],
    ids=["random", "uniform", "early-exit"],
)
def test_ablation_variants_export_with_parity(tiny_tokenizer, tmp_path, opts):
    import jsonschema
    from conftest import make_tiny_model

    from onsight.exporter.bundle_writer import ExportOptions, export_bundle
    from onsight.runtime.bundle import load_bundle

    tok, vocab = tiny_tokenizer
    model = make_tiny_model(vocab)
    out, manifest = export_bundle(
        model, tok, tmp_path / "b", ExportOptions(kv_capacity=160, keep_text_tokens=24, **opts)
    )
    p = manifest["parity"]
    assert p["passed"] and p["same_tokens"] and p["same_decisions"]
    schema = json.loads((REPO / "runtime" / "bundle.schema.json").read_text())
    jsonschema.validate(json.loads((out / "bundle.json").read_text()), schema)
    layout = load_bundle(out).layout
    if opts["keep_ratio"] == 0.0:
        assert layout.routed == (2, 3) and layout.k == 0
    else:
        assert layout.routed == (1, 3) and layout.k == 2


def test_early_exit_matches_mod_flops_as_closely_as_the_layers_allow(tiny_tokenizer):
    from conftest import make_tiny_model

    from onsight.exporter.bundle_writer import ExportOptions
    from onsight.exporter.demo.ablation import (
        _layout,
        choose_exit_layer,
        exit_options,
        full_compute_layout,
        lm_dims,
        vision_flops,
        vision_tokens_per_layer,
    )

    _, vocab = tiny_tokenizer
    model = make_tiny_model(vocab)  # 4 layers, 10 tokens per frame, r = 0.2 on layers 1, 3
    base = ExportOptions(kv_capacity=512, keep_text_tokens=24)
    mod = ExportOptions(kv_capacity=512, keep_text_tokens=24, keep_ratio=0.2, router="learned")
    e, mod_ratio, exit_ratio = choose_exit_layer(model, mod, sink=20, context_frames=10)
    # linear FLOPs: MoD 24 / 40 token-layers = 0.6; exits after 1, 2, 3 layers: 0.25, 0.5, 0.75
    assert e == 2 and exit_ratio == pytest.approx(0.5)
    assert 0.5 < mod_ratio < 0.62
    layout = _layout(model, exit_options(base, e), sink=20)
    assert vision_tokens_per_layer(layout) == [10, 10, 0, 0]
    flops = vision_flops(lm_dims(model), layout, 20, 10)
    full = vision_flops(lm_dims(model), full_compute_layout(layout), 20, 10)
    assert flops["linear"] / full["linear"] == pytest.approx(0.5)


def test_ablation_table_runs_on_a_tiny_model(tiny_tokenizer, tmp_path):
    from conftest import make_tiny_model

    from onsight.exporter.demo.ablation import ablation_markdown, run_ablations, write_report
    from onsight.exporter.model import save_native

    tok, vocab = tiny_tokenizer
    ckpt = save_native(make_tiny_model(vocab), tok, tmp_path / "ckpt")
    counted: dict[str, list[int]] = {}  # variant -> [streams announced, streams done]

    @contextlib.contextmanager
    def stream_bar(name: str, streams: int):
        counted[name] = [streams, 0]
        yield lambda: counted[name].__setitem__(1, counted[name][1] + 1)

    report = run_ablations(
        ckpt,
        twin=tmp_path / "no-twin",
        engine=None,
        streams=2,
        frames=6,
        threads=1,
        stream_bar=stream_bar,
    )
    rows = {r["role"]: r for r in report["rows"]}
    assert list(rows) == ["learned", "random", "uniform", "early_exit", "twin"]
    # a progress bar per variant that ran, over its streams (the twin was not trained)
    assert counted == {r["variant"]: [2, 2] for r in report["rows"] if r["status"] == "ok"}
    assert rows["twin"]["status"].startswith("not trained")
    for role in ("learned", "random", "uniform", "early_exit"):
        r = rows[role]
        assert r["status"] == "ok" and 0.0 <= r["f1_exact"] <= 1.0
        assert 0.0 < r["flops_vs_full"] < 1.0
    assert rows["early_exit"]["k"] == 0
    gates = report["router_gates"]["mean_kept_weight"]
    assert set(gates) == {"1", "3"} and all(0.0 < w < 1.0 for w in gates.values())
    js, md = write_report(report, tmp_path / "out" / "ablation.json")
    assert json.loads(js.read_text())["rows"][0]["variant"] == rows["learned"]["variant"]
    text = md.read_text()
    assert text.strip() == ablation_markdown(report)
    tables = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = tables[0].count("|")
    main_rows = tables[: 2 + len(rows)]
    assert all(ln.count("|") == header for ln in main_rows)
    assert "not trained" in text and "weight on kept tokens' updates (sigmoid gate)" in text


def test_ablation_says_when_its_engine_is_missing(tiny_tokenizer, tmp_path):
    """--ablations shares the shipped bundle's cache settings; an --engine that is not there
    (a relative default run from another directory) is said, not silently replaced."""
    import logging

    from conftest import make_tiny_model

    from onsight.exporter.demo import ablation

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    # on the module's own logger: an in-process `onsight bench` stops onsight.exporter's
    # records from reaching the root logger (and so pytest's caplog)
    logger = logging.getLogger(ablation.__name__)
    logger.addHandler(handler)
    try:
        _, vocab = tiny_tokenizer
        model = make_tiny_model(vocab)
        opts = ablation.base_options(tmp_path / "engines" / "demo", model)
        assert any("no bundle there" in m for m in said) and opts.kv_capacity > 0
        said.clear()
        ablation.base_options(None, model)
        assert said == []
    finally:
        logger.removeHandler(handler)
