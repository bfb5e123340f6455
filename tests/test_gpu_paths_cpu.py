"""The GPU paths' calls to TensorRT 10, cuda-python and onnxruntime's IO binding, on the CPU.

A fake `tensorrt` module (tests/fake_gpu.py: builder, parser, engines, execution contexts that run small numpy
functions over "device" memory) and a fake cuda-python runtime (host memory behind every
pointer, cuda-python's `(err, value)` returns) record what onsight calls, with which
arguments and in which order. They follow TensorRT 10's Python API (pyCore.cpp: setInputShape
/ setTensorAddress / enqueueV3 return bool) and cuda-python's runtime module; the gpu-marked
test at the end runs the real ones.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from fake_gpu import DT, FakeCudart, FakeEngine, Tensor, cudaError_t, fake_tensorrt

from onsight.runtime import ort_iobinding, trt_backend, trt_build
from onsight.runtime.bundle import GRAPHS, load_bundle
from onsight.runtime.errors import BundleError, EngineError, ExportError
from onsight.runtime.trt_build import GpuInfo

GPU = GpuInfo("Fake GPU", "8.7")


@pytest.fixture
def cuda(monkeypatch):
    host = FakeCudart()
    monkeypatch.setattr(trt_backend, "_cudart", lambda: host)
    return host


def _text_engine() -> FakeEngine:
    """A text-step-like plan: int32 ids (as a plan could take them), a float32 cache."""
    cache = (2, 8, 4)

    def compute(ins):
        ids = ins["input_ids"]
        return {
            "logits": ids.astype(np.float32) + ins["past_key_0"].sum(),
            "new_key_0": np.full((2, len(ids), 4), 1.5, np.float32),
        }

    return FakeEngine(
        [
            Tensor("input_ids", True, DT.INT32, ((1,), (1,), (256,))),
            Tensor("past_key_0", True, DT.FLOAT, (cache, cache, cache)),
            Tensor("logits", False, DT.FLOAT),
            Tensor("new_key_0", False, DT.FLOAT),
        ],
        compute,
        lambda s: {"logits": s["input_ids"], "new_key_0": (2, s["input_ids"][0], 4)},
    )


def _vision_engine(max_batch: int = 4) -> FakeEngine:
    """frames uint8 (B, 8, 8, 3) -> frame_embeds (B, 2, 3): each frame's mean pixel."""

    def compute(ins):
        mean = ins["frames"].reshape(len(ins["frames"]), -1).mean(1).astype(np.float32)
        return {"frame_embeds": np.broadcast_to(mean[:, None, None], (len(mean), 2, 3))}

    return FakeEngine(
        [
            Tensor("frames", True, "UINT8", ((1, 8, 8, 3), (1, 8, 8, 3), (max_batch, 8, 8, 3))),
            Tensor("frame_embeds", False, DT.FLOAT),
        ],
        compute,
        lambda s: {"frame_embeds": (s["frames"][0], 2, 3)},
    )


def _trt_backend(monkeypatch, tmp_path, engines: dict, bundle=None, version="10.3.0", **meta):
    """A TrtBackend over fake plans written to tmp_path (blob = the graph's name)."""
    plans = {}
    for graph in engines:
        (tmp_path / f"{graph}.plan").write_bytes(graph.encode())
        plans[graph] = str(tmp_path / f"{graph}.plan")  # absolute: bundle.path / it is it
    trt = fake_tensorrt(version, {g.encode(): e for g, e in engines.items()})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "gpu_info", lambda: GPU)
    meta = {
        "precision": "fp16",
        "gpu": GPU.name,
        "compute_capability": GPU.compute_capability,
        "tensorrt_version": version,
        "plans": plans,
        "profiles": {
            "vision": {"frames": [[1, 8, 8, 3], [1, 8, 8, 3], [4, 8, 8, 3]]},
            "text_step": {"input_ids": [[1], [1], [256]]},
        },
    } | meta
    if bundle is None:
        bundle = SimpleNamespace(path=tmp_path, manifest={"tensorrt": meta})
    else:
        bundle = dataclasses.replace(bundle, manifest={**bundle.manifest, "tensorrt": meta})
    return trt_backend.TrtBackend(bundle)


