"""The `onsight` command. Torch-free at import; exporter commands import torch lazily."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence

from onsight.runtime.errors import OnsightError
from onsight.runtime.narrate_cli import add_question_flags

log = logging.getLogger("onsight")

EXIT_OK, EXIT_BAD_INPUT, EXIT_SOURCE = 0, 2, 3


def _need_exporter() -> None:
    """Refuse, saying how to install it, a command that needs the exporter extra."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise OnsightError(
            f"this command needs the exporter extra ({e.name} is missing): from a checkout, "
            "pip install -e '.[exporter]' (or pip install 'onsight[exporter]')"
        ) from e


def _number(kind: type, low: float, inclusive: bool = True, what: str = "") -> Callable:
    """An argparse type: a finite `kind` >= low (or > low), refused with what to give."""

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        ok = x >= low if inclusive else x > low
        if not ok or not math.isfinite(x):
            raise argparse.ArgumentTypeError(
                f"{text}: give {what or ('>= ' if inclusive else '> ') + str(low)}"
            )
        return x

    return parse


POSITIVE_INT = _number(int, 1, what="a whole number >= 1")
NON_NEGATIVE_INT = _number(int, 0, what="a whole number >= 0")
POSITIVE = _number(float, 0, inclusive=False, what="a number > 0")
NON_NEGATIVE = _number(float, 0, what="a number >= 0")
SOURCE_HELP = (
    "camera index or /dev/videoN, video file, RTSP/HTTP/UDP URL, GStreamer pipeline, "
    "image folder, or demo (the synthetic demo video)"
)


# ---- export / info / build ----


def cmd_export(a: argparse.Namespace) -> int:
    _need_exporter()
    import dataclasses

    from onsight.exporter.bundle_writer import (
        ExportOptions,
        check_export_args,
        default_kv_capacity,
        export_bundle,
    )
    from onsight.exporter.loaders import load_checkpoint

    opts = ExportOptions(
        keep_ratio=a.keep_ratio,
        mod_layers=a.mod_layers,
        router=a.router,
        tokens_per_frame=a.tokens_per_frame,
        dtype=a.dtype,
        fps=a.fps,
        keep_text_tokens=a.keep_text_tokens,
    )
    if a.kv_capacity is not None:
        opts = dataclasses.replace(opts, kv_capacity=a.kv_capacity)
    check_export_args(a.out, opts, a.replace)  # before loading: minutes for a big model
    print(f"loading {a.source} ...", file=sys.stderr)
    model, tok = load_checkpoint(
        a.source,
        vision=a.vision,
        projector=a.projector,
        base=a.base,
        experts=a.experts,
        fmt=a.format,
    )
    if a.kv_capacity is None:
        opts = dataclasses.replace(opts, kv_capacity=default_kv_capacity(model))
    out, manifest = export_bundle(
        model, tok, a.out, opts, progress=lambda m: print(m, file=sys.stderr), replace=a.replace
    )
    from onsight.runtime.info import describe

    print(describe(out))
    return EXIT_OK


def cmd_info(a: argparse.Namespace) -> int:
    from onsight.runtime.info import describe

    print(describe(a.bundle, as_json=a.json, budget_mb=a.budget_mb, verify=a.verify))
    return EXIT_OK


