"""`onsight eval`: the demo bundle's quality on held-out synthetic streams.

Narration runs THROUGH THE BUNDLE with the torch-free runtime (onnxruntime sessions + the
runtime's StreamLoop), exactly as `onsight run` would; each stream's questions are asked at
their frames. Training draws world seeds below 100000, so the default seed range is unseen.

With --checkpoint, VideoLLM-online's (Chen et al., CVPR 2024) teacher-forced metrics come
too, from the PyTorch model (the same routing as the bundle) fed the ground-truth stream in
the streaming template, laid out token for token as `StreamLoop` feeds it (`data.build_example`;
questions left out, answers are scored by accuracy). Every prediction is read off that one
pass with the ground truth as context, never the model's own earlier outputs:

- LM perplexity: exp of the mean cross-entropy of the ground-truth narration tokens and
  their EOS, pooled over all narrations.
- LM correctness: the fraction of those tokens that are the model's argmax (greedy) pick.
- Fluency: per dialogue turn, the share of its predictions that succeed in a row from the
  turn's start. A turn is the frames since the previous narration up to the event frame,
  then the narration: first one speak-or-stay-silent decision per frame, taken from the
  logits at the frame's last `<v>` by the runtime's rule (`stream_loop.decide`: p(interval)
  below the speak threshold, the bundle's or --threshold, is zeroed before the argmax; so
  with a threshold above 0.5, silent exactly when p(interval) >= threshold), a success when
  it stays silent before the event frame and speaks at it; then the narration's tokens and
  EOS, a success when the argmax is the ground truth. Fluency = (successes before the first
  failure) / (predictions in the turn), averaged over turns. Frames after a stream's last
  narration make no turn (as in VideoLLM-online; speaking there costs event precision).

VideoLLM-online's released `stream_evaluate` differs in three details, all deliberate here:
it averages per-turn perplexities (pooled over tokens here, as the numbers always were), its
LM correctness counts per turn only the tokens before the first wrong one (every token
counts here), and when a turn's decision fires early it counts one success more than the
run before that failure (the count stops at the first failure here).

TimeDiff is measured on the bundle's free-running narrations (exact-text matches), not
teacher-forced.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onsight.runtime.synthetic import (
    NarrationReport,
    Stream,
    WorldConfig,
    curriculum,
    generate_stream,
    question_accuracy,
    recall_by_objects_in_view,
    score_narrations,
    wrong_details,
)

if TYPE_CHECKING:
    from onsight.exporter.demo.data import Example

log = logging.getLogger(__name__)

HELD_OUT_SEED = 100_000  # first world seed training never draws


@dataclass
class StreamResult:
    """What the narrator said on one stream, next to the truth."""

    seed: int
    predictions: list[tuple[float, str]]
    answers: list[str]
    expected: list[str]
    question_kinds: list[str]


@dataclass
class Counts:
    """Match counts pooled over streams (one mode)."""

    predictions: int = 0
    events: int = 0
    matched: int = 0
    time_err_sum: float = 0.0
    hits_by_kind: dict[str, int] = field(default_factory=dict)
    totals_by_kind: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        p = self.matched / self.predictions if self.predictions else 0.0
        r = self.matched / self.events if self.events else 1.0
        return {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "time_diff_s": self.time_err_sum / self.matched if self.matched else None,
            "recall_by_kind": {
                k: self.hits_by_kind.get(k, 0) / n for k, n in sorted(self.totals_by_kind.items())
            },
            "events_by_kind": dict(sorted(self.totals_by_kind.items())),
            "n_predictions": self.predictions,
            "n_events": self.events,
            "n_matched": self.matched,
        }


class BundleNarrator:
    """A bundle under the runtime's own engine: frames in, narrations and answers out."""

    def __init__(
        self,
        engine: str | Path,
        threads: int | None = None,
        threshold: float | None = None,
        qdq: bool = False,
    ):
        from tokenizers import Tokenizer

        from onsight.runtime.bundle import load_bundle
        from onsight.runtime.ort_backend import OrtSessions
        from onsight.runtime.template import build_template_ids

        self.bundle = load_bundle(engine)
        files = None
        if qdq:  # the calibrated Q/DQ graphs for TensorRT int8, run by onnxruntime's CPU
            qdq_meta = self.bundle.manifest.get("qdq")
            if not qdq_meta:
                raise SystemExit(
                    f"{engine} has no Q/DQ graphs: run `onsight build {engine} --precision int8 "
                    "--calibrate-only` first"
                )
            files = {g: self.bundle.path / f for g, f in qdq_meta["graphs"].items()}
        self.sessions = OrtSessions(
            self.bundle,
            device="cpu",
            threads=threads,
            use_overrides=False if qdq else None,
            graph_files=files,
        )
        self.tok = Tokenizer.from_file(str(self.bundle.tokenizer_path))
        self.ids = build_template_ids(self.tok, self.bundle.template)
        self.fps = float(self.bundle.generation["fps"])
        # An override is for calibrating a new threshold; ship it in the model's template.
        self.threshold = threshold or float(self.bundle.generation["threshold"])

    def loop(self):
        from onsight.runtime.stream_loop import StreamLoop

        gen = self.bundle.generation
        return StreamLoop(
            self.sessions.stepper(),
            self.ids,
            encode=lambda s: self.tok.encode(s, add_special_tokens=False).ids,
            threshold=self.threshold,
            max_new_tokens=int(gen["max_new_tokens"]),
        )

    def run(self, stream: Stream) -> StreamResult:
        from onsight.runtime.preprocess import preprocess_batch

        pixels = preprocess_batch(list(stream.frames), self.bundle.manifest["preprocess"])
        embeds = self.sessions.encode(pixels)  # (T, N, hidden)
        loop = self.loop()
        asked: dict[int, list] = {}
        for q in stream.questions:
            asked.setdefault(q.frame_index, []).append(q)
        preds, answers, expected, kinds = [], [], [], []
        for f in range(stream.num_frames):
            for q in asked.get(f, []):
                loop.ask(q.text)  # injected right after this frame, as the world asks it
                expected.append(q.answer)
                kinds.append(q.kind.value)
            out = loop.on_frame(embeds[f])
            if out.speak:
                preds.append((f / stream.fps, self.tok.decode(out.narration).strip()))
            answers += [self.tok.decode(ids).strip() for _, ids in out.answers]
        return StreamResult(stream.seed, preds, answers, expected, kinds)


