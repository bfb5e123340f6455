"""`onsight eval --ablations`: issue 8's table in miniature, on the held-out streams.

Rows: the MoD model with its learned routers, the same weights with random and with uniform
routing, an early-exit variant (vision tokens leave after the first E layers, E matched to
MoD's vision-token FLOPs), and a full-compute twin trained the same way (r = 1). Every row
is exported to a bundle (parity-checked, as `onsight export` does) and narrated by the
runtime's own engine, so the numbers are those a user of that bundle would get.

Vision-token prefill FLOPs per frame are counted from the dims: each layer's q/k/v/o and MLP
matmuls on the vision tokens it processes, their attention (QK^T and PV) over the cache, and
the learned router's scoring. Attention assumes a cache holding the system prompt and
`context_frames` earlier frames (each with its interval token), capped at the layer's capacity.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onsight.exporter.bench_report import LMDims
from onsight.exporter.bundle_writer import (
    ExportOptions,
    apply_options,
    default_kv_capacity,
    export_bundle,
)
from onsight.exporter.decoder import kept_indices
from onsight.exporter.demo.data import NarrationDelay
from onsight.exporter.demo.evaluate import (
    HELD_OUT_SEED,
    BundleNarrator,
    held_out_streams,
    score_narrator,
)
from onsight.exporter.demo.train_config import checkpoint_delay
from onsight.exporter.model import StreamingModel, load_native
from onsight.exporter.reference import layout_for
from onsight.runtime.bundle import load_bundle
from onsight.runtime.files import write_text_atomic
from onsight.runtime.kv_cache import KVLayout
from onsight.runtime.synthetic import Stream

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# (variant name, streams) -> a context manager giving the per-stream callback (a progress bar)
StreamBar = Callable[[str, int], AbstractContextManager[Callable[[], object]]]
TARGET_F1_GAP = 0.02  # learned MoD within 2 F1 points of the full-compute twin
TARGET_FLOPS_RATIO = 0.65  # at <= 0.65x the twin's vision-token FLOPs


# ---- vision-token FLOPs from the dims ----


def lm_dims(model: StreamingModel) -> LMDims:
    dec = model.decoder
    c = dec.lm.config
    return LMDims(
        hidden=int(c.hidden_size),
        layers=len(dec.layers),
        heads=dec.num_heads,
        kv_heads=dec.num_kv_heads,
        head_dim=dec.head_dim,
        intermediate=int(c.intermediate_size),
        vocab=int(c.vocab_size),
    )


def vision_tokens_per_layer(layout: KVLayout) -> list[int]:
    """Vision tokens of one frame that each layer processes (k on routed layers, else N)."""
    N = layout.tokens_per_frame
    return [layout.k if i in layout.routed else N for i in range(layout.num_layers)]


def vision_flops(
    dims: LMDims,
    layout: KVLayout,
    sink: int,
    context_frames: int,
    learned_router: bool = False,
) -> dict[str, float]:
    """FLOPs of one frame's vision tokens through the decoder (linear, attention, router)."""
    N = layout.tokens_per_frame
    linear = attention = router = 0.0
    for i, t in enumerate(vision_tokens_per_layer(layout)):
        ctx = min(layout.capacity(i), sink + context_frames * (t + 1))
        linear += 2.0 * dims.layer_params * t
        attention += 4.0 * dims.heads * dims.head_dim * t * (ctx + t)  # QK^T and PV
        if learned_router and i in layout.routed and t > 0:
            router += 2.0 * dims.hidden * N  # every token is scored, k of them kept
    return {
        "total": linear + attention + router,
        "linear": linear,
        "attention": attention,
        "router": router,
    }


def full_compute_layout(layout: KVLayout) -> KVLayout:
    """The same cache with every vision token in every layer (r = 1)."""
    return dataclasses.replace(
        layout, routed=(), k=layout.tokens_per_frame, capacity_mod=layout.capacity_dense
    )


# ---- the variants ----


@dataclass(frozen=True)
class Variant:
    """One row: a checkpoint exported with some MoD settings (or a note why it is missing)."""

    role: str  # learned | random | uniform | early_exit | twin
    name: str  # row label
    checkpoint: Path | None  # native checkpoint; None with a `missing` note
    opts: ExportOptions | None = None
    missing: str = ""  # why the row has no numbers, e.g. "not trained"