# ---- TrtBackend.run: shapes, addresses, dtypes, execution ----


def test_trt_run_sets_every_input_shape_before_reading_outputs_and_executing(
    cuda, monkeypatch, tmp_path
):
    engine = _text_engine()
    b = _trt_backend(monkeypatch, tmp_path, {"text_step": engine})
    cache = trt_backend.DeviceBuffer((2, 8, 4), np.float32)
    cache.upload(np.full((2, 8, 4), 0.5, np.float32), b.stream)
    out = b.run("text_step", {"input_ids": np.array([5, 6, 7]), "past_key_0": cache}, ("logits",))
    # int64 ids reach an int32 input as int32 (read as raw bytes they would be 5, 0, 6)
    np.testing.assert_array_equal(out["logits"], [5 + 32, 6 + 32, 7 + 32])
    new_k = out["new_key_0"]  # not fetched: stays on the device, with its shape and dtype
    assert isinstance(new_k, trt_backend.DeviceBuffer) and new_k.shape == (2, 3, 4)
    np.testing.assert_array_equal(new_k.download(b.stream), np.full((2, 3, 4), 1.5))
    log = engine.log
    first_output = log.index(("get_tensor_shape", "logits"))
    for name in ("input_ids", "past_key_0"):
        i = log.index(("set_input_shape", name, (3,) if name == "input_ids" else (2, 8, 4)))
        assert i < log.index(("set_tensor_address", name)) < first_output
    assert [c[0] for c in log[-1:]] == ["execute_async_v3"] and log[-1][1] == b.stream


def test_trt_run_refuses_a_cache_buffer_of_another_dtype(cuda, monkeypatch, tmp_path):
    b = _trt_backend(monkeypatch, tmp_path, {"text_step": _text_engine()})
    fp16 = trt_backend.DeviceBuffer((2, 8, 4), np.float16)  # an fp16 export's cache
    with pytest.raises(
        EngineError, match="past_key_0 is float32, the cache bound to it is float16"
    ):
        b.run("text_step", {"input_ids": np.array([1]), "past_key_0": fp16}, ("logits",))


def test_trt_step_longer_than_the_plans_profile_names_the_input_and_the_limits(
    cuda, monkeypatch, tmp_path
):
    b = _trt_backend(monkeypatch, tmp_path, {"text_step": _text_engine()})
    cache = trt_backend.DeviceBuffer((2, 8, 4), np.float32)
    ids = np.arange(300)
    with pytest.raises(EngineError, match=r"input_ids has shape \(300,\).*\(1,\) to \(256,\)"):
        b.run("text_step", {"input_ids": ids, "past_key_0": cache}, ("logits",))


def test_trt_run_names_an_input_the_bundle_does_not_feed(cuda, monkeypatch, tmp_path):
    b = _trt_backend(monkeypatch, tmp_path, {"text_step": _text_engine()})
    with pytest.raises(EngineError, match="'past_key_0' this bundle does not feed"):
        b.run("text_step", {"input_ids": np.array([1])}, ("logits",))


def test_trt_encode_batches_frames_to_the_vision_plans_profile(cuda, monkeypatch, tmp_path):
    engine = _vision_engine(max_batch=4)
    b = _trt_backend(monkeypatch, tmp_path, {"vision": engine})
    frames = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(6)])
    emb = b.encode(frames)
    assert emb.shape == (6, 2, 3) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb[:, 0, 0], [0, 10, 20, 30, 40, 50])
    batches = [c[2] for c in engine.log if c[0] == "set_input_shape"]
    assert batches == [(4, 8, 8, 3), (2, 8, 8, 3)]
    assert b.max_text_tokens == 256  # DeviceStepper splits longer text steps


# ---- TrtBackend: opening, errors a Jetson user can act on, cleanup ----