def cmd_build(a: argparse.Namespace) -> int:
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if a.quantize == "int8" and a.backend == "tensorrt":
        raise OnsightError(
            "--quantize int8 is CPU int8 for onnxruntime: use --backend onnxruntime --quantize "
            "int8 (for TensorRT int8 use --precision int8 instead)"
        )
    if a.backend == "onnxruntime" and a.precision is not None:
        raise OnsightError(
            f"--precision {a.precision} is for --backend tensorrt; onnxruntime graphs keep the "
            "bundle's precision (re-export with --dtype fp16) or use --quantize int8"
        )
    from onsight.runtime.bundle import check_bundle_dir

    check_bundle_dir(a.bundle)  # before any building or importing the exporter
    a.precision = a.precision or "fp16"
    if a.calibrate_only or a.calibration_video:
        if a.backend != "tensorrt" or a.precision != "int8":
            raise OnsightError(
                "--calibrate-only / --calibration-video are for --backend tensorrt "
                "--precision int8 (CPU int8 needs no calibration: --quantize int8)"
            )
    if a.calibrate_only:
        from onsight.runtime.trt_int8 import build_qdq_graphs

        result = build_qdq_graphs(a.bundle, a.calibration_video, a.calibration_frames, say)
        print(json.dumps(result, indent=2))
        return EXIT_OK
    if a.backend == "tensorrt":
        from onsight.runtime.trt_build import build_tensorrt

        build_tensorrt(
            a.bundle,
            precision=a.precision,
            progress=say,
            calibration_video=a.calibration_video,
            calibration_frames=a.calibration_frames,
        )
        return EXIT_OK
    if a.quantize != "int8":
        raise OnsightError(
            "--backend onnxruntime needs --quantize int8 (the fp32 graphs are already built)"
        )
    _need_exporter()  # quantize replays frames through the PyTorch model (parity_frames)
    from onsight.exporter.quantize import quantize_bundle

    result = quantize_bundle(a.bundle, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=2))
    return EXIT_OK


# ---- narrate (headless) ----


def cmd_narrate(a: argparse.Namespace) -> int:
    from onsight.runtime.narrate_cli import cmd_narrate as run

    return run(a)


# ---- delegated commands (their modules own their flags) ----


