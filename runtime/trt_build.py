"""`onsight build --backend tensorrt`: serialized TensorRT plans from a bundle's ONNX graphs.

Written against TensorRT 10's Python API (JetPack 6.1 and later ship TensorRT 10.3 on Jetson;
JetPack 6.0's 8.6 is refused with a message; on x86 it comes from NVIDIA's own packages, not
PyPI). Plans are tied to one GPU model and TensorRT version: both are recorded, and the runtime
refuses a plan built elsewhere with a message to rebuild.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onsight.runtime import graph_io as io_names
from onsight.runtime.bundle import Bundle, load_bundle, write_manifest
from onsight.runtime.errors import BundleError, ExportError, OnsightError

log = logging.getLogger(__name__)

PLAN_DIR = "trt"
MAX_STEP_TOKENS = 256  # longest text step (a question, or a prompt) one plan call takes
MAX_FRAME_TEXT = 64  # longest text run before a frame in one frame step
MIN_TENSORRT = 10  # strongly typed networks and IO tensors by name, as used here


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "Orin"
    compute_capability: str  # e.g. "9.0"


def check_tensorrt_version(version: str, error: type[OnsightError] = ExportError) -> None:
    """Refuse TensorRT older than 10, naming the JetPack that has it."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT:
        raise error(
            f"onsight's TensorRT backend needs TensorRT {MIN_TENSORRT} or newer; this is "
            f"TensorRT {version}. On Jetson, JetPack 6.1 and later ship TensorRT 10.3 (JetPack "
            "6.0 has 8.6); elsewhere install TensorRT 10 from NVIDIA. Or use --backend onnxruntime"
        )


def _cuda_gpu() -> GpuInfo | None:
    """Device 0 as the CUDA runtime sees it (the same on Jetson and discrete GPUs)."""
    try:
        from onsight.runtime.trt_backend import _cudart

        cudart = _cudart()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
    except Exception:  # noqa: BLE001 - no cuda-python or no driver: try the other sources
        return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name.strip("\x00 "), f"{prop.major}.{prop.minor}")


def gpu_info() -> GpuInfo | None:
    """The first GPU: from the CUDA runtime (cuda-python), else nvidia-smi, else (Jetson
    without either) the device tree's model name with compute capability 8.7 for Orin.
    Jetson's nvidia-smi, where there is one, answers most queries with [N/A]."""
    gpu = _cuda_gpu()
    if gpu is not None:
        return gpu
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
            if re.fullmatch(r"\d+\.\d+", cc):
                return GpuInfo(name, cc)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    model = Path("/proc/device-tree/model")
    if model.is_file() and "orin" in model.read_text(errors="ignore").lower():
        return GpuInfo(model.read_text(errors="ignore").strip("\x00 \n"), "8.7")
    return None


