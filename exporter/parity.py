"""Parity of a bundle (run by the runtime's onnxruntime engine) against the PyTorch reference."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from onsight.exporter.model import StreamingModel
from onsight.exporter.reference import reference_loop
from onsight.runtime.bundle import load_bundle
from onsight.runtime.kv_policy import EvictionPolicy
from onsight.runtime.ort_backend import OrtSessions
from onsight.runtime.stream_loop import StreamLoop
from onsight.runtime.template import bundle_template_ids

log = logging.getLogger(__name__)

# Max |logit error| allowed, relative to max(1, largest |logit|). fp16 keeps ~3 significant
# digits through a deep stack of matmuls, so its bound is looser; decisions and greedy tokens
# must still agree exactly.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}
PARITY_MAX_NEW_TOKENS = 8


class RecordingStepper:
    """Wraps a Stepper and keeps every step's logits."""

    def __init__(self, inner):
        self.inner = inner
        self.logits: list[np.ndarray] = []

    def text(self, ids, kind, group):
        out = self.inner.text(ids, kind, group)
        self.logits.append(out)
        return out

    def frame(self, ids, embeds, group):
        out = self.inner.frame(ids, embeds, group)
        self.logits.append(out)
        return out


def parity_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """A deterministic stream: smooth random scenes that drift, so frames differ."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    frames = []
    for i in range(n):
        img = np.kron(base, np.ones((8, 8, 1)))[:size, :size]
        img = np.roll(img, shift=3 * i, axis=1) + rng.normal(0, 8, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


@torch.no_grad()
def run_parity(
    model: StreamingModel,
    bundle_dir: str | Path,
    dtype: str = "fp32",
    frames: int = 8,
    policy: EvictionPolicy | None = None,
) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir, verify=False)
    sessions = OrtSessions(bundle, device="cpu")
    pixels = parity_frames(frames, bundle.image_size)
    ref_emb = model.encode_frames(torch.from_numpy(pixels)).float().numpy()
    ort_emb = sessions.encode(pixels)
    vision_err = float(np.abs(ref_emb - ort_emb).max())

    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    ids = bundle_template_ids(tok, bundle)
    ref = reference_loop(
        model,
        bundle.tokenizer_path,
        capacity=bundle.layout.capacity_dense,
        policy=policy,
        max_new_tokens=PARITY_MAX_NEW_TOKENS,
    )
    rt = StreamLoop(
        sessions.stepper(policy),
        ids,
        encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        threshold=float(bundle.generation["threshold"]),
        max_new_tokens=PARITY_MAX_NEW_TOKENS,
    )
    ref.stepper = RecordingStepper(ref.stepper)
    rt.stepper = RecordingStepper(rt.stepper)
    same_decisions = same_tokens = True
    spoke = 0
    for f in range(frames):
        if f == frames // 2:
            ref.ask("what is happening?")
            rt.ask("what is happening?")
        a, b = ref.on_frame(ref_emb[f]), rt.on_frame(ref_emb[f])
        same_decisions &= a.speak == b.speak
        same_tokens &= a.narration == b.narration and a.answers == b.answers
        spoke += int(a.speak)
        if not (same_decisions and same_tokens):
            break
    pairs = list(zip(ref.stepper.logits, rt.stepper.logits, strict=False))
    err = max(float(np.abs(x - y).max()) for x, y in pairs)
    scale = max(1.0, max(float(np.abs(x).max()) for x, _ in pairs))
    tol = TOLERANCE[dtype] * scale
    result = {
        "frames": frames,
        "steps": len(pairs),
        "frames_spoken": spoke,
        "max_abs_logit_error": err,
        "logit_scale": scale,
        "tolerance": tol,
        "vision_max_abs_error": vision_err,
        "same_decisions": bool(same_decisions),
        "same_tokens": bool(same_tokens),
        "dtype": dtype,
        "provider": "CPUExecutionProvider",
    }
    result["passed"] = bool(err <= tol and same_decisions and same_tokens)
    log.info("parity: %s", result)
    return result