def _delegate(module: str, needs_torch: bool) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        if needs_torch:
            _need_exporter()
        import importlib

        return int(importlib.import_module(module).main(a.rest) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onsight",
        description="Offline streaming video assistant: narrates what a camera or file shows.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser(
        "export", help="checkpoint -> bundle (ONNX graphs + bundle.json), parity-checked"
    )
    e.add_argument(
        "source", help="onsight checkpoint dir, VideoLLM-online adapter dir, or HF LLM dir"
    )
    e.add_argument("--out", required=True, help="bundle directory to create, e.g. engines/NAME")
    e.add_argument(
        "--replace",
        action="store_true",
        help="--out may be an existing bundle: it is replaced, with everything in it (plans "
        "built by `onsight build` too), once the new one passed parity (a failed export "
        "leaves it untouched)",
    )
    e.add_argument(
        "--format", default="auto", choices=["auto", "onsight", "videollm-online", "compose"]
    )
    e.add_argument("--base", help="videollm-online: the base Llama-3 directory")
    e.add_argument("--vision", help="videollm-online / compose: the SigLIP or CLIP directory")
    e.add_argument("--projector", help="compose: projector .safetensors (fc1/fc2)")
    e.add_argument("--experts", help="compose: LayerExpert .safetensors (optional)")
    e.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        help="MoD keep ratio r in [0, 1] (e.g. 0.2; 0: vision tokens skip the routed layers)",
    )
    e.add_argument(
        "--mod-layers",
        default=None,
        help="interleaved | all | none | from:E (layers E on; with --keep-ratio 0: early exit) "
        "| 1,3,5",
    )
    e.add_argument(
        "--router",
        default=None,
        choices=["learned", "novelty", "norm", "random", "uniform"],
        help="learned: LayerExperts; novelty / norm: training-free; random / uniform: baselines",
    )
    e.add_argument(
        "--tokens-per-frame", default=None, help="e.g. 1+3x3 (default: the checkpoint's)"
    )
    e.add_argument(
        "--kv-capacity",
        type=int,
        default=None,
        help="KV tokens per dense layer (default 4096, or the model's trained positions if fewer)",
    )
    e.add_argument(
        "--keep-text-tokens",
        type=int,
        default=256,
        help="narration tokens kept across evictions (with the system prompt, the reserve)",
    )
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    e.add_argument(
        "--fps", type=float, default=2.0, help="default sampling rate stored in the bundle"
    )
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="what a bundle holds")
    i.add_argument(
        "bundle", nargs="?", default="engines/demo", help="bundle directory (default: the demo)"
    )
    i.add_argument("--json", action="store_true", help="print bundle.json's summary as JSON")
    i.add_argument(
        "--verify",
        action="store_true",
        help="hash every file against bundle.json (loads skip files that matched before and "
        "have not changed since)",
    )
    i.add_argument(
        "--budget-mb", type=POSITIVE, default=1024.0, help="KV memory budget for 'frames that fit'"
    )
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("build", help="TensorRT plans (GPU) or int8 graphs (CPU) from a bundle")
    b.add_argument("bundle")
    b.add_argument("--backend", default="tensorrt", choices=["tensorrt", "onnxruntime"])
    b.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "fp16", "int8"],
        help="TensorRT plans' precision (default fp16)",
    )
    b.add_argument("--quantize", default=None, choices=["int8"])
    b.add_argument(
        "--calibration-video",
        default=None,
        metavar="PATH",
        help="TensorRT int8: calibrate on frames of this video (default: the synthetic world); "
        "footage like the deployment's calibrates best",
    )
    b.add_argument(
        "--calibration-frames", type=int, default=32, help="TensorRT int8: frames to calibrate on"
    )
    b.add_argument(
        "--calibrate-only",
        action="store_true",
        help="TensorRT int8: only write the calibrated Q/DQ graphs (no GPU needed); "
        "build the plans later on the GPU",
    )
    b.set_defaults(func=cmd_build)

    n = sub.add_parser("narrate", help="narrate a source headless, printing JSON lines")
    n.add_argument(
        "--engine", default="engines/demo", help="bundle directory (default: the shipped demo)"
    )
    n.add_argument(
        "--source",
        required=True,
        help=SOURCE_HELP,
    )
    n.add_argument(
        "--fps", type=POSITIVE, default=None, help="sampling rate (default: the bundle's)"
    )
    n.add_argument("--transcript", help="append every event as a JSON line here (flushed per line)")
    n.add_argument(
        "--max-frames", type=POSITIVE_INT, default=None, help="stop after this many frames"
    )
    n.add_argument("--no-realtime", action="store_true", help="files: as fast as possible")
    n.add_argument(
        "--decode-workers", type=POSITIVE_INT, default=1, help="files: parallel decoders"
    )
    n.add_argument(
        "--backend", default="auto", help="auto | onnxruntime | onnxruntime:cpu | tensorrt"
    )
    n.add_argument(
        "--max-new-tokens",
        type=POSITIVE_INT,
        default=None,
        help="cap on one narration (default: the bundle's)",
    )
    n.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 is greedy (default)")
    add_question_flags(n)
    n.add_argument(
        "--prune-static", action="store_true", help="DyCoke-style temporal token pruning"
    )
    n.add_argument("--skip-duplicates", action="store_true", help="skip near-duplicate frames")
    n.set_defaults(func=cmd_narrate)

    for name, module, torch_needed, helptext in (
        ("run", "onsight.tui.main", False, "the terminal app: live narration from a camera"),
        (
            "eval",
            "onsight.exporter.demo.evaluate",
            True,
            "quality of a bundle on held-out synthetic streams",
        ),
        ("bench", "onsight.exporter.bench", True, "speed and memory, side by side"),
        ("train-demo", "onsight.exporter.demo.train", True, "train the demo model from a seed"),
        ("demo-video", "onsight.runtime.synthetic.cli", False, "render a synthetic demo video"),
    ):
        s = sub.add_parser(name, help=helptext, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_delegate(module, torch_needed))
    return p


DELEGATED = ("run", "eval", "bench", "train-demo", "demo-video")


def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Delegated commands own their flags: hand them everything after the command name
    # unchanged (argparse.REMAINDER refuses a first argument that starts with "-").
    head = next((i for i, x in enumerate(argv) if x not in ("-v", "--verbose")), None)
    if head is not None and argv[head] in DELEGATED:
        args = parser.parse_args(argv[: head + 1])
        rest = argv[head + 1 :]
        args.rest = rest[1:] if rest[:1] == ["--"] else rest
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except OnsightError as e:
        print(f"onsight: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onsight: interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        print(f"onsight: error: {e.filename}: no such file or directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a full or read-only disk, no permission: the user can act on these
        log.debug("OS error", exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        print(f"onsight: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - the user sees a message, -v shows the traceback
        log.debug("unexpected error", exc_info=True)
        print(
            f"onsight: internal error: {type(e).__name__}: {e} (run with -v for the traceback; "
            "please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