def base_options(engine: str | Path | None, model: StreamingModel) -> ExportOptions:
    """Export settings of the shipped bundle (cache size, text budget, fps), so every variant
    runs under the same cache as the bundle users get; defaults when there is none."""
    manifest = Path(engine) / "bundle.json" if engine else None
    if manifest is not None and not manifest.is_file():
        log.warning(
            "%s: no bundle there; the variants get default cache settings (capacity 4096 or "
            "the model's context), not a shipped bundle's: pass --engine with that bundle",
            engine,
        )
    elif manifest is not None:
        m = json.loads(manifest.read_text())
        return ExportOptions(
            kv_capacity=int(m["kv"]["capacity_dense"]),
            keep_text_tokens=int(m["eviction"]["keep_text_tokens"]),
            fps=float(m["generation"]["fps"]),
            dtype="fp16" if m["kv"]["dtype"] == "float16" else "fp32",
        )
    return ExportOptions(kv_capacity=default_kv_capacity(model))


def _layout(model: StreamingModel, opts: ExportOptions, sink: int) -> KVLayout:
    return layout_for(apply_options(model, opts), opts.kv_capacity, sink + opts.keep_text_tokens)


def choose_exit_layer(
    model: StreamingModel, mod_opts: ExportOptions, sink: int, context_frames: int
) -> tuple[int, float, float]:
    """The E (1 <= E < layers) whose early exit best matches the MoD variant's vision-token
    FLOPs. Returns (E, MoD's FLOPs / full, early exit's FLOPs / full)."""
    dims = lm_dims(model)
    learned = (mod_opts.router or model.cfg.mod.router) == "learned"
    mod_layout = _layout(model, mod_opts, sink)
    full = vision_flops(dims, full_compute_layout(mod_layout), sink, context_frames)["total"]
    target = vision_flops(dims, mod_layout, sink, context_frames, learned)["total"] / full
    best: tuple[float, int, float] | None = None
    for e in range(1, dims.layers):
        lay = _layout(model, exit_options(mod_opts, e), sink)
        ratio = vision_flops(dims, lay, sink, context_frames)["total"] / full
        if best is None or abs(ratio - target) < best[0]:
            best = (abs(ratio - target), e, ratio)
    if best is None:
        raise ValueError("early exit needs a decoder of at least 2 layers")
    return best[1], target, best[2]


def exit_options(base: ExportOptions, exit_at: int) -> ExportOptions:
    """Vision tokens pass layers 0..exit_at-1 only: the later layers route with k = 0."""
    # keep ratio 0 runs no router; "uniform" only names one that needs no weights
    return dataclasses.replace(base, keep_ratio=0.0, mod_layers=f"from:{exit_at}", router="uniform")


def build_variants(
    checkpoint: Path, model: StreamingModel, twin: Path | None, base: ExportOptions, exit_at: int
) -> list[Variant]:
    r = model.cfg.mod.keep_ratio
    layers = ",".join(str(i) for i in model.cfg.mod.layers) or "interleaved"
    mod = dataclasses.replace(base, keep_ratio=r, mod_layers=layers)
    name = f"MoD r={r:g}, learned routers"
    if model.cfg.has_layer_experts:
        rows = [Variant("learned", name, checkpoint, _with(mod, "learned"))]
    else:
        rows = [Variant("learned", name, None, missing="no LayerExperts in the checkpoint")]
    rows += [
        Variant("random", f"MoD r={r:g}, random routing", checkpoint, _with(mod, "random")),
        Variant("uniform", f"MoD r={r:g}, uniform routing", checkpoint, _with(mod, "uniform")),
        Variant(
            "early_exit",
            f"early exit after {exit_at} layers",
            checkpoint,
            exit_options(base, exit_at),
        ),
    ]
    name = "full-compute twin (r=1)"
    if twin is None:
        rows.append(Variant("twin", name, None, missing="not trained"))
    elif not (twin / "config.json").is_file():
        rows.append(Variant("twin", name, None, missing=f"not trained (no checkpoint at {twin})"))
    else:
        full = dataclasses.replace(base, keep_ratio=1.0, mod_layers="none")
        rows.append(Variant("twin", name, twin, full))
    return rows


def _with(opts: ExportOptions, router: str) -> ExportOptions:
    return dataclasses.replace(opts, router=router)


# ---- running them ----


