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
from onsight.runtime.kv_policy import FRAME, EvictionPolicy
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
        import tensorrt as trt

        meta = bundle.manifest.get("tensorrt")
        if not meta:
            raise EngineError(
                f"bundle {bundle.path} has no TensorRT plans; build them with "
                f"`onsight build {bundle.path} --backend tensorrt`"
            )
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


class DeviceStepper:
    """The same contract as CachedStepper, with the cache on the GPU.

    `backend` supplies `bundle`, `cudart`, `stream` and `run(graph, inputs, fetch)`, whose
    unfetched outputs expose a device pointer `.ptr`: TensorRT plans here, onnxruntime's CUDA
    provider through IO binding in ort_iobinding.py.
    """

    def __init__(self, backend, policy: EvictionPolicy):
        from onsight.runtime.kv_cache import KVCache

        self.b = backend
        lay = backend.bundle.layout
        self.layout = lay
        # Host-side bookkeeping (lengths, positions, masks, token table) reuses KVCache; its
        # host K/V arrays are used only as staging during eviction.
        self.cache = KVCache(lay, policy, spans=False)  # plans bind whole buffers
        self.inv_freq = backend.bundle.inv_freq
        self.all_routed = backend.bundle.routed_layers
        dt = np.dtype(lay.dtype)
        self.k = [
            DeviceBuffer((lay.kv_heads, lay.capacity(i), lay.head_dim), dt)
            for i in range(lay.num_layers)
        ]
        self.v = [
            DeviceBuffer((lay.kv_heads, lay.capacity(i), lay.head_dim), dt)
            for i in range(lay.num_layers)
        ]
        self.prev_embeds: np.ndarray | None = None

    @property
    def evictions(self) -> int:
        return self.cache.evictions

    def reset(self) -> None:
        self.cache.reset()
        self.prev_embeds = None

    def _ensure(self, new_dense: int, new_mod: int) -> None:
        c = self.cache
        routed = self.layout.routed
        full = any(
            c.lengths[i] + (new_mod if i in routed else new_dense) > len(c.masks[i])
            for i in range(self.layout.num_layers)
        )
        if not full:
            return
        s = self.b.stream
        for i in range(self.layout.num_layers):  # device -> host staging, rebase, back
            c.k[i][...] = self.k[i].download(s)
            c.v[i][...] = self.v[i].download(s)
        c.ensure_room(new_dense, new_mod, self.inv_freq)
        for i in range(self.layout.num_layers):
            self.k[i].upload(c.k[i], s)
            self.v[i].upload(c.v[i], s)

    def _inputs(self, **extra) -> dict:
        c, lay = self.cache, self.layout
        dense = next((i for i in range(lay.num_layers) if i not in lay.routed), None)
        mod = next((i for i in range(lay.num_layers) if i in lay.routed), None)
        feeds = dict(extra)
        feeds["dense_mask"] = (
            c.masks[dense] if dense is not None else np.zeros(lay.capacity_dense, bool)
        )
        feeds["mod_mask"] = c.masks[mod] if mod is not None else np.zeros(lay.capacity_mod, bool)
        for i in range(lay.num_layers):
            feeds[f"past_key_{i}"] = self.k[i]
            feeds[f"past_value_{i}"] = self.v[i]
        return feeds

    def _append(self, i: int, new_k, new_v, positions: np.ndarray) -> None:
        """Strided in-place device copy of (Hkv, T, D) after the layer's valid slots."""
        cud = self.b.cudart
        c = self.cache
        n, t = c.lengths[i], len(positions)
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
        c.positions[i][n : n + t] = positions
        c._set_length(i, n + t)

    def text(self, ids: list[int], kind: int, group: int) -> np.ndarray:
        self._ensure(len(ids), len(ids))
        pos = self.cache.table.append(len(ids), kind, group)
        out = self.b.run(
            "text_step",
            self._inputs(input_ids=np.asarray(ids, np.int64), position_ids=pos),
            fetch=("logits",),
        )
        for i in range(self.layout.num_layers):
            self._append(i, out[f"new_key_{i}"], out[f"new_value_{i}"], pos)
        return np.asarray(out["logits"], np.float32)

    def frame(self, ids: list[int], embeds: np.ndarray, group: int, keep=None) -> np.ndarray:
        full = embeds
        prev_full = self.prev_embeds if self.prev_embeds is not None else np.zeros_like(full)
        if keep is not None:
            embeds, prev_full = full[keep], prev_full[keep]
        t, n = len(ids), embeds.shape[0]
        self._ensure(t + n, t + self.layout.k)
        table = self.cache.table
        pos_text = table.append(t, FRAME, group)
        pos_vis = table.append(n, FRAME, group, vision=True)
        positions = np.concatenate([pos_text, pos_vis])
        prev = prev_full
        dt = np.dtype(self.layout.dtype)
        kept_names = tuple(f"kept_{i}" for i in self.all_routed)
        out = self.b.run(
            "frame_step",
            self._inputs(
                input_ids=np.asarray(ids, np.int64),
                frame_embeds=embeds.astype(dt),
                prev_frame_embeds=prev.astype(dt),
                position_ids=positions,
            ),
            fetch=("logits", *kept_names),
        )
        self.prev_embeds = full
        for i in range(self.layout.num_layers):
            if i in self.layout.routed:
                pos = np.concatenate([pos_text, pos_vis[np.asarray(out[f"kept_{i}"])]])
            else:
                pos = positions
            self._append(i, out[f"new_key_{i}"], out[f"new_value_{i}"], pos)
        return np.asarray(out["logits"], np.float32)


TrtStepper = DeviceStepper  # the name it had before onnxruntime's CUDA path shared it
