"""VideoLLM-online's (Chen et al., CVPR 2024) teacher-forced metrics of a demo checkpoint.

From the PyTorch model (the same routing as the bundle) fed the ground-truth stream in
the streaming template, laid out token for token as `StreamLoop` feeds it (`data.build_example`;
questions left out, answers are scored by accuracy). Every prediction is read off that one
pass with the ground truth as context, never the model's own earlier outputs:

- LM perplexity: exp of the mean cross-entropy of the ground-truth narration tokens and
  their EOS, pooled over all narrations.
- LM correctness: the fraction of those tokens that are the model's argmax (greedy) pick.
- Fluency: per dialogue turn, the share of its predictions that succeed in a row from the
  turn's start. A turn is the frames since the previous narration up to the frame the model
  narrates the event at (the event frame, or later for a kind it was trained to narrate
  late: `data.NarrationDelay`), then the narration: first one speak-or-stay-silent decision
  per frame, taken from the logits at the frame's last `<v>` by the runtime's rule (`stream_loop.decide`: p(interval)
  below the speak threshold, the bundle's or --threshold, is zeroed before the argmax; so
  with a threshold above 0.5, silent exactly when p(interval) >= threshold), a success when
  it stays silent before that frame and speaks at it; then the narration's tokens and
  EOS, a success when the argmax is the ground truth. Fluency = (successes before the first
  failure) / (predictions in the turn), averaged over turns. Frames after a stream's last
  narration make no turn (as in VideoLLM-online; speaking there costs event precision).

VideoLLM-online's released `stream_evaluate` differs in three details, all deliberate here:
it averages per-turn perplexities (pooled over tokens here, as the numbers always were), its
LM correctness counts per turn only the tokens before the first wrong one (every token
counts here), and when a turn's decision fires early it counts one success more than the
run before that failure (the count stops at the first failure here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onsight.runtime.synthetic import Stream

if TYPE_CHECKING:
    from onsight.exporter.demo.data import Example


@dataclass
class TeacherForced:
    """The teacher-forced metrics of `teacher_forced_metrics` (definitions: module docstring)."""

    perplexity: float
    lm_correctness: float
    fluency: float
    n_tokens: int  # ground-truth language tokens scored (narration tokens + their EOS)
    n_turns: int  # dialogue turns scored by fluency


@dataclass
class TeacherForcedTally:
    """Running sums of the teacher-forced metrics over streams."""

    ce_sum: float = 0.0
    n_tokens: int = 0
    n_correct: int = 0
    fluencies: list[float] = field(default_factory=list)

    def add(
        self,
        ex: Example,
        lm_logits: np.ndarray,
        frame_logits: np.ndarray,
        interval_id: int,
        threshold: float,
        ce_sum: float | None = None,
    ) -> None:
        """One stream's `Example` and its logits: `lm_logits` (n_labels, vocab) at the
        labelled positions in order, `frame_logits` (F, vocab) at each frame's last <v>.
        `ce_sum` is the summed CE of the labelled tokens (computed here when left out)."""
        from onsight.exporter.demo.data import IGNORE
        from onsight.runtime.stream_loop import decide

        lm_logits = np.asarray(lm_logits, dtype=np.float64)
        label_pos = np.nonzero(ex.labels != IGNORE)[0]
        targets = ex.labels[label_pos]
        if ce_sum is None:
            z = lm_logits - lm_logits.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            ce_sum = float(-logp[np.arange(len(targets)), targets].sum())
        token_ok = lm_logits.argmax(-1) == targets if len(targets) else np.zeros(0, bool)
        self.ce_sum += ce_sum
        self.n_tokens += len(targets)
        self.n_correct += int(token_ok.sum())
        # The runtime's decision at every frame, right when it says the same as the truth.
        decision_ok = [
            decide(frame_logits[f], interval_id, threshold)[0] == (label != interval_id)
            for f, label in enumerate(ex.stream_label)
        ]
        # A turn: the frames since the previous reply up to the one that must speak, then
        # the reply's tokens (+ EOS): the labelled positions before the next frame's tokens.
        first = 0
        n_frames = len(ex.stream_label)
        for f in range(n_frames):
            if ex.stream_label[f] == interval_id:
                continue
            stop = ex.frame_pos[f + 1, 0] if f + 1 < n_frames else len(ex.ids)
            in_reply = (label_pos > ex.frame_pos[f, -1]) & (label_pos < stop)
            self.fluencies.append(turn_fluency(decision_ok[first : f + 1], token_ok[in_reply]))
            first = f + 1
        # Frames after the last reply form no turn (VideoLLM-online scores only turns with a
        # reply): the model's speaking there is counted by event precision, not here.

    def result(self) -> TeacherForced:
        nan = float("nan")
        return TeacherForced(
            perplexity=math.exp(self.ce_sum / self.n_tokens) if self.n_tokens else nan,
            lm_correctness=self.n_correct / self.n_tokens if self.n_tokens else nan,
            fluency=float(np.mean(self.fluencies)) if self.fluencies else nan,
            n_tokens=self.n_tokens,
            n_turns=len(self.fluencies),
        )


def turn_fluency(decisions_ok: Sequence[bool], tokens_ok: Sequence[bool]) -> float:
    """Successful predictions of one turn counted from its start up to the first failure,
    over the turn's predictions: the frames' speak decisions, then the reply's tokens."""
    seq = [bool(x) for x in decisions_ok] + [bool(x) for x in tokens_ok]
    if not seq:
        return float("nan")
    run = next((i for i, ok in enumerate(seq) if not ok), len(seq))
    return run / len(seq)