def run_variant(
    v: Variant,
    data: Sequence[Stream],
    out_dir: Path,
    window_s: float,
    context_frames: int,
    threads: int | None,
    threshold: float | None,
    say: Progress,
    stream_bar: StreamBar | None = None,
) -> dict[str, Any]:
    """Export one variant, narrate the streams through it, and score it."""
    row: dict[str, Any] = {"role": v.role, "variant": v.name}
    if v.checkpoint is None or v.opts is None:
        return {**row, "status": v.missing}
    model, tok = load_native(v.checkpoint)
    if v.opts.keep_ratio == 1.0 and model.cfg.mod.keep_ratio != 1.0:
        log.warning(
            "%s was trained at r=%s, evaluated at r=1", v.checkpoint, model.cfg.mod.keep_ratio
        )
    slug = re.sub(r"[^a-z0-9]+", "-", v.name.lower()).strip("-")
    say(f"{v.name}: exporting")
    bundle, manifest = export_bundle(model, tok, out_dir / slug, v.opts, progress=log.info)
    layout = load_bundle(bundle, verify=False).layout
    sink = int(manifest["token_ids"]["sink_length"])
    learned = manifest["mod"]["router"] == "learned"
    dims = lm_dims(model)
    flops = vision_flops(dims, layout, sink, context_frames, learned)
    full = vision_flops(dims, full_compute_layout(layout), sink, context_frames)
    narrator = BundleNarrator(bundle, threads, threshold)
    if stream_bar is None:
        say(f"{v.name}: narrating {len(data)} streams")
        scores, _ = score_narrator(narrator, data, window_s)
    else:
        with stream_bar(v.name, len(data)) as done_one:
            scores, _ = score_narrator(narrator, data, window_s, on_stream=done_one)
    narr = scores["narration"]
    return {
        **row,
        "status": "ok",
        "checkpoint": str(v.checkpoint),
        "bundle": str(bundle),
        "router": manifest["mod"]["router"],
        "keep_ratio": manifest["mod"]["keep_ratio"],
        "k": layout.k,
        "routed_layers": list(layout.routed),
        "vision_tokens_per_layer": vision_tokens_per_layer(layout),
        "parity_max_abs_logit_error": manifest["parity"]["max_abs_logit_error"],
        "vision_flops_per_frame": flops,
        "vision_flops_full": full["total"],
        "flops_vs_full": flops["total"] / full["total"],
        "linear_flops_vs_full": flops["linear"] / full["linear"],
        "wrong_details": scores["wrong_details"],
        "f1_exact": narr["exact"]["f1"],
        "f1_kind": narr["kind"]["f1"],
        "recall_by_kind_exact": narr["exact"]["recall_by_kind"],
        "recall_by_kind_kind": narr["kind"]["recall_by_kind"],
        **scores,
    }


