"""The GPU-resident cache path (DeviceStepper + onnxruntime IO binding) run on the CPU.

A stand-in for cuda-python's runtime API backs "device" memory with host buffers, so the
stepper's pointer arithmetic (strided in-place writes, eviction staging) and the IO binding
of buffers by pointer are checked against the plain CPU stepper token by token. On a GPU the
same code runs with the real cudart (see the gpu-marked test).
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from onsight.runtime import ort_iobinding, trt_backend
from onsight.runtime.bundle import load_bundle
from onsight.runtime.ort_backend import OrtSessions
from onsight.runtime.stream_loop import StreamLoop
from onsight.runtime.template import build_template_ids


class HostCudart:
    """cudaMalloc / cudaMemcpy*Async / streams over host memory, with cuda-python's returns."""

    cudaMemcpyKind = SimpleNamespace(
        cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
    )

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}

    def cudaMalloc(self, nbytes):
        buf = np.zeros(nbytes, np.uint8)
        self.blocks[buf.ctypes.data] = buf
        return (0, buf.ctypes.data)

    def cudaFree(self, ptr):
        self.blocks.pop(ptr, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        return (0,)

    def cudaStreamCreate(self):
        return (0, 0)

    def cudaStreamSynchronize(self, stream):
        return (0,)


def _loop(stepper, bundle, tok):
    return StreamLoop(
        stepper,
        build_template_ids(tok, bundle.template),
        encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        threshold=bundle.generation["threshold"],
        max_new_tokens=bundle.generation["max_new_tokens"],
    )


def test_device_stepper_over_io_binding_equals_the_cpu_stepper(tiny_bundle, monkeypatch):
    from tokenizers import Tokenizer

    host = HostCudart()
    monkeypatch.setattr(trt_backend, "_cudart", lambda: host)
    monkeypatch.setattr(ort_iobinding, "_cudart", lambda: host)
    path, model, tok_path = tiny_bundle
    bundle, tok = load_bundle(path), Tokenizer.from_file(str(tok_path))
    device = ort_iobinding.OrtDeviceBackend(OrtSessions(bundle, "cpu"), device="cpu")
    plain = OrtSessions(bundle, "cpu")
    a, b = _loop(plain.stepper(), bundle, tok), _loop(device.stepper(), bundle, tok)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    embeds = model.encode_frames(torch.from_numpy(pixels)).numpy()
    for f in range(60):
        if f == 20:
            a.ask("what is on the table?")
            b.ask("what is on the table?")
        x, y = a.on_frame(embeds[f % 12]), b.on_frame(embeds[f % 12])
        assert (x.speak, x.narration, x.answers) == (y.speak, y.narration, y.answers), f
    assert a.stepper.evictions == b.stepper.evictions >= 1
    for i in range(bundle.layout.num_layers):
        n = a.stepper.cache.lengths[i]
        assert b.stepper.cache.lengths[i] == n
        on_device = b.stepper.k[i].download(device.stream)[:, :n]
        np.testing.assert_allclose(on_device, a.stepper.cache.k[i][:, :n], atol=1e-5)
    assert device.name.endswith(":iobinding")


@pytest.mark.gpu
def test_io_binding_on_cuda(tiny_bundle):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    if not ort_iobinding.io_binding_ready():
        pytest.skip("cuda-python is not installed")
    from onsight.runtime.backends import make_backend

    path, model, _ = tiny_bundle
    backend = make_backend(load_bundle(path), "onnxruntime:cuda")
    assert backend.name.endswith(":iobinding")
    st = backend.stepper()
    n, hidden = st.layout.tokens_per_frame, backend.bundle.hidden_size
    logits = st.frame([1], np.zeros((n, hidden), np.float32), 0)
    assert np.isfinite(logits).all()
