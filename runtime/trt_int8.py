"""Int8 for TensorRT: Q/DQ graphs calibrated on real frames (explicit quantization).

TensorRT 10 builds int8 engines from ONNX graphs that carry QuantizeLinear / DequantizeLinear
pairs (explicit quantization; its implicit calibrators are deprecated). onsight writes them with
onnxruntime's static quantizer, to TensorRT's rules: symmetric int8 (zero point 0, weights in
[-127, 127]) on the inputs of MatMul / Gemm / Conv, weights per output channel, activation
ranges from running the fp32 bundle over a stream of frames (a video the user gives, ideally
from the deployment camera, or else the synthetic world). Everything else stays float.

The Q/DQ graphs also run on onnxruntime's CPU provider, so their top-1 agreement with fp32 is
measured here, on any machine, before a GPU ever builds them: a calibration that breaks the
model is refused before a plan exists. This module needs onnxruntime and onnx (its quantizer
reads graphs with it), not TensorRT or torch.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from onsight.runtime.agreement import narrate_recorded, top1_agreement
from onsight.runtime.bundle import GRAPHS, Bundle, load_bundle, write_manifest
from onsight.runtime.errors import ExportError
from onsight.runtime.ort_backend import OrtSessions
from onsight.runtime.preprocess import preprocess_batch
from onsight.runtime.quant_prep import quantizer_input

log = logging.getLogger(__name__)

QDQ_OPS = ("MatMul", "Gemm", "Conv")
MIN_AGREEMENT = 0.9  # top-1 agreement with fp32 below this: the Q/DQ graphs are not written


def calibration_frames(bundle: Bundle, video: str | Path | None, count: int) -> np.ndarray:
    """`count` frames for calibration, uint8 (T, S, S, 3) as the vision graph takes them:
    spread evenly over `video`, or (without one) a stream of the synthetic world."""
    if video is None:
        from onsight.runtime.synthetic import generate_stream

        images = list(generate_stream(7, count).frames)
    else:
        images = _video_frames(Path(video), count)
    return preprocess_batch(images, bundle.manifest["preprocess"])


def _video_frames(path: Path, count: int) -> list[np.ndarray]:
    import cv2

    if not path.is_file():
        raise ExportError(f"calibration video {path} does not exist; pass a readable video file")
    cap = cv2.VideoCapture(str(path))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    step = max(1, total // count) if total > 0 else 1
    frames: list[np.ndarray] = []
    i = 0
    while len(frames) < count:
        ok, bgr = cap.read()
        if not ok:
            break
        if i % step == 0:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        i += 1
    cap.release()
    if len(frames) < 2:
        raise ExportError(
            f"could not read frames from {path} (OpenCV decoded {len(frames)}); "
            "pass a video OpenCV can decode, e.g. H.264 in .mp4"
        )
    return frames


class _Recorder:
    """Wraps an onnxruntime session: every call's inputs are copied into `feeds`."""

    def __init__(self, session, feeds: list[dict[str, np.ndarray]]):
        self.session, self.feeds = session, feeds

    def run(self, outputs, feeds, *args, **kwargs):
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.session.run(outputs, feeds, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def record_inputs(sessions: OrtSessions, pixels: np.ndarray) -> dict[str, list[dict]]:
    """Every graph's inputs while the fp32 bundle narrates `pixels` (one frame per call)."""
    recorded: dict[str, list[dict]] = {g: [] for g in GRAPHS}
    originals = dict(sessions.sessions)
    try:
        for g in GRAPHS:
            sessions.sessions[g] = _Recorder(originals[g], recorded[g])
        # the runtime encodes frame by frame: calibrate the vision graph the same way
        emb = np.concatenate([sessions.encode(pixels[f : f + 1]) for f in range(len(pixels))])
        narrate_recorded(sessions, emb)
    finally:
        sessions.sessions.update(originals)
    return recorded


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def qdq_graph(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """A TensorRT-ready Q/DQ copy of one graph, calibrated on `feeds`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with quantizer_input(src, dst.parent) as (clean, big):
        quantize_static(
            str(clean),
            str(dst),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QDQ_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=big,
            extra_options={
                "ActivationSymmetric": True,  # TensorRT: zero point 0
                "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                "CalibTensorRangeSymmetric": True,
                "QuantizeBias": False,  # TensorRT dequantizes int8 only, not int32 biases
                # only the inputs of the quantized ops: their outputs (residual sums,
                # gates, the logits) stay float
                "OpTypesToExcludeOutputQuantization": list(QDQ_OPS),
            },
        )


def qdq_name(graph: str) -> str:
    return f"{graph}.qdq.onnx"


def _publish(d: Path, manifest: dict[str, Any], tmp: Path, result: dict[str, Any]) -> None:
    """Move the Q/DQ graphs from `tmp` into the bundle and name them in bundle.json, which
    never lists a file about to be replaced: the earlier calibration (and the int8 plans built
    from it) is unlisted first, then its files are replaced, then one write records these."""
    files = [f for g in GRAPHS for f in (qdq_name(g), qdq_name(g) + ".data")]
    stale = [f for f in files if (d / f).exists()]  # incl. weights of an earlier calibration
    earlier = manifest.pop("qdq", None) is not None
    if (manifest.get("tensorrt") or {}).get("precision") == "int8":
        manifest["tensorrt"] = None  # plans built from the earlier Q/DQ graphs: rebuild them
        earlier = True
    if earlier or stale:
        write_manifest(d, manifest, unlist=stale)
        for f in stale:
            (d / f).unlink()
    for f in files:
        if (tmp / f).is_file():
            shutil.move(str(tmp / f), str(d / f))
    manifest["qdq"] = result
    write_manifest(d, manifest)


def build_qdq_graphs(
    bundle_dir: str | Path,
    video: str | Path | None = None,
    frames: int = 32,
    progress: Callable[[str], None] | None = None,
    min_agreement: float | None = None,
) -> dict[str, Any]:
    """Calibrate and write `GRAPH.qdq.onnx` for every graph, then record them in bundle.json
    (under "qdq") with their agreement with fp32. Refuses (writes nothing) below
    `min_agreement` (default MIN_AGREEMENT)."""
    say = progress or (lambda m: log.info("%s", m))
    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    d = Path(bundle_dir)
    bundle = load_bundle(d)
    if bundle.layout.dtype != "float32":
        raise ExportError(
            f"{d}: int8 calibration starts from an fp32 bundle; re-export with --dtype fp32"
        )
    if frames < 2:
        raise ExportError(f"--calibration-frames must be at least 2, got {frames}")
    source = str(video) if video else "synthetic world (seed 7)"
    say(f"[1/3] recording calibration inputs: {frames} frames from {source}")
    pixels = calibration_frames(bundle, video, frames)
    fp32 = OrtSessions(bundle, "cpu", use_overrides=False)
    recorded = record_inputs(fp32, pixels)
    tmp = Path(tempfile.mkdtemp(prefix=".qdq-", dir=d))
    try:
        for g in GRAPHS:
            say(f"[2/3] calibrating {g} on {len(recorded[g])} calls and writing its Q/DQ graph")
            qdq_graph(bundle.graph_path(g), tmp / qdq_name(g), recorded[g])
        say("[3/3] measuring top-1 agreement with fp32 (teacher-forced, onnxruntime CPU)")
        qdq = OrtSessions(
            bundle, "cpu", use_overrides=False, graph_files={g: tmp / qdq_name(g) for g in GRAPHS}
        )
        # the calibration frames in reverse order: the same pictures, other contexts
        result = top1_agreement(fp32, qdq, pixels[::-1].copy())
        del qdq
        if result["top1_agreement"] < min_agreement:
            raise ExportError(
                f"the calibrated int8 graphs agree with fp32 on only "
                f"{result['top1_agreement']:.1%} of steps (< {min_agreement:.0%}); nothing was "
                "written. Calibrate on more frames, or on frames like the deployment's "
                "(--calibration-video), or build with --precision fp16"
            )
        result.update(
            graphs={g: qdq_name(g) for g in GRAPHS},
            ops=list(QDQ_OPS),
            scheme="int8 symmetric, per-channel weights, MinMax activation ranges",
            calibration={"source": source, "frames": len(pixels)},
            agreement_on="the calibration frames replayed in reverse order",
        )
        _publish(d, copy.deepcopy(bundle.manifest), tmp, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(
        f"      Q/DQ graphs written; top-1 agreement {result['top1_agreement']:.3f} over "
        f"{result['steps']} steps"
    )
    return result