def test_trt_backend_close_frees_every_device_buffer_and_the_stream(
    cuda, monkeypatch, tmp_path, tiny_bundle
):
    bundle = load_bundle(tiny_bundle[0])
    b = _trt_backend(monkeypatch, tmp_path, {"vision": _vision_engine()}, bundle=bundle)
    b.stepper()  # the KV cache: 2 buffers per layer
    assert len(cuda.blocks) == 2 * bundle.layout.num_layers
    b.encode(np.zeros((1, 8, 8, 3), np.uint8))
    assert len(cuda.blocks) == 2 * bundle.layout.num_layers + 2  # and the vision plan's IO
    stream = b.stream
    b.close()
    assert cuda.blocks == {} and stream not in cuda.streams
    b.close()  # twice is fine


def test_trt_backend_on_tensorrt_8_says_which_jetpack_has_10(cuda, monkeypatch, tmp_path):
    with pytest.raises(EngineError, match=r"needs TensorRT 10.*8\.6\.2.*JetPack 6\.1"):
        _trt_backend(monkeypatch, tmp_path, {"vision": _vision_engine()}, version="8.6.2")


def test_trt_backend_with_a_missing_plan_says_rebuild_and_leaks_nothing(
    cuda, monkeypatch, tmp_path
):
    engines = {"vision": _vision_engine(), "text_step": _text_engine()}
    with pytest.raises(EngineError, match="could not be read.*onsight build .* --backend tensorrt"):
        _trt_backend(monkeypatch, tmp_path, engines, plans={"vision": str(tmp_path / "gone")})
    assert cuda.streams == set() and cuda.blocks == {}


def test_trt_backend_plan_tensorrt_cannot_load_names_where_it_was_built(
    cuda, monkeypatch, tmp_path
):
    (tmp_path / "junk.plan").write_bytes(b"junk")
    with pytest.raises(EngineError, match=r"built with TensorRT 10\.3\.0 for Fake GPU.*rebuild"):
        _trt_backend(monkeypatch, tmp_path, {}, plans={"vision": str(tmp_path / "junk.plan")})
    assert cuda.streams == set()


def test_trt_backend_refuses_plans_built_on_another_gpu(cuda, monkeypatch, tmp_path):
    with pytest.raises(
        BundleError, match=r"built for NVIDIA A100.*this is Fake GPU.*onsight build"
    ):
        _trt_backend(monkeypatch, tmp_path, {"vision": _vision_engine()}, gpu="NVIDIA A100")


def test_auto_backend_uses_onnxruntime_when_the_plans_do_not_fit(monkeypatch, tiny_bundle, caplog):
    from onsight.runtime import backends

    def refuse(bundle):
        raise BundleError("the TensorRT plans were built for NVIDIA A100 (sm 8.0)")

    monkeypatch.setattr(backends, "_tensorrt_ready", lambda bundle: True)
    monkeypatch.setattr(trt_backend, "TrtBackend", refuse)
    bundle = load_bundle(tiny_bundle[0])
    with caplog.at_level(logging.WARNING):
        backend = backends.make_backend(bundle, "auto")
    assert backend.name.startswith("onnxruntime")
    assert "built for NVIDIA A100" in caplog.text
    with pytest.raises(BundleError, match="built for NVIDIA A100"):
        backends.make_backend(bundle, "tensorrt")  # asked for by name: the error stands


# ---- cuda-python: error returns, device identity ----


def test_cuda_error_names_the_call_and_what_to_do():
    with pytest.raises(EngineError, match=r"cudaMalloc failed: cudaErrorInsufficientDriver.*<13"):
        trt_backend._check((cudaError_t.cudaErrorInsufficientDriver, 0), "cudaMalloc")
    with pytest.raises(EngineError, match="cudaMemcpyAsync failed: error 719"):
        trt_backend._check((719,), "cudaMemcpyAsync")
    assert trt_backend._check((cudaError_t.cudaSuccess, 1234)) == 1234


