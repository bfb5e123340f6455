"""Native TensorRT backend: the bundle's plans with the KV cache resident on the GPU.

The cache lives in device buffers (Hkv, capacity, D) per layer; each step binds them as
inputs and its new K/V outputs are copied in place after the valid slots (a strided
device-to-device copy, no whole-cache copy). Eviction, rare by design, moves the cache to the
host, re-bases it with the shared numpy code, and moves it back. Needs TensorRT 10 (JetPack 6.1
and later ship 10.3; JetPack 6.0 has 8.6) and cuda-python (`pip install cuda-python`, the
release whose major version is the driver's CUDA: 12.x on JetPack 6).
"""

from __future__ import annotations

import logging

import numpy as np

from onsight.runtime import graph_io as io_names
from onsight.runtime.bundle import Bundle
from onsight.runtime.errors import EngineError
from onsight.runtime.kv_policy import EvictionPolicy
from onsight.runtime.stepper import CachedStepper, FrameOut, TextOut
from onsight.runtime.trt_build import check_plan_compat, check_tensorrt_version, gpu_info

log = logging.getLogger(__name__)

CUDA_PYTHON_HINT = (
    "pip install the cuda-python whose major version matches your CUDA driver "
    "(CUDA 12, e.g. JetPack 6: pip install 'cuda-python>=12,<13')"
)
# cudaError_t names a user can act on, and what to do
_CUDA_HINTS = {
    "cudaErrorInsufficientDriver": "the NVIDIA driver is older than the CUDA runtime inside "
    "cuda-python; " + CUDA_PYTHON_HINT,
    "cudaErrorNoDevice": "no CUDA GPU is visible to this process (check CUDA_VISIBLE_DEVICES, "
    "or run the container with the NVIDIA runtime)",
    "cudaErrorMemoryAllocation": "the GPU is out of memory; close other GPU programs, or "
    "re-export the bundle with a smaller --kv-capacity",
}


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python (the alias is gone in 13.0)
        except ImportError as e:
            raise EngineError(
                f"the GPU backends need cuda-python, which is not installed: {CUDA_PYTHON_HINT}"
            ) from e
    return cudart


def _check(result, what: str = "a CUDA call"):
    """cuda-python returns (err, *values): raise on err, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", None) or f"error {int(err)}"
        hint = _CUDA_HINTS.get(name)
        raise EngineError(f"{what} failed: {name}" + (f"; {hint}" if hint else ""))
    return rest[0] if len(rest) == 1 else rest


def _quiet(result, what: str) -> None:
    """For cleanup: log a failed call and go on freeing the rest."""
    try:
        _check(result, what)
    except EngineError as e:
        log.warning("%s", e)


def _quiet_sync(cudart, stream) -> None:
    """Let queued work that reads buffers about to be freed finish (cleanup paths)."""
    if stream is not None:
        _quiet(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def _native_handle(obj) -> int:
    """The address inside a cuda-python object (a stream), for APIs that take an int, as
    TensorRT's execute_async_v3 does; `int(obj)` is deprecated from cuda-python 13.0."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before the utils module
        return int(obj)
    return int(get_cuda_native_handle(obj))


def cuda_available() -> bool:
    try:
        err, count = _cudart().cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


