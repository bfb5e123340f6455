"""`onsight bench`: speed and memory of onsight and its peers, on the same weights and frames.

Builds what a preset needs once (random weights: compute does not depend on their values) in
a cache directory, then measures every configuration in one process, interleaved, and writes
results.json, results.md and PNG plots. Numbers in onsight's README come from here only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onsight.exporter import bench_e2e as e2e
from onsight.exporter import bench_peers as peers
from onsight.exporter import bench_report as report
from onsight.exporter.bench_build import (
    GRAPH_SOURCES,
    PRESETS,
    REPO,
    SHARED_VIDEOS,
    Workspace,
    build_engine,
    build_preset,
)
from onsight.runtime.bundle import Bundle, load_bundle
from onsight.runtime.cli import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT
from onsight.runtime.errors import OnsightError
from onsight.runtime.stream_loop import TemplateIds
from onsight.runtime.template import bundle_template_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    """Flags of `onsight bench`."""

    preset: str | None  # demo | 0.5b | 8b (None with --engine)
    engine: Path | None  # an existing bundle instead of a preset
    backend: str  # auto | onnxruntime:cpu | onnxruntime:cuda
    out: Path  # results folder
    cache: Path  # built bundles and peers, reused by the next run
    video: Path | None  # real video for end-to-end runs (None: skipped)
    iters: int  # timed rounds of the interleaved step measurements
    warmup: int  # untimed rounds first
    quick: bool  # small everything, for tests and smoke runs
    e2e_frames: int  # frames per end-to-end run
    memory_frames: int  # frames of the long stream (0: enough to evict)
    budget_mb: float  # KV budget for "frames that fit"
    fill_tokens: int = 300  # warm cache fill before each measured step
    speak_every: int = 10  # random weights: speak after every n-th frame
    narration_tokens: int = 12  # random weights: tokens per narration


# ---- measurements ----


def _template(b: Bundle) -> TemplateIds:
    from tokenizers import Tokenizer

    return bundle_template_ids(Tokenizer.from_file(str(b.tokenizer_path)), b)


class Bench:
    """One benchmark run: the workspace, the options and the results being filled in."""

    def __init__(self, ws: Workspace, o: BenchOptions, res: dict[str, Any]):
        self.ws, self.o, self.res = ws, o, res
        self.device = _device(o.backend)
        self.pixels = self.embeds = np.zeros(0)

    def _record(self, times: dict[str, list[float]], floors: dict[str, dict | None]) -> None:
        for name, ms in times.items():
            fp32_prefill = name.split(" ")[0] in ("onsight", "torch", "optimum")
            key = "prefill" if fp32_prefill and not name.endswith("int8") else "other_steps"
            self.res[key][name] = st = peers.summarize(ms)
            if name.startswith("decode"):
                st["tokens_per_s"] = 1e3 / st["median_ms"]
            floor = report.efficiency(floors.get(name), st["median_ms"], self.res["peaks"])
            self.res["floors"][name] = floor

    def steps(self) -> None:
        """Frame prefill at every keep ratio, the vision encoder and the peers, interleaved."""
        ws, o = self.ws, self.o
        ratios = sorted(ws.bundles, reverse=True)
        b0 = load_bundle(ws.bundles[ratios[0]], verify=False)
        vis = peers.GraphSessions(b0, {"vision": b0.graph_path("vision")}, self.device)
        fps = float(b0.generation.get("fps", 2.0))
        self.pixels = px = peers.sample_frames(o.video, 4 if o.quick else 8, fps, b0.image_size)
        self.embeds = vis.encode(px)
        ids = _template(b0)
        warm = peers.warm_stream(ids, self.embeds, o.fill_tokens)
        dims, N = report.LMDims.from_manifest(b0.manifest), b0.tokens_per_frame
        probes, floors = [], {}
        for r in ratios:
            b = load_bundle(ws.bundles[r], verify=False)
            gs = peers.GraphSessions(b, {"frame_step": b.graph_path("frame_step")}, self.device)
            sp = peers.StepperProbes(gs.stepper(), warm, self.embeds, ids.interval_id)
            probes.append(sp.frame(f"onsight r={r}"))
            toks = [1 + (b.layout.k if i in b.layout.routed else N) for i in range(dims.layers)]
            floors[f"onsight r={r}"] = report.step_floor(dims, toks, sp.lengths, 4, sp.spans)
        name = "vision encoder (1 frame)"
        probes.append(peers.Probe(name, lambda i: vis.encode(px[i % len(px)][None])))
        floors[name] = report.vision_floor(ws.vision, b0.image_size, dims.hidden,
                                           ws.projector_hidden)  # fmt: skip
        fill = sum(len(t) + len(f) for t, f in warm)
        dense = report.step_floor(dims, [1 + N] * dims.layers, [fill] * dims.layers, 4)
        if ws.hf_lm:
            tp = peers.TorchPeer(ws.hf_lm, warm, self.embeds, ids.interval_id)
            probes += [tp.probe("torch eager (VideoLLM-online style)", last_only=False),
                       tp.probe("torch eager (logits_to_keep=1)", last_only=True),
                       tp.probe("torch eager (logits_to_keep=1, 1 thread)", True, 1)]  # fmt: skip
        if ws.optimum:
            ep = "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"
            op = peers.OptimumPeer(ws.optimum, warm, N, ids.interval_id, dims.vocab, ep)
            probes.append(op.probe("optimum ORTModelForCausalLM"))
            self.res["meta"]["notes"].append(
                "optimum's ORTModelForCausalLM takes input_ids only, so each frame is fed as "
                f"{N} stand-in token ids (same sequence length and compute as {N} vision tokens)"
            )
        floors.update({p.name: dense for p in probes if p.name.startswith(("torch", "optimum"))})
        log.info("timing %d configurations x %d rounds, interleaved", len(probes), o.iters)
        self._record(peers.interleave(probes, o.iters, o.warmup), floors)

    def variant(self, label: str, path: Path, int8: bool) -> None:
        """Decode tokens/s (and for int8: prefill and vision) through the runtime's OrtSessions."""
        from onsight.runtime.ort_backend import OrtSessions

        b, px = load_bundle(path, verify=False), self.pixels
        s = OrtSessions(b, self.device, use_overrides=int8)
        ids = _template(b)
        warm = peers.warm_stream(ids, self.embeds, self.o.fill_tokens)
        sp = peers.StepperProbes(s.stepper(), warm, self.embeds, ids.interval_id)
        token = int(b.manifest["token_ids"]["interval"]) + 1  # any ordinary token
        probes = [sp.decode(f"decode 1 token, {label}", token)]
        if int8:
            probes += [peers.Probe(f"vision encoder (1 frame) {label}",
                                   lambda i: s.encode(px[i % len(px)][None]))]  # fmt: skip
        dims = report.LMDims.from_manifest(b.manifest)
        floor = report.step_floor(dims, [1] * dims.layers, sp.lengths, 1 if int8 else 4, sp.spans)
        self._record(peers.interleave(probes, self.o.iters, self.o.warmup), {probes[0].name: floor})
        s.close()

    def int8_steps(self) -> None:
        """Frame prefill with int8 weights (the CPU deployment), MoD and full compute
        interleaved: on CPU, layers of few tokens are bound by reading their weights, which
        int8 makes 4x smaller."""
        ws, o = self.ws, self.o
        pairs = [(1.0, ws.int8_full), (ws.ship_ratio, ws.int8)]
        if not all(p for _, p in pairs) or ws.ship_ratio == 1.0:
            return
        probes, floors = [], {}
        for r, path in pairs:
            b = load_bundle(path, verify=False)
            graph = b.path / b.manifest["graph_overrides"]["frame_step"]
            gs = peers.GraphSessions(b, {"frame_step": graph}, "cpu")  # int8 is for CPUs
            ids = _template(b)
            warm = peers.warm_stream(ids, self.embeds, o.fill_tokens)
            sp = peers.StepperProbes(gs.stepper(), warm, self.embeds, ids.interval_id)
            probes.append(sp.frame(f"onsight r={r} int8"))
        log.info("timing int8 frame prefill, r=1.0 and r=%s x %d rounds", ws.ship_ratio, o.iters)
        self._record(peers.interleave(probes, o.iters, o.warmup), floors)

    def runtime(self) -> None:
        """Decode, then end to end on a real video and memory over a long stream (Assistant)."""
        from onsight.runtime.assistant import AssistantConfig

        ws, o = self.ws, self.o
        variants = [("fp32", ws.bundles[ws.ship_ratio], False)]
        variants += [("int8", ws.int8, True)] if ws.int8 else []
        for label, path, int8 in variants:
            log.info("decode and runtime steps: %s r=%s", label, ws.ship_ratio)
            self.variant(label, path, int8)
        modes = ["realtime", "fast", "fast+skip"]
        if "prune_static_tokens" in {f.name for f in dataclasses.fields(AssistantConfig)}:
            modes.append("fast+prune")  # the other training-free extra, once the runtime has it
        runs = [(f"{lbl} r={ws.ship_ratio}", p, modes) for lbl, p, _ in variants]
        if o.quick:
            runs = runs[-1:]  # the lightest shipped variant only
        elif 1.0 in ws.bundles and ws.ship_ratio != 1.0:
            runs.append(("fp32 r=1.0", ws.bundles[1.0], ["fast"]))
        memory_on = runs[-1 if o.quick else len(variants) - 1][0]
        for label, path, run_modes in runs:
            for prune in (False, True):  # pruning is fixed when the Assistant starts
                todo = [m for m in run_modes if m.endswith("+prune") == prune] if o.video else []
                memory = label == memory_on and not prune
                if todo or memory:
                    self._assistant(label, path, todo, memory, prune)

    def _assistant(self, label: str, path: Path, modes: list[str], memory: bool, prune: bool):
        from onsight.runtime.assistant import Assistant, AssistantConfig

        o, extra = self.o, {"prune_static_tokens": True} if prune else {}
        with Assistant(path, AssistantConfig(backend=o.backend, stats_every=10**9, **extra)) as a:
            if self.ws.scripted:
                t = a.bundle.manifest["token_ids"]
                # no public hook yet: wrap the stepper the Assistant's loop calls
                a._stepper.inner = e2e.ScriptedSpeech(
                    a._stepper.inner, int(t["interval"]), int(t["eos"]), o.speak_every,
                    o.narration_tokens)  # fmt: skip
            for mode in modes:
                log.info("end to end: %s, %s, %d frames", label, mode, o.e2e_frames)
                self.res["e2e"].append(e2e.run_e2e(a, o.video, label, mode, o.e2e_frames))
            if memory:
                log.info("resident memory over a long stream: %s", label)
                self.res["memory"] = e2e.rss_stream(a, label, o.memory_frames)
        gc.collect()


