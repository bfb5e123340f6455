"""`onsight bench` output: FLOP and byte floors from the dims, targets, markdown, PNG plots."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onsight.runtime.files import write_text_atomic
from onsight.runtime.kv_cache import KVLayout

# ---- floors: the work a step cannot avoid, from the model's dims ----


@dataclass(frozen=True)
class LMDims:
    """Decoder dims, read from a bundle's manifest."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> LMDims:
        d = m["model"]
        return cls(
            int(d["hidden_size"]),
            int(d["num_layers"]),
            int(d["num_heads"]),
            int(d["num_kv_heads"]),
            int(d["head_dim"]),
            int(d["intermediate_size"]),
            int(d["vocab_size"]),
        )

    @property
    def layer_params(self) -> int:
        """Matmul weights of one layer: q, k, v, o projections and the gated MLP."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * q + kv + 3 * self.hidden * self.intermediate

    def kv_token_bytes(self, itemsize: int) -> int:
        return 2 * self.kv_heads * self.head_dim * itemsize


def step_floor(d: LMDims, tokens: Sequence[int], ctx: Sequence[int], weight_bytes: float,
               attended: Sequence[int] | None = None, kv_bytes: int = 4) -> dict[str, float]:  # fmt: skip
    """One decoder step: `tokens[i]` tokens go through layer i, which attends over `ctx[i]`
    cached tokens. FLOPs = 2 * weights touched * tokens + attention (QK^T and PV) + the
    lm_head on the last token only; bytes = every weight read once + the KV read and written.
    With `attended` (per layer, the cache slots the graph actually reads: the runtime's
    span, valid slots rounded up), `gflop_as_run` counts attention over those, masked
    slots included, instead of over the valid tokens only."""

    def flops(context: Sequence[int]) -> float:
        f = 2.0 * d.vocab * d.hidden
        for t, c in zip(tokens, context, strict=True):
            f += 2.0 * d.layer_params * t + 4.0 * d.heads * d.head_dim * t * (c + t)
        return f

    weights = (d.layers * d.layer_params + d.vocab * d.hidden) * weight_bytes
    kv = (sum(ctx) + sum(tokens)) * d.kv_token_bytes(kv_bytes)
    # per part (each layer, then the lm_head): the roofline takes the slower of compute and
    # memory part by part, since a layer of few tokens is bound by reading its weights
    parts = [
        (
            (2.0 * d.layer_params * t + 4.0 * d.heads * d.head_dim * t * (c + t)) / 1e9,
            (d.layer_params * weight_bytes + (c + t) * d.kv_token_bytes(kv_bytes)) / 1e6,
        )
        for t, c in zip(tokens, ctx, strict=True)
    ]
    parts.append((2.0 * d.vocab * d.hidden / 1e9, d.vocab * d.hidden * weight_bytes / 1e6))
    out = {"gflop": flops(ctx) / 1e9, "mbytes": (weights + kv) / 1e6, "parts": parts}
    if attended is not None:
        out["gflop_as_run"] = flops(attended) / 1e9
    return out


def vision_floor(
    vision: dict[str, Any] | None, image_size: int, llm_hidden: int, projector_hidden: int = 0
) -> dict[str, float] | None:
    """One frame through the tower, the pooling matrix and the projector (None: dims unknown)."""
    if not vision:
        return None
    h = int(vision["hidden_size"])
    grid, pooled = int(vision["grid"]), bool(vision.get("use_pooled", True))
    ph = projector_hidden or llm_hidden
    n_tok = grid * grid + int(pooled)
    if vision["kind"] == "tiny":
        flops, params, c_in, side = 0.0, 0, 3, image_size
        for c in vision.get("tiny_channels", (32, 64, 128)):
            side = math.ceil(side / 2)
            flops += 2.0 * c_in * 9 * c * side * side
            params += c_in * 9 * c
            c_in = c
        patches = side * side
        blocks = int(vision.get("tiny_blocks", 0))
        flops += blocks * 2.0 * c_in * 9 * c_in * patches
        params += blocks * c_in * 9 * c_in
        flops += 2.0 * c_in * h * patches + 2.0 * h * h
        params += c_in * h + h * h
    else:
        hf = vision.get("hf_config") or {}
        if not hf:
            return None
        p, inter, layers = (
            int(hf["patch_size"]),
            int(hf["intermediate_size"]),
            int(hf["num_hidden_layers"]),
        )
        patches = (int(hf["image_size"]) // p) ** 2
        layer = 4 * h * h + 2 * h * inter
        params = 3 * p * p * h + layers * layer
        flops = 2.0 * 3 * p * p * h * patches + layers * (
            2.0 * layer * patches + 4.0 * patches**2 * h
        )
        if vision["kind"] == "siglip":  # attention-pooling head: k, v over every patch + MLP
            params += 4 * h * h + 2 * h * inter
            flops += 2.0 * 2 * h * h * patches + 2.0 * (2 * h * h + 2 * h * inter)
    flops += 2.0 * grid * grid * patches * h + 2.0 * n_tok * (h * ph + ph * llm_hidden)
    params += h * ph + ph * llm_hidden
    return {"gflop": flops / 1e9, "mbytes": params * 4 / 1e6}


def efficiency(floor: dict[str, float] | None, median_ms: float, peaks: dict[str, float]) -> dict:
    """Achieved GFLOP/s and the floor time max(FLOPs / peak, bytes / bandwidth) over measured."""
    if not floor or not median_ms:
        return {}
    s = median_ms / 1e3
    flop_s, byte_s = peaks["peak_gflops"], peaks["copy_gbps"] * 1e3
    t_floor = max(floor["gflop"] / flop_s, floor["mbytes"] / byte_s)
    if floor.get("parts"):  # roofline, part by part (never below the whole-step bound)
        t_floor = max(t_floor, sum(max(g / flop_s, mb / byte_s) for g, mb in floor["parts"]))
    return {
        **{k: v for k, v in floor.items() if k != "parts"},
        "achieved_gflops": floor["gflop"] / s,
        "floor_ms": t_floor * 1e3,
        "of_floor": t_floor / s,
    }


# ---- KV cache and the environment ----


def kv_table(layouts: dict[float, KVLayout], ship: float, budget_mb: float) -> dict[str, Any]:
    """KV bytes per frame and frames that fit in the budget, per keep ratio and dense."""
    budget = int(budget_mb * 2**20)
    configs = {}
    for r in sorted(layouts, reverse=True):
        lay, mod = layouts[r], bool(layouts[r].routed)
        configs[f"r={r}" + (" (MoD)" if mod else " (dense)")] = {
            "bytes_per_frame": lay.bytes_per_frame(mod=mod),
            "frames_in_budget": lay.frames_in_budget(budget, mod=mod),
        }
    lay = layouts[ship]
    dense, mod = lay.frames_in_budget(budget, mod=False), lay.frames_in_budget(budget, mod=True)
    if not any(k.endswith("(dense)") for k in configs):
        configs["dense"] = {
            "bytes_per_frame": lay.bytes_per_frame(mod=False),
            "frames_in_budget": dense,
        }
    return {"budget_mb": budget_mb, "configs": configs, "fit_ratio": mod / max(1, dense)}


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def versions() -> str:
    import onnxruntime
    import torch
    import transformers

    return (
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


# ---- targets (issue 7): measured, then compared ----


def _status(value: float | None, ok: bool | None, goal: str) -> str:
    if value is not None and "info" in goal:
        return "info"
    return "n/a" if value is None or ok is None else ("PASS" if ok else "MISS")


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    pre = {k: v["median_ms"] for k, v in r.get("prefill", {}).items()}
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, ok: bool | None, note: str = "") -> None:
        rows.append(
            {
                "target": name,
                "value": value,
                "goal": target,
                "status": _status(value, ok, target),
                "note": note,
            }
        )

    ship = f"onsight r={r['ship_ratio']}"
    full, mod = pre.get("onsight r=1.0"), pre.get(ship)
    ratio = mod / full if full and mod and r["ship_ratio"] < 1.0 else None
    fl = r.get("floors", {})
    g_full, g_mod = (fl.get(k, {}).get("gflop") for k in ("onsight r=1.0", ship))
    note = f"FLOP floor ratio {g_mod / g_full:.2f}x" if g_full and g_mod else ""
    t_full, t_mod = (fl.get(k, {}).get("floor_ms") for k in ("onsight r=1.0", ship))
    if t_full and t_mod:
        note += f"; roofline ratio {t_mod / t_full:.2f}x (compute or weight reads, per layer)"
    add(f"MoD r={r['ship_ratio']} prefill / r=1.0", ratio, "<= 0.65x",
        None if ratio is None else ratio <= 0.65, note)  # fmt: skip
    other = {k: v["median_ms"] for k, v in r.get("other_steps", {}).items()}
    q_full, q_mod = other.get("onsight r=1.0 int8"), other.get(f"{ship} int8")
    q = q_mod / q_full if q_full and q_mod and r["ship_ratio"] < 1.0 else None
    add(f"MoD r={r['ship_ratio']} prefill / r=1.0, int8 weights", q, "(info)", None,
        "int8 (the CPU deployment) reads 4x fewer weight bytes but adds per-op costs")  # fmt: skip
    torch_rows = {k: v for k, v in pre.items() if k.startswith("torch")}
    fastest = min(torch_rows, key=torch_rows.get) if torch_rows else None
    peers = [("torch eager (VideoLLM-online style)", "PyTorch eager, VideoLLM-online style")]
    if fastest != peers[0][0]:
        peers += [
            (fastest, f"fastest PyTorch eager {(fastest or '').removeprefix('torch eager ')}")
        ]
    peers += [("optimum ORTModelForCausalLM", "optimum ORTModelForCausalLM")]
    for peer, label in peers:
        for cfg in (ship, "onsight r=1.0") if ship != "onsight r=1.0" else (ship,):
            p, o = pre.get(peer or ""), pre.get(cfg)
            v = p / o if p and o else None
            goal = ">= 1.5x" if peer and peer.startswith("torch") else "> 1.0x"
            ok = None if v is None else v >= 1.5 if goal == ">= 1.5x" else v > 1.0
            if cfg != ship:  # the same compute as the dense peer: shown, not a target
                goal, ok = "(same compute, info)", None
            add(f"{cfg} vs {label}: speed-up", v, goal, ok)
    rt = next(
        (
            e
            for e in r.get("e2e", [])
            if e["variant"].startswith("int8") and e["mode"] == "realtime"
        ),
        None,
    )
    add(
        "int8 end to end, real time",
        rt["fps_processed"] if rt else None,
        ">= 2 frames/s, every sampled frame processed",
        (rt["target_fps"] >= 2.0 and rt["all_sampled_processed"]) if rt else None,
        f"{rt['frames_processed']} frames processed at the bundle's {rt['target_fps']} fps, "
        f"{rt['frames_dropped']} dropped"
        if rt
        else "no int8 bundle or no video",
    )
    kv = r.get("kv", {})
    v = kv.get("fit_ratio")
    add(
        f"KV frames in {kv.get('budget_mb', 0):.0f} MiB, MoD / dense",
        v,
        ">= 1.6x",
        None if v is None else v >= 1.6,
    )
    return rows


# ---- markdown ----


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _load(x: Sequence[float] | None) -> str:
    return "-" if not x else "/".join(f"{v:.1f}" for v in x)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += [
        "| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |"
        for row in rows
    ]
    return out + [""]


def markdown(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [
        f"# onsight bench: preset `{m['preset']}`",
        "",
        f"{m['machine']}; {m['versions']}; {m['date']}; {m['iters']} timed iterations "
        f"(+{m['warmup']} warm-up) interleaved round-robin; cache fill {m['fill_tokens']} "
        f"tokens; {m['tokens_per_frame']} tokens per frame; load average "
        f"{_load(m.get('load_average_start'))} at start, {_load(m.get('load_average_end'))} "
        f"at end (the cores may be shared).",
        "",
        "## Per-frame steps (median and p95 over interleaved runs)",
        "",
    ]
    rows = []
    base = r.get("prefill", {}).get("onsight r=1.0", {}).get("median_ms")
    for name, s in {**r.get("prefill", {}), **r.get("other_steps", {})}.items():
        e = r.get("floors", {}).get(name, {})
        rel = f"{s['median_ms'] / base:.2f}x" if base and name in r["prefill"] else "-"
        share = f"{100 * e['of_floor']:.0f}%" if e else "-"
        rows.append([name, s["median_ms"], s["p95_ms"], rel, _g(e.get("gflop")),
                     _g(e.get("gflop_as_run")), _g(e.get("achieved_gflops")),
                     _g(e.get("floor_ms")), share])  # fmt: skip
    lines += _table(["step", "median ms", "p95 ms", "time / onsight r=1.0", "GFLOP (floor)",
                     "GFLOP as run (attended span)", "achieved GFLOP/s",
                     "floor ms", "floor / achieved"], rows)  # fmt: skip
    if r.get("e2e"):
        lines += ["## End to end (Assistant.narrate on a real video, capture and decoding "
                  "included)", ""]  # fmt: skip
        lines += _table(
            ["variant", "mode", "frames/s processed", "frames/s handled", "processed", "sampled",
             "skipped", "tokens pruned", "dropped", "every sampled frame processed"],
            [[e["variant"], e["mode"], e["fps_processed"], e["fps_handled"], e["frames_processed"],
              e["frames_sampled"], e["frames_skipped"], e.get("tokens_pruned", 0),
              e["frames_dropped"], "yes" if e["all_sampled_processed"] else "no"]
             for e in r["e2e"]])  # fmt: skip
    kv = r.get("kv", {})
    if kv:
        lines += [f"## KV cache ({kv['budget_mb']:.0f} MiB budget)", ""]
        lines += _table(
            ["config", "KV bytes per frame", "frames in budget"],
            [[k, v["bytes_per_frame"], v["frames_in_budget"]] for k, v in kv["configs"].items()],
        )
    mem = r.get("memory", {})
    if mem.get("samples"):
        rss = [s["rss_mb"] for s in mem["samples"]]
        lines += [
            "## Resident memory over a long stream",
            "",
            f"{mem['variant']}: {mem['frames']} frames pushed, {mem['evictions']} "
            f"evictions, RSS {min(rss):.0f} -> {max(rss):.0f} MiB (first {rss[0]:.0f}, "
            f"last {rss[-1]:.0f}); {mem.get('gpu', 'no GPU')}.",
            "",
        ]
    lines += ["## Targets (issue 7)", ""]
    lines += _table(
        ["target", "measured", "goal", "status", "note"],
        [
            [
                t["target"],
                t["value"] if t["value"] is None else f"{t['value']:.2f}",
                t["goal"],
                f"**{t['status']}**",
                t["note"],
            ]
            for t in r["targets"]
        ],
    )
    pk = r.get("peaks", {})
    if pk:
        lines += [
            f"Peaks on this machine: matmul {pk['peak_gflops']:.0f} GFLOP/s fp32 (numpy "
            f"{pk['numpy_gflops']:.0f}, onnxruntime {pk['ort_gflops']:.0f}), copy "
            f"{pk['copy_gbps']:.1f} GB/s. Floors count matmul FLOPs (2 x weights touched x "
            "tokens + attention + last-token lm_head) and bytes (weights read once + KV).",
            "",
        ]
    lines += ["## Notes", ""] + [f"- {n}" for n in m.get("notes", [])] + [""]
    return "\n".join(lines)


# ---- plots (matplotlib, Agg) ----


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    steps = {**r.get("prefill", {}), **r.get("other_steps", {})}
    if steps:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(steps) + 1.5))
        names = list(steps)
        med = [steps[n]["median_ms"] for n in names]
        err = [steps[n]["p95_ms"] - steps[n]["median_ms"] for n in names]
        ax.barh(names, med, xerr=[[0] * len(med), err], color="tab:blue", capsize=3)
        ax.invert_yaxis()
        if max(med) > 30 * max(min(med), 1e-3):
            ax.set_xscale("log")  # sub-ms steps beside second-long peers
        ax.set_xlabel("ms per call (bar: median, whisker: p95)")
        ax.set_title(f"{r['meta']['preset']}: per-frame steps")
        save(fig, "steps.png")
    if r.get("e2e"):
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(r["e2e"]) + 1.5))
        labels = [f"{e['variant']} {e['mode']}" for e in r["e2e"]]
        ax.barh(labels, [e["fps_processed"] for e in r["e2e"]], color="tab:green")
        ax.axvline(2.0, color="k", ls="--", lw=1, label="2 frames/s")
        ax.invert_yaxis()
        ax.set_xlabel("frames/s processed")
        ax.legend()
        save(fig, "e2e.png")
    mem = r.get("memory", {})
    if mem.get("samples"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s["frame"] for s in mem["samples"]], [s["rss_mb"] for s in mem["samples"]], "o-")
        ax.set_xlabel("frames pushed")
        ax.set_ylabel("RSS MiB")
        ax.set_title(f"resident memory, {mem['variant']}")
        save(fig, "memory.png")
    kv = r.get("kv", {}).get("configs", {})
    if kv:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(list(kv), [v["frames_in_budget"] for v in kv.values()], color="tab:orange")
        ax.set_ylabel(f"frames in {r['kv']['budget_mb']:.0f} MiB")
        save(fig, "kv.png")
    return written


def write_all(r: dict[str, Any], out: Path) -> tuple[Path, Path, list[Path]]:
    out.mkdir(parents=True, exist_ok=True)
    r["targets"] = targets(r)
    write_text_atomic(out / "results.json", json.dumps(r, indent=2, default=str))
    write_text_atomic(out / "results.md", markdown(r))
    return out / "results.json", out / "results.md", plots(r, out)
