"""Top-1 agreement of a quantized bundle's graphs with fp32, on the same steps.

The reference sessions narrate a stream (with one question in the middle); the candidate
sessions then replay exactly the steps the reference took (teacher-forced), so one early
difference cannot change every later input. Used by int8 for CPU and Q/DQ for TensorRT.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onsight.runtime.ort_backend import OrtSessions
from onsight.runtime.stream_loop import StreamLoop
from onsight.runtime.template import bundle_template_ids


class Replay:
    """Records a stepper's calls so another stepper can be driven with the same inputs."""

    def __init__(self, inner):
        self.inner, self.calls, self.logits = inner, [], []

    def text(self, ids, kind, group):
        self.calls.append(("text", (list(ids), kind, group)))
        out = self.inner.text(ids, kind, group)
        self.logits.append(out)
        return out

    def frame(self, ids, embeds, group):
        self.calls.append(("frame", (list(ids), embeds, group)))
        out = self.inner.frame(ids, embeds, group)
        self.logits.append(out)
        return out


def narrate_recorded(sessions: OrtSessions, emb: np.ndarray, max_new_tokens: int = 16) -> Replay:
    """Narrate frame embeddings `emb` (T, N, hidden) through `sessions`' decoder, asking a
    question halfway; returns the recorded stepper calls."""
    from tokenizers import Tokenizer

    bundle = sessions.bundle
    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    rec = Replay(sessions.stepper())
    loop = StreamLoop(
        rec,
        bundle_template_ids(tok, bundle),
        encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        threshold=float(bundle.generation["threshold"]),
        max_new_tokens=max_new_tokens,
    )
    for f in range(len(emb)):
        if f == len(emb) // 2:
            loop.ask("what is happening?")
        loop.on_frame(emb[f])
    return rec


def top1_agreement(reference: OrtSessions, candidate: OrtSessions, pixels: np.ndarray):
    """Teacher-forced: the candidate replays the reference stream's exact steps."""
    emb = reference.encode(pixels)
    rec = narrate_recorded(reference, emb)
    vision_agree = float(np.mean(np.sign(emb) == np.sign(candidate.encode(pixels))))
    q = candidate.stepper()
    agree, n, err = 0, 0, 0.0
    for (kind, args), ref in zip(rec.calls, rec.logits, strict=True):
        out = q.text(*args) if kind == "text" else q.frame(*args)
        agree += int(np.argmax(out) == np.argmax(ref))
        n += 1
        err = max(err, float(np.abs(out - ref).max()))
    result: dict[str, Any] = {
        "top1_agreement": agree / n,
        "steps": n,
        "max_abs_logit_error": err,
        "vision_sign_agreement": vision_agree,
    }
    return result