def test_a_failed_cuda_call_inside_the_backend_raises_an_engine_error(cuda):
    cuda.fail["cudaMalloc"] = cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(EngineError, match="cudaMalloc failed: .*out of memory.*--kv-capacity"):
        trt_backend.DeviceBuffer((4,), np.float32)


def test_gpu_info_asks_the_cuda_runtime_first(cuda, monkeypatch):
    def no_smi(*a, **k):
        raise AssertionError("nvidia-smi is not needed when cuda-python answers")

    cuda.prop.name = b"Orin\x00\x00\x00"
    monkeypatch.setattr(trt_build.subprocess, "run", no_smi)
    assert trt_build.gpu_info() == GpuInfo("Orin", "8.7")


def test_gpu_info_ignores_jetson_nvidia_smi_na_fields(monkeypatch):
    def no_cuda():
        raise EngineError("no cuda-python")

    monkeypatch.setattr(trt_backend, "_cudart", no_cuda)
    monkeypatch.setattr(
        trt_build.subprocess,
        "run",
        lambda *a, **k: SimpleNamespace(stdout="Orin (nvgpu), [N/A]\n"),
    )
    gpu = trt_build.gpu_info()
    assert gpu is None or gpu.compute_capability == "8.7"  # the device tree's, on a Jetson


# ---- DeviceStepper: the raw device copy is checked first ----


def test_device_stepper_refuses_new_kv_of_another_dtype(cuda, tiny_bundle):
    bundle = load_bundle(tiny_bundle[0])
    lay = bundle.layout
    backend = SimpleNamespace(bundle=bundle, cudart=cuda, stream=cuda.cudaStreamCreate()[1])
    st = trt_backend.DeviceStepper(backend, bundle.policy)
    new = trt_backend.DeviceBuffer((lay.kv_heads, 3, lay.head_dim), np.float16)
    with pytest.raises(EngineError, match="new K/V is .* float16, the cache takes .* float32"):
        st.write(0, new, new, np.arange(3))
    assert st.cache.lengths[0] == 0
    st.free()
    new.free()
    assert cuda.blocks == {}


def test_text_longer_than_the_plans_take_goes_in_steps_with_the_same_result(
    cuda, monkeypatch, tiny_bundle
):
    """TensorRT's text plan takes at most MAX_STEP_TOKENS a step; a longer prompt is split,
    and (attention being causal) the cache and the logits match one long step's."""
    from onsight.runtime.kv_policy import SINK, TURN
    from onsight.runtime.ort_backend import OrtSessions

    monkeypatch.setattr(ort_iobinding, "_cudart", lambda: cuda)
    bundle = load_bundle(tiny_bundle[0])
    device = ort_iobinding.OrtDeviceBackend(OrtSessions(bundle, "cpu"), device="cpu")
    device.max_text_tokens = 3  # as TrtBackend sets it from the text plan's profile
    steps = []
    run = device.run
    monkeypatch.setattr(device, "run", lambda g, i, fetch: steps.append(g) or run(g, i, fetch))
    a, b = OrtSessions(bundle, "cpu").stepper(), device.stepper()
    n, hidden = bundle.layout.tokens_per_frame, bundle.hidden_size
    frame = np.random.default_rng(0).normal(size=(n, hidden)).astype(np.float32)
    for call in (
        lambda st: st.text(list(range(5, 15)), SINK, 0),  # 10 tokens: 4 steps of <= 3
        lambda st: st.frame([1, 2], frame, 1),
        lambda st: st.text(list(range(20, 27)), TURN, 2),
    ):
        np.testing.assert_allclose(call(b), call(a), atol=1e-5)
    assert steps == ["text_step"] * 4 + ["frame_step"] + ["text_step"] * 3
    assert a.evictions == b.evictions == 0 and a.cache.lengths == b.cache.lengths
    for i in range(bundle.layout.num_layers):
        n_i = a.cache.lengths[i]
        on_device = b.k[i].download(device.stream)[:, :n_i]
        np.testing.assert_allclose(on_device, a.cache.k[i][:, :n_i], atol=1e-5)
        np.testing.assert_array_equal(b.cache.positions[i][:n_i], a.cache.positions[i][:n_i])
    device.close()