def pool_scores(reports: Sequence[NarrationReport], streams: Sequence[Stream]):
    """Pool exact / kind / timing matching over streams (one report per stream)."""
    pooled = {m: Counts() for m in ("exact", "kind", "timing")}
    for report, stream in zip(reports, streams, strict=True):
        for scores in (report.exact, report.kind, report.timing):
            c = pooled[scores.mode]
            c.predictions += scores.n_predictions
            c.events += scores.n_events
            c.matched += scores.n_matched
            c.time_err_sum += (scores.time_diff_s or 0.0) * scores.n_matched
            matched = {i for i, _ in scores.matches}
            for i, e in enumerate(stream.events):
                k = e.kind.value
                c.totals_by_kind[k] = c.totals_by_kind.get(k, 0) + 1
                c.hits_by_kind[k] = c.hits_by_kind.get(k, 0) + (i in matched)
    return {m: c.summary() for m, c in pooled.items()}


def pool_wrong_details(
    results: Sequence[StreamResult],
    reports: Sequence[NarrationReport],
    streams: Sequence[Stream],
) -> dict[str, dict[str, int]]:
    """`wrong_details` summed over streams: {event kind: {what was wrong: count}}."""
    pooled: dict[str, dict[str, int]] = {}
    for res, report, stream in zip(results, reports, streams, strict=True):
        details = wrong_details(res.predictions, stream.events, stream.states, report)
        for kind, reasons in details.items():
            into = pooled.setdefault(kind, {})
            for why, n in reasons.items():
                into[why] = into.get(why, 0) + n
    return {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in sorted(pooled.items())}


