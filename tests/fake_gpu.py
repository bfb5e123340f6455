"""Fakes of the GPU libraries for CPU tests: a cuda-python runtime over host memory (every
pointer is host memory; cuda-python's `(err, value)` returns) and a `tensorrt` module (builder,
parser, engines and execution contexts running small numpy functions over that memory). They
follow TensorRT 10's Python API (pyCore.cpp: setInputShape / setTensorAddress / enqueueV3
return bool) and cuda-python's runtime module, and record what onsight calls, with which
arguments and in which order."""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# ---- a cuda-python runtime over host memory ----


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class FakeCudart:
    """cudaMalloc / copies / streams over host memory, returning (err, value) like
    cuda.bindings.runtime; every call is logged."""

    cudaMemcpyKind = SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )

    def __init__(self, name: bytes = b"Fake GPU", cc: tuple[int, int] = (8, 7)):
        self.blocks: dict[int, np.ndarray] = {}
        self.calls: list[tuple] = []
        self.streams: set[int] = set()
        self.prop = SimpleNamespace(name=name + b"\x00" * 8, major=cc[0], minor=cc[1])
        self.fail: dict[str, cudaError_t] = {}

    def _ret(self, call: str, *value):
        self.calls.append((call, *value))
        return (self.fail.get(call, cudaError_t.cudaSuccess), *value)

    def cudaMalloc(self, nbytes):
        buf = np.zeros(nbytes, np.uint8)
        self.blocks[buf.ctypes.data] = buf
        return self._ret("cudaMalloc", buf.ctypes.data)

    def cudaFree(self, ptr):
        assert ptr in self.blocks, "cudaFree of a pointer cudaMalloc did not return"
        del self.blocks[ptr]
        return self._ret("cudaFree")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert stream in self.streams
        ctypes.memmove(dst, src, nbytes)
        return self._ret("cudaMemcpyAsync")

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        return self._ret("cudaMemcpy2DAsync")

    def cudaStreamCreate(self):
        stream = 1000 + len(self.calls)
        self.streams.add(stream)
        return self._ret("cudaStreamCreate", stream)

    def cudaStreamSynchronize(self, stream):
        assert stream in self.streams
        return self._ret("cudaStreamSynchronize")

    def cudaStreamDestroy(self, stream):
        self.streams.remove(stream)
        return self._ret("cudaStreamDestroy")

    def cudaGetDeviceCount(self):
        return self._ret("cudaGetDeviceCount", 1)

    def cudaGetDeviceProperties(self, device):
        return self._ret("cudaGetDeviceProperties", self.prop)


