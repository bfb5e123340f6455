"""`onsight bench`: speed and memory of onsight and its peers, on the same weights and frames.

Builds what a preset needs once (random weights: compute does not depend on their values) in
a cache directory, then measures every configuration in one process, interleaved, and writes
results.json, results.md and PNG plots. Numbers in onsight's README come from here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onsight.exporter import bench_peers as peers
from onsight.exporter import bench_report as report
from onsight.exporter.config import ModConfig, ModelConfig, PreprocessConfig, VisionConfig
from onsight.runtime.bundle import Bundle, load_bundle
from onsight.runtime.errors import OnsightError
from onsight.runtime.stream_loop import TemplateIds
from onsight.runtime.template import build_template_ids

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"
RATIOS = (1.0, 0.5, 0.2)


@dataclass(frozen=True)
class Preset:
    """A model shape to benchmark with random weights."""

    name: str
    decoder: dict[str, Any]  # transformers config dict of the LLM
    vision: VisionConfig  # tower and frame tokens
    image_size: int  # tower input side
    kv_capacity: int = 4096  # tokens per dense layer in the bundles
    parity_frames: int = 8  # frames in the export's parity check (fewer for big models)
    gpu_only: bool = False  # refuse on a machine without CUDA


def _siglip(hidden: int, inter: int, layers: int, heads: int, image: int) -> dict[str, Any]:
    return dict(model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, image_size=image,
                patch_size=16, num_channels=3)


PRESETS = {
    # stand-in for engines/demo when it is not shipped yet: issue 8's trial-run shape
    "demo": Preset("demo", dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=192,
        intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False),
        VisionConfig(kind="tiny", hidden_size=128, grid=3, tiny_channels=(16, 32, 64)), 64,
        kv_capacity=1024, parity_frames=2),
    # Qwen2-0.5B decoder + SigLIP-base/16 at 224 (14x14 patches pooled to 1 + 7x7 = 50 tokens)
    "0.5b": Preset("0.5b", dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936,
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
        VisionConfig(kind="siglip", hidden_size=768, grid=7, hf_config=_siglip(768, 3072, 12, 12, 224)),
        224, parity_frames=2),
    # Llama-3-8B + SigLIP-L/16 at 384, VideoLLM-online's 1 + 3x3 tokens
    "8b": Preset("8b", dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False),
        VisionConfig(kind="siglip", hidden_size=1024, grid=3, hf_config=_siglip(1024, 4096, 24, 16, 384)),
        384, parity_frames=1, gpu_only=True),
}


@dataclass(frozen=True)
class BenchOptions:
    """Flags of `onsight bench`."""

    preset: str | None  # demo | 0.5b | 8b (None with --engine)
    engine: Path | None  # an existing bundle instead of a preset
    backend: str  # onnxruntime:cpu | onnxruntime:cuda | ...
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


@dataclass
class Workspace:
    """What the measurements run on."""

    bundles: dict[float, Path]  # keep ratio -> fp32 bundle
    ship_ratio: float  # the configuration onsight ships (MoD r=0.2 for presets)
    int8: Path | None = None  # that bundle with int8 graph overrides
    hf_lm: Path | None = None  # the LLM in transformers format, for the peers
    optimum: Path | None = None  # the LLM exported by optimum
    vision: dict[str, Any] | None = None  # tower dims for the vision floor
    projector_hidden: int = 0  # projector width (0: the LLM's)
    scripted: bool = True  # random weights: script when to speak
    notes: list[str] = field(default_factory=list)


# ---- building (cached) ----


def wordlevel_tokenizer(path: Path, vocab_size: int, bos: str, eos: str) -> Path:
    """A word-level tokenizer with exactly `vocab_size` ids (template words first, fillers
    after) and `<v>` appended last: the LM's embedding and lm_head get the real size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from onsight.exporter.config import DEFAULT_SYSTEM_PROMPT

    words = ["[UNK]", bos, eos, *list(",.:;[]!?'\"-()")]
    for w in (DEFAULT_SYSTEM_PROMPT + " User Assistant").replace(",", " ").replace(".", " ").split():
        if w not in words:
            words.append(w)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([bos, eos, "<v>"])
    assert tok.token_to_id("<v>") == vocab_size, "<v> must sit just outside the LM's vocabulary"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _say(msg: str) -> None:
    log.info("%s", msg)