def teacher_forced_metrics(
    checkpoint: str | Path, streams: Sequence[Stream], threshold: float | None = None
) -> TeacherForced:
    """Perplexity, LM-correctness and fluency of the ground-truth narrations, in one
    teacher-forced pass per stream through the PyTorch model (the same routing as the
    bundle), laid out in the streaming template as `StreamLoop` feeds it. `threshold` is the
    speak threshold of the frames' decisions (default: the checkpoint's)."""
    import torch
    from tokenizers import Tokenizer

    from onsight.exporter.demo.data import IGNORE, build_example
    from onsight.exporter.demo.objective import batched_hidden
    from onsight.exporter.demo.train_config import checkpoint_delay
    from onsight.exporter.model import load_native
    from onsight.runtime.template import build_template_ids

    model, tok_path = load_native(checkpoint)
    tok = Tokenizer.from_file(str(tok_path))
    t = build_template_ids(tok, asdict(model.cfg.template))
    v_id = tok.token_to_id(model.cfg.template.v_token)
    if threshold is None:
        threshold = float(model.cfg.template.threshold)
    dec = model.decoder
    delay = checkpoint_delay(checkpoint)  # narrations where the model was trained to say them
    tally = TeacherForcedTally()
    for stream in streams:
        # Questions are left out: answers are scored by accuracy, not perplexity.
        plain = Stream(
            stream.seed, stream.config, stream.fps, stream.frames, stream.states, stream.events, ()
        )
        ex = build_example(
            plain,
            t,
            lambda s: tok.encode(s, add_special_tokens=False).ids,
            v_id,
            model.cfg.tokens_per_frame,
            delay,
        )
        with torch.no_grad():
            x = batched_hidden(
                model,
                torch.from_numpy(ex.ids)[None],
                torch.from_numpy(ex.frames)[None],
                torch.from_numpy(ex.frame_pos)[None],
            )[0]
            labels = torch.from_numpy(ex.labels)
            mask = labels != IGNORE
            if not mask.any():
                continue
            # The LM rows exactly as the perplexity always took them (same rows, same call).
            logits = dec.lm_head(dec.final_norm(x[mask])).float()
            ce = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum")
            last = torch.from_numpy(ex.frame_pos[:, -1])
            frame_logits = dec.lm_head(dec.final_norm(x[last])).float()
        tally.add(ex, logits.numpy(), frame_logits.numpy(), t.interval_id, threshold, float(ce))
    return tally.result()


def narration_perplexity(checkpoint: str | Path, streams: Sequence[Stream]) -> float:
    """exp(mean CE) of the ground-truth narration tokens (+ EOS), teacher-forced in the
    streaming template, under the PyTorch model (see `teacher_forced_metrics`)."""
    return teacher_forced_metrics(checkpoint, streams).perplexity


def teacher_forced_report(
    checkpoint: str | Path | None, data: Sequence[Stream], threshold: float
) -> dict[str, object]:
    """The report's teacher-forced entries (None without a checkpoint)."""
    if not checkpoint:
        keys = ("perplexity", "lm_correctness", "fluency", "n_lm_tokens", "n_turns")
        return dict.fromkeys(keys)
    tf = teacher_forced_metrics(checkpoint, data, threshold)
    return {
        "perplexity": tf.perplexity,
        "lm_correctness": tf.lm_correctness,
        "fluency": tf.fluency,
        "n_lm_tokens": tf.n_tokens,
        "n_turns": tf.n_turns,
    }
