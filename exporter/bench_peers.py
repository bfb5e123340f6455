"""What `onsight bench` times: probes over onsight's steppers and the two peers (end-to-end
and memory runs through the Assistant, and this machine's peaks, are in bench_e2e).

Every probe has a `before(i)` (untimed: put the cache back to its warm state) and a `run(i)`
(timed), so that the interleaved runner measures every configuration at the same cache fill,
on the same frame, in alternation.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onsight.runtime.bundle import Bundle
from onsight.runtime.errors import OnsightError
from onsight.runtime.graph_io import FRAMES
from onsight.runtime.kv_policy import TURN, TokenTable
from onsight.runtime.ort_backend import OrtStepper, choose_providers, reads_cache_span

log = logging.getLogger(__name__)

# One step of a warm-up stream: the text token ids before a frame, and the frame (N, hidden).
Segment = tuple[list[int], np.ndarray]


@dataclass(frozen=True)
class Probe:
    """One configuration under test."""

    name: str  # row label in the table
    run: Callable[[int], object]  # timed: one step on frame i
    before: Callable[[int], object] = lambda i: None  # untimed: restore the warm state


# ---- inputs: real frames, and a warm-up stream of a few hundred tokens ----


def pick_video(explicit: Path | None, folder: Path) -> Path | None:
    """--video, checked to give a frame (before any building), or the largest in `folder`."""
    if explicit:
        check_video(explicit)
        return explicit
    if not folder.is_dir():
        return None
    vids = sorted(p for p in folder.iterdir() if p.suffix in (".mp4", ".mkv", ".avi"))
    return max(vids, key=lambda p: p.stat().st_size) if vids else None


def check_video(video: Path) -> None:
    """Refuse a --video that is missing or gives no frame, saying what to pass."""
    import cv2

    if not video.is_file():
        what = "is a folder" if video.is_dir() else "does not exist"
        raise OnsightError(
            f"--video {video} {what}; pass a video file (or leave --video out: the largest "
            "video in ../shared/videos, or synthetic frames without one)"
        )
    cap = cv2.VideoCapture(str(video))
    try:
        ok = cap.isOpened() and cap.read()[0]
    finally:
        cap.release()
    if not ok:
        raise OnsightError(
            f"--video {video} gives no frame (not a video ffmpeg can read, or damaged); "
            "pass a playable video file"
        )


def sample_frames(video: Path | None, n: int, fps: float, size: int) -> np.ndarray:
    """n frames of the video sampled at fps and letterboxed (synthetic frames without one)."""
    from onsight.runtime.preprocess import letterbox

    if video is None:
        from onsight.exporter.parity import parity_frames

        return parity_frames(n, size)
    import cv2

    cap, out, t = cv2.VideoCapture(str(video)), [], 0.0
    while len(out) < n:
        cap.set(cv2.CAP_PROP_POS_MSEC, t * 1e3)
        ok, img = cap.read()
        if not ok:
            break
        out.append(letterbox(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), size))
        t += 1.0 / fps
    cap.release()
    if not out:
        raise OnsightError(f"--video {video} gives no frame; pass a playable video file")
    while len(out) < n:  # a short video: repeat it
        out.append(out[len(out) % max(1, len(out))])
    return np.stack(out)


def warm_stream(ids, embeds: np.ndarray, fill: int) -> list[Segment]:
    """System prompt with the first frame, then frames after interval tokens, to `fill` tokens."""
    warm = [(list(ids.sink) + list(ids.stream_open), embeds[0])]
    n = len(warm[0][0]) + embeds.shape[1]
    while n < fill:
        warm.append(([ids.interval_id], embeds[len(warm) % len(embeds)]))
        n += 1 + embeds.shape[1]
    return warm


def wordlevel_tokenizer(path: Path, vocab_size: int, bos: str, eos: str) -> Path:
    """A word-level tokenizer with exactly `vocab_size` ids (template words first, fillers
    after) and `<v>` appended last: the LM's embedding and lm_head get the real size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from onsight.exporter.config import DEFAULT_SYSTEM_PROMPT

    words = ["[UNK]", bos, eos, *",.:;[]!?'\"-()"]
    text = (DEFAULT_SYSTEM_PROMPT + " User Assistant").replace(",", " ").replace(".", " ")
    words += [w for w in dict.fromkeys(text.split()) if w not in words]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([bos, eos, "<v>"])
    assert tok.token_to_id("<v>") == vocab_size, "<v> must sit just outside the LM's vocabulary"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def interleave(probes: Sequence[Probe], iters: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of each probe, measured round-robin so that drift (the shared
    cores, thermal state) hits every configuration equally; the start rotates each round."""
    out: dict[str, list[float]] = {p.name: [] for p in probes}
    n = len(probes)
    for it in range(warmup + iters):
        for p in [probes[(it + j) % n] for j in range(n)]:
            p.before(it)
            t = time.perf_counter()
            p.run(it)
            dt = (time.perf_counter() - t) * 1e3
            if it >= warmup:
                out[p.name].append(dt)
        log.debug("round %d/%d done", it + 1, warmup + iters)
    return out


def summarize(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, np.float64)
    return {
        "median_ms": float(np.median(a)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "n": int(a.size),
    }


# ---- onsight: the runtime's OrtStepper over sessions of the graphs a measurement needs ----


class GraphSessions:
    """Duck-types OrtSessions for OrtStepper but opens only the named graphs, with the same
    options: the 0.5b preset's three frame_step graphs fit in memory side by side, three
    whole bundles (vision + text_step + frame_step each) would not."""

    def __init__(self, bundle: Bundle, graphs: dict[str, Path], device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.bundle = bundle
        self.providers = choose_providers(device)
        self.sessions = {
            g: ort.InferenceSession(str(p), opts, providers=self.providers)
            for g, p in graphs.items()
        }
        self.inputs = {g: {i.name for i in s.get_inputs()} for g, s in self.sessions.items()}
        self.dynamic_past = reads_cache_span(self.sessions)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        (out,) = self.sessions["vision"].run(None, {FRAMES: frames})
        return out.astype(np.float32, copy=False)

    def stepper(self) -> OrtStepper:
        return OrtStepper(self, self.bundle.policy)  # type: ignore[arg-type]


@dataclass
class _Snapshot:
    lengths: list[int]
    table: TokenTable


def snapshot(stepper) -> _Snapshot:
    return _Snapshot(list(stepper.cache.lengths), copy.deepcopy(stepper.cache.table))


def restore(stepper, snap: _Snapshot) -> None:
    """Back to the warm fill: slots past each saved length become invalid again."""
    c = stepper.cache
    if any(now < n for now, n in zip(c.lengths, snap.lengths, strict=True)):
        raise RuntimeError(
            "a measured step evicted from the KV cache, so it cannot be rewound: use a "
            "smaller warm fill than the bundle's KV capacity allows"
        )
    for i, n in enumerate(snap.lengths):
        c.truncate(i, n)
    c.table = copy.deepcopy(snap.table)


def warm_up(stepper, warm: Sequence[Segment]) -> int:
    """Feed the warm-up stream through frame steps only (the system prompt rides with the
    first frame), so a stepper over frame_step alone can be warmed; returns the group count."""
    for group, (ids, frame) in enumerate(warm):
        stepper.frame(list(ids), frame, group)
    return len(warm)


class StepperProbes:
    """Frame prefill and one-token decode on a warm cache of one OrtStepper."""

    def __init__(self, stepper, warm: Sequence[Segment], frames: np.ndarray, interval_id: int):
        self.s, self.frames, self.interval = stepper, frames, interval_id
        self.group = warm_up(stepper, warm)
        self.snap = snapshot(stepper)
        self.lengths = list(stepper.cache.lengths)  # per-layer fill, for the attention floor
        self._before(0)  # one step first, so the spans are those every measured step reads
        stepper.frame([interval_id], frames[0], self.group)
        restore(stepper, self.snap)
        self.spans = list(stepper.cache.span)  # per-layer slots the graphs read

    def _before(self, i: int) -> None:
        restore(self.s, self.snap)
        self.s.prev_embeds = self.frames[(i - 1) % len(self.frames)]  # novelty vs the last frame

    def frame(self, name: str) -> Probe:
        f = self.frames
        return Probe(
            name, lambda i: self.s.frame([self.interval], f[i % len(f)], self.group), self._before
        )

    def decode(self, name: str, token: int) -> Probe:
        return Probe(name, lambda i: self.s.text([token], TURN, self.group), self._before)


# ---- peer (a): PyTorch eager with transformers, VideoLLM-online's frame-by-frame loop ----


class TorchPeer:
    """The HF causal LM fed `inputs_embeds` of one frame (interval token + N vision tokens)
    per call, reusing `past_key_values` (a DynamicCache cropped back to the warm fill)."""

    def __init__(self, lm_dir: Path, warm: Sequence[Segment], frames: np.ndarray, interval_id: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.threads = torch, torch.get_num_threads()
        self.lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
        self.embed = self.lm.get_input_embeddings()
        with torch.inference_mode():
            x = torch.cat([torch.cat([self._embeds(t), self._embeds(f)]) for t, f in warm])[None]
            self.cache = self.lm(inputs_embeds=x, use_cache=True).past_key_values
        self.fill = x.shape[1]
        self.inputs = [
            torch.cat([self._embeds([interval_id]), self._embeds(f)])[None] for f in frames
        ]

    def _embeds(self, seg: Segment):
        if isinstance(seg, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(seg, np.float32))
        with self.torch.inference_mode():
            return self.embed(self.torch.tensor(list(seg), dtype=self.torch.int64))

    def _step(self, i: int, last_only: bool) -> None:
        with self.torch.inference_mode():
            kw = {"logits_to_keep": 1} if last_only else {}
            self.lm(
                inputs_embeds=self.inputs[i % len(self.inputs)],
                past_key_values=self.cache,
                use_cache=True,
                **kw,
            )

    def probe(self, name: str, last_only: bool, threads: int | None = None) -> Probe:
        """threads: None keeps torch's default (all cores); 1 avoids OpenMP barrier waits,
        which dominate when the cores are shared with other work."""

        def before(i: int) -> None:
            self.torch.set_num_threads(threads or self.threads)
            self.cache.crop(self.fill)

        return Probe(name, lambda i: self._step(i, last_only), before)


# ---- peer (b): the dense LLM exported with optimum, run by ORTModelForCausalLM ----


def export_optimum(lm_dir: Path, out: Path) -> Path:
    """`ORTModelForCausalLM.from_pretrained(dir, export=True)`, saved for the next run."""
    from optimum.onnxruntime import ORTModelForCausalLM

    with warnings.catch_warnings():
        # optimum's TorchScript export warns about its own tracing (trace constants, the legacy
        # exporter, advanced indexing): nothing a bench user can act on
        warnings.filterwarnings("ignore", module=r"(torch\.onnx|transformers|optimum)(\.|$)")
        model = ORTModelForCausalLM.from_pretrained(lm_dir, export=True, use_cache=True)
    model.save_pretrained(out)
    return out


class OptimumPeer:
    """ORTModelForCausalLM takes `input_ids` only (no `inputs_embeds`), so a frame is fed as
    N stand-in token ids: the same sequence length, hence the same compute in the decoder."""

    def __init__(
        self,
        ort_dir: Path,
        warm: Sequence[Segment],
        tokens_per_frame: int,
        interval_id: int,
        vocab: int,
        provider: str = "CPUExecutionProvider",
    ):
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        self.torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(ort_dir, provider=provider, use_cache=True)
        rng = np.random.default_rng(0)
        stand_in = lambda: rng.integers(0, vocab, tokens_per_frame).tolist()  # noqa: E731
        warm_ids = [t for ids, _ in warm for t in [*ids, *stand_in()]]
        out = self.model(
            input_ids=torch.tensor([warm_ids]),
            attention_mask=torch.ones(1, len(warm_ids), dtype=torch.int64),
            use_cache=True,
        )
        self.past = out.past_key_values  # never extended: every call starts from the warm fill
        self.fill = len(warm_ids)
        self.ids = [torch.tensor([[interval_id, *stand_in()]]) for _ in range(4)]
        self.mask = torch.ones(1, self.fill + 1 + tokens_per_frame, dtype=torch.int64)

    def _step(self, i: int) -> None:
        self.model(
            input_ids=self.ids[i % len(self.ids)],
            attention_mask=self.mask,
            past_key_values=self.past,
            use_cache=True,
        )

    def probe(self, name: str) -> Probe:
        return Probe(name, self._step)