def _export_ratios(model, tok: Path, cache: Path, ratios, kv_capacity: int, parity: int,
                   router: str | None) -> dict[float, Path]:
    from onsight.exporter.bundle_writer import ExportOptions, export_bundle

    out = {}
    for r in ratios:
        d = cache / f"r{r}"
        if not (d / "bundle.json").is_file():
            log.info("exporting the r=%s bundle to %s", r, d)
            export_bundle(model, tok, d, ExportOptions(
                keep_ratio=r, mod_layers="interleaved", router=router, kv_capacity=kv_capacity,
                parity_frames=parity), progress=_say)
        out[r] = d
    return out


def _save_hf_lm(model, d: Path) -> Path:
    if not (d / "config.json").is_file():
        model.decoder.lm.save_pretrained(d, safe_serialization=True)
    return d


def _int8(ws: Workspace, cache: Path) -> None:
    """Hard-link the shipped bundle into the cache and add int8 graphs to the copy."""
    src = ws.bundles[ws.ship_ratio]
    dst = cache / f"r{ws.ship_ratio}-int8"
    if (dst / "bundle.json").is_file() and "graph_overrides" in (dst / "bundle.json").read_text():
        ws.int8 = dst
        return
    try:
        from onsight.exporter.quantize import quantize_bundle
    except ImportError as e:
        ws.notes.append(f"int8 skipped: exporter.quantize is not available ({e})")
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            os.link(f, dst / f.name)  # write_manifest replaces bundle.json, never edits it
    try:
        quantize_bundle(dst, progress=_say)
        ws.int8 = dst
    except Exception as e:  # noqa: BLE001 - report, and measure the rest
        log.exception("int8 quantization failed")
        ws.notes.append(f"int8 skipped: quantize_bundle failed ({type(e).__name__}: {e})")


def _peers(ws: Workspace, model, cache: Path) -> None:
    ws.hf_lm = _save_hf_lm(model, cache / "hf_lm")
    d = cache / "optimum"
    if (d / "config.json").is_file():
        ws.optimum = d
        return
    try:
        log.info("exporting the dense LLM with optimum (ORTModelForCausalLM, export=True)")
        ws.optimum = peers.export_optimum(ws.hf_lm, d)
    except Exception as e:  # noqa: BLE001
        log.exception("optimum export failed")
        ws.notes.append(f"optimum peer skipped: export failed ({type(e).__name__}: {e})")


def build_preset(p: Preset, cache: Path) -> Workspace:
    import torch

    from onsight.exporter.model import StreamingModel

    cache.mkdir(parents=True, exist_ok=True)
    tpl = ModelConfig(decoder=p.decoder).template
    tok = cache / "tokenizer.json"
    if not tok.is_file():
        wordlevel_tokenizer(tok, int(p.decoder["vocab_size"]), tpl.bos, tpl.eos)
    cfg = ModelConfig(decoder=p.decoder, vision=p.vision,
                      preprocess=PreprocessConfig(image_size=p.image_size),
                      mod=ModConfig(keep_ratio=1.0, router="novelty"))
    ws = Workspace({}, min(RATIOS), vision=dataclasses.asdict(p.vision), scripted=True)
    need = [r for r in RATIOS if not (cache / f"r{r}" / "bundle.json").is_file()]
    model = None
    if need or not (cache / "hf_lm" / "config.json").is_file():
        log.info("building the %s model with random weights (seed 0)", p.name)
        torch.manual_seed(0)
        model = StreamingModel(cfg).eval()
    threads = torch.get_num_threads()
    if int(p.decoder["hidden_size"]) < 512:
        # tiny ops on several OpenMP threads crawl when the cores are shared (barrier waits)
        torch.set_num_threads(1)
    try:
        ws.bundles = _export_ratios(model, tok, cache, RATIOS, p.kv_capacity, p.parity_frames,
                                    "novelty")
        _peers(ws, model, cache)
        del model
        gc.collect()
        _int8(ws, cache)
    finally:
        torch.set_num_threads(threads)
    ws.notes.append(f"{p.name}: random weights (seed 0); the speak decision is scripted "
                    "(see ScriptedSpeech) because random weights would speak after every frame")
    return ws


