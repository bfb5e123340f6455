"""`onsight eval`: the demo bundle's quality on held-out synthetic streams.

Narration runs THROUGH THE BUNDLE with the torch-free runtime (onnxruntime sessions + the
runtime's StreamLoop), exactly as `onsight run` would; each stream's questions are asked at
their frames. Training draws world seeds below 100000, so the default seed range is unseen.

With --checkpoint, VideoLLM-online's teacher-forced metrics come too (`teacher_forced`: LM
perplexity, LM correctness and fluency, from the PyTorch model).

TimeDiff is measured on the bundle's free-running narrations (exact-text matches), not
teacher-forced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onsight.exporter.demo.teacher_forced import teacher_forced_report
from onsight.runtime.errors import OnsightError
from onsight.runtime.files import write_text_atomic
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
                raise OnsightError(
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


def held_out_streams(
    streams: int = 20,
    seed_start: int = HELD_OUT_SEED,
    frames: int = 60,
    stage: int = 2,
    mover_questions: float = 0.0,
    onset_questions: float = 0.0,
) -> list[Stream]:
    """The evaluation streams: world seeds from `seed_start`, which training never draws.
    `mover_questions` adds "what colour/shape is the moving object?" questions (a probe of
    finding the mover from text); frames and events do not change with it."""
    world: WorldConfig = dataclasses.replace(
        curriculum(stage), mover_questions=mover_questions, onset_questions=onset_questions
    )
    return [generate_stream(seed_start + i, frames, world) for i in range(streams)]


def score_narrator(
    narrator: BundleNarrator,
    data: Sequence[Stream],
    window_s: float,
    on_stream: Callable[[], object] | None = None,
) -> tuple[dict[str, object], list[StreamResult]]:
    """Narrate every stream through the bundle; event scores and question accuracy.
    `on_stream` is called after each stream (a progress bar's update)."""
    results = []
    for s in data:
        results.append(narrator.run(s))
        if on_stream:
            on_stream()
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
    on_stream: Callable[[], object] | None = None,
    mover_questions: float = 0.0,
    onset_questions: float = 0.0,
) -> dict[str, object]:
    """Narrate held-out streams through the bundle and score them; `on_stream` is called
    after each stream is narrated."""
    narrator = BundleNarrator(engine, threads, threshold, qdq)
    data = held_out_streams(streams, seed_start, frames, stage, mover_questions, onset_questions)
    scores, results = score_narrator(narrator, data, window_s, on_stream)
    report: dict[str, object] = {
        "engine": str(engine),
        "streams": streams,
        "seed_start": seed_start,
        "frames": frames,
        "window_s": window_s,
        "world_stage": stage,
        "mover_questions": mover_questions,
        "onset_questions": onset_questions,
        **scores,
        **teacher_forced_report(checkpoint, data, narrator.threshold),
        "examples": [
            {"seed": r.seed, "said": r.predictions[:6], "truth": s.narrations()[:6]}
            for r, s in zip(results[:3], data[:3], strict=True)
        ],
    }
    return report


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
    p.add_argument(
        "--streams", type=int, default=20, help="held-out streams to narrate (README: 500)"
    )
    p.add_argument(
        "--seed-start",
        type=int,
        default=HELD_OUT_SEED,
        help=f"first world seed (default {HELD_OUT_SEED}: held out; 200000+: validation)",
    )
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
        "--mover-questions",
        type=float,
        default=0.0,
        metavar="P",
        help='also ask "what colour/shape is the moving object?" at this chance on frames '
        "where exactly one object moves (question accuracy by kind reports them; frames and "
        "events stay the same, but the extra questions sit in the model's context, so compare "
        "narration scores only between runs with the same P)",
    )
    p.add_argument(
        "--onset-questions",
        type=float,
        default=0.0,
        metavar="P",
        help="ask the same at this chance on the frame a move starts, when that object is the "
        "only one moving (the frame where naming the mover is hardest)",
    )
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
    args = p.parse_args(argv)
    problem = _check_args(args)
    if problem:
        p.error(problem)
    return args


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, said so that the user can fix it; None if nothing."""
    if args.streams < 1:
        return f"--streams {args.streams}: give at least 1 held-out stream (the README uses 500)"
    if args.frames < 2:
        return f"--frames {args.frames}: a stream needs at least 2 frames (default 60)"
    if args.window <= 0:
        return f"--window {args.window}: the match window must be positive seconds (default 2)"
    if args.threads is not None and args.threads < 1:
        return (
            f"--threads {args.threads}: give at least 1, or leave it out for onnxruntime's default"
        )
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        return f"--threshold {args.threshold}: a speak probability strictly between 0 and 1"
    for flag in ("mover_questions", "onset_questions"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            return (
                f"--{flag.replace('_', '-')} {getattr(args, flag)}: a chance from 0 to 1 (e.g. 0.3)"
            )
    if args.out is not None:
        problem = _out_problem(Path(args.out))
        if problem:
            return f"--out {args.out}: {problem}; choose another path"
    if not args.ablations:
        for flag in ("twin", "bundles"):
            if getattr(args, flag) is not None:
                return f"--{flag} only applies with --ablations"
        return None
    if args.qdq:
        return "--qdq scores one bundle; leave it out with --ablations (variants export fp32)"
    if args.mover_questions or args.onset_questions:
        return "--mover-questions and --onset-questions probe one bundle; leave them out with --ablations"
    if args.twin is not None:
        from onsight.exporter.demo.run_files import is_native_dir

        if not is_native_dir(Path(args.twin)):
            return (
                f"--twin {args.twin}: not a native checkpoint (config.json, model.safetensors, "
                "tokenizer.json); make one from the twin's run with `onsight train-demo --out "
                "RUN --snapshot DIR`, or leave --twin out"
            )
    if (
        args.bundles is not None
        and Path(args.bundles).exists()
        and any(Path(args.bundles).iterdir())
    ):
        return f"--bundles {args.bundles} is not empty; choose a new directory"
    return None


def _out_problem(out: Path) -> str | None:
    """Why the report could not be written to `out` (checked before minutes of narrating)."""
    if out.is_dir():
        return "is a directory, and the report is a file (e.g. eval.json)"
    from onsight.runtime.files import why_unwritable

    return why_unwritable(out)


@contextmanager
def _stream_bar(name: str, streams: int) -> Iterator[Callable[[], object]]:
    """A progress bar on stderr over `streams` streams (an eval, or one ablation variant)."""
    import sys

    from tqdm import tqdm

    with tqdm(total=streams, desc=name, unit="stream", file=sys.stderr) as bar:
        yield bar.update


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
        stream_bar=_stream_bar,
    )
    print(ablation_markdown(report))
    if args.out:
        js, md = write_report(report, args.out)
        print(f"report: {js} and {md}")
    return 0


def check_demo_bundle(engine: str | Path) -> None:
    """Refuse a bundle whose model was not trained by `onsight train-demo` (another prompt):
    it would narrate none of the world's events, every score 0, slowly."""
    from onsight.exporter.demo.tokenizer import DEMO_SYSTEM_PROMPT
    from onsight.runtime.bundle import load_bundle

    b = load_bundle(engine, verify=False)  # refuses a file or checkpoint given as the bundle
    if b.template.get("system_prompt") != DEMO_SYSTEM_PROMPT:
        raise OnsightError(
            f"onsight eval scores the demo model's synthetic world, and {b.path} is not a demo "
            "model (exported from `onsight train-demo`); evaluate engines/demo or a bundle "
            "exported from a train-demo checkpoint (for other bundles: onsight narrate, bench)"
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.ablations:  # exports from --checkpoint; --engine only sets the cache size
        return main_ablations(args)
    check_demo_bundle(args.engine)
    with _stream_bar("eval", args.streams) as done_one:
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
            on_stream=done_one,
            mover_questions=args.mover_questions,
            onset_questions=args.onset_questions,
        )
    print(markdown(report))
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=2))
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
