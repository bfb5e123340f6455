"""`onsight export`: model -> bundle directory (graphs, tokenizer, bundle.json), atomically.

The bundle is assembled in a hidden temporary sibling directory, parity-checked there with
the runtime's own onnxruntime engine against the PyTorch reference, and only then renamed
into place: an interrupted or failed export never leaves a directory that looks valid.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from onsight.exporter.ckpt_llm import sliding_window
from onsight.exporter.config import ModConfig, parse_mod_layers, parse_tokens_per_frame
from onsight.exporter.model import StreamingModel, staging_dir, write_error
from onsight.exporter.onnx_export import export_graphs
from onsight.exporter.parity import run_parity
from onsight.exporter.reference import layout_for
from onsight.exporter.vision import FrameEncoder
from onsight.runtime.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    DEFAULT_TOKENIZER,
    RUNTIME_IO,
    write_manifest,
)
from onsight.runtime.errors import ExportError, OnsightError
from onsight.runtime.files import why_unwritable
from onsight.runtime.kv_policy import EvictionPolicy
from onsight.runtime.template import build_template_ids

log = logging.getLogger(__name__)

EXPORTER_VERSION = "0.1.0"


@dataclass(frozen=True)
class ExportOptions:
    """Flags of `onsight export`; None keeps the checkpoint's own setting."""

    keep_ratio: float | None = None  # MoD keep ratio r in [0, 1] (0: vision skips those layers)
    mod_layers: str | None = None  # interleaved | all | none | from:E | 1,3,5
    router: str | None = None  # learned | novelty | norm | random | uniform
    tokens_per_frame: str | None = None  # e.g. 1+3x3
    kv_capacity: int = 4096  # tokens per dense layer; routed layers get their share
    dtype: str = "fp32"  # fp32 | fp16
    fps: float = 2.0  # default sampling rate the runtime uses
    parity_frames: int = 8  # frames in the parity stream
    keep_text_tokens: int = 256  # narration kept across evictions
    name: str | None = None  # bundle name; defaults to the directory name


Progress = Callable[[str], None]


def check_options(opts: ExportOptions) -> None:
    """Refuse flags that are wrong whatever the model (checked before a checkpoint loads)."""
    if opts.keep_ratio is not None and not 0.0 <= opts.keep_ratio <= 1.0:
        raise ExportError(
            f"--keep-ratio {opts.keep_ratio}: must be in [0, 1], e.g. 0.2 (0 with "
            "--mod-layers from:E is early exit)"
        )
    if opts.dtype not in ("fp32", "fp16"):
        raise ExportError(f"--dtype {opts.dtype!r}: use fp32 or fp16")
    if not opts.fps > 0 or opts.fps == float("inf"):
        raise ExportError(f"--fps {opts.fps}: the sampling rate must be positive (default 2)")
    if opts.keep_text_tokens < 0:
        raise ExportError(f"--keep-text-tokens {opts.keep_text_tokens}: give 0 or more")
    if opts.kv_capacity < 1:
        raise ExportError(f"--kv-capacity {opts.kv_capacity}: give a positive number of tokens")


def check_out(out: str | Path, replace: bool = False) -> Path:
    """Refuse an --out that exists (unless `replace` and it is a bundle) or cannot be created
    (before minutes of loading)."""
    if not str(out).strip():
        raise ExportError("--out is empty; give a new bundle directory, e.g. engines/NAME")
    out = Path(out)
    if out.is_file():
        raise ExportError(f"--out {out} is a file; give a new bundle directory, e.g. engines/NAME")
    if replace and out.is_symlink():
        raise ExportError(
            f"--replace does not replace a symlink ({out} -> {os.readlink(out)}); give the "
            "bundle's own path as --out"
        )
    if replace and out.is_dir():
        if not (out / "bundle.json").is_file():
            raise ExportError(
                f"--replace only replaces an onsight bundle, and {out} has no bundle.json; "
                "choose another --out"
            )
    elif out.exists() or out.is_symlink():
        hint = "" if replace else ", delete it, or pass --replace (if it is a bundle)"
        raise ExportError(f"output directory {out} already exists; choose another --out{hint}")
    problem = why_unwritable(out)
    if problem:
        raise ExportError(f"cannot write {out}: {problem}; choose another --out")
    return out


def check_export_args(out: str | Path, opts: ExportOptions, replace: bool = False) -> Path:
    """Every check of `onsight export`'s flags that needs no model; returns `out` as a Path."""
    check_options(opts)
    return check_out(out, replace)