def build_engine(engine: Path, cache: Path) -> Workspace:
    """An existing bundle; with its native checkpoint (`NAME-checkpoint`) beside it, the other
    keep ratios and the peers are built from the same weights."""
    from onsight.exporter.model import load_native

    b = load_bundle(engine)
    r0 = float(b.manifest["mod"]["keep_ratio"])
    ws = Workspace({r0: engine}, r0, scripted=False)
    ckpt = engine.parent / f"{engine.name}-checkpoint"
    cache.mkdir(parents=True, exist_ok=True)
    if ckpt.is_dir():
        model, tok = load_native(ckpt)
        ws.vision = dataclasses.asdict(model.cfg.vision)
        ws.projector_hidden = model.cfg.projector_hidden
        others = [r for r in RATIOS if abs(r - r0) > 1e-9]
        ws.bundles.update(_export_ratios(model, tok, cache, others, b.layout.capacity_dense,
                                         4, None if model.cfg.has_layer_experts else "novelty"))
        _peers(ws, model, cache)
        del model
    else:
        ws.notes.append(f"no checkpoint at {ckpt}: only keep ratio {r0} measured, no peers")
    _int8(ws, cache)
    return ws


def _template(b: Bundle) -> TemplateIds:
    from tokenizers import Tokenizer

    return build_template_ids(Tokenizer.from_file(str(b.tokenizer_path)), b.template)


# ---- measurements ----