# ---- onnxruntime IO binding ----


class FakeIOBinding:
    def __init__(self, outputs):
        self.calls, self._outputs = [], outputs

    def bind_input(self, *args):
        self.calls.append(("bind_input", *args))

    def bind_cpu_input(self, name, arr):
        self.calls.append(("bind_cpu_input", name, arr.dtype))

    def bind_output(self, name, device_type="cpu", device_id=0):
        self.calls.append(("bind_output", name, device_type, device_id))

    def get_outputs(self):
        return self._outputs


def test_bind_step_binds_the_cache_by_pointer_and_waits_for_the_gpu(cuda):
    import onnxruntime as ort

    logits = ort.OrtValue.ortvalue_from_numpy(np.ones(5, np.float32))
    new_k = ort.OrtValue.ortvalue_from_numpy(np.ones((2, 1, 4), np.float16))
    io = FakeIOBinding([logits, new_k])
    ran = []
    session = SimpleNamespace(
        io_binding=lambda: io,
        get_inputs=lambda: [SimpleNamespace(name="input_ids"), SimpleNamespace(name="past_key_0")],
        get_outputs=lambda: [SimpleNamespace(name="logits"), SimpleNamespace(name="new_key_0")],
        run_with_iobinding=lambda binding, opts: ran.append(opts),
    )
    cache = trt_backend.DeviceBuffer((2, 8, 4), np.float16)
    out = ort_iobinding.bind_step(
        session,
        {"input_ids": np.array([3]), "past_key_0": cache, "mod_mask": np.zeros(2, bool)},
        ("logits",),
        "cuda",
        ort_iobinding.synchronized_run_options(),
    )
    assert ("bind_input", "past_key_0", "cuda", 0, np.float16, [2, 8, 4], cache.ptr) in io.calls
    assert ("bind_cpu_input", "input_ids", np.int64) in io.calls
    assert not any(c[1] == "mod_mask" for c in io.calls)  # not an input of this graph
    assert ("bind_output", "logits", "cpu", 0) in io.calls
    assert ("bind_output", "new_key_0", "cuda", 0) in io.calls
    (opts,) = ran
    assert opts.get_run_config_entry("disable_synchronize_execution_providers") == "0"
    np.testing.assert_array_equal(out["logits"], np.ones(5))
    kept = out["new_key_0"]
    assert (kept.shape, kept.dtype, kept.ptr) == ((2, 1, 4), np.float16, new_k.data_ptr())


def test_ort_device_backend_close_frees_the_cache_and_the_stream(cuda, monkeypatch, tiny_bundle):
    from onsight.runtime.ort_backend import OrtSessions

    monkeypatch.setattr(ort_iobinding, "_cudart", lambda: cuda)
    bundle = load_bundle(tiny_bundle[0])
    device = ort_iobinding.OrtDeviceBackend(OrtSessions(bundle, "cpu"), device="cpu")
    st = device.stepper()
    n = bundle.layout.tokens_per_frame
    st.frame([1], np.zeros((n, bundle.hidden_size), np.float32), 0)
    assert st.cache.lengths[0] > 0 and cuda.blocks
    device.close()
    assert cuda.blocks == {} and cuda.streams == set()
    device.close()


# ---- trt_build: what the builder is asked for ----


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], out)
    return out


@pytest.fixture
def fake_trt(monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_build, "gpu_info", lambda: GPU)
    return trt


def test_fp16_build_profiles_every_dynamic_input_of_the_real_graphs(fake_trt, bundle_copy):
    meta = trt_build.build_tensorrt(bundle_copy, "fp16", workspace_gb=0.5)
    assert len(fake_trt.parsed) == 3
    assert fake_trt.networks == [0, 0, 0]  # weakly typed; explicit batch is TensorRT 10's only
    for config in fake_trt.configs:
        assert config.flags == {"FP16"}
        assert config.pools == {"WORKSPACE": 2**29}
    m = load_bundle(bundle_copy).manifest["tensorrt"]
    assert m["plans"] == meta["plans"] and m["tensorrt_version"] == "10.3.0"
    assert (m["gpu"], m["compute_capability"]) == (GPU.name, GPU.compute_capability)
    assert all((bundle_copy / p).read_bytes() == b"plan" for p in m["plans"].values())