def _array(ptr: int, shape, dtype) -> np.ndarray:
    """A numpy view of "device" memory."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = (ctypes.c_uint8 * max(1, n)).from_address(ptr)
    return np.frombuffer(raw, np.uint8, n).view(dtype).reshape(shape)


# ---- a tensorrt module: runtime side ----

DT = SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64", BOOL="BOOL")
NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}
NP |= {"BOOL": np.bool_, "UINT8": np.uint8}


@dataclasses.dataclass
class Tensor:
    name: str
    input: bool
    dtype: str
    profile: tuple | None = None  # inputs: (min, opt, max)


class FakeEngine:
    """IO tensors by name; `compute(inputs) -> outputs` stands in for the network."""

    def __init__(self, tensors: list[Tensor], compute, out_shapes):
        self.tensors = {t.name: t for t in tensors}
        self.order = [t.name for t in tensors]
        self.compute, self.out_shapes = compute, out_shapes
        self.log: list[tuple] = []

    @property
    def num_io_tensors(self):
        return len(self.order)

    def get_tensor_name(self, i):
        return self.order[i]

    def get_tensor_mode(self, name):
        return "INPUT" if self.tensors[name].input else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.tensors[name].dtype

    def get_tensor_profile_shape(self, name, profile):
        assert profile == 0
        return self.tensors[name].profile

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.e, self.shapes, self.ptrs = engine, {}, {}

    def set_input_shape(self, name, shape):
        self.e.log.append(("set_input_shape", name, tuple(shape)))
        lo, _, hi = self.e.tensors[name].profile
        ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def set_tensor_address(self, name, ptr):
        self.e.log.append(("set_tensor_address", name))
        self.ptrs[name] = ptr
        return True

    def get_tensor_shape(self, name):
        self.e.log.append(("get_tensor_shape", name))
        assert all(n in self.shapes for n, t in self.e.tensors.items() if t.input), (
            "output shapes asked before every input shape was set"
        )
        return self.e.out_shapes(self.shapes)[name]

    def execute_async_v3(self, stream_handle):
        self.e.log.append(("execute_async_v3", stream_handle))
        assert set(self.ptrs) == set(self.e.tensors), "execute before every address was set"
        t = self.e.tensors
        ins = {
            n: _array(self.ptrs[n], self.shapes[n], NP[t[n].dtype]).copy() for n in t if t[n].input
        }
        shapes = self.e.out_shapes(self.shapes)
        for n, value in self.e.compute(ins).items():
            _array(self.ptrs[n], shapes[n], NP[t[n].dtype])[...] = value
        return True


# ---- a tensorrt module: builder side (inputs read from the real ONNX graphs) ----


class FakeNetwork:
    def __init__(self, flags):
        self.flags, self.inputs = flags, []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, k):
        return self.inputs[k]


class FakeParser:
    def __init__(self, network, logger, trt):
        self.network, self.trt, self.num_errors = network, trt, 0

    def parse_from_file(self, path):
        import onnx

        self.trt.parsed.append(Path(path).name)
        self.network.parsed = path
        if self.trt.parse_fails:
            self.num_errors = 1
            return False
        model = onnx.load(path, load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        for i in model.graph.input:
            if i.name not in init:
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else -1
                    for d in i.type.tensor_type.shape.dim
                )
                self.network.inputs.append(SimpleNamespace(name=i.name, shape=dims))
        return True

    def get_error(self, k):
        return "In node 3 (TopK): k must be an initializer"


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeConfig:
    def __init__(self, trt):
        self.trt, self.flags, self.pools, self.profiles, self.cache = trt, set(), {}, [], None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def create_timing_cache(self, blob):
        return SimpleNamespace(blob=bytes(blob), serialize=lambda: b"cache-of-this-gpu")

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        self.trt.cache_sets.append(cache.blob)
        if cache.blob and cache.blob != b"cache-of-this-gpu":
            return False  # a cache from another device or TensorRT version
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class FakeBuilder:
    def __init__(self, logger, trt):
        self.trt = trt

    def create_network(self, flags):
        self.trt.networks.append(flags)
        return FakeNetwork(flags)

    def create_builder_config(self):
        config = FakeConfig(self.trt)
        self.trt.configs.append(config)
        return config

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        # what TensorRT checks: every dynamic input has a profile of its rank, and the
        # profile keeps the static dimensions as they are
        (profile,) = config.profiles
        for t in network.inputs:
            if -1 not in t.shape:
                continue
            assert t.name in profile.shapes, f"no profile for dynamic input {t.name}"
            for s in profile.shapes[t.name]:
                assert len(s) == len(t.shape), t.name
                assert all(d == -1 or d == x for d, x in zip(t.shape, s)), (t.name, s, t.shape)
        graph = Path(network.parsed).name.split(".")[0]
        if graph == self.trt.fail_on:
            return None  # what a failed TensorRT build returns
        self.trt.built.append(graph)
        if self.trt.unique_plans:
            return f"{graph} plan {len(self.trt.built)}".encode()  # unlike any earlier build
        return b"plan"


def fake_tensorrt(version: str = "10.3.0", engines: dict | None = None) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.engines = engines or {}  # plan bytes -> FakeEngine
    trt.networks, trt.configs, trt.parsed, trt.cache_sets = [], [], [], []
    trt.parse_fails = False
    trt.fail_on = None  # a graph whose build returns None
    trt.built = []  # the graphs built, in order
    trt.unique_plans = False  # plans name their graph and build (else all are b"plan")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            return trt.engines.get(bytes(blob))

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda kind: NP[kind]
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.Builder = lambda logger: FakeBuilder(logger, trt)
    trt.OnnxParser = lambda network, logger: FakeParser(network, logger, trt)
    return trt