def apply_options(model: StreamingModel, opts: ExportOptions) -> StreamingModel:
    """The same weights with the export's MoD and frame-token settings."""
    cfg = model.cfg
    check_options(opts)
    try:
        layers = cfg.mod.layers
        if opts.mod_layers is not None:
            layers = parse_mod_layers(opts.mod_layers, cfg.num_layers)
        elif not layers and (opts.keep_ratio if opts.keep_ratio is not None else 1.0) < 1.0:
            layers = parse_mod_layers("interleaved", cfg.num_layers)
        router = opts.router or (
            cfg.mod.router if cfg.has_layer_experts or cfg.mod.router != "learned" else "novelty"
        )
        if router == "learned" and not cfg.has_layer_experts:
            raise ExportError(
                "--router learned needs LayerExpert weights, which this checkpoint lacks; "
                "use --router novelty or --router norm (training-free)"
            )
        keep_ratio = opts.keep_ratio if opts.keep_ratio is not None else cfg.mod.keep_ratio
        if router == "learned" and keep_ratio > 0:  # at r = 0 no router runs
            missing = [i for i in layers if str(i) not in model.decoder.experts]
            if missing:
                raise ExportError(
                    f"--router learned: no LayerExpert for layers {missing}; route only the "
                    f"layers that have one ({sorted(int(x) for x in model.decoder.experts)})"
                )
        mod = ModConfig(
            keep_ratio=keep_ratio,
            layers=layers,
            router=router,
            gate=cfg.mod.gate,
            keep_last=cfg.mod.keep_last,
        )
    except ValueError as e:
        raise ExportError(str(e)) from e
    new_cfg = cfg.replace(mod=mod)
    if opts.tokens_per_frame:
        try:
            use_pooled, grid = parse_tokens_per_frame(opts.tokens_per_frame)
        except ValueError as e:
            raise ExportError(f"--tokens-per-frame: {e}") from e
        new_cfg = new_cfg.replace(
            vision=dataclasses.replace(cfg.vision, grid=grid, use_pooled=use_pooled)
        )
    out = model.with_config(new_cfg)
    if new_cfg.vision != cfg.vision:
        try:
            enc = FrameEncoder(new_cfg)
        except Exception as e:
            raise ExportError(f"--tokens-per-frame {opts.tokens_per_frame}: {e}") from e
        enc.load_state_dict(model.encoder.state_dict(), strict=False)
        out.encoder = enc.eval()
    return out


def _manifest(
    model: StreamingModel,
    tokenizer_json: Path,
    layout,
    graphs: dict,
    opts: ExportOptions,
    name: str,
) -> dict[str, Any]:
    from tokenizers import Tokenizer

    cfg = model.cfg
    dec = model.decoder
    tok = Tokenizer.from_file(str(tokenizer_json))
    tpl = dataclasses.asdict(cfg.template)
    ids = build_template_ids(tok, tpl)
    v_id = tok.token_to_id(cfg.template.v_token)
    lm_cfg = dec.lm.config
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": name,
        "exporter_version": EXPORTER_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "graphs": graphs,
        "tokenizer": DEFAULT_TOKENIZER,
        "model": {
            "architecture": cfg.architecture,
            "hidden_size": cfg.llm_hidden,
            "num_layers": layout.num_layers,
            "num_heads": dec.num_heads,
            "num_kv_heads": dec.num_kv_heads,
            "head_dim": dec.head_dim,
            "vocab_size": int(lm_cfg.vocab_size),
            "intermediate_size": int(getattr(lm_cfg, "intermediate_size", 0)),
            "max_position_embeddings": int(getattr(lm_cfg, "max_position_embeddings", 0)),
            "rope_inv_freq": [float(x) for x in dec.inv_freq.tolist()],
            "dtype": layout.dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "vision": {
            "kind": cfg.vision.kind,
            "tokens_per_frame": cfg.tokens_per_frame,
            "grid": cfg.vision.grid,
            "use_pooled": cfg.vision.use_pooled,
            "pooled_last": cfg.vision.pooled_last,
            "hidden_size": cfg.vision.hidden_size,
        },
        "preprocess": dataclasses.asdict(cfg.preprocess),
        "mod": {
            "keep_ratio": cfg.mod.keep_ratio,
            "k": layout.k,
            "router": cfg.mod.router,
            "gate": cfg.mod.gate,
            "keep_last": cfg.mod.keep_last,
            "routed_layers": list(dec.routed),
        },
        "kv": {
            "layout": "per layer: key and value (kv_heads, capacity, head_dim); keys after RoPE; steps read a prefix span",
            "dtype": layout.dtype,
            "capacity_dense": layout.capacity_dense,
            "capacity_mod": layout.capacity_mod,
            "routed_layers": list(layout.routed),
            "layers": [
                {
                    "index": i,
                    "group": "mod" if i in layout.routed else "dense",
                    "capacity": layout.capacity(i),
                }
                for i in range(layout.num_layers)
            ],
            "bytes_per_frame_dense": layout.bytes_per_frame(mod=False),
            "bytes_per_frame_mod": layout.bytes_per_frame(mod=True),
            "total_bytes": layout.total_bytes(),
        },
        "io": copy.deepcopy(RUNTIME_IO),  # the names onnx_export gives the graphs' IO
        "template": tpl,
        "token_ids": {
            "interval": ids.interval_id,
            "eos": ids.eos_id,
            "v": v_id,
            "sink_length": len(ids.sink),
        },
        "generation": {
            "threshold": cfg.template.threshold,
            "max_new_tokens": cfg.template.max_new_tokens,
            "temperature": 0.0,
            "fps": opts.fps,
        },
        "eviction": {"free_fraction": 0.25, "keep_text_tokens": opts.keep_text_tokens},
        "files": {},
        "parity": None,
        "tensorrt": None,
    }


