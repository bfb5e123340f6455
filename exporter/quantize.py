"""`onsight build --backend onnxruntime --quantize int8`: int8 weights for CPU.

Dynamic quantization (int8 weights, activations quantized per call) of the decoder graphs and
the vision graph, with top-1 agreement against fp32 measured on a replayed parity stream.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onsight.exporter.parity import parity_frames
from onsight.runtime import agreement
from onsight.runtime.bundle import load_bundle, write_manifest
from onsight.runtime.errors import ExportError
from onsight.runtime.ort_backend import OrtSessions
from onsight.runtime.quant_prep import quantizer_input

log = logging.getLogger(__name__)


def _quantize_graph(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quantizer_input(src, dst.parent) as (clean, big):
        quantize_dynamic(
            str(clean),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            use_external_data_format=big,  # int8 graphs keep fp32 embeddings: still big
        )


def top1_agreement(
    bundle_dir: Path, frames: int = 16, int8_files: dict[str, Path] | None = None
) -> dict[str, Any]:
    """Teacher-forced top-1 agreement of the int8 graphs with fp32 (runtime.agreement).
    `int8_files` ({graph: path}): graphs not yet published in bundle.json; default: its
    graph_overrides."""
    bundle = load_bundle(bundle_dir, verify=False)
    fp32 = OrtSessions(bundle, "cpu", use_overrides=False)
    if int8_files is None:
        int8 = OrtSessions(bundle, "cpu", use_overrides=True)
    else:
        int8 = OrtSessions(bundle, "cpu", use_overrides=False, graph_files=int8_files)
    return agreement.top1_agreement(fp32, int8, parity_frames(frames, bundle.image_size, seed=1))


def _graph_bytes(path: Path) -> int:
    """A graph's size with its external weights (`NAME.data`), if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def quantize_bundle(
    bundle_dir: str | Path, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    say = progress or (lambda m: log.info("%s", m))
    d = Path(bundle_dir)
    bundle = load_bundle(d)
    if bundle.layout.dtype != "float32":
        raise ExportError(
            f"{d}: int8 quantization starts from an fp32 bundle; re-export with --dtype fp32"
        )
    manifest = json.loads((d / "bundle.json").read_text())
    # Quantize and measure copies in a temporary directory; bundle.json names the int8 graphs
    # only once they are checked, in one atomic write: an interrupted build leaves the fp32
    # bundle as it was, never graph_overrides without their agreement.
    tmp = Path(tempfile.mkdtemp(prefix=".int8-", dir=d))
    try:
        overrides = {}
        for i, g in enumerate(("vision", "text_step", "frame_step"), 1):
            say(f"[{i}/4] quantizing {g} to int8 weights")
            name = f"{g}.int8.onnx"
            _quantize_graph(bundle.graph_path(g), tmp / name)
            overrides[g] = name
        say("[4/4] measuring top-1 agreement with fp32 (teacher-forced replay)")
        result = top1_agreement(d, int8_files={g: tmp / f for g, f in overrides.items()})
        fp32_bytes = sum(_graph_bytes(bundle.graph_path(g)) for g in overrides)
        int8_bytes = sum(_graph_bytes(tmp / f) for f in overrides.values())
        result.update(
            weight_type="int8 per-channel dynamic", bytes_fp32=fp32_bytes, bytes_int8=int8_bytes
        )
        # bundle.json never lists a file about to be replaced or deleted: an earlier int8
        # build's graphs (and any stray file under the new names) are unlisted, then deleted,
        # then the new graphs move in, and one last write names them with their agreement
        earlier = manifest.pop("graph_overrides", None) or {}
        had_int8 = manifest.pop("int8", None) is not None
        stale = [
            f
            for name in {*earlier.values(), *overrides.values()}
            for f in (name, name + ".data")
            if (d / f).exists()
        ]
        if earlier or had_int8 or stale:
            write_manifest(d, manifest, unlist=stale)
            for f in stale:
                (d / f).unlink()
        for name in overrides.values():
            for f in (name, name + ".data"):
                if (tmp / f).is_file():
                    shutil.move(str(tmp / f), str(d / f))
        manifest["graph_overrides"] = overrides
        manifest["int8"] = result
        write_manifest(d, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(
        f"      top-1 agreement {result['top1_agreement']:.3f} over {result['steps']} steps; "
        f"graphs {fp32_bytes / 2**20:.1f} -> {int8_bytes / 2**20:.1f} MiB"
    )
    return result
