"""onnxruntime on CUDA with IO binding: the KV cache stays in GPU memory between steps.

Without IO binding every step would send the whole cache from host to device and back. Here
the cache lives in plain cudaMalloc buffers (the same DeviceStepper as the TensorRT backend:
in-place strided device-to-device writes of each step's new K/V, eviction staged through the
host); each step binds those buffers to the graph's past inputs by pointer, small inputs are
bound from host memory, the logits and kept indices come back to the host, and the new K/V
stay on the device until they are written into the cache. Needs onnxruntime-gpu and
cuda-python (`pip install cuda-python`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from onsight.runtime.kv_policy import EvictionPolicy
from onsight.runtime.ort_backend import OrtSessions
from onsight.runtime.trt_backend import (
    DeviceBuffer,
    DeviceStepper,
    _check,
    _cudart,
    _quiet,
    _quiet_sync,
)

log = logging.getLogger(__name__)

# OrtValue.data_type() -> numpy, for the tensor types the graphs' K/V outputs may have
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class BoundOutput:
    """A graph output left in device memory; keeps onnxruntime's buffer alive while used."""

    def __init__(self, value: Any):
        self.value = value
        self.ptr = int(value.data_ptr())
        self.shape = tuple(value.shape())
        kind = _ORT_TYPES.get(value.data_type())
        self.dtype = np.dtype(kind) if kind else None  # None: not checked by the stepper


def synchronized_run_options():
    """Run options that make onnxruntime wait for its CUDA stream before `run_with_iobinding`
    returns (its default, stated: the new K/V are then read on another stream)."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.add_run_config_entry("disable_synchronize_execution_providers", "0")
    return opts


def bind_step(
    session, inputs: dict[str, Any], fetch: tuple[str, ...], device: str, run_options=None
) -> dict:
    """Run one session with IO binding. DeviceBuffers are bound by pointer; numpy arrays from
    host memory. Outputs named in `fetch` come back as numpy arrays, the rest stay on
    `device` as BoundOutputs."""
    io = session.io_binding()
    wanted = {i.name for i in session.get_inputs()}
    for name, value in inputs.items():
        if name not in wanted:
            continue
        if isinstance(value, DeviceBuffer):
            io.bind_input(name, device, 0, value.dtype, list(value.shape), value.ptr)
        else:
            io.bind_cpu_input(name, np.ascontiguousarray(value))
    names = [o.name for o in session.get_outputs()]
    for name in names:
        io.bind_output(name, "cpu" if name in fetch or device == "cpu" else device, 0)
    session.run_with_iobinding(io, run_options)
    out: dict[str, Any] = {}
    for name, value in zip(names, io.get_outputs(), strict=True):
        out[name] = value.numpy() if name in fetch else BoundOutput(value)
    return out


class OrtDeviceBackend:
    """OrtSessions on the CUDA execution provider, run through IO binding."""

    def __init__(self, ort: OrtSessions, device: str = "cuda"):
        self.ort = ort
        self.sessions = ort.sessions  # graph name -> InferenceSession, as OrtSessions has
        self.inputs = ort.inputs
        self.device = device  # where DeviceBuffers live ("cpu" only in tests)
        self.bundle = ort.bundle
        self.cudart = _cudart()
        self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._run_options = synchronized_run_options()
        self._last: dict[str, Any] | None = None
        self._steppers: list[DeviceStepper] = []

    @property
    def name(self) -> str:
        return self.ort.name + ":iobinding"

    def run(self, graph: str, inputs: dict[str, Any], fetch: tuple[str, ...]) -> dict[str, Any]:
        # the cache writes queued on our stream must land before onnxruntime reads the cache
        _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        out = bind_step(self.sessions[graph], inputs, fetch, self.device, self._run_options)
        self._last = out  # device outputs stay alive until the next step's sync
        return out

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return self.ort.encode(frames)

    def stepper(self, policy: EvictionPolicy | None = None) -> DeviceStepper:
        st = DeviceStepper(self, policy or self.bundle.policy)
        self._steppers.append(st)  # its cache is freed with the backend
        return st

    def close(self) -> None:
        """Free the device caches and the stream; safe to call twice."""
        _quiet_sync(self.cudart, self.stream)
        for st in self._steppers:
            st.free()
        self._steppers.clear()
        self._last = None
        if self.stream is not None:
            _quiet(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None
        self.ort.close()


def io_binding_ready() -> bool:
    """cuda-python is importable (onnxruntime's CUDA provider is checked by the caller)."""
    try:
        _cudart()
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False
    return True