def check_plan_compat(
    trt_meta: dict[str, Any],
    gpu: GpuInfo | None,
    trt_version: str | None,
    bundle: str | Path = "BUNDLE",
) -> None:
    """Refuse plans built for another GPU or TensorRT version (they fail or misbehave)."""
    rebuild = f"`onsight build {bundle} --backend tensorrt`"
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
            f"{gpu.name} (sm {gpu.compute_capability}); rebuild them here with {rebuild}"
        )
    if built_trt != trt_version:
        raise BundleError(
            f"the TensorRT plans were built with TensorRT {built_trt}, this is {trt_version}; "
            f"rebuild them with {rebuild}"
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
        cache[io_names.past_key(i)] = cache[io_names.past_value(i)] = (shape, shape, shape)
    cache[io_names.DENSE_MASK] = ((lay.capacity_dense,),) * 3
    cache[io_names.MOD_MASK] = ((lay.capacity_mod,),) * 3
    return {
        "vision": {
            io_names.FRAMES: (
                (1, bundle.image_size, bundle.image_size, 3),
                (1, bundle.image_size, bundle.image_size, 3),
                (4, bundle.image_size, bundle.image_size, 3),
            )
        },
        "text_step": {
            io_names.INPUT_IDS: ((1,), (1,), (MAX_STEP_TOKENS,)),
            io_names.POSITION_IDS: ((1,), (1,), (MAX_STEP_TOKENS,)),
            **cache,
        },
        "frame_step": {
            io_names.INPUT_IDS: ((1,), (1,), (MAX_FRAME_TEXT,)),
            io_names.POSITION_IDS: ((1 + k,), (1 + n,), (MAX_FRAME_TEXT + n,)),
            # frames may be pruned to as few as k tokens (DyCoke-style), never fewer
            io_names.FRAME_EMBEDS: ((k, hidden), (n, hidden), (n, hidden)),
            io_names.PREV_FRAME_EMBEDS: ((k, hidden), (n, hidden), (n, hidden)),
            **cache,
        },
    }


def _build_plans(
    trt: Any,
    bundle: Bundle,
    stage: Path,
    *,
    sources: dict[str, Path | None],  # a graph to parse instead of the bundle's (Q/DQ)
    precision: str,
    gpu: GpuInfo,
    workspace_gb: float,
    say: Callable[[str], None],
) -> dict[str, str]:
    """Build a plan per graph into `stage`; returns {graph: its path in the bundle}."""
    out_dir = bundle.path / PLAN_DIR
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out_dir / "timing.cache"  # a build cache, not part of the bundle
    plans: dict[str, str] = {}
    for i, (graph, shapes) in enumerate(_profiles(bundle).items(), 1):
        say(f"[{i}/3] building {graph} ({precision}) for {gpu.name}")
        # Q/DQ graphs build strongly typed: the graph's own Q/DQ decide what runs in int8
        # (TensorRT 10's explicit quantization; precision flags are not set for them, and a
        # strongly typed network refuses them). Without flags a TensorRT 10 network has
        # explicit batch, which its ONNX parser needs.
        strong = precision == "int8"
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
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
        _use_timing_cache(config, cache_path)
        profile = builder.create_optimization_profile()
        for k in range(network.num_inputs):
            tensor = network.get_input(k)
            if tensor.name in shapes:
                profile.set_shape(tensor.name, *shapes[tensor.name])
            elif any(d < 0 for d in tuple(tensor.shape)):
                raise ExportError(
                    f"{graph}: input {tensor.name} has dynamic dimensions {tuple(tensor.shape)} "
                    "that onsight has no TensorRT profile for; is the bundle from a newer onsight?"
                )
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"TensorRT failed to build {graph}; run with -v for its log")
        name = f"{graph}.{precision}.plan"
        (stage / name).write_bytes(bytes(plan))
        plans[graph] = f"{PLAN_DIR}/{name}"
        cache = config.get_timing_cache()
        if cache is not None:
            write_bytes_atomic(cache_path, bytes(cache.serialize()))
    return plans


def _use_timing_cache(config: Any, path: Path) -> None:
    """Reuse the build's timing cache; one from another GPU or TensorRT version (a bundle
    copied between machines) is refused by TensorRT, and a fresh one is used instead."""
    blob = path.read_bytes() if path.is_file() else b""
    for attempt in (blob, b"") if blob else (b"",):
        cache = config.create_timing_cache(attempt)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        if attempt:
            log.warning("%s is from another GPU or TensorRT version; starting a fresh one", path)
    log.warning("TensorRT gave no timing cache; building without one")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    check_tensorrt_version(trt.__version__)
    gpu = gpu_info()
    if gpu is None:
        raise ExportError(
            "no NVIDIA GPU found (neither the CUDA runtime, nvidia-smi nor a Jetson device tree "
            "saw one): TensorRT plans are built on the GPU that will run them"
        )
    d = Path(bundle_dir)
    sources: dict[str, Path | None] = {g: None for g in ("vision", "text_step", "frame_step")}
    if precision == "int8":
        from onsight.runtime.trt_int8 import build_qdq_graphs

        qdq = load_bundle(d, verify=False).manifest.get("qdq")  # verified below
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
    # Plans are built into a hidden staging folder and named in bundle.json only once all
    # three are built: a failed or interrupted build leaves the bundle (and its earlier plans,
    # which bundle.json checksums) as they were.
    stage = Path(tempfile.mkdtemp(prefix=".plans-", dir=out_dir))
    try:
        plans = _build_plans(
            trt,
            bundle,
            stage,
            sources=sources,
            precision=precision,
            gpu=gpu,
            workspace_gb=workspace_gb,
            say=say,
        )
        meta = {
            "precision": precision,
            "gpu": gpu.name,
            "compute_capability": gpu.compute_capability,
            "tensorrt_version": trt.__version__,
            "plans": plans,
            "profiles": {
                g: {k: [list(s) for s in v] for k, v in p.items()}
                for g, p in _profiles(bundle).items()
            },
        }
        manifest = copy.deepcopy(bundle.manifest)
        if manifest.get("tensorrt"):
            # unlist the earlier plans before these replace them
            manifest["tensorrt"] = None
            write_manifest(d, manifest)
        for rel in plans.values():
            os.replace(stage / Path(rel).name, d / rel)
        manifest["tensorrt"] = meta
        write_manifest(d, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    say(f"plans written to {out_dir}; TensorRT {trt.__version__}, sm {gpu.compute_capability}")
    return meta