def run_ablations(
    checkpoint: str | Path,
    twin: str | Path | None = None,
    engine: str | Path | None = "engines/demo",
    streams: int = 20,
    seed_start: int = HELD_OUT_SEED,
    frames: int = 60,
    window_s: float = 2.0,
    stage: int = 2,
    threads: int | None = None,
    threshold: float | None = None,
    bundles_dir: str | Path | None = None,
    progress: Progress | None = None,
    stream_bar: StreamBar | None = None,
) -> dict[str, Any]:
    """Every variant on the same held-out streams; the report behind `ablation_markdown`.
    `progress` gets a line per step, `stream_bar` (if given) counts each variant's streams."""
    say = progress or (lambda msg: log.info("%s", msg))
    checkpoint = Path(checkpoint)
    model, tok = load_native(checkpoint)
    base = base_options(engine, model)
    sink = _sink_length(model, tok)
    context_frames = max(1, frames // 2)
    mod_opts = dataclasses.replace(
        base,
        keep_ratio=model.cfg.mod.keep_ratio,
        router="learned" if model.cfg.has_layer_experts else None,
    )
    exit_at, mod_ratio, exit_ratio = choose_exit_layer(model, mod_opts, sink, context_frames)
    variants = build_variants(checkpoint, model, Path(twin) if twin else None, base, exit_at)
    say(f"{len(variants)} variants on {streams} held-out streams x {frames} frames")
    data = held_out_streams(streams, seed_start, frames, stage)
    gates = router_gates(model, tok, data[:4], checkpoint_delay(checkpoint))
    tmp = None if bundles_dir else Path(tempfile.mkdtemp(prefix="onsight-ablation-"))
    out_dir = Path(bundles_dir) if bundles_dir else tmp
    try:
        rows = [
            run_variant(
                v, data, out_dir, window_s, context_frames, threads, threshold, say, stream_bar
            )
            for v in variants
        ]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if tmp is not None:
        for row in rows:
            row.pop("bundle", None)  # deleted with the temporary directory
    return {
        "checkpoint": str(checkpoint),
        "twin": str(twin) if twin else None,
        "streams": streams,
        "seed_start": seed_start,
        "frames": frames,
        "window_s": window_s,
        "world_stage": stage,
        "context_frames": context_frames,
        "kv_capacity": base.kv_capacity,
        "early_exit": {
            "layers_passed": exit_at,
            "target_flops_vs_full": mod_ratio,
            "achieved_flops_vs_full": exit_ratio,
        },
        "router_gates": gates,
        "rows": rows,
        "targets": targets(rows),
    }


def router_gates(
    model: StreamingModel,
    tok: Path,
    data: Sequence[Stream],
    delay: NarrationDelay = NarrationDelay(),
) -> dict[str, Any]:
    """How much of its routed layer a kept vision token gets: the mean weight w of its update
    x + w * (block(x) - x), per routed layer, over `data` (1.0 with the straight-through gate),
    laid out with the checkpoint's narration `delay` as it was trained.
    Near 0, the layer is switched off for vision tokens whichever ones the router keeps."""
    import torch
    from tokenizers import Tokenizer

    from onsight.exporter.demo.data import build_example
    from onsight.exporter.demo.objective import batched_hidden
    from onsight.runtime.preprocess import preprocess_batch
    from onsight.runtime.template import build_template_ids

    mod = model.cfg.mod
    out: dict[str, Any] = {"gate": mod.gate, "streams": len(data), "mean_kept_weight": {}}
    if not model.cfg.has_layer_experts or mod.router != "learned" or not 0 < mod.keep_ratio < 1:
        return out
    if mod.gate == "straight":  # w = 1 by construction: nothing to measure
        out["mean_kept_weight"] = {str(i): 1.0 for i in sorted(model.decoder.routed)}
        return out
    t = Tokenizer.from_file(str(tok))
    ids = build_template_ids(t, dataclasses.asdict(model.cfg.template))
    v_id = t.token_to_id(model.cfg.template.v_token)
    pre = dataclasses.asdict(model.cfg.preprocess)
    k = mod.k(model.cfg.tokens_per_frame)
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in sorted(model.decoder.routed)}
    for stream in data:
        ex = build_example(
            stream,
            ids,
            lambda s: t.encode(s, add_special_tokens=False).ids,
            v_id,
            model.cfg.tokens_per_frame,
            delay,
        )
        frames = preprocess_batch(list(ex.frames), pre)  # as the bundle would see them
        scores: list[torch.Tensor] = []
        with torch.no_grad():
            batched_hidden(
                model,
                torch.from_numpy(ex.ids)[None],
                torch.from_numpy(frames)[None],
                torch.from_numpy(ex.frame_pos)[None],
                None,
                scores,
            )
        for i, score in zip(kept, scores):
            top = kept_indices(score, k, mod.keep_last)
            kept[i].append(torch.sigmoid(score.gather(-1, top)).flatten())
    out["mean_kept_weight"] = {str(i): float(torch.cat(w).mean()) for i, w in kept.items()}
    return out


def _sink_length(model: StreamingModel, tok: Path) -> int:
    from tokenizers import Tokenizer

    from onsight.runtime.template import build_template_ids

    ids = build_template_ids(Tokenizer.from_file(str(tok)), dataclasses.asdict(model.cfg.template))
    return len(ids.sink)


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 8's targets, where the rows they compare were run."""
    ok = {r["role"]: r for r in rows if r.get("status") == "ok"}
    learned, random, twin = ok.get("learned"), ok.get("random"), ok.get("twin")
    out: dict[str, Any] = {}
    if learned is not None and twin is not None:
        gap = twin["f1_exact"] - learned["f1_exact"]
        ratio = learned["vision_flops_per_frame"]["total"] / twin["vision_flops_per_frame"]["total"]
        out["f1_gap_to_twin"] = gap
        out["f1_kind_gap_to_twin"] = twin["f1_kind"] - learned["f1_kind"]
        out["flops_vs_twin"] = ratio
        out["met_quality"] = gap <= TARGET_F1_GAP
        out["met_flops"] = ratio <= TARGET_FLOPS_RATIO
    if learned is not None and random is not None:
        out["f1_learned_minus_random"] = learned["f1_exact"] - random["f1_exact"]
        out["f1_kind_learned_minus_random"] = learned["f1_kind"] - random["f1_kind"]
    return out