class DeviceBuffer:
    """A plain cudaMalloc allocation with host copies (never managed memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.cudart = _cudart()
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.ptr = int(_check(self.cudart.cudaMalloc(max(1, self.nbytes)), "cudaMalloc"))

    def upload(self, host: np.ndarray, stream) -> None:
        """Queue a host-to-device copy. A pageable source is staged before the call returns
        (CUDA's "API synchronization behavior"), so `host` may be a temporary."""
        h = np.ascontiguousarray(host, self.dtype)
        assert h.nbytes <= self.nbytes, "upload larger than the buffer"
        _check(
            self.cudart.cudaMemcpyAsync(
                self.ptr,
                h.ctypes.data,
                h.nbytes,
                self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                stream,
            ),
            "cudaMemcpyAsync (host to device)",
        )

    def download(self, stream, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The buffer on the host, after everything queued on `stream` before it."""
        out = np.empty(shape or self.shape, self.dtype)
        assert out.nbytes <= self.nbytes, "download larger than the buffer"
        _check(
            self.cudart.cudaMemcpyAsync(
                out.ctypes.data,
                self.ptr,
                out.nbytes,
                self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                stream,
            ),
            "cudaMemcpyAsync (device to host)",
        )
        _check(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return out

    def free(self) -> None:
        if self.ptr:
            _quiet(self.cudart.cudaFree(self.ptr), "cudaFree")
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
        check_tensorrt_version(trt.__version__, EngineError)
        check_plan_compat(meta, gpu_info(), trt.__version__, bundle.path)
        self.bundle = bundle
        self.precision = meta["precision"]
        self.engines: dict = {}
        self.contexts: dict = {}
        self._scratch: dict[tuple[str, str], DeviceBuffer] = {}
        self._io: dict[str, list[tuple[str, bool, np.dtype]]] = {}  # graph -> (name, input, dtype)
        self._steppers: list[DeviceStepper] = []
        self.stream = None
        self._runtime = None
        profiles = meta.get("profiles") or {}
        frames = profiles.get("vision", {}).get(io_names.FRAMES)
        self._max_frames = int(frames[2][0]) if frames else 1  # the vision plan's largest batch
        ids = profiles.get("text_step", {}).get(io_names.INPUT_IDS)
        # the text plan's longest step; DeviceStepper splits longer text (a long prompt)
        self.max_text_tokens = int(ids[2][0]) if ids else None
        self.cudart = _cudart()
        try:
            self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._stream_handle = _native_handle(self.stream)
            # the logger and runtime outlive the engines they made
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            for graph, rel in meta["plans"].items():
                self._load(graph, bundle.path / rel, meta)
        except BaseException:
            self.close()
            raise

    def _load(self, graph: str, path, meta: dict) -> None:
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise EngineError(
                f"TensorRT plan {path} could not be read ({e.strerror}); rebuild the plans with "
                f"`onsight build {self.bundle.path} --backend tensorrt`"
            ) from e
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise EngineError(
                f"TensorRT could not load {path.name} (built with TensorRT "
                f"{meta.get('tensorrt_version')} for {meta.get('gpu')}; TensorRT's log above says "
                f"why); rebuild the plans here with `onsight build {self.bundle.path} "
                "--backend tensorrt`"
            )
        self.engines[graph] = engine
        ctx = engine.create_execution_context()
        if ctx is None:
            raise EngineError(
                f"TensorRT could not create an execution context for {graph} (most often: out "
                "of GPU memory); close other GPU programs or use --backend onnxruntime"
            )
        self.contexts[graph] = ctx

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
                # queued work (a copy out of last step's outputs) may still read it
                _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
                buf.free()
            buf = DeviceBuffer(shape, dtype)
            self._scratch[key] = buf
        return buf

    @staticmethod
    def _dtype(trt, engine, graph: str, name: str) -> np.dtype:
        kind = engine.get_tensor_dtype(name)
        try:
            dt = trt.nptype(kind)
        except TypeError:
            dt = None
        if dt is None:
            raise EngineError(f"{graph}: tensor {name} is {kind}, which onsight cannot feed")
        return np.dtype(dt)

    def _set_shape(self, graph: str, name: str, shape: tuple[int, ...]) -> None:
        engine, ctx = self.engines[graph], self.contexts[graph]
        if not ctx.set_input_shape(name, shape):
            lo, _, hi = (tuple(d) for d in engine.get_tensor_profile_shape(name, 0))
            raise EngineError(
                f"{graph}: {name} has shape {tuple(shape)}, outside what the plan was built for "
                f"({lo} to {hi}); if it is a long question or prompt, shorten it; otherwise "
                f"rebuild the plans from this bundle (`onsight build {self.bundle.path} --backend "
                "tensorrt`), or use --backend onnxruntime"
            )

    def _bind(self, ctx, graph: str, name: str, ptr: int) -> None:
        if not ctx.set_tensor_address(name, ptr):
            raise EngineError(f"TensorRT refused the buffer for {graph}:{name}")

    def run(
        self, graph: str, inputs: dict[str, np.ndarray | DeviceBuffer], fetch: tuple[str, ...]
    ) -> dict[str, np.ndarray | DeviceBuffer]:
        """Bind inputs (host arrays are uploaded; DeviceBuffers bound as they are), execute,
        and return the named outputs on the host; other outputs stay on the device."""
        import tensorrt as trt

        engine, ctx = self.engines[graph], self.contexts[graph]
        io = self._io.get(graph)
        if io is None:  # a plan's IO never changes: read it once, not every token
            io = self._io[graph] = [
                (
                    n,
                    engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
                    self._dtype(trt, engine, graph, n),
                )
                for n in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
            ]
        for name, _, want in (t for t in io if t[1]):
            if name not in inputs:
                raise EngineError(
                    f"{graph}: the plan takes an input {name!r} this bundle does not feed; "
                    f"rebuild the plans with `onsight build {self.bundle.path} --backend tensorrt`"
                )
            value = inputs[name]
            if isinstance(value, DeviceBuffer):
                # bound by pointer: TensorRT reads the bytes as `want`, whatever they hold
                if value.dtype != want:
                    raise EngineError(
                        f"{graph}: the plan's {name} is {want}, the cache bound to it is "
                        f"{value.dtype}; the plans were built from another export: rebuild them "
                        f"with `onsight build {self.bundle.path} --backend tensorrt`"
                    )
                buf = value
            else:
                host = np.ascontiguousarray(value, want)
                buf = self._buffer(graph, name, host.shape, want)
                buf.shape = host.shape
                buf.upload(host, self.stream)
            self._set_shape(graph, name, buf.shape)
            self._bind(ctx, graph, name, buf.ptr)
        outputs: dict[str, np.ndarray | DeviceBuffer] = {}
        for name, _, dtype in (t for t in io if not t[1]):
            shape = tuple(ctx.get_tensor_shape(name))  # known once every input shape is set
            if any(d < 0 for d in shape):
                raise EngineError(
                    f"{graph}: output {name} has no shape before running ({shape}); onsight's "
                    "graphs have none that depend on data, so this plan is not from this bundle"
                )
            buf = self._buffer(graph, name, shape, dtype)
            buf.shape = shape
            self._bind(ctx, graph, name, buf.ptr)
            outputs[name] = buf
        if not ctx.execute_async_v3(self._stream_handle):
            raise EngineError(f"TensorRT failed to run {graph} (its log above says why)")
        for name in fetch:
            outputs[name] = outputs[name].download(self.stream)
        _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outputs

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> (B, N, hidden) float32, in batches the vision plan takes."""
        step, embeds = max(1, self._max_frames), io_names.FRAME_EMBEDS
        parts = [
            self.run("vision", {io_names.FRAMES: frames[i : i + step]}, fetch=(embeds,))[embeds]
            for i in range(0, len(frames), step)
        ]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def stepper(self, policy: EvictionPolicy | None = None) -> DeviceStepper:
        st = DeviceStepper(self, policy or self.bundle.policy)
        self._steppers.append(st)  # its cache is freed with the backend
        return st

    def close(self) -> None:
        """Free every device allocation and the stream; safe to call twice."""
        _quiet_sync(self.cudart, self.stream)
        for st in self._steppers:
            st.free()
        self._steppers.clear()
        for buf in self._scratch.values():
            buf.free()
        self._scratch.clear()
        self.contexts.clear()  # contexts before their engines, engines before the runtime
        self.engines.clear()
        self._runtime = None
        if self.stream is not None:
            _quiet(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None


class DeviceStepper(CachedStepper):
    """CachedStepper with the cache on the GPU.

    `backend` supplies `bundle`, `cudart`, `stream` and `run(graph, inputs, fetch)`, whose
    unfetched outputs expose a device pointer `.ptr`, a `.shape` and (where known) a `.dtype`:
    TensorRT plans here, onnxruntime's CUDA provider through IO binding in ort_iobinding.py.
    The host-side KVCache keeps the bookkeeping (lengths, positions, masks, token table); its
    K/V arrays are used only as staging during eviction. The backend frees the device cache
    when it closes (or call `free`).
    """

    def __init__(self, backend, policy: EvictionPolicy):
        b = backend.bundle
        # graphs bind the whole preallocated buffers (TensorRT profiles fix their length)
        super().__init__(b.layout, b.inv_freq, b.routed_layers, policy, spans=False)
        self.b = backend
        lay, dt = self.layout, np.dtype(self.layout.dtype)
        shapes = [(lay.kv_heads, lay.capacity(i), lay.head_dim) for i in range(lay.num_layers)]
        self.k: list[DeviceBuffer] = []
        self.v: list[DeviceBuffer] = []
        try:
            for shape in shapes:
                self.k.append(DeviceBuffer(shape, dt))
                self.v.append(DeviceBuffer(shape, dt))
        except BaseException:
            self.free()
            raise
        dense = next((i for i in range(lay.num_layers) if i not in lay.routed), None)
        mod = next((i for i in range(lay.num_layers) if i in lay.routed), None)
        c = self.cache
        self._dense_mask = (
            c.masks[dense] if dense is not None else np.zeros(lay.capacity_dense, bool)
        )
        self._mod_mask = c.masks[mod] if mod is not None else np.zeros(lay.capacity_mod, bool)
        # per layer (key, value) names, made once: every token's step feeds and reads them
        L = lay.num_layers
        self._past = [(io_names.past_key(i), io_names.past_value(i)) for i in range(L)]
        self._new = [(io_names.new_key(i), io_names.new_value(i)) for i in range(L)]

    def free(self) -> None:
        for buf in (*self.k, *self.v):
            buf.free()

    def text(self, ids: list[int], kind: int, group: int) -> np.ndarray:
        """Text longer than the backend's plans take goes in consecutive steps of the same
        group (attention is causal: the cache and the last logits come out the same)."""
        limit = getattr(self.b, "max_text_tokens", None)
        if not limit or len(ids) <= limit:
            return super().text(ids, kind, group)
        for start in range(0, len(ids), limit):
            logits = super().text(ids[start : start + limit], kind, group)
        return logits

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
        cud, lay = self.b.cudart, self.layout
        dt = np.dtype(lay.dtype)
        n, t = self.cache.lengths[i], len(positions)
        assert n + t <= self.k[i].shape[1], "ensure_room must run before write"
        # the copy moves raw bytes: a wrong shape or type would corrupt the cache silently
        for src in (new_k, new_v):
            shape, kind = tuple(src.shape), getattr(src, "dtype", None)
            if shape != (lay.kv_heads, t, lay.head_dim) or (kind is not None and kind != dt):
                raise EngineError(
                    f"layer {i}: the graph's new K/V is {shape} {kind}, the cache takes "
                    f"{(lay.kv_heads, t, lay.head_dim)} {dt}; the plans or graphs do not match "
                    "this bundle: rebuild them"
                )
        row = t * lay.head_dim * dt.itemsize
        pitch_dst = self.k[i].shape[1] * lay.head_dim * dt.itemsize
        off = n * lay.head_dim * dt.itemsize
        for dst, src in ((self.k[i], new_k), (self.v[i], new_v)):
            _check(
                cud.cudaMemcpy2DAsync(
                    dst.ptr + off,
                    pitch_dst,
                    src.ptr,
                    row,
                    row,
                    lay.kv_heads,
                    cud.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                    self.b.stream,
                ),
                "cudaMemcpy2DAsync (KV cache write)",
            )
        self.cache.advance(i, positions)

    def _run(self, graph: str, fetch: tuple[str, ...], feeds: dict) -> dict:
        feeds = {**feeds, io_names.DENSE_MASK: self._dense_mask, io_names.MOD_MASK: self._mod_mask}
        for (key, value), k, v in zip(self._past, self.k, self.v, strict=True):
            feeds[key], feeds[value] = k, v
        return self.b.run(graph, feeds, fetch=fetch)

    def _new_kv(self, out: dict) -> tuple[list, list]:
        return [out[key] for key, _ in self._new], [out[value] for _, value in self._new]

    def run_text(self, ids: np.ndarray, positions: np.ndarray) -> TextOut:
        out = self._run(
            "text_step",
            (io_names.LOGITS,),
            {io_names.INPUT_IDS: ids, io_names.POSITION_IDS: positions},
        )
        return (np.asarray(out[io_names.LOGITS], np.float32), *self._new_kv(out))

    def run_frame(self, ids, embeds, prev, positions) -> FrameOut:
        dt = np.dtype(self.layout.dtype)
        kept_names = tuple(io_names.kept(i) for i in self.all_routed)
        out = self._run(
            "frame_step",
            (io_names.LOGITS, *kept_names),
            {
                io_names.INPUT_IDS: ids,
                io_names.FRAME_EMBEDS: embeds.astype(dt),
                io_names.PREV_FRAME_EMBEDS: prev.astype(dt),
                io_names.POSITION_IDS: positions,
            },
        )
        logits = np.asarray(out[io_names.LOGITS], np.float32)
        return (logits, *self._new_kv(out), [np.asarray(out[k]) for k in kept_names])


TrtStepper = DeviceStepper  # the name it had before onnxruntime's CUDA path shared it
