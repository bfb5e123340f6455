"""onnxruntime backend: the bundle's three graphs in sessions created once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from onsight.runtime import graph_io as io_names
from onsight.runtime.bundle import Bundle
from onsight.runtime.errors import EngineError
from onsight.runtime.kv_policy import EvictionPolicy
from onsight.runtime.stepper import CachedStepper, FrameOut, TextOut

log = logging.getLogger(__name__)

# Fastest first; "auto" takes the first one that this onnxruntime build offers.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEVICE_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - a dependency
        raise EngineError(
            "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu "
            "(CUDA; never both)"
        ) from e
    return onnxruntime


def choose_providers(device: str = "auto") -> list[str]:
    """Providers for a device name ("auto", "cpu", "cuda", "tensorrt")."""
    available = _ort().get_available_providers()
    if device == "auto":
        # TensorRT EP needs per-shape engine builds; prefer CUDA for the dynamic text step.
        order = ("CUDAExecutionProvider", "CPUExecutionProvider")
        return [p for p in order if p in available]
    want = DEVICE_PROVIDERS.get(device)
    if want is None:
        raise EngineError(f"unknown device {device!r}: use auto, cpu, cuda or tensorrt")
    if want not in available:
        raise EngineError(
            f"onnxruntime here offers {', '.join(available)}, not {want}; install "
            "onnxruntime-gpu (instead of onnxruntime) on a CUDA machine, or use --backend "
            "onnxruntime:cpu"
        )
    return [want, "CPUExecutionProvider"] if want != "CPUExecutionProvider" else [want]


def reads_cache_span(sessions: dict) -> bool:
    """Whether the decoder graphs take a dynamic cache length (the filled span); bundles from
    before that change take the whole capacity."""
    for s in sessions.values():
        for i in s.get_inputs():
            if i.name == io_names.past_key(0):
                return not isinstance(i.shape[1], int)
    return False


class OrtSessions:
    """The bundle's graphs as onnxruntime sessions."""

    def __init__(
        self,
        bundle: Bundle,
        device: str = "auto",
        threads: int | None = None,
        use_overrides: bool | None = None,
        graph_files: dict[str, Path] | None = None,
    ):
        ort = _ort()
        self.bundle = bundle
        self.providers = choose_providers(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.sessions = {}
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        # int8 graphs (from `onsight build --quantize int8`) are for CPU: used there by default
        self.int8 = bool(bundle.manifest.get("graph_overrides")) and (
            on_cpu if use_overrides is None else use_overrides
        )
        for g in ("vision", "text_step", "frame_step"):
            path = bundle.graph_path(g)
            override = (bundle.manifest.get("graph_overrides") or {}).get(g)
            if self.int8 and override and (bundle.path / override).is_file():
                path = bundle.path / override
            if graph_files and g in graph_files:  # e.g. Q/DQ graphs under evaluation
                path = Path(graph_files[g])
            try:
                self.sessions[g] = ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                raise EngineError(
                    f"onnxruntime could not load {path}: {e}; re-export the bundle"
                ) from e
        self.inputs = {g: {i.name for i in s.get_inputs()} for g, s in self.sessions.items()}
        self.dynamic_past = reads_cache_span(self.sessions)
        self.device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"
        log.info("onnxruntime sessions on %s (%s)", self.device, ", ".join(self.providers))

    @property
    def name(self) -> str:
        ep = self.providers[0].removesuffix("ExecutionProvider").lower()
        return f"onnxruntime:{ep}" + (":int8" if self.int8 else "")

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (B, N, hidden) float32."""
        (out,) = self.sessions["vision"].run(None, {io_names.FRAMES: frames})
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        self.sessions.clear()

    def stepper(self, policy: EvictionPolicy | None = None) -> OrtStepper:
        return OrtStepper(self, policy or self.bundle.policy)


class OrtStepper(CachedStepper):
    """Feeds the preallocated cache buffers straight into the sessions (no copies on CPU)."""

    def __init__(self, sessions: OrtSessions, policy: EvictionPolicy):
        b = sessions.bundle
        # graphs exported with a dynamic cache length attend over the filled span only;
        # older bundles take the whole capacity
        super().__init__(b.layout, b.inv_freq, b.routed_layers, policy, sessions.dynamic_past)
        self.s = sessions
        L = b.layout.num_layers
        self._dense = next((i for i in range(L) if i not in b.layout.routed), None)
        self._mod = next((i for i in range(L) if i in b.layout.routed), None)
        self._empty_dense = np.zeros(b.layout.capacity_dense, bool)
        self._empty_mod = np.zeros(b.layout.capacity_mod, bool)
        self.dtype = np.dtype(b.layout.dtype)
        # per layer (key, value) input names, made once: every token's step feeds them
        self._past = [(io_names.past_key(i), io_names.past_value(i)) for i in range(L)]

    def _feeds(self, graph: str, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = self.cache
        feeds = dict(extra)
        feeds[io_names.DENSE_MASK] = (
            c.mask(self._dense) if self._dense is not None else self._empty_dense
        )
        feeds[io_names.MOD_MASK] = c.mask(self._mod) if self._mod is not None else self._empty_mod
        for (key, value), k, v in zip(self._past, c.k, c.v, strict=True):
            feeds[key], feeds[value] = k, v
        wanted = self.s.inputs[graph]
        return {k: v for k, v in feeds.items() if k in wanted}

    def run_text(self, ids: np.ndarray, positions: np.ndarray) -> TextOut:
        outs = self.s.sessions["text_step"].run(
            None,
            self._feeds("text_step", {io_names.INPUT_IDS: ids, io_names.POSITION_IDS: positions}),
        )
        L = self.layout.num_layers
        return (
            outs[0].astype(np.float32, copy=False),
            outs[1 : 2 * L + 1 : 2],
            outs[2 : 2 * L + 1 : 2],
        )

    def run_frame(self, ids, embeds, prev, positions) -> FrameOut:
        outs = self.s.sessions["frame_step"].run(
            None,
            self._feeds(
                "frame_step",
                {
                    io_names.INPUT_IDS: ids,
                    io_names.FRAME_EMBEDS: embeds.astype(self.dtype, copy=False),
                    io_names.PREV_FRAME_EMBEDS: prev.astype(self.dtype, copy=False),
                    io_names.POSITION_IDS: positions,
                },
            ),
        )
        L = self.layout.num_layers
        return (
            outs[0].astype(np.float32, copy=False),
            outs[1 : 2 * L + 1 : 2],
            outs[2 : 2 * L + 1 : 2],
            outs[2 * L + 1 :],
        )


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
