"""Native TensorRT backend: the bundle's plans with the KV cache resident on the GPU.

The cache lives in device buffers (Hkv, capacity, D) per layer; each step binds them as
inputs and its new K/V outputs are copied in place after the valid slots (a strided
device-to-device copy, no whole-cache copy). Eviction, rare by design, moves the cache to the
host, re-bases it with the shared numpy code, and moves it back. Needs TensorRT 10 and
cuda-python (`pip install cuda-python`), both present on JetPack 6.
"""

from __future__ import annotations

import logging

import numpy as np

from onsight.runtime.bundle import Bundle
from onsight.runtime.errors import EngineError
from onsight.runtime.kv_policy import EvictionPolicy
from onsight.runtime.stepper import CachedStepper, FrameOut, TextOut
from onsight.runtime.trt_build import check_plan_compat, gpu_info

log = logging.getLogger(__name__)


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise EngineError(
                "the TensorRT backend needs cuda-python: pip install cuda-python"
            ) from e
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA call failed with error {err}")
    return rest[0] if len(rest) == 1 else rest


def cuda_available() -> bool:
    try:
        cudart = _cudart()
        return int(cudart.cudaGetDeviceCount()[0]) == 0 and cudart.cudaGetDeviceCount()[1] > 0
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


class DeviceBuffer:
    """A plain cudaMalloc allocation with host copies (never managed memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.cudart = _cudart()
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.ptr = int(_check(self.cudart.cudaMalloc(max(1, self.nbytes))))

    def upload(self, host: np.ndarray, stream) -> None:
        h = np.ascontiguousarray(host, self.dtype)
        _check(
            self.cudart.cudaMemcpyAsync(
                self.ptr,
                h.ctypes.data,
                h.nbytes,
                self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                stream,
            )
        )

    def download(self, stream, shape: tuple[int, ...] | None = None) -> np.ndarray:
        out = np.empty(shape or self.shape, self.dtype)
        _check(
            self.cudart.cudaMemcpyAsync(
                out.ctypes.data,
                self.ptr,
                out.nbytes,
                self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                stream,
            )
        )
        _check(self.cudart.cudaStreamSynchronize(stream))
        return out

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


class TrtBackend:
    """Engines deserialized once; buffers allocated once at their largest shapes."""

    def __init__(self, bundle: Bundle):
        meta = bundle.manifest.get("tensorrt")
        if not meta:
            raise EngineError(
                f"bundle {bundle.path} has no TensorRT plans; build them on this GPU with "
                f"`onsight build {bundle.path} --backend tensorrt`, or use --backend onnxruntime"
            )
        try:
            import tensorrt as trt
        except ImportError as e:
            raise EngineError(
                "--backend tensorrt needs TensorRT's Python package (`import tensorrt` failed: "
                f"{e}); install it (JetPack ships it on Jetson), or use --backend onnxruntime"
            ) from e
        check_plan_compat(meta, gpu_info(), trt.__version__)
        self.bundle = bundle
        self.cudart = _cudart()
        self.stream = _check(self.cudart.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for graph, rel in meta["plans"].items():
            engine = runtime.deserialize_cuda_engine((bundle.path / rel).read_bytes())
            if engine is None:
                raise EngineError(f"TensorRT could not load {rel}; rebuild with `onsight build`")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
        self.precision = meta["precision"]
        self._scratch: dict[tuple[str, str], DeviceBuffer] = {}

    @property
    def name(self) -> str:
        return f"tensorrt:{self.precision}"

    def _buffer(self, graph: str, tensor: str, shape: tuple[int, ...], dtype) -> DeviceBuffer:
        """Scratch buffers grow to the largest shape seen and are then reused."""
        key = (graph, tensor)
        buf = self._scratch.get(key)
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if buf is None or buf.nbytes < need:
            if buf is not None:
                buf.free()
            buf = DeviceBuffer(shape, dtype)
            self._scratch[key] = buf
        return buf

    def run(
        self, graph: str, inputs: dict[str, np.ndarray | DeviceBuffer], fetch: tuple[str, ...]
    ) -> dict[str, np.ndarray | DeviceBuffer]:
        """Bind inputs (host arrays are uploaded; DeviceBuffers bound as they are), execute,
        and return the named outputs on the host; other outputs stay on the device."""
        import tensorrt as trt

        engine, ctx = self.engines[graph], self.contexts[graph]
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT or name not in inputs:
                continue
            value = inputs[name]
            if isinstance(value, DeviceBuffer):
                ctx.set_input_shape(name, value.shape)
                ctx.set_tensor_address(name, value.ptr)
            else:
                buf = self._buffer(graph, name, value.shape, value.dtype)
                buf.shape = value.shape
                buf.upload(value, self.stream)
                ctx.set_input_shape(name, value.shape)
                ctx.set_tensor_address(name, buf.ptr)
        outputs: dict[str, np.ndarray | DeviceBuffer] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            buf = self._buffer(graph, name, shape, dtype)
            buf.shape = shape
            ctx.set_tensor_address(name, buf.ptr)
            outputs[name] = buf
        if not ctx.execute_async_v3(self.stream):
            raise EngineError(f"TensorRT failed to run {graph}")
        for name in fetch:
            outputs[name] = outputs[name].download(self.stream)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return outputs

    def encode(self, frames: np.ndarray) -> np.ndarray:
        out = self.run("vision", {"frames": frames}, fetch=("frame_embeds",))
        return np.asarray(out["frame_embeds"], np.float32)

    def stepper(self, policy: EvictionPolicy | None = None) -> DeviceStepper:
        return DeviceStepper(self, policy or self.bundle.policy)

    def close(self) -> None:
        for buf in self._scratch.values():
            buf.free()
        self._scratch.clear()
        self.contexts.clear()
        self.engines.clear()


class DeviceStepper(CachedStepper):
    """CachedStepper with the cache on the GPU.

    `backend` supplies `bundle`, `cudart`, `stream` and `run(graph, inputs, fetch)`, whose
    unfetched outputs expose a device pointer `.ptr`: TensorRT plans here, onnxruntime's CUDA
    provider through IO binding in ort_iobinding.py. The host-side KVCache keeps the
    bookkeeping (lengths, positions, masks, token table); its K/V arrays are used only as
    staging during eviction.
    """

    def __init__(self, backend, policy: EvictionPolicy):
        b = backend.bundle
        # graphs bind the whole preallocated buffers (TensorRT profiles fix their length)
        super().__init__(b.layout, b.inv_freq, b.routed_layers, policy, spans=False)
        self.b = backend
        lay, dt = self.layout, np.dtype(self.layout.dtype)
        shapes = [(lay.kv_heads, lay.capacity(i), lay.head_dim) for i in range(lay.num_layers)]
        self.k = [DeviceBuffer(shape, dt) for shape in shapes]
        self.v = [DeviceBuffer(shape, dt) for shape in shapes]
        dense = next((i for i in range(lay.num_layers) if i not in lay.routed), None)
        mod = next((i for i in range(lay.num_layers) if i in lay.routed), None)
        c = self.cache
        self._dense_mask = (
            c.masks[dense] if dense is not None else np.zeros(lay.capacity_dense, bool)
        )
        self._mod_mask = c.masks[mod] if mod is not None else np.zeros(lay.capacity_mod, bool)

    def ensure_room(self, new_dense: int, new_mod: int, protect: int | None = None) -> None:
        c = self.cache
        if not c.needs_room(new_dense, new_mod):
            return
        s = self.b.stream
        for i in range(self.layout.num_layers):  # device -> host staging, rebase, back
            c.k[i][...] = self.k[i].download(s)
            c.v[i][...] = self.v[i].download(s)
        c.ensure_room(new_dense, new_mod, self.inv_freq, protect)
        for i in range(self.layout.num_layers):
            self.k[i].upload(c.k[i], s)
            self.v[i].upload(c.v[i], s)

    def write(self, i: int, new_k, new_v, positions: np.ndarray) -> None:
        """Strided in-place device copy of (Hkv, T, D) after the layer's valid slots."""
        cud = self.b.cudart
        n, t = self.cache.lengths[i], len(positions)
        item = np.dtype(self.layout.dtype).itemsize
        row = t * self.layout.head_dim * item
        pitch_dst = self.k[i].shape[1] * self.layout.head_dim * item
        off = n * self.layout.head_dim * item
        for dst, src in ((self.k[i], new_k), (self.v[i], new_v)):
            _check(
                cud.cudaMemcpy2DAsync(
                    dst.ptr + off,
                    pitch_dst,
                    src.ptr,
                    row,
                    row,
                    self.layout.kv_heads,
                    cud.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                    self.b.stream,
                )
            )
        self.cache.advance(i, positions)

    def _run(self, graph: str, fetch: tuple[str, ...], **feeds) -> dict:
        feeds["dense_mask"], feeds["mod_mask"] = self._dense_mask, self._mod_mask
        for i in range(self.layout.num_layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = self.k[i], self.v[i]
        return self.b.run(graph, feeds, fetch=fetch)

    def _new_kv(self, out: dict) -> tuple[list, list]:
        L = self.layout.num_layers
        return [out[f"new_key_{i}"] for i in range(L)], [out[f"new_value_{i}"] for i in range(L)]

    def run_text(self, ids: np.ndarray, positions: np.ndarray) -> TextOut:
        out = self._run("text_step", ("logits",), input_ids=ids, position_ids=positions)
        return (np.asarray(out["logits"], np.float32), *self._new_kv(out))

    def run_frame(self, ids, embeds, prev, positions) -> FrameOut:
        dt = np.dtype(self.layout.dtype)
        kept = tuple(f"kept_{i}" for i in self.all_routed)
        out = self._run(
            "frame_step",
            ("logits", *kept),
            input_ids=ids,
            frame_embeds=embeds.astype(dt),
            prev_frame_embeds=prev.astype(dt),
            position_ids=positions,
        )
        logits = np.asarray(out["logits"], np.float32)
        return (logits, *self._new_kv(out), [np.asarray(out[k]) for k in kept])


TrtStepper = DeviceStepper  # the name it had before onnxruntime's CUDA path shared it