def measure_steps(ws: Workspace, o: BenchOptions, device: str, res: dict[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Frame prefill at every keep ratio, the vision encoder and the peers, interleaved."""
    ratios = sorted(ws.bundles, reverse=True)
    b0 = load_bundle(ws.bundles[ratios[0]], verify=False)
    vis = peers.GraphSessions(b0, {"vision": b0.graph_path("vision")}, device)
    fps = float(b0.generation.get("fps", 2.0))
    pixels = peers.sample_frames(o.video, 4 if o.quick else 8, fps, b0.image_size)
    embeds = vis.encode(pixels)
    ids = _template(b0)
    warm = peers.warm_stream(ids, embeds, o.fill_tokens)
    probes, floors = [], {}
    dims = report.LMDims.from_manifest(b0.manifest)
    N = b0.tokens_per_frame
    for r in ratios:
        b = load_bundle(ws.bundles[r], verify=False)
        sp = peers.StepperProbes(peers.GraphSessions(b, {"frame_step": b.graph_path("frame_step")},
                                                     device).stepper(), warm, embeds, ids.interval_id)
        name = f"onsight r={r}"
        probes.append(sp.frame(name))
        toks = [1 + (b.layout.k if i in b.layout.routed else N) for i in range(dims.layers)]
        floors[name] = report.step_floor(dims, toks, sp.lengths, 4)
    probes.append(peers.Probe("vision encoder (1 frame)",
                              lambda i: vis.encode(pixels[i % len(pixels)][None])))
    floors["vision encoder (1 frame)"] = report.vision_floor(
        ws.vision, b0.image_size, dims.hidden, ws.projector_hidden)
    fill = sum(len(t) + len(f) for t, f in warm)
    dense_floor = report.step_floor(dims, [1 + N] * dims.layers, [fill] * dims.layers, 4)
    if ws.hf_lm:
        tp = peers.TorchPeer(ws.hf_lm, warm, embeds, ids.interval_id)
        for name, last in (("torch eager (VideoLLM-online style)", False),
                           ("torch eager (logits_to_keep=1)", True)):
            probes.append(tp.probe(name, last))
            floors[name] = dense_floor
    if ws.optimum:
        op = peers.OptimumPeer(ws.optimum, warm, N, ids.interval_id, dims.vocab)
        probes.append(op.probe("optimum ORTModelForCausalLM"))
        floors["optimum ORTModelForCausalLM"] = dense_floor
        res["meta"]["notes"].append(
            "optimum's ORTModelForCausalLM takes input_ids only, so each frame is fed as "
            f"{N} stand-in token ids (same sequence length and compute as {N} vision tokens)")
    log.info("timing %d configurations x %d rounds, interleaved", len(probes), o.iters)
    times = peers.interleave(probes, o.iters, o.warmup)
    for name, ms in times.items():
        key = "prefill" if name.startswith(("onsight", "torch", "optimum")) else "other_steps"
        res[key][name] = peers.summarize(ms)
        res["floors"][name] = report.efficiency(floors.get(name), res[key][name]["median_ms"],
                                                res["peaks"])
    return pixels, embeds


def _decode_token(b: Bundle) -> int:
    return int(b.manifest["token_ids"]["interval"]) + 1


def measure_variant(label: str, path: Path, ws: Workspace, o: BenchOptions, device: str,
                    frames: tuple[np.ndarray, np.ndarray], res: dict[str, Any], int8: bool) -> None:
    """Decode tokens/s (and for int8: prefill and vision) through the runtime's OrtSessions."""
    from onsight.runtime.ort_backend import OrtSessions

    pixels, embeds = frames
    b = load_bundle(path, verify=False)
    s = OrtSessions(b, device, use_overrides=int8)
    ids = _template(b)
    sp = peers.StepperProbes(s.stepper(), peers.warm_stream(ids, embeds, o.fill_tokens), embeds,
                             ids.interval_id)
    probes = [sp.decode(f"decode 1 token, {label}", _decode_token(b))]
    if int8:
        probes += [sp.frame(f"onsight r={ws.ship_ratio} {label}"),
                   peers.Probe(f"vision encoder (1 frame) {label}", lambda i: s.encode(
                       pixels[i % len(pixels)][None]))]
    for name, ms in peers.interleave(probes, o.iters, o.warmup).items():
        res["other_steps"][name] = st = peers.summarize(ms)
        if name.startswith("decode"):
            st["tokens_per_s"] = 1e3 / st["median_ms"]
    s.close()


def measure_runtime(ws: Workspace, o: BenchOptions, device: str, frames, res) -> None:
    from onsight.runtime.assistant import Assistant, AssistantConfig

    variants = [("fp32", ws.bundles[ws.ship_ratio], False)]
    if ws.int8:
        variants.append(("int8", ws.int8, True))
    for label, path, int8 in variants:
        log.info("decode and runtime steps: %s r=%s", label, ws.ship_ratio)
        measure_variant(label, path, ws, o, device, frames, res, int8)
    modes = ["realtime", "fast", "fast+skip"]
    if "prune_static_tokens" in {f.name for f in dataclasses.fields(AssistantConfig)}:
        modes.append("fast+prune")  # the other training-free extra, once the runtime has it
    runs = [(f"{lbl} r={ws.ship_ratio}", p, modes) for lbl, p, _ in variants]
    if 1.0 in ws.bundles and ws.ship_ratio != 1.0 and not o.quick:
        runs.append(("fp32 r=1.0", ws.bundles[1.0], ["fast"]))
    for i, (label, path, modes) in enumerate(runs):
        with Assistant(path, AssistantConfig(backend=o.backend, stats_every=10**9)) as a:
            if ws.scripted:
                b = a.bundle.manifest["token_ids"]
                a._stepper.inner = peers.ScriptedSpeech(a._stepper.inner, int(b["interval"]),
                                                        int(b["eos"]), o.speak_every,
                                                        o.narration_tokens)
            for mode in modes if o.video else []:
                log.info("end to end: %s, %s, %d frames", label, mode, o.e2e_frames)
                res["e2e"].append(peers.run_e2e(a, o.video, label, mode, o.e2e_frames))
            if i == len(variants) - 1:  # the long stream on the lightest shipped variant
                log.info("resident memory over a long stream: %s", label)
                res["memory"] = peers.rss_stream(a, label, o.memory_frames)
        gc.collect()


def kv_table(ws: Workspace, budget_mb: float) -> dict[str, Any]:
    budget = int(budget_mb * 2**20)
    configs = {}
    for r in sorted(ws.bundles, reverse=True):
        lay = load_bundle(ws.bundles[r], verify=False).layout
        mod = bool(lay.routed)
        configs[f"r={r}" + (" (MoD)" if mod else " (dense)")] = {
            "bytes_per_frame": lay.bytes_per_frame(mod=mod),
            "frames_in_budget": lay.frames_in_budget(budget, mod=mod)}
    lay = load_bundle(ws.bundles[ws.ship_ratio], verify=False).layout
    dense, mod = lay.frames_in_budget(budget, mod=False), lay.frames_in_budget(budget, mod=True)
    if not any(k.endswith("(dense)") for k in configs):
        configs["dense"] = {"bytes_per_frame": lay.bytes_per_frame(mod=False), "frames_in_budget": dense}
    return {"budget_mb": budget_mb, "configs": configs, "fit_ratio": mod / max(1, dense)}


# ---- the command ----


def _machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def _versions() -> str:
    import onnxruntime
    import torch
    import transformers

    return (f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def parse_args(argv: list[str]) -> BenchOptions:
    p = argparse.ArgumentParser(prog="onsight bench", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: demo)")
    g.add_argument("--engine", type=Path, help="an existing bundle, e.g. engines/demo")
    p.add_argument("--backend", default="auto", help="auto | onnxruntime:cpu | onnxruntime:cuda")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/NAME)")
    p.add_argument("--cache-dir", type=Path, help="built bundles and peers (reused)")
    p.add_argument("--video", type=Path, help="real video (default: the largest in ../shared/videos)")
    p.add_argument("--iters", type=int, help="timed rounds (default 20; 3 with --quick)")
    p.add_argument("--e2e-frames", type=int, help="frames per end-to-end run (default 40)")
    p.add_argument("--memory-frames", type=int, default=0, help="long stream length (0: evicts)")
    p.add_argument("--budget-mb", type=float, default=1024.0, help="KV budget for frames that fit")
    p.add_argument("--quick", action="store_true", help="a smoke run: few iterations and frames")
    a = p.parse_args(argv)
    preset = None if a.engine else (a.preset or "demo")
    name = preset or a.engine.name
    key = hashlib.sha256(json.dumps(dataclasses.asdict(PRESETS[preset]) if preset
                                    else str(a.engine.resolve()), default=str).encode())
    cache = a.cache_dir or Path.home() / ".cache" / "onsight" / "bench" / f"{name}-{key.hexdigest()[:8]}"
    video = peers.pick_video(a.video, SHARED_VIDEOS)
    return BenchOptions(
        preset=preset, engine=a.engine, backend=a.backend, video=video,
        out=a.out or REPO / "bench" / "results" / name, cache=cache,
        iters=a.iters or (3 if a.quick else 20), warmup=1 if a.quick else 3, quick=a.quick,
        e2e_frames=a.e2e_frames or (6 if a.quick else 40),
        memory_frames=a.memory_frames or (12 if a.quick else 0), budget_mb=a.budget_mb)


def _device(backend: str) -> str:
    dev = backend.split(":", 1)[1] if ":" in backend else "auto"
    return dev.split(":")[0]


def _check_gpu(o: BenchOptions) -> None:
    import onnxruntime

    if o.preset and PRESETS[o.preset].gpu_only and (
            "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
            or _device(o.backend) == "cpu"):
        raise OnsightError(
            f"the {o.preset} preset is GPU only (about 16 GB of fp16 weights, minutes per frame "
            "on a CPU): run it on a machine with an NVIDIA GPU and onnxruntime-gpu, with "
            "--backend onnxruntime:cuda; this one offers "
            f"{', '.join(onnxruntime.get_available_providers())}")


def run(o: BenchOptions) -> dict[str, Any]:
    _check_gpu(o)
    device = _device(o.backend)
    demo = REPO / "engines" / "demo"
    if o.engine:
        ws = build_engine(o.engine, o.cache)
    elif o.preset == "demo" and (demo / "bundle.json").is_file():
        ws = build_engine(demo, o.cache)
    else:
        ws = build_preset(PRESETS[o.preset or "demo"], o.cache)
    b = load_bundle(ws.bundles[ws.ship_ratio], verify=False)
    res: dict[str, Any] = {
        "meta": {"preset": o.preset or str(o.engine), "machine": _machine(),
                 "versions": _versions(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                 "iters": o.iters, "warmup": o.warmup, "fill_tokens": o.fill_tokens,
                 "tokens_per_frame": b.tokens_per_frame, "backend": o.backend,
                 "cache": str(o.cache), "notes": list(ws.notes),
                 "load_average_start": os.getloadavg()},
        "ship_ratio": ws.ship_ratio, "prefill": {}, "other_steps": {}, "floors": {}, "e2e": [],
        "kv": kv_table(ws, o.budget_mb), "memory": {},
    }
    log.info("measuring this machine's matmul and copy peaks")
    res["peaks"] = peers.machine_peaks(o.quick)
    frames = measure_steps(ws, o, device, res)
    gc.collect()
    if o.video is None:
        res["meta"]["notes"].append(f"no real video ({SHARED_VIDEOS} is missing): end-to-end "
                                    "runs skipped; steps measured on synthetic frames")
    measure_runtime(ws, o, device, frames, res)
    if ws.scripted:
        res["meta"]["notes"].append(
            f"end to end: the model speaks after every {o.speak_every}th frame, "
            f"{o.narration_tokens} tokens each (scripted; all compute runs)")
    return res


def _setup_logging() -> None:
    lg = logging.getLogger("onsight.exporter")
    if not lg.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s bench: %(message)s", "%H:%M:%S"))
        lg.addHandler(h)
        lg.propagate = False  # the CLI's root handler would print every line twice
    if lg.level == logging.NOTSET or lg.level > logging.INFO:
        lg.setLevel(logging.INFO)


def main(argv: list[str]) -> int:
    _setup_logging()
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