def pool_recall_by_objects(
    reports: Sequence[NarrationReport], streams: Sequence[Stream]
) -> dict[str, dict[str, list[int]]]:
    """`recall_by_objects_in_view` summed over streams: {kind: {"1" | "2" | "3+": [hits,
    events]}}."""
    pooled: dict[str, dict[str, list[int]]] = {}
    for report, stream in zip(reports, streams, strict=True):
        for kind, buckets in recall_by_objects_in_view(
            stream.events, stream.states, report
        ).items():
            into = pooled.setdefault(kind, {})
            for bucket, (hit, total) in buckets.items():
                h, t = into.get(bucket, [0, 0])
                into[bucket] = [h + hit, t + total]
    return {k: dict(sorted(v.items())) for k, v in sorted(pooled.items())}


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


def held_out_streams(
    streams: int = 20, seed_start: int = HELD_OUT_SEED, frames: int = 60, stage: int = 2
) -> list[Stream]:
    """The evaluation streams: world seeds from `seed_start`, which training never draws."""
    world: WorldConfig = curriculum(stage)
    return [generate_stream(seed_start + i, frames, world) for i in range(streams)]


def score_narrator(
    narrator: BundleNarrator, data: Sequence[Stream], window_s: float
) -> tuple[dict[str, object], list[StreamResult]]:
    """Narrate every stream through the bundle; event scores and question accuracy."""
    results = [narrator.run(s) for s in data]
    reports = [  # matched once per stream; every pooled table reads these
        score_narrations(r.predictions, s.events, window_s=window_s)
        for r, s in zip(results, data, strict=True)
    ]
    answers = [a for r in results for a in r.answers]
    expected = [e for r in results for e in r.expected]
    qkinds = [k for r in results for k in r.question_kinds]
    by_kind: dict[str, list[bool]] = {}
    for a, e, k in zip(answers, expected, qkinds, strict=True):
        by_kind.setdefault(k, []).append(question_accuracy([a], [e]) == 1.0)
    scores: dict[str, object] = {
        "threshold": narrator.threshold,
        "narration": pool_scores(reports, data),
        # the narrations of the right kind with the wrong text: what they got wrong
        "wrong_details": pool_wrong_details(results, reports, data),
        "recall_by_objects_in_view": pool_recall_by_objects(reports, data),
        "question_accuracy": question_accuracy(answers, expected) if expected else None,
        "question_accuracy_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "n_questions": len(expected),
    }
    return scores, results


def evaluate(
    engine: str | Path,
    streams: int = 20,
    seed_start: int = HELD_OUT_SEED,
    frames: int = 60,
    window_s: float = 2.0,
    stage: int = 2,
    checkpoint: str | Path | None = None,
    threads: int | None = None,
    threshold: float | None = None,
    qdq: bool = False,
) -> dict[str, object]:
    """Narrate held-out streams through the bundle and score them."""
    narrator = BundleNarrator(engine, threads, threshold, qdq)
    data = held_out_streams(streams, seed_start, frames, stage)
    scores, results = score_narrator(narrator, data, window_s)
    report: dict[str, object] = {
        "engine": str(engine),
        "streams": streams,
        "seed_start": seed_start,
        "frames": frames,
        "window_s": window_s,
        "world_stage": stage,
        **scores,
        **teacher_forced_report(checkpoint, data, narrator.threshold),
        "examples": [
            {"seed": r.seed, "said": r.predictions[:6], "truth": s.narrations()[:6]}
            for r, s in zip(results[:3], data[:3], strict=True)
        ],
    }
    return report


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