# ---- the command ----


def parse_args(argv: list[str]) -> BenchOptions:
    p = argparse.ArgumentParser(prog="onsight bench", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: demo)")
    g.add_argument("--engine", type=Path, help="an existing bundle, e.g. engines/demo")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "onnxruntime", "onnxruntime:cpu",
                                              "onnxruntime:cuda"],
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, help=f"results folder (default {REPO / 'bench' / 'results'}/NAME)"
    )
    p.add_argument("--cache-dir", type=Path, help="built bundles and peers (reused)")
    p.add_argument(
        "--video", type=Path, help="real video (default: the largest in ../shared/videos)"
    )
    p.add_argument("--iters", type=POSITIVE_INT, help="timed rounds (default 20; 3 with --quick)")
    p.add_argument("--e2e-frames", type=POSITIVE_INT, help="frames per end-to-end run (default 40)")
    p.add_argument(
        "--memory-frames", type=NON_NEGATIVE_INT, default=0, help="long stream length (0: evicts)"
    )
    p.add_argument(
        "--budget-mb", type=POSITIVE, default=1024.0, help="KV budget for frames that fit"
    )
    p.add_argument(
        "--speak-every", type=POSITIVE_INT, default=10, help="random weights: speak every Nth frame"
    )
    p.add_argument(
        "--narration-tokens", type=POSITIVE_INT, default=12, help="random weights: tokens per turn"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: few iterations and frames")
    a = p.parse_args(argv)
    if a.engine:
        load_bundle(a.engine, verify=False)  # a wrong --engine is refused before any building
    for flag, d in (("--out", a.out), ("--cache-dir", a.cache_dir)):
        _check_writable_dir(flag, d)
    preset = None if a.engine else (a.preset or "demo")
    name = preset or a.engine.name
    spec = dataclasses.asdict(PRESETS[preset]) if preset else str(a.engine.resolve())
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for src in GRAPH_SOURCES:  # graphs from an older exporter are rebuilt, not measured
        h.update((REPO / "exporter" / src).read_bytes())
    key = h.hexdigest()[:8]
    return BenchOptions(
        preset=preset, engine=a.engine, backend=a.backend,
        out=a.out or REPO / "bench" / "results" / name,
        cache=a.cache_dir or Path.home() / ".cache" / "onsight" / "bench" / f"{name}-{key}",
        video=peers.pick_video(a.video, SHARED_VIDEOS),
        iters=a.iters or (3 if a.quick else 20), warmup=1 if a.quick else 3, quick=a.quick,
        e2e_frames=a.e2e_frames or (6 if a.quick else 40),
        memory_frames=a.memory_frames or (12 if a.quick else 0), budget_mb=a.budget_mb,
        speak_every=a.speak_every, narration_tokens=a.narration_tokens,
    )  # fmt: skip


def _check_writable_dir(flag: str, d: Path | None) -> None:
    """Refuse an --out or --cache-dir that cannot be a folder, before minutes of measuring."""
    from onsight.runtime.files import why_unwritable

    if d is None:
        return
    if d.exists() and not d.is_dir():
        raise OnsightError(f"{flag} {d} is a file; give a folder (it is created if missing)")
    problem = None if d.exists() else why_unwritable(d)
    if problem:
        raise OnsightError(f"{flag} {d}: {problem}; choose another folder")


def _device(backend: str) -> str:
    """`onnxruntime:cuda` -> cuda; `auto`, `onnxruntime` -> auto."""
    return backend.split(":")[1] if ":" in backend else "auto"


def _check_gpu(o: BenchOptions) -> None:
    import onnxruntime

    offered = onnxruntime.get_available_providers()
    if not (o.preset and PRESETS[o.preset].gpu_only):
        return
    if "CUDAExecutionProvider" not in offered or _device(o.backend) == "cpu":
        raise OnsightError(
            f"the {o.preset} preset is GPU only (16 GB of fp16 weights; seconds per frame on a "
            "CPU): run it on a machine with an NVIDIA GPU and onnxruntime-gpu, with --backend "
            f"onnxruntime:cuda; onnxruntime here offers {', '.join(offered)}"
        )


def _meta(o: BenchOptions, ws: Workspace) -> dict[str, Any]:
    b = load_bundle(ws.bundles[ws.ship_ratio], verify=False)
    return {
        "preset": o.preset or str(o.engine), "machine": report.machine(),
        "versions": report.versions(), "date": dt.datetime.now().isoformat(timespec="seconds"),
        "iters": o.iters, "warmup": o.warmup, "fill_tokens": o.fill_tokens,
        "tokens_per_frame": b.tokens_per_frame, "backend": o.backend, "cache": str(o.cache),
        "video": str(o.video) if o.video else None, "notes": list(ws.notes),
        "load_average_start": os.getloadavg(),
    }  # fmt: skip


def run(o: BenchOptions) -> dict[str, Any]:
    _check_gpu(o)
    demo = REPO / "engines" / "demo"
    if o.engine:
        ws = build_engine(o.engine, o.cache)
    elif o.preset == "demo" and (demo / "bundle.json").is_file():
        ws = build_engine(demo, o.cache)
    else:
        ws = build_preset(PRESETS[o.preset or "demo"], o.cache)
    layouts = {r: load_bundle(p, verify=False).layout for r, p in ws.bundles.items()}
    res: dict[str, Any] = {
        "meta": _meta(o, ws), "ship_ratio": ws.ship_ratio, "prefill": {}, "other_steps": {},
        "floors": {}, "e2e": [], "kv": report.kv_table(layouts, ws.ship_ratio, o.budget_mb),
        "memory": {},
    }  # fmt: skip
    log.info("measuring this machine's matmul and copy peaks")
    res["peaks"] = e2e.machine_peaks(o.quick)
    bench = Bench(ws, o, res)
    bench.steps()
    bench.int8_steps()
    gc.collect()
    notes = res["meta"]["notes"]
    if o.video is None:
        notes.append(f"no real video ({SHARED_VIDEOS} is missing): end-to-end runs skipped; "
                     "steps measured on synthetic frames")  # fmt: skip
    bench.runtime()
    if ws.scripted:
        notes.append(f"random weights would speak after every frame, so the end-to-end runs "
                     f"script the decision: speak after every {o.speak_every}th frame, "
                     f"{o.narration_tokens} tokens each (all compute still runs)")  # fmt: skip
    return res


@contextlib.contextmanager
def _bench_logging() -> Iterator[None]:
    """Progress lines on stderr while the bench runs; the logger is put back afterwards, so
    a bench run inside a longer process (the tests) leaves its logging as it was."""
    lg = logging.getLogger("onsight.exporter")
    saved = (lg.level, lg.propagate)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s bench: %(message)s", "%H:%M:%S"))
    lg.addHandler(h)
    lg.propagate = False  # the CLI's root handler would print every line twice
    if lg.level == logging.NOTSET or lg.level > logging.INFO:
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        lg.removeHandler(h)
        lg.setLevel(saved[0])
        lg.propagate = saved[1]


def main(argv: list[str]) -> int:
    with _bench_logging():
        return _main(argv)


def _main(argv: list[str]) -> int:
    argv = list(argv)
    o = parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `onsight bench -- --flags`
    t = time.perf_counter()
    res = run(o)
    res["meta"]["wall_s"] = round(time.perf_counter() - t, 1)
    res["meta"]["load_average_end"] = os.getloadavg()
    js, md, pngs = report.write_all(res, o.out)
    print(md.read_text())
    print(f"wrote {js}, {md} and {len(pngs)} plots in {o.out}", file=sys.stderr)
    return 0
