"""What `onsight bench` runs through the Assistant (end to end on a video, resident memory
over a long pushed stream) and this machine's peaks (the roofline the step times are read
against)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# ---- random weights do not know when to speak: script the decision for end-to-end runs ----


@dataclass
class ScriptedSpeech:
    """Wraps a Stepper: speaks after every `speak_every`-th frame for `tokens` tokens, silent
    otherwise, by overriding only the interval / EOS logits. All compute still runs; only the
    control flow is scripted (a random-weight model would speak after every frame)."""

    inner: object  # the runtime's stepper
    interval_id: int  # forced to win on silent frames, to lose on speaking ones
    eos_id: int  # suppressed until `tokens` tokens were generated, then forced
    speak_every: int = 10  # VideoLLM-online speaks on a minority of frames
    tokens: int = 12  # a short narration
    _frames: int = field(default=0, init=False)
    _left: int = field(default=-1, init=False)

    def __getattr__(self, name: str):  # cache, reset, ... of the wrapped stepper
        return getattr(self.inner, name)

    def frame(self, ids, embeds, group, keep=None) -> np.ndarray:
        args = (ids, embeds, group) if keep is None else (ids, embeds, group, keep)
        logits = np.array(self.inner.frame(*args), np.float32)
        self._frames += 1
        speak = self.speak_every > 0 and self._frames % self.speak_every == 0
        logits[self.interval_id] = logits.min() - 100 if speak else logits.max() + 100
        self._left = self.tokens if speak else -1
        return logits

    def text(self, ids, kind, group) -> np.ndarray:
        logits = np.array(self.inner.text(ids, kind, group), np.float32)
        if self._left > 0:
            logits[self.eos_id] = logits.min() - 100
            self._left -= 1
        elif self._left == 0:
            logits[self.eos_id] = logits.max() + 100
            self._left = -1
        return logits


# ---- end to end and memory, through the Assistant ----


def run_e2e(a, video: Path, label: str, mode: str, max_frames: int) -> dict[str, Any]:
    """Assistant.narrate over a real video, capture and decoding included. mode: `realtime`
    (paced like a camera at the bundle's fps) or `fast`, plus `+skip` (skip_duplicate_frames);
    `+prune` needs an Assistant made with prune_static_tokens (it is read at start)."""
    from onsight.runtime.capture import open_source

    a.reset()
    a.config = dataclasses.replace(a.config, skip_duplicate_frames=mode.endswith("+skip"))
    s0 = a.stats()
    src = open_source(str(video), fps=a.fps, realtime=mode.startswith("realtime"))
    t = time.perf_counter()
    for _ in a.narrate(src, max_frames=max_frames):
        pass
    wall = time.perf_counter() - t
    st, s1 = src.stats(), a.stats()
    processed = s1.frames_processed - s0.frames_processed
    skipped = s1.frames_skipped - s0.frames_skipped
    handled = processed + skipped
    return {"variant": label, "mode": mode, "video": video.name, "target_fps": a.fps,
            "wall_s": wall, "fps_processed": processed / wall, "fps_handled": handled / wall,
            "frames_processed": processed, "frames_skipped": skipped,
            "frames_sampled": st.frames_sampled, "frames_dropped": st.frames_dropped,
            "tokens_pruned": getattr(s1, "tokens_pruned", 0) - getattr(s0, "tokens_pruned", 0),
            # max_frames stops the run; the source may have sampled one more frame by then
            "all_sampled_processed": st.frames_dropped == 0
            and handled >= min(st.frames_sampled, max_frames)}  # fmt: skip


def synthetic_frame(i: int, shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A camera-sized RGB frame that pans one step per index (so frames differ)."""
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 256, (shape[0] // 8, shape[1] // 8, 3)).astype(np.uint8)
    return np.roll(np.kron(cells, np.ones((8, 8, 1), np.uint8)), 5 * i, axis=1)


def rss_stream(a, label: str, frames: int) -> dict[str, Any]:
    """Resident memory sampled while a long synthetic stream is pushed frame by frame; by
    default long enough to evict (1.5x the frames the KV cache holds)."""
    import psutil

    a.reset()
    a.config = dataclasses.replace(a.config, skip_duplicate_frames=False)
    frames = frames or int(1.5 * a.stats().kv_frames_fit) + 10
    every = max(1, frames // 20)
    proc, samples = psutil.Process(), []
    base = synthetic_frame(0)
    for i in range(frames):
        a.push(np.roll(base, 5 * i, axis=1), timestamp=i / a.fps)
        if i % every == 0 or i == frames - 1:
            samples.append({"frame": i + 1, "rss_mb": proc.memory_info().rss / 2**20})
    st = a.stats()
    gpu = "no GPU on this machine"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"torch CUDA allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    except ImportError:
        pass
    return {
        "variant": label,
        "frames": frames,
        "evictions": st.evictions,
        "samples": samples,
        "kv_total_mb": a.bundle.layout.total_bytes() / 2**20,
        "gpu": gpu,
    }


# ---- this machine's peaks: the denominators of achieved / floor ----


def _best_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ort_matmul(n: int) -> Callable[[], object]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "mm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((n, n), np.float32)
    onnx.checker.check_model(model)
    return lambda: sess.run(None, {"A": a})


def machine_peaks(quick: bool) -> dict[str, float]:
    """fp32 GFLOP/s of a large matmul (numpy and onnxruntime; the better one is the peak) and
    memory bandwidth in GB/s (a large copy: bytes read + written)."""
    n = 1024 if quick else 2048
    reps = 2 if quick else 4
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), np.float32)
    flops = 2.0 * n**3
    np_gflops = flops / _best_time(lambda: a @ b, reps) / 1e9
    ort_gflops = flops / _best_time(_ort_matmul(n), reps) / 1e9
    size = (32 if quick else 128) << 20  # floats
    src, dst = np.ones(size, np.float32), np.empty(size, np.float32)
    bw = 2 * src.nbytes / _best_time(lambda: np.copyto(dst, src), reps) / 1e9
    return {
        "matmul_n": n,
        "numpy_gflops": np_gflops,
        "ort_gflops": ort_gflops,
        "peak_gflops": max(np_gflops, ort_gflops),
        "copy_gbps": bw,
    }