def markdown(report: dict) -> str:
    ex = report["narration"]["exact"]
    kind = report["narration"]["kind"]
    td = ex["time_diff_s"]
    rows = [
        "| metric | value |",
        "| --- | --- |",
        f"| held-out streams x frames (seeds from {report['seed_start']}) | "
        f"{report['streams']} x {report['frames']} |",
        f"| speak threshold p(interval) | {report['threshold']} |",
        f"| event precision (exact text, {report['window_s']} s window) | {ex['precision']:.3f} |",
        f"| event recall (exact) | {ex['recall']:.3f} |",
        f"| event F1 (exact) | {ex['f1']:.3f} |",
        f"| event F1 (right kind, any object) | {kind['f1']:.3f} |",
        f"| TimeDiff (s, exact matches) | {td:.2f} |" if td is not None else "| TimeDiff | - |",
    ]
    for k, r in ex["recall_by_kind"].items():
        rows.append(f"| recall: {k} ({ex['events_by_kind'][k]} events) | {r:.3f} |")
    for k, buckets in report.get("recall_by_objects_in_view", {}).items():
        said = ", ".join(f"{b}: {h / t:.2f} ({t})" for b, (h, t) in buckets.items() if t)
        rows.append(f"| recall: {k}, by objects in view (exact) | {said} |")
    for k, reasons in report.get("wrong_details", {}).items():
        said = ", ".join(f"{why} {n}" for why, n in reasons.items())
        rows.append(f"| right kind, wrong text: {k} | {said} |")
    qa = report["question_accuracy"]
    rows.append(
        f"| question accuracy ({report['n_questions']} questions) | "
        + (f"{qa:.3f} |" if qa is not None else "- |")
    )
    ppl, corr, flu = (report.get(k) for k in ("perplexity", "lm_correctness", "fluency"))
    rows.append(f"| LM perplexity of GT narrations | {ppl:.3f} |" if ppl else "| perplexity | - |")
    rows.append(
        f"| LM correctness (teacher-forced argmax) | {corr:.3f} |"
        if corr is not None
        else "| LM correctness | - |"
    )
    rows.append(
        f"| fluency ({report['n_turns']} turns, teacher-forced) | {flu:.3f} |"
        if flu is not None
        else "| fluency | - |"
    )
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="onsight eval", description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="engines/demo", help="bundle directory")
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--seed-start", type=int, default=HELD_OUT_SEED)
    p.add_argument("--frames", type=int, default=60, help="frames per stream")
    p.add_argument("--window", type=float, default=2.0, help="seconds after an event to match")
    p.add_argument("--stage", type=int, default=2, help="world curriculum stage (2: full world)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="native checkpoint, for perplexity, LM correctness and fluency (--ablations: the MoD model, default "
        "engines/demo-checkpoint)",
    )
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    p.add_argument(
        "--threshold", type=float, default=None, help="override the bundle's speak threshold"
    )
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument(
        "--qdq",
        action="store_true",
        help="score the bundle's calibrated Q/DQ graphs (TensorRT int8, from `onsight build "
        "--precision int8`) on onnxruntime's CPU; int8 CPU graphs (--quantize int8) are used "
        "automatically when the bundle has them",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="the ablation table instead: learned / random / uniform routing, early exit and "
        "the full-compute twin, each exported from --checkpoint (the bundle in --engine only "
        "sets the cache size); with --out, markdown is written beside the JSON",
    )
    p.add_argument(
        "--twin", default=None, help="--ablations: native checkpoint of the full-compute twin"
    )
    p.add_argument(
        "--bundles",
        default=None,
        help="--ablations: keep the variants' bundles in this new directory (default: deleted)",
    )
    return p.parse_args(argv)


def main_ablations(args: argparse.Namespace) -> int:
    import sys

    from onsight.exporter.demo.ablation import ablation_markdown, run_ablations, write_report

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report = run_ablations(
        args.checkpoint or "engines/demo-checkpoint",
        twin=args.twin,
        engine=args.engine,
        streams=args.streams,
        seed_start=args.seed_start,
        frames=args.frames,
        window_s=args.window,
        stage=args.stage,
        threads=args.threads,
        threshold=args.threshold,
        bundles_dir=args.bundles,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(ablation_markdown(report))
    if args.out:
        js, md = write_report(report, args.out)
        print(f"report: {js} and {md}")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.ablations:
        return main_ablations(args)
    report = evaluate(
        args.engine,
        args.streams,
        args.seed_start,
        args.frames,
        args.window,
        args.stage,
        args.checkpoint,
        args.threads,
        args.threshold,
        args.qdq,
    )
    print(markdown(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
