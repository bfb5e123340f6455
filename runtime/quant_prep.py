"""A graph copy ready for onnxruntime's quantizers (shared by CPU int8 and TensorRT Q/DQ)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from onsight.runtime.errors import ExportError

BIG_GRAPH_BYTES = 1.8e9  # protobuf cannot serialise past 2 GB


def need_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ExportError(
            "quantization needs the onnx package (onnxruntime's quantizers use it): "
            "pip install onnx"
        ) from e
    return onnx


@contextmanager
def quantizer_input(src: Path, work_dir: Path) -> Iterator[tuple[Path, bool]]:
    """Yields (path, big): a copy of `src` in a temporary folder under `work_dir`, without the
    exporter's stale value_info (it can contradict shapes once MatMuls are rewritten, a known
    failure on dynamo-exported graphs) and, for big graphs, with its weights in one external
    `.data` file (write the quantized graph the same way). The quantizers' warnings on the root
    logger about pre-processing are silenced meanwhile."""
    onnx = need_onnx()
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    big = sum(len(t.raw_data) for t in model.graph.initializer) > BIG_GRAPH_BYTES
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        clean = Path(tmp) / src.name
        if big:
            onnx.save(model, str(clean), save_as_external_data=True, location=clean.name + ".data")
        else:
            onnx.save(model, str(clean))
        del model
        root.setLevel(logging.ERROR)
        try:
            yield clean, big
        finally:
            root.setLevel(level)