# ---- the report ----


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def ablation_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    events: dict[str, int] = {}
    for r in rows:
        if r["status"] == "ok":  # the same streams for every row
            events = r["narration"]["kind"]["events_by_kind"]
    kinds = sorted(events)
    lines = [
        f"Held-out streams: {report['streams']} x {report['frames']} frames (world seeds from "
        f"{report['seed_start']}, stage {report['world_stage']}), events matched within "
        f"{report['window_s']} s. FLOPs: one frame's vision tokens through the decoder, "
        f"attention over the system prompt and {report['context_frames']} cached frames.",
        "",
        "| variant | router | r (k) | vision MFLOP / frame | vs full | linear vs full "
        "| F1 exact | F1 kind | question acc. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | - | - | - | - | - | - | - |")
            continue
        fl = r["vision_flops_per_frame"]["total"] / 1e6
        lines.append(
            f"| {r['variant']} | {r['router'] if 0 < r['keep_ratio'] < 1 else '-'} | "
            f"{r['keep_ratio']:g} ({r['k']}) | {fl:.2f} | {r['flops_vs_full']:.2f}x | "
            f"{r['linear_flops_vs_full']:.2f}x | {r['f1_exact']:.3f} | {r['f1_kind']:.3f} | "
            f"{_f(r['question_accuracy'])} |"
        )
    for mode, title in (("kind", "right kind, any object"), ("exact", "exact text")):
        lines += ["", f"Recall by event type ({title}):", ""]
        lines.append("| variant | " + " | ".join(f"{k} ({events[k]})" for k in kinds) + " |")
        lines.append("| --- |" + " --- |" * len(kinds))
        for r in rows:
            rec = r.get(f"recall_by_kind_{mode}", {})
            cells = [_f(rec.get(k)) for k in kinds]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    ee, t = report["early_exit"], report["targets"]
    lines += [
        "",
        f"Early exit: vision tokens pass {ee['layers_passed']} layers, "
        f"{ee['achieved_flops_vs_full']:.2f}x full-compute FLOPs (MoD: "
        f"{ee['target_flops_vs_full']:.2f}x).",
    ]
    gates = report.get("router_gates", {})
    if gates.get("mean_kept_weight"):
        w = ", ".join(f"layer {i}: {v:.3f}" for i, v in gates["mean_kept_weight"].items())
        lines.append(
            f"Learned routers' weight on kept tokens' updates ({gates['gate']} gate), mean over "
            f"{gates['streams']} held-out streams: {w}."
        )
    if "f1_gap_to_twin" in t:
        lines.append(
            f"Target (learned MoD within {TARGET_F1_GAP * 100:.0f} F1 points of the twin at <= "
            f"{TARGET_FLOPS_RATIO}x its FLOPs): F1 gap {t['f1_gap_to_twin'] * 100:+.1f} points "
            f"(kind: {t['f1_kind_gap_to_twin'] * 100:+.1f}), FLOPs {t['flops_vs_twin']:.2f}x: "
            + ("met" if t["met_quality"] and t["met_flops"] else "not met")
            + "."
        )
    else:
        lines.append("Target vs the full-compute twin: not measured (no twin checkpoint).")
    if "f1_learned_minus_random" in t:
        lines.append(
            f"Learned minus random routing: {t['f1_learned_minus_random'] * 100:+.1f} F1 points "
            f"exact, {t['f1_kind_learned_minus_random'] * 100:+.1f} kind."
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], json_path: str | Path) -> tuple[Path, Path]:
    """The report as JSON and, beside it, as markdown (same name, .md)."""
    json_path = write_text_atomic(json_path, json.dumps(report, indent=2))
    md = write_text_atomic(json_path.with_suffix(".md"), ablation_markdown(report) + "\n")
    return json_path, md
