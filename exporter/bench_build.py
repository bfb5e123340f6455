"""What `onsight bench` measures on, built once and cached: the presets' random-weight
bundles at each keep ratio, their int8 copies and the peers' models (or an existing bundle
and, beside it, its checkpoint's other keep ratios)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onsight.exporter import bench_peers as peers
from onsight.exporter.config import ModConfig, ModelConfig, PreprocessConfig, VisionConfig
from onsight.runtime.bundle import load_bundle

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"
RATIOS = (1.0, 0.5, 0.2)  # keep ratios measured side by side; the smallest is the shipped one
GRAPH_SOURCES = ("onnx_export.py", "decoder.py", "vision.py", "model.py", "bundle_writer.py")


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


def _llm(arch: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int,
         max_pos: int, rope: float, tie: bool, **extra: Any) -> dict[str, Any]:  # fmt: skip
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[arch]
    return dict(architectures=[arch], model_type=model_type, vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, max_position_embeddings=max_pos, rope_theta=rope,
                tie_word_embeddings=tie, **extra)  # fmt: skip


def _tower(hidden: int, inter: int, layers: int, heads: int, image: int, grid: int) -> VisionConfig:
    hf = dict(model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads, image_size=image,
              patch_size=16, num_channels=3)  # fmt: skip
    return VisionConfig(kind="siglip", hidden_size=hidden, grid=grid, hf_config=hf)


# stand-in for engines/demo until it ships: issue 8's trial-run shape, 1 + 3x3 tokens
DEMO = Preset("demo", _llm("LlamaForCausalLM", 512, 192, 512, 4, 4, 2, 2048, 1e4, False),
              VisionConfig(kind="tiny", hidden_size=128, grid=3, tiny_channels=(16, 32, 64)),
              64, kv_capacity=1024, parity_frames=2)  # fmt: skip
# Qwen2-0.5B + SigLIP-base/16 at 224 (14x14 patches pooled to 1 + 7x7 = 50 tokens)
QWEN_05B = Preset("0.5b", _llm("Qwen2ForCausalLM", 151936, 896, 4864, 24, 14, 2, 32768, 1e6, True,
                               rms_norm_eps=1e-6, use_sliding_window=False),
                  _tower(768, 3072, 12, 12, 224, grid=7), 224, parity_frames=2)  # fmt: skip
# Llama-3-8B + SigLIP-L/16 at 384 with VideoLLM-online's 1 + 3x3 tokens
LLAMA_8B = Preset("8b", _llm("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 8192, 5e5, False),
                  _tower(1024, 4096, 24, 16, 384, grid=3), 384, parity_frames=1,
                  gpu_only=True)  # fmt: skip
PRESETS = {p.name: p for p in (DEMO, QWEN_05B, LLAMA_8B)}


@dataclass
class Workspace:
    """What the measurements run on."""

    bundles: dict[float, Path]  # keep ratio -> fp32 bundle
    ship_ratio: float  # the configuration onsight ships (MoD r=0.2 for presets)
    int8: Path | None = None  # that bundle with int8 graph overrides
    int8_full: Path | None = None  # the r = 1.0 bundle with int8 graph overrides
    hf_lm: Path | None = None  # the LLM in transformers format, for the peers
    optimum: Path | None = None  # the LLM exported by optimum
    vision: dict[str, Any] | None = None  # tower dims for the vision floor
    projector_hidden: int = 0  # projector width (0: the LLM's)
    scripted: bool = True  # random weights: script when to speak
    notes: list[str] = field(default_factory=list)


# ---- building (cached) ----


def _export(model, tok: Path, d: Path, r: float, capacity: int, parity: int, router) -> Path:
    from onsight.exporter.bundle_writer import ExportOptions, export_bundle

    if not (d / "bundle.json").is_file():
        log.info("exporting the r=%s bundle to %s", r, d)
        opts = ExportOptions(keep_ratio=r, mod_layers="interleaved", router=router,
                             kv_capacity=capacity, parity_frames=parity)  # fmt: skip
        export_bundle(model, tok, d, opts, progress=lambda m: log.info("%s", m))
    return d


def _copy_bundle(src: Path, dst: Path) -> None:
    """The graphs (with their external data) and the tokenizer, copied (onnx refuses
    hard-linked external data), and a manifest listing just those files."""
    from onsight.runtime.bundle import DEFAULT_TOKENIZER, write_manifest

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    manifest = json.loads((src / "bundle.json").read_text())
    for built in ("graph_overrides", "int8", "qdq", "tensorrt"):  # their files are not copied
        manifest.pop(built, None)
    for g in manifest["graphs"].values():
        for name in (g["file"], g["file"] + ".data"):
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    tokenizer = manifest.get("tokenizer", DEFAULT_TOKENIZER)
    shutil.copyfile(src / tokenizer, dst / tokenizer)
    write_manifest(dst, manifest)


def _int8(ws: Workspace, cache: Path) -> None:
    """Copies of the shipped bundle and of the r = 1.0 bundle with int8 graphs added by
    `onsight build --quantize int8` (the r = 1.0 one for MoD vs full compute in int8)."""
    for r in dict.fromkeys((ws.ship_ratio, 1.0)):
        if r not in ws.bundles:
            continue
        dst = cache / f"r{r}-int8"
        done = (dst / "bundle.json").is_file() and '"graph_overrides"' in (
            dst / "bundle.json"
        ).read_text()
        if done or _quantize(ws.bundles[r], dst, ws):
            if r == ws.ship_ratio:
                ws.int8 = dst
            if r == 1.0:
                ws.int8_full = dst


def _quantize(src: Path, dst: Path, ws: Workspace) -> bool:
    try:
        from onsight.exporter import quantize
    except ImportError as e:
        ws.notes.append(f"int8 skipped: exporter.quantize is not available ({e})")
        return False
    try:
        _copy_bundle(src, dst)
        quantize.quantize_bundle(dst, progress=lambda m: log.info("%s", m))
        return True
    except Exception as e:  # noqa: BLE001 - report it, and measure the rest
        log.exception("int8 quantization failed")
        ws.notes.append(f"int8 skipped: quantize_bundle failed ({type(e).__name__}: {e})")
        return False


def _peers(ws: Workspace, model, cache: Path) -> None:
    ws.hf_lm, ws.optimum = cache / "hf_lm", cache / "optimum"
    if not (ws.hf_lm / "config.json").is_file():
        model.decoder.lm.save_pretrained(ws.hf_lm, safe_serialization=True)
    if (ws.optimum / "config.json").is_file():
        return
    try:
        log.info("exporting the dense LLM with optimum (ORTModelForCausalLM, export=True)")
        peers.export_optimum(ws.hf_lm, ws.optimum)
    except Exception as e:  # noqa: BLE001 - the other measurements still stand
        log.exception("optimum export failed")
        ws.optimum = None
        ws.notes.append(f"optimum peer skipped: export failed ({type(e).__name__}: {e})")


def build_preset(p: Preset, cache: Path) -> Workspace:
    import torch

    from onsight.exporter.model import StreamingModel

    cache.mkdir(parents=True, exist_ok=True)
    tok = cache / "tokenizer.json"
    tpl = ModelConfig(decoder=p.decoder).template
    if not tok.is_file():
        peers.wordlevel_tokenizer(tok, int(p.decoder["vocab_size"]), tpl.bos, tpl.eos)
    ws = Workspace({}, min(RATIOS), vision=dataclasses.asdict(p.vision))
    ws.notes.append(f"{p.name}: random weights (seed 0)")
    model = None
    built = [cache / f"r{r}" / "bundle.json" for r in RATIOS] + [cache / "hf_lm" / "config.json"]
    if not all(f.is_file() for f in built):
        log.info("building the %s model with random weights (seed 0)", p.name)
        torch.manual_seed(0)
        cfg = ModelConfig(decoder=p.decoder, vision=p.vision,
                          preprocess=PreprocessConfig(image_size=p.image_size),
                          mod=ModConfig(keep_ratio=1.0, router="novelty"))  # fmt: skip
        model = StreamingModel(cfg).eval()
    threads = torch.get_num_threads()
    if int(p.decoder["hidden_size"]) < 512:
        torch.set_num_threads(1)  # tiny ops on OpenMP threads crawl when the cores are shared
    try:
        for r in RATIOS:
            ws.bundles[r] = _export(model, tok, cache / f"r{r}", r, p.kv_capacity,
                                    p.parity_frames, "novelty")  # fmt: skip
        _peers(ws, model, cache)
        del model
        gc.collect()
        _int8(ws, cache)
    finally:
        torch.set_num_threads(threads)
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
        router = None if model.cfg.has_layer_experts else "novelty"
        for r in (r for r in RATIOS if abs(r - r0) > 1e-9):
            ws.bundles[r] = _export(model, tok, cache / f"r{r}", r, b.layout.capacity_dense, 4,
                                    router)  # fmt: skip
        _peers(ws, model, cache)
        del model
        ws.notes.append(f"{engine}: its own weights; keep ratios other than {r0} and the peers "
                        f"use the same weights, from {ckpt}")  # fmt: skip
    else:
        ws.notes.append(f"no checkpoint at {ckpt}: only keep ratio {r0} measured, no peers")
    _int8(ws, cache)
    return ws
