"""Pick and open a backend for a bundle: onnxruntime (CPU / CUDA) or native TensorRT plans."""

from __future__ import annotations

import logging

from onsight.runtime.bundle import Bundle
from onsight.runtime.errors import EngineError, OnsightError

log = logging.getLogger(__name__)


def _tensorrt_ready(bundle: Bundle) -> bool:
    if not bundle.manifest.get("tensorrt"):
        return False
    try:
        import tensorrt  # noqa: F401

        from onsight.runtime.trt_backend import cuda_available
    except (ImportError, OSError):  # OSError: a TensorRT library that would not load
        return False
    return cuda_available()


def _device_resident(sessions):
    """On CUDA, keep the KV cache on the GPU through IO binding when cuda-python is here."""
    if sessions.device != "cuda" or sessions.providers[0] != "CUDAExecutionProvider":
        return sessions
    from onsight.runtime.ort_iobinding import OrtDeviceBackend, io_binding_ready

    if not io_binding_ready():
        log.warning(
            "onnxruntime on CUDA without cuda-python: the KV cache makes a host round trip "
            "every step; pip install cuda-python to keep it on the GPU"
        )
        return sessions
    try:
        return OrtDeviceBackend(sessions)
    except Exception as e:  # noqa: BLE001 - e.g. a driver / cuda-python mismatch
        log.warning("IO binding unavailable (%s); the KV cache makes a host round trip", e)
        return sessions


def _open_tensorrt(bundle: Bundle, required: bool):
    """TrtBackend; for `auto` (not `required`), None with a warning when its plans do not
    fit this machine (built on another GPU or TensorRT version: a bundle copied to a Jetson)."""
    from onsight.runtime.trt_backend import TrtBackend

    try:
        return TrtBackend(bundle)
    except OnsightError as e:
        if required:
            raise
        log.warning("TensorRT plans unusable here (%s); using onnxruntime", e)
        return None


def make_backend(bundle: Bundle, name: str = "auto", threads: int | None = None):
    """`auto` takes TensorRT plans when the bundle has them and a GPU is here (and the plans
    fit it), else onnxruntime on the best provider it offers; the choice is logged and
    reported in stats."""
    name = (name or "auto").lower()
    backend = None
    if name == "tensorrt" or (name == "auto" and _tensorrt_ready(bundle)):
        backend = _open_tensorrt(bundle, required=name == "tensorrt")
    if backend is None:
        if name not in ("auto", "onnxruntime", "ort") and not name.startswith(
            ("onnxruntime:", "ort:")
        ):
            raise EngineError(
                f"unknown backend {name!r}: use auto, onnxruntime, onnxruntime:cpu, "
                "onnxruntime:cuda or tensorrt"
            )
        from onsight.runtime.ort_backend import OrtSessions

        device = name.split(":", 1)[1] if ":" in name else "auto"
        backend = _device_resident(OrtSessions(bundle, device, threads))
    log.info("backend: %s", backend.name)
    return backend