def test_int8_build_is_strongly_typed_with_no_precision_flags(fake_trt, bundle_copy, monkeypatch):
    from onsight.runtime import trt_int8

    graphs = {g: load_bundle(bundle_copy).graph_path(g).name for g in GRAPHS}
    monkeypatch.setattr(trt_int8, "build_qdq_graphs", lambda *a, **k: {"graphs": graphs})
    trt_build.build_tensorrt(bundle_copy, "int8")
    strongly_typed = 1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert fake_trt.networks == [strongly_typed] * 3
    assert all(config.flags == set() for config in fake_trt.configs)


def test_build_on_tensorrt_8_says_which_jetpack_has_10(fake_trt, bundle_copy):
    fake_trt.__version__ = "8.6.2"
    with pytest.raises(ExportError, match=r"needs TensorRT 10.*JetPack 6\.1"):
        trt_build.build_tensorrt(bundle_copy, "fp16")
    assert fake_trt.networks == []


def test_build_starts_a_fresh_timing_cache_when_the_old_one_is_from_another_gpu(
    fake_trt, bundle_copy, caplog
):
    (bundle_copy / trt_build.PLAN_DIR).mkdir(exist_ok=True)
    cache = bundle_copy / trt_build.PLAN_DIR / "timing.cache"
    cache.write_bytes(b"cache-of-an-a100")
    with caplog.at_level(logging.WARNING):
        trt_build.build_tensorrt(bundle_copy, "fp16")
    assert fake_trt.cache_sets[:2] == [b"cache-of-an-a100", b""]  # refused, then a fresh one
    assert all(c.cache is not None for c in fake_trt.configs)
    assert cache.read_bytes() == b"cache-of-this-gpu"
    assert "another GPU or TensorRT version" in caplog.text


def test_build_reports_the_parsers_errors(fake_trt, bundle_copy):
    fake_trt.parse_fails = True
    with pytest.raises(ExportError, match="could not parse vision.onnx: In node 3 .TopK."):
        trt_build.build_tensorrt(bundle_copy, "fp16")


# ---- on a GPU: the real TensorRT and cuda-python ----


@pytest.mark.gpu
def test_tensorrt_plans_step_like_onnxruntime_on_a_gpu(bundle_copy):
    """fp32 plans on the GPU against onnxruntime's CPU stepper, step by step through
    evictions (TensorRT's default TF32 allows small differences)."""
    pytest.importorskip("tensorrt")
    if not trt_backend.cuda_available():
        pytest.skip("cuda-python is not installed or sees no GPU")
    from onsight.runtime.kv_policy import SINK, TURN
    from onsight.runtime.ort_backend import OrtSessions

    trt_build.build_tensorrt(bundle_copy, "fp32")
    bundle = load_bundle(bundle_copy)
    gpu, cpu = trt_backend.TrtBackend(bundle), OrtSessions(bundle, "cpu")
    try:
        pixels = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
        embeds = cpu.encode(pixels)
        np.testing.assert_allclose(gpu.encode(pixels), embeds, rtol=1e-2, atol=1e-2)
        a, b = cpu.stepper(), gpu.stepper()
        steps = [lambda st: st.text(list(range(5, 15)), SINK, 0)]
        steps += [lambda st, f=f: st.frame([1, 2], embeds[f % 6], 1 + f) for f in range(30)]
        steps += [lambda st: st.text(list(range(20, 27)), TURN, 31)]
        for k, step in enumerate(steps):
            np.testing.assert_allclose(step(b), step(a), rtol=1e-2, atol=1e-2, err_msg=str(k))
        assert a.evictions == b.evictions >= 1
    finally:
        gpu.close()