class KvLimit(NamedTuple):
    """The largest --kv-capacity that keeps a model exact."""

    tokens: int
    what: str  # e.g. "the model's sliding_window (4096)"
    why: str  # what a larger cache would do


def kv_capacity_limit(model: StreamingModel) -> KvLimit | None:
    """The model's KvLimit, None if it has none.

    The runtime re-bases positions inside the cache, never past its capacity, and attends over
    all of it: a cache larger than the trained positions, or than a sliding window (Mistral-
    7B-v0.1's 4096), would compute something the model was never trained to.
    """
    config = model.decoder.lm.config
    limits = []
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    if max_pos:
        why = "positions are re-based inside the cache, never past it"
        limits.append(KvLimit(max_pos, f"the model's trained positions ({max_pos})", why))
    window = sliding_window(config)
    if window:
        why = (
            f"it was trained to attend to the last {window} positions only, and onsight "
            "attends over the whole cache"
        )
        limits.append(KvLimit(window, f"the model's sliding_window ({window})", why))
    return min(limits, key=lambda limit: limit.tokens, default=None)


def default_kv_capacity(model: StreamingModel) -> int:
    """The cache size when none is given: 4096 tokens per dense layer, or fewer if the model's
    trained positions or sliding window are fewer (see kv_capacity_limit)."""
    default = ExportOptions.kv_capacity
    limit = kv_capacity_limit(model)
    if limit is None or limit.tokens >= default:
        return default
    if sliding_window(model.decoder.lm.config) == limit.tokens:
        # a cache smaller than the usual one is worth a word: fewer frames of memory
        log.warning(
            "kv capacity %d tokens instead of the default %d: %s; a larger cache would attend "
            "past it",
            limit.tokens,
            default,
            limit.what,
        )
    return limit.tokens


