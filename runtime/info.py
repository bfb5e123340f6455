"""`onsight info`: a human summary of a bundle."""

from __future__ import annotations

import json
from pathlib import Path

from onsight.runtime.bundle import load_bundle


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def summary(path: str | Path, budget_mb: float = 1024.0, verify: bool = False) -> dict:
    """bundle.json's summary; `verify` hashes every file (else files matched before and
    unchanged since are trusted, as every load does: `runtime/verified.py`)."""
    b = load_bundle(path, memo=not verify)
    m, lay = b.manifest, b.layout
    budget = int(budget_mb * 2**20)
    dense_frames = lay.frames_in_budget(budget, mod=False)
    mod_frames = lay.frames_in_budget(budget, mod=True)
    return {
        "name": b.name,
        "path": str(b.path),
        "format_version": m["format_version"],
        "exporter_version": m.get("exporter_version"),
        "model": {k: v for k, v in m["model"].items() if k != "rope_inv_freq"},
        "vision": m["vision"],
        "image_size": b.image_size,
        "mod": m["mod"],
        "kv": {
            "dtype": lay.dtype,
            "capacity_dense_tokens": lay.capacity_dense,
            "capacity_mod_tokens": lay.capacity_mod,
            "bytes_per_frame_dense": lay.bytes_per_frame(mod=False),
            "bytes_per_frame_mod": lay.bytes_per_frame(mod=True),
            "mod_over_dense": lay.bytes_per_frame(True) / lay.bytes_per_frame(False),
            "cache_bytes": lay.total_bytes(),
            "budget_mb": budget_mb,
            "frames_fit_budget_dense": dense_frames,
            "frames_fit_budget_mod": mod_frames,
        },
        "generation": m["generation"],
        "parity": m.get("parity"),
        "tensorrt": m.get("tensorrt"),
        "int8": m.get("int8"),
        "qdq": m.get("qdq"),
        "files": {k: v["bytes"] for k, v in m["files"].items()},
        "files_hashed": verify,
    }


def describe(
    path: str | Path, as_json: bool = False, budget_mb: float = 1024.0, verify: bool = False
) -> str:
    s = summary(path, budget_mb, verify)
    if as_json:
        return json.dumps(s, indent=2)
    mo, kv, mod = s["model"], s["kv"], s["mod"]
    lines = [
        f"bundle {s['name']}  ({s['path']}, format v{s['format_version']}, exporter {s['exporter_version']})",
        f"  decoder   {mo['architecture']}: {mo['num_layers']} layers, hidden {mo['hidden_size']}, "
        f"{mo['num_heads']} heads / {mo['num_kv_heads']} kv heads x {mo['head_dim']}, vocab {mo['vocab_size']}, "
        f"{mo['parameters'] / 1e6:.1f}M params, {mo['dtype']}",
        f"  vision    {s['vision']['kind']}, {s['image_size']} px, {s['vision']['tokens_per_frame']} tokens/frame",
        f"  MoD       keep ratio {mod['keep_ratio']} (k={mod['k']}), router {mod['router']}, "
        f"routed layers {mod['routed_layers'] or 'none'}"
        + (", each frame's last token always kept" if mod.get("keep_last") else ""),
        f"  KV        {kv['dtype']}, {kv['capacity_dense_tokens']} tokens/dense layer, "
        f"{kv['capacity_mod_tokens']} tokens/routed layer, cache {_mb(kv['cache_bytes'])}",
        f"            per frame: dense {_mb(kv['bytes_per_frame_dense'])}, MoD {_mb(kv['bytes_per_frame_mod'])} "
        f"({kv['mod_over_dense']:.2f}x)",
        f"            frames that fit in {kv['budget_mb']:.0f} MiB: dense {kv['frames_fit_budget_dense']}, "
        f"MoD {kv['frames_fit_budget_mod']} ({kv['frames_fit_budget_mod'] / max(1, kv['frames_fit_budget_dense']):.2f}x)",
        f"  speak     threshold {s['generation']['threshold']}, max {s['generation']['max_new_tokens']} "
        f"tokens, {s['generation']['fps']} fps",
    ]
    p = s["parity"]
    if p:
        lines.append(
            f"  parity    {'passed' if p['passed'] else 'FAILED'}: max |logit error| "
            f"{p['max_abs_logit_error']:.2e} (tol {p['tolerance']:.0e}, {p['dtype']}), {p['steps']} steps, "
            f"decisions {'equal' if p['same_decisions'] else 'differ'}, tokens {'equal' if p['same_tokens'] else 'differ'}"
        )
    if s["tensorrt"]:
        t = s["tensorrt"]
        lines.append(
            f"  tensorrt  {t.get('precision')} plans for {t.get('gpu')} (sm {t.get('compute_capability')}), TensorRT {t.get('tensorrt_version')}"
        )
    if s["int8"]:
        q = s["int8"]
        lines.append(
            f"  int8      top-1 agreement with fp32 {q.get('top1_agreement', 0):.3f} on {q.get('steps')} steps"
        )
    if s["qdq"]:
        q = s["qdq"]
        cal = q.get("calibration", {})
        lines.append(
            f"  qdq       TensorRT int8 graphs calibrated on {cal.get('frames')} frames of "
            f"{cal.get('source')}; top-1 agreement with fp32 {q.get('top1_agreement', 0):.3f} "
            f"on {q.get('steps')} steps"
        )
    lines.append("  files     " + ", ".join(f"{k} ({_mb(v)})" for k, v in s["files"].items()))
    if s["files_hashed"]:
        lines.append(f"            all {len(s['files'])} files match their sha256 in bundle.json")
    return "\n".join(lines)
