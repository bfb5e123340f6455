"""The command line of `onsight train-demo` (its flags and their help); `train.main` runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from onsight.exporter.config import GATES, parse_mod_layers
from onsight.exporter.demo.data import NarrationDelay
from onsight.exporter.demo.objective import ROUTER_TARGETS
from onsight.exporter.demo.train_config import TrainConfig
from onsight.runtime.errors import OnsightError
from onsight.runtime.synthetic import curriculum

# The smallest gap between two events in any world a run trains on (the curriculum's stages).
MIN_EVENT_GAP = min(curriculum(stage).min_event_gap for stage in range(3))

DESCRIPTION = "train the demo model on synthetic streams, resumably, on CPU or GPU"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="onsight train-demo", description=DESCRIPTION)
    p.add_argument("--out", default="runs/demo", help="run directory (checkpoints, log)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3000)")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-time budget; alone, the step count is fitted to it after 5 timed steps",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/train_state.pt (its settings; a larger --steps extends the run)",
    )
    p.add_argument("--keep-ratio", type=float, default=0.2, help="MoD keep ratio r")
    p.add_argument("--full-compute", action="store_true", help="the r = 1 twin")
    p.add_argument(
        "--keep-last",
        action="store_true",
        help="routed layers always keep each frame's last vision token, where the speak "
        "decision is read (one of the k; the routers choose the rest)",
    )
    p.add_argument(
        "--mod-layers",
        default="interleaved",
        metavar="LAYERS",
        help="the routed layers: interleaved, every other one from the second (1, 3, ...: "
        "VideoLLM-MoD's), interleaved-even, from the first (0, 2, ...: the last layer keeps "
        "every vision token's KV), or a list like 3 (for diagnostics)",
    )
    p.add_argument(
        "--pos-embed",
        action="store_true",
        help="a learned embedding of each patch's grid cell in the tower's tokens, so frame "
        "tokens say where things are (with --init-from a tower without it, it starts at zero)",
    )
    p.add_argument(
        "--pooled-last",
        action="store_true",
        help="each frame's pooled whole-frame token after its grid cells, so it is the frame's "
        "last token (sees the whole frame; with --keep-last, the token routed layers keep)",
    )
    p.add_argument(
        "--change-layer",
        type=int,
        default=-1,
        metavar="L",
        help="also read the per-cell change targets (what moved, which event) from the vision "
        "tokens' states at the input of decoder layer L, where text still reads them (with "
        "LayerExperts on 1, 3: L=2); -1: only from the final states",
    )
    p.add_argument(
        "--change-target",
        choices=("change", "onset"),
        default="change",
        help="what the --change-layer head reads: the change targets, or 'onset': only the "
        "cells of moves begun in the last two frames (the frames a move is narrated on)",
    )
    p.add_argument(
        "--name-weight",
        type=float,
        default=1.0,
        help="LM-loss weight of the words that name an object (colours, shapes) against 1 for "
        "the others: naming the object that moved is one word of its narration",
    )
    p.add_argument(
        "--narration-delay",
        type=int,
        default=0,
        metavar="FRAMES",
        help=f"narrate events of --delay-kinds this many frames after they happen (below the "
        f"world's {MIN_EVENT_GAP}-frame event gap; the eval's 2 s window still matches them): "
        "a move is then narrated when the object has moved twice",
    )
    p.add_argument(
        "--delay-kinds",
        default=None,
        metavar="KINDS",
        help="with --narration-delay: comma-separated event kinds (enter, leave, move, stop, "
        "recolour, dim, brighten, cut) or 'all' (default: move)",
    )
    p.add_argument(
        "--mover-questions",
        type=float,
        default=0.0,
        metavar="P",
        help='chance that a training frame in which exactly one object moves asks "what '
        "colour/shape is the moving object?\": practice at finding the mover's token from "
        "text, which naming a move needs (0: off, the shipped recipe)",
    )
    p.add_argument(
        "--onset-questions",
        type=float,
        default=0.0,
        metavar="P",
        help="chance that the frame a move starts asks the same question, when that object is "
        "the only one moving (0: off, the shipped recipe)",
    )
    p.add_argument(
        "--anneal-keep-ratio",
        type=int,
        default=0,
        metavar="STEPS",
        help="lower the routed layers' keep ratio linearly from 1 to --keep-ratio over the "
        "first STEPS steps (for a start from dense weights, e.g. the twin's; 0: off)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, default=24, help="frames per training stream")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--speak-weight", type=float, default=3.0)
    p.add_argument("--aux-weight", type=float, default=0.5, help="per-frame scene loss (0: off)")
    p.add_argument(
        "--tower-blocks",
        type=int,
        default=1,
        help="residual convs at the tower's last scale (0: the first demo model's tower)",
    )
    p.add_argument(
        "--decoder-layers",
        type=int,
        default=4,
        help="decoder depth, LayerExperts on every other layer; with --init-from, layers past "
        "the earlier run's depth start as identity",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN",
        help="start from another run's weights, or a native checkpoint's such as "
        "engines/demo-checkpoint (new tower blocks at zero); with --full-world, a fine-tuning "
        "run",
    )
    p.add_argument(
        "--full-world", action="store_true", help="no curriculum: the full world from step 0"
    )
    p.add_argument(
        "--router-weight",
        type=float,
        default=0.0,
        help="weight of a loss teaching the MoD routers which tokens show the action (0: off)",
    )
    p.add_argument(
        "--router-target",
        default="scene",
        choices=ROUTER_TARGETS,
        help="with --router-weight, what the routers learn to keep: the scene's moving and "
        "event cells and the pooled token (scene), only what a narration is about (actor), or "
        "scene except that a just-begun move's frames keep its mover and the pooled token (onset)",
    )
    p.add_argument(
        "--distill-from",
        default=None,
        metavar="RUN",
        help="a run (the full-compute twin) whose next-token distributions this one learns too",
    )
    p.add_argument(
        "--distill-weight", type=float, default=1.0, help="with --distill-from: the KL's weight"
    )
    p.add_argument(
        "--gate",
        default="sigmoid",
        choices=GATES,
        help="how a router weighs a kept token's update: sigmoid(score) (MoD), or 1 with the "
        "sigmoid's gradient (straight-through: a router chooses, it cannot switch layers off)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--snapshot",
        default=None,
        metavar="DIR",
        help="only write OUT's latest checkpoint as a native checkpoint to DIR, and exit",
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="with --snapshot: the speak threshold"
    )
    args = p.parse_args(argv)
    problem = _check_numbers(args)
    if problem:
        p.error(problem)
    return args


def _check_numbers(args: argparse.Namespace) -> str | None:
    """Flags out of range, said so that the user can fix them; None if all are fine."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} is a file; give a run directory (new, or one to --resume)"
    if args.steps is not None and args.steps < 1:
        return f"--steps {args.steps}: give at least 1 optimizer step (default 3000)"
    if args.minutes is not None and not args.minutes > 0:
        return f"--minutes {args.minutes}: give a positive wall-time budget"
    if not 0.0 < args.keep_ratio <= 1.0:
        return f"--keep-ratio {args.keep_ratio}: give a ratio in (0, 1] (0.2 keeps 2 of 10)"
    for flag in ("batch_size", "threads"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1"
    if args.frames < 2:
        return f"--frames {args.frames}: a training stream needs at least 2 frames (default 24)"
    if not args.lr > 0:
        return f"--lr {args.lr}: the learning rate must be positive (e.g. 1e-3)"
    if not 0.0 <= args.onset_questions <= 1.0:
        return f"--onset-questions {args.onset_questions}: give a probability from 0 to 1"
    if not 0.0 <= args.mover_questions <= 1.0:
        return (
            f"--mover-questions {args.mover_questions}: give a probability from 0 to 1 (e.g. 0.3)"
        )
    for flag in ("speak_weight", "aux_weight", "router_weight", "distill_weight", "name_weight"):
        if getattr(args, flag) < 0:
            return f"--{flag.replace('_', '-')} {getattr(args, flag)}: a loss weight is 0 or more"
    return None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig from its flags; a contradictory combination is an OnsightError."""
    delay = narration_delay(args.narration_delay, args.delay_kinds)
    if args.decoder_layers < 2:
        raise OnsightError(
            f"--decoder-layers {args.decoder_layers}: the decoder needs at least 2 layers "
            "(LayerExperts sit on every other one: 1, 3, ...)"
        )
    try:
        parse_mod_layers(args.mod_layers, args.decoder_layers)
    except ValueError as e:
        raise OnsightError(str(e)) from None
    if args.change_target != "change" and args.change_layer < 0:
        raise OnsightError(
            f"--change-target {args.change_target} needs --change-layer L (the layer it reads)"
        )
    if args.router_target != "scene" and args.router_weight <= 0:
        raise OnsightError(
            f"--router-target {args.router_target} has no effect without the router loss: "
            "add --router-weight (e.g. 1)"
        )
    if args.keep_last and (args.full_compute or args.keep_ratio >= 1.0):
        raise OnsightError(
            "--keep-last chooses which tokens routed layers keep; the full-compute twin "
            "(r = 1) keeps every token: drop one of them"
        )
    if args.anneal_keep_ratio and (args.full_compute or args.keep_ratio >= 1.0):
        raise OnsightError(
            "--anneal-keep-ratio lowers the keep ratio toward --keep-ratio; the full-compute "
            "twin (r = 1) has nothing to anneal: drop one of them"
        )
    if args.anneal_keep_ratio < 0 or args.anneal_keep_ratio > (args.steps or 3000):
        raise OnsightError(
            f"--anneal-keep-ratio {args.anneal_keep_ratio}: give a step count between 0 and "
            f"--steps ({args.steps or 3000}), so the run ends at --keep-ratio"
        )
    return TrainConfig(
        seed=args.seed,
        steps=args.steps or 3000,
        batch_size=args.batch_size,
        num_frames=args.frames,
        lr=args.lr,
        speak_weight=args.speak_weight,
        aux_weight=args.aux_weight,
        keep_ratio=1.0 if args.full_compute else args.keep_ratio,
        tower_blocks=args.tower_blocks,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else "",
        stage_fractions=(0.0, 0.0) if args.full_world else TrainConfig.stage_fractions,
        router_weight=args.router_weight,
        distill_from=str(Path(args.distill_from).resolve()) if args.distill_from else "",
        distill_weight=args.distill_weight if args.distill_from else 0.0,
        gate=args.gate,
        router_target=args.router_target,
        decoder_layers=args.decoder_layers,
        anneal_steps=args.anneal_keep_ratio,
        keep_last=args.keep_last,
        pos_embed=args.pos_embed,
        mod_layers=args.mod_layers,
        pooled_last=args.pooled_last,
        change_layer=args.change_layer,
        change_target=args.change_target,
        name_weight=args.name_weight,
        mover_questions=args.mover_questions,
        onset_questions=args.onset_questions,
        narration_delay=delay.frames,
        delay_kinds=",".join(delay.kinds),
    )


def narration_delay(frames: int, kinds: str | None) -> NarrationDelay:
    """--narration-delay and --delay-kinds, checked: kinds only with a delay, a delay below
    the world's event gap (so no two narrations share a frame), at least one known kind."""
    if kinds is not None and not frames:
        raise OnsightError(
            f"--delay-kinds {kinds!r} does nothing without --narration-delay FRAMES (e.g. 1)"
        )
    if not 0 <= frames < MIN_EVENT_GAP:
        raise OnsightError(
            f"--narration-delay {frames}: give 0 to {MIN_EVENT_GAP - 1} frames; events are "
            f"{MIN_EVENT_GAP} frames apart, so a longer delay would reach the next event"
        )
    try:
        delay = NarrationDelay.parse(frames, "move" if kinds is None else kinds)
    except ValueError as e:
        raise OnsightError(f"--delay-kinds: {e}") from None
    if frames and not delay.kinds:
        raise OnsightError("--delay-kinds is empty: name at least one event kind, or 'all'")
    return delay
