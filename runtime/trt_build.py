"""`onsight build --backend tensorrt`: serialized TensorRT plans from a bundle's ONNX graphs.

Written against TensorRT 10's Python API (JetPack 6 ships it on every Jetson; on x86 it comes
from NVIDIA's own packages, not PyPI). Plans are tied to one GPU model and TensorRT version:
both are recorded, and the runtime refuses a plan built elsewhere with a message to rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onsight.runtime.bundle import load_bundle
from onsight.runtime.errors import BundleError, ExportError
from onsight.runtime.files import write_text_atomic

log = logging.getLogger(__name__)

PLAN_DIR = "trt"
MAX_STEP_TOKENS = 256  # longest text step (a question, or a prompt) one plan call takes
MAX_FRAME_TEXT = 64  # longest text run before a frame in one frame step


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "Orin"
    compute_capability: str  # e.g. "9.0"


def gpu_info() -> GpuInfo | None:
    """The first GPU as nvidia-smi reports it (Jetson boards: tegrastats has no query; fall
    back to the device tree's model name with compute capability 8.7 for Orin)."""
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
        if out:
            name, cc = (x.strip() for x in out[0].split(","))
            return GpuInfo(name, cc)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    model = Path("/proc/device-tree/model")
    if model.is_file() and "orin" in model.read_text(errors="ignore").lower():
        return GpuInfo(model.read_text(errors="ignore").strip("\x00 \n"), "8.7")
    return None


def check_plan_compat(
    trt_meta: dict[str, Any], gpu: GpuInfo | None, trt_version: str | None
) -> None:
    """Refuse plans built for another GPU or TensorRT version (they fail or misbehave)."""
    if gpu is None:
        raise BundleError(
            "this bundle's TensorRT plans need an NVIDIA GPU, and none was found; "
            "use --backend onnxruntime"
        )
    if trt_version is None:
        raise BundleError(
            "TensorRT is not installed here; use --backend onnxruntime, or install "
            "TensorRT (it ships with JetPack)"
        )
    built_cc, built_trt = trt_meta.get("compute_capability"), trt_meta.get("tensorrt_version")
    if built_cc != gpu.compute_capability or trt_meta.get("gpu") != gpu.name:
        raise BundleError(
            f"the TensorRT plans were built for {trt_meta.get('gpu')} (sm {built_cc}), this is "
            f"{gpu.name} (sm {gpu.compute_capability}); rebuild them here with "
            "`onsight build BUNDLE --backend tensorrt`"
        )
    if built_trt != trt_version:
        raise BundleError(
            f"the TensorRT plans were built with TensorRT {built_trt}, this is {trt_version}; "
            "rebuild them with `onsight build BUNDLE --backend tensorrt`"
        )


def _profiles(bundle) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """min / opt / max shapes of every dynamic input, per graph."""
    n = bundle.tokens_per_frame
    lay = bundle.layout
    k, hidden = lay.k, bundle.hidden_size
    # The native TensorRT backend binds whole preallocated cache buffers, so the cache length
    # (dynamic in the ONNX, for onnxruntime's filled-span attention) is fixed at the capacity.
    cache: dict[str, tuple[tuple[int, ...], ...]] = {}
    for i in range(lay.num_layers):
        shape = (lay.kv_heads, lay.capacity(i), lay.head_dim)
        cache[f"past_key_{i}"] = cache[f"past_value_{i}"] = (shape, shape, shape)
    cache["dense_mask"] = ((lay.capacity_dense,),) * 3
    cache["mod_mask"] = ((lay.capacity_mod,),) * 3
    return {
        "vision": {
            "frames": (
                (1, bundle.image_size, bundle.image_size, 3),
                (1, bundle.image_size, bundle.image_size, 3),
                (4, bundle.image_size, bundle.image_size, 3),
            )
        },
        "text_step": {
            "input_ids": ((1,), (1,), (MAX_STEP_TOKENS,)),
            "position_ids": ((1,), (1,), (MAX_STEP_TOKENS,)),
            **cache,
        },
        "frame_step": {
            "input_ids": ((1,), (1,), (MAX_FRAME_TEXT,)),
            "position_ids": ((1 + k,), (1 + n,), (MAX_FRAME_TEXT + n,)),
            # frames may be pruned to as few as k tokens (DyCoke-style), never fewer
            "frame_embeds": ((k, hidden), (n, hidden), (n, hidden)),
            "prev_frame_embeds": ((k, hidden), (n, hidden), (n, hidden)),
            **cache,
        },
    }


def build_tensorrt(
    bundle_dir: str | Path,
    precision: str = "fp16",
    progress: Callable[[str], None] | None = None,
    workspace_gb: float = 4.0,
    calibration_video: str | Path | None = None,
    calibration_frames: int = 32,
) -> dict[str, Any]:
    """Build plans for every graph; int8 builds from calibrated Q/DQ graphs (trt_int8),
    calibrating first when the bundle has none."""
    say = progress or (lambda m: log.info("%s", m))
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ExportError(
            "TensorRT is not installed. It ships with JetPack on Jetson boards; on x86 install it "
            "from NVIDIA's packages (its PyPI packages only redirect to NVIDIA's index). Or run the "
            "bundle with onnxruntime, which needs no build."
        ) from e
    gpu = gpu_info()
    if gpu is None:
        raise ExportError(
            "no NVIDIA GPU found (nvidia-smi saw none): TensorRT plans are built "
            "on the GPU that will run them"
        )
    d = Path(bundle_dir)
    sources = {g: None for g in ("vision", "text_step", "frame_step")}
    if precision == "int8":
        from onsight.runtime.trt_int8 import build_qdq_graphs

        qdq = load_bundle(d).manifest.get("qdq")
        if (
            not qdq
            or calibration_video is not None
            or qdq["calibration"]["frames"] != calibration_frames
        ):
            qdq = build_qdq_graphs(d, calibration_video, calibration_frames, say)
        sources = {g: d / f for g, f in qdq["graphs"].items()}
    bundle = load_bundle(d)
    out_dir = d / PLAN_DIR
    out_dir.mkdir(exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out_dir / "timing.cache"
    plans: dict[str, str] = {}
    for i, (graph, shapes) in enumerate(_profiles(bundle).items(), 1):
        say(f"[{i}/3] building {graph} ({precision}) for {gpu.name}")
        # Q/DQ graphs build strongly typed: the graph's own Q/DQ decide what runs in int8
        # (TensorRT 10's explicit quantization; precision flags are not set for them)
        flags = 0
        if precision == "int8" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(sources[graph] or bundle.graph_path(graph))):
            errors = "; ".join(str(parser.get_error(k)) for k in range(parser.num_errors))
            parsed = Path(sources[graph] or bundle.graph_path(graph)).name
            raise ExportError(f"TensorRT could not parse {parsed}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8" and not flags:  # TensorRT 8.x has no strong typing
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            if any(network.get_input(k).name == name for k in range(network.num_inputs)):
                profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"TensorRT failed to build {graph}; run with -v for its log")
        name = f"{graph}.{precision}.plan"
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(bytes(plan))
        os.replace(tmp, out_dir / name)
        plans[graph] = f"{PLAN_DIR}/{name}"
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {
        "precision": precision,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt_version": trt.__version__,
        "plans": plans,
        "profiles": {
            g: {k: [list(s) for s in v] for k, v in p.items()} for g, p in _profiles(bundle).items()
        },
    }
    manifest = json.loads((d / "bundle.json").read_text())
    manifest["tensorrt"] = meta
    write_text_atomic(d / "bundle.json", json.dumps(manifest, indent=2))
    say(f"plans written to {out_dir}; TensorRT {trt.__version__}, sm {gpu.compute_capability}")
    return meta