def export_bundle(
    model: StreamingModel,
    tokenizer_json: str | Path,
    out: str | Path,
    opts: ExportOptions = ExportOptions(),
    progress: Progress | None = None,
    replace: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Export, parity-check and atomically publish a bundle. Returns (path, manifest).
    With `replace`, a bundle already at `out` is swapped for the new one once it passed parity
    (until then it is untouched; a failed export leaves it as it was)."""
    say = progress or (lambda msg: log.info("%s", msg))
    out = check_export_args(out, opts, replace)
    model = apply_options(model, opts)
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    limit = kv_capacity_limit(model)
    if limit and opts.kv_capacity > limit.tokens:
        raise ExportError(
            f"--kv-capacity {opts.kv_capacity} exceeds {limit.what} ({limit.why}); use at most "
            f"{limit.tokens}, the largest cache that keeps the model exact"
        )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    sink_len = len(build_template_ids(tok, dataclasses.asdict(model.cfg.template)).sink)
    need = sink_len + 2 * (model.cfg.tokens_per_frame + 1) + model.cfg.template.max_new_tokens
    if opts.kv_capacity < need:
        hint = f"use at least {need}"
        if limit and limit.tokens < need:  # "use at least" alone would go in circles
            hint = f"{limit.what} allows at most {limit.tokens}: export fewer --tokens-per-frame"
        raise ExportError(
            f"--kv-capacity {opts.kv_capacity} is too small: the system prompt ({sink_len} tokens), "
            f"two frames and one narration need {need}; {hint}"
        )
    reserve = sink_len + opts.keep_text_tokens
    layout = layout_for(model, opts.kv_capacity, reserve)
    if dtype == torch.float16:
        layout = dataclasses.replace(layout, dtype="float16")
    tmp = staging_dir(out, "partial-")
    try:
        t0 = time.perf_counter()
        say(
            f"[1/4] exporting graphs (keep ratio {model.cfg.mod.keep_ratio}, k={layout.k} of "
            f"{layout.tokens_per_frame}, routed layers {list(layout.routed)}, {opts.dtype})"
        )
        export_model = model if dtype == torch.float32 else _copy_to(model, dtype)
        graphs = export_graphs(export_model, layout, tmp, dtype)
        say(f"      graphs written in {time.perf_counter() - t0:.1f} s")
        shutil.copyfile(tokenizer_json, tmp / DEFAULT_TOKENIZER)
        manifest = _manifest(
            model, Path(tokenizer_json), layout, graphs, opts, opts.name or out.name
        )
        write_manifest(tmp, manifest)
        say(f"[2/4] parity: onnxruntime vs PyTorch on a {opts.parity_frames}-frame stream")
        parity = run_parity(
            model,
            tmp,
            opts.dtype,
            frames=opts.parity_frames,
            policy=EvictionPolicy(keep_text_tokens=opts.keep_text_tokens),
        )
        manifest["parity"] = parity
        if not parity["passed"]:
            raise ExportError(
                f"parity failed (max logit error {parity['max_abs_logit_error']:.2e} > tolerance "
                f"{parity['tolerance']:.1e}, decisions equal: {parity['same_decisions']}, tokens "
                f"equal: {parity['same_tokens']}); the bundle was not written. Please report this."
            )
        say(
            f"      max |logit error| {parity['max_abs_logit_error']:.2e} (tolerance "
            f"{parity['tolerance']:.0e}), {parity['steps']} steps, decisions and tokens equal"
        )
        say("[3/4] writing bundle.json with checksums")
        write_manifest(tmp, manifest)
        say(f"[4/4] publishing {out}")
        _publish(tmp, out, replace)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, e) from e
    except OnsightError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # write_text_atomic's "cannot write" names the staging path, not --out
        if not isinstance(e, ExportError) and isinstance(e.__cause__, OSError):
            raise write_error(out, e.__cause__) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, manifest


def _publish(tmp: Path, out: Path, replace: bool = False) -> None:
    """Rename the finished staging directory onto `out`; refuse if `out` appeared meanwhile.
    With `replace`, a bundle at `out` is swapped for it (`_swap`)."""
    if replace and not out.is_symlink() and (out / "bundle.json").is_file():
        _swap(tmp, out)
        return
    try:
        os.replace(tmp, out)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise ExportError(
                f"cannot write {out}: it was created while this export ran (another export to "
                "the same --out?); this one was not published: choose another --out"
            ) from e
        raise


def _swap(tmp: Path, out: Path) -> None:
    """Put the bundle in `tmp` where the bundle `out` is: `out` moves into a hidden sibling
    folder, `tmp` is renamed onto `out`, the old bundle is deleted. `out` is missing only
    between the two renames; if anything (an error, Ctrl-C) stops the swap there, the old
    bundle is put back, and if it cannot be, the error says where it is."""
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old = holder / out.name
    try:
        os.rename(out, old)
        os.rename(tmp, out)
    except BaseException as e:
        if not tmp.exists():  # stopped just after the second rename: the new one is in place
            _remove_old(holder, out)
            raise
        if old.exists():
            try:
                os.rename(old, out)
            except OSError as again:
                raise ExportError(
                    f"cannot publish {out}: {again.strerror} (it was created again while this "
                    "export replaced it: another export to the same --out?); the bundle that "
                    f"was there is kept in {old}"
                ) from e
        shutil.rmtree(holder, ignore_errors=True)  # empty again
        if isinstance(e, OSError):
            raise ExportError(
                f"cannot replace {out}: {e.strerror}; the bundle there is unchanged"
            ) from e
        raise
    _remove_old(holder, out)


def _remove_old(holder: Path, out: Path) -> None:
    shutil.rmtree(holder, ignore_errors=True)
    if holder.exists():
        log.warning("replaced %s, but could not delete the old bundle in %s", out, holder)


def _copy_to(model: StreamingModel, dtype: torch.dtype) -> StreamingModel:
    return copy.deepcopy(model).to(dtype)
