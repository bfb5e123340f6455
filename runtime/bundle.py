"""Read and verify a bundle directory: bundle.json is the contract between exporter and runtime."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onsight.runtime.errors import BundleError
from onsight.runtime.files import write_text_atomic
from onsight.runtime.kv_cache import KVLayout
from onsight.runtime.kv_policy import EvictionPolicy
from onsight.runtime.manifest_check import (  # re-exported: the contract's names live here too
    DEFAULT_TOKENIZER,
    GRAPHS,
    RUNTIME_IO,
    SCHEMA_KEYWORDS,
    SCHEMA_PATH,
    bundle_schema,
    consistency_problems,
    is_json_type,
    manifest_problems,
    named_files,
    same_json,
    schema_problems,
    show_json,
    unsafe_name,
)
from onsight.runtime.verified import VerifiedFiles, signature

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "DEFAULT_TOKENIZER",
    "GRAPHS",
    "RUNTIME_IO",
    "SCHEMA_KEYWORDS",
    "SCHEMA_PATH",
    "Bundle",
    "bundle_schema",
    "check_bundle_dir",
    "consistency_problems",
    "load_bundle",
    "manifest_problems",
    "resolve_engine",
    "schema_problems",
    "sha256_file",
    "shipped_demo_bundle",
    "write_manifest",
]

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "onsight-bundle"
BUNDLE_FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fix_for(problem: str, d: Path) -> str:
    """What brings a bundle back when `problem` lies in a section that a build wrote."""
    field = problem.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
    if field in ("graph_overrides", "int8"):
        return f"run `onsight build {d} --backend onnxruntime --quantize int8` again"
    if field == "qdq":
        return f"run `onsight build {d} --precision int8 --calibrate-only` again"
    if field == "tensorrt":
        return f"run `onsight build {d} --backend tensorrt` again on the GPU that will run it"
    return "re-export it with `onsight export`"


def write_manifest(d: Path, manifest: dict[str, Any], unlist: Collection[str] = ()) -> None:
    """bundle.json with fresh checksums of every other file (the top-level files and the plans
    the manifest names), written atomically; refuses a manifest the runtime would refuse.
    `unlist`: top-level files about to be replaced or deleted, left out (unless named)."""
    names = {
        p.name
        for p in d.iterdir()
        if p.is_file()
        and p.name != "bundle.json"
        and not p.name.startswith(".")
        and p.name not in unlist
    }
    names |= {n for n in named_files(manifest) if not unsafe_name(n)}
    missing = sorted(n for n in names if not (d / n).is_file())
    if missing:
        raise BundleError(
            f"cannot write {d / 'bundle.json'}: it names {', '.join(missing)}, which the "
            "bundle lacks"
        )
    manifest["files"] = {
        n: {"sha256": sha256_file(d / n), "bytes": (d / n).stat().st_size} for n in sorted(names)
    }
    text = json.dumps(manifest, indent=2)
    problems = manifest_problems(json.loads(text))  # what a reader will see (no tuples)
    if problems:
        raise BundleError(
            f"refusing to write {d / 'bundle.json'}: {'; '.join(problems[:3])} (a bug in "
            "onsight: please report it)"
        )
    write_text_atomic(d / "bundle.json", text)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory, manifest, and the typed facts the runtime needs."""

    path: Path
    manifest: dict[str, Any]
    layout: KVLayout
    inv_freq: np.ndarray  # RoPE frequencies, to re-base cached keys after eviction
    routed_layers: tuple[int, ...]  # every layer with a router (kept_i outputs, in order)
    policy: EvictionPolicy

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocess"]["image_size"])

    @property
    def tokens_per_frame(self) -> int:
        return int(self.manifest["vision"]["tokens_per_frame"])

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["model"]["hidden_size"])

    @property
    def template(self) -> dict[str, Any]:
        return self.manifest["template"]

    @property
    def generation(self) -> dict[str, Any]:
        return self.manifest["generation"]

    def graph_path(self, graph: str) -> Path:
        return self.path / self.manifest["graphs"][graph]["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.get("tokenizer", DEFAULT_TOKENIZER)


def _fail(path: Path, what: str, fix: str = "re-export it with `onsight export`") -> BundleError:
    return BundleError(f"bundle {path}: {what}; {fix}")


def _refill(d: Path, m: dict, name: str) -> str:
    """How to bring back a bundle file: `onsight build` made the int8, Q/DQ and TensorRT
    files (as the manifest's sections say), `onsight export` the rest."""
    names = named_files(m)
    field = names.get(name) or names.get(name.removesuffix(".data"), "")  # external weights
    return _fix_for(field, d)


DEMO_ENGINE = "engines/demo"  # the commands' default --engine


def shipped_demo_bundle() -> Path | None:
    """The demo bundle that ships beside the package (a source checkout or editable install)."""
    d = Path(__file__).resolve().parent.parent / DEMO_ENGINE
    return d if (d / "bundle.json").is_file() else None


def resolve_engine(path: str | Path) -> Path:
    """`path`, or for the default `engines/demo` when run outside the repository, the shipped
    demo bundle beside the package, so the default works from any directory."""
    d = Path(path)
    if not d.exists() and d == Path(DEMO_ENGINE):
        return shipped_demo_bundle() or d
    return d


CHECKPOINT_MARKERS = ("config.json", "adapter_config.json", "model.safetensors")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")


def check_bundle_dir(path: str | Path) -> None:
    """Refuse, saying what to pass instead, the paths people give for a bundle by mistake: a
    file inside one (bundle.json, a graph), another file, or a checkpoint not yet exported.
    Anything else is left to load_bundle, which says what is missing or corrupt."""
    d = resolve_engine(path)
    if d.is_file():
        parent = d.parent
        if (parent / "bundle.json").is_file():
            raise BundleError(
                f"bundle {d} is a file inside a bundle; pass the bundle's folder: {parent}"
            )
        if d.suffix.lower() in VIDEO_SUFFIXES:
            raise BundleError(
                f"bundle {d} is a video, not a bundle; a video goes to --source, the bundle "
                "to --engine (default: engines/demo)"
            )
        raise BundleError(
            f"bundle {d} is a file, not a bundle; a bundle is a folder holding bundle.json and "
            "its ONNX graphs (e.g. engines/demo), made by `onsight export`"
        )
    if d.is_dir() and not (d / "bundle.json").exists():
        if any((d / name).is_file() for name in CHECKPOINT_MARKERS):
            raise BundleError(
                f"{d} is a checkpoint, not a bundle; export it first: "
                f"onsight export {d} --out engines/NAME (then pass engines/NAME)"
            )


def load_bundle(path: str | Path, verify: bool = True, memo: bool = True) -> Bundle:
    """Open a bundle; refuse (with a BundleError that says what to do) other format versions,
    a bundle.json that breaks bundle.schema.json or contradicts itself, and missing, resized or
    (with `verify`) modified files. With `memo`, a file that matched its sha256 before and has
    not changed since (`runtime/verified.py`) is not hashed again; without, every file is."""
    check_bundle_dir(path)
    d = resolve_engine(path)
    if not d.is_dir():
        shipped = shipped_demo_bundle()
        hint = f" or use the shipped demo bundle ({shipped})" if shipped else ""
        raise BundleError(
            f"bundle {d} does not exist; export one with `onsight export SOURCE --out {d}`{hint}"
        )
    mpath = d / "bundle.json"
    if not mpath.is_file():
        raise _fail(d, "bundle.json is missing (not a bundle, or an interrupted export)")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(d, f"bundle.json is not valid JSON ({e})") from e
    if not isinstance(m, dict):
        raise _fail(d, f"bundle.json holds a JSON {type(m).__name__}, not an object")
    if m.get("format") != BUNDLE_FORMAT:
        raise _fail(d, f"bundle.json has format {m.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    _check_version(d, m.get("format_version"))
    problems = manifest_problems(m)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        shown = "; ".join(problems[:3])
        first = problems[0]
        files = m.get("files") if isinstance(m.get("files"), dict) else {}
        # a bad checksum entry: the fix is whatever rewrites that file
        entry = next((n for n in files if first.startswith(f"files.{n}.")), None)
        fix = _refill(d, m, entry) if entry else _fix_for(first, d)
        raise _fail(d, f"bundle.json is malformed: {shown}{more}", fix)
    checked = VerifiedFiles() if verify and memo else None
    for name, info in m["files"].items():
        f = d / name
        if not f.is_file():
            raise _fail(d, f"file {name} listed in bundle.json is missing", _refill(d, m, name))
        # the size first: a truncated copy is caught even without hashing (verify=False)
        size = f.stat().st_size
        if size != info["bytes"]:
            raise _fail(
                d,
                f"file {name} has {size} bytes, bundle.json says {info['bytes']} (truncated or "
                "modified)",
                _refill(d, m, name),
            )
        if not verify or (checked is not None and checked.known(f, info["sha256"])):
            continue
        before = signature(f)
        if sha256_file(f) != info["sha256"]:
            raise _fail(
                d,
                f"file {name} does not match its sha256 in bundle.json (corrupt or modified)",
                _refill(d, m, name),
            )
        if checked is not None:
            checked.remember(f, info["sha256"], before)
    if checked is not None:
        checked.save()
    kv, model = m["kv"], m["model"]
    layout = KVLayout(
        num_layers=int(model["num_layers"]),
        kv_heads=int(model["num_kv_heads"]),
        head_dim=int(model["head_dim"]),
        capacity_dense=int(kv["capacity_dense"]),
        capacity_mod=int(kv["capacity_mod"]),
        routed=tuple(int(i) for i in kv["routed_layers"]),
        tokens_per_frame=int(m["vision"]["tokens_per_frame"]),
        k=int(m["mod"]["k"]),
        dtype=kv["dtype"],
    )
    ev = m["eviction"]
    return Bundle(
        path=d,
        manifest=m,
        layout=layout,
        inv_freq=np.asarray(model["rope_inv_freq"], np.float32),
        routed_layers=tuple(int(i) for i in m["mod"]["routed_layers"]),
        policy=EvictionPolicy(
            free_fraction=float(ev["free_fraction"]),
            keep_text_tokens=int(ev["keep_text_tokens"]),
        ),
    )


def _check_version(d: Path, version: Any) -> None:
    """Refuse any format version but ours, saying which side to upgrade."""
    if same_json(version, BUNDLE_FORMAT_VERSION):
        return
    if is_json_type(version, "integer") and version > BUNDLE_FORMAT_VERSION:
        raise _fail(
            d,
            f"format version {version} is not supported by this onsight: the bundle was "
            f"written by a newer onsight (this one reads version {BUNDLE_FORMAT_VERSION})",
            "upgrade onsight (pip install -U onsight), or re-export the model with this one",
        )
    raise _fail(
        d,
        f"format version {show_json(version)} is not supported by this onsight (reads "
        f"{BUNDLE_FORMAT_VERSION})",
        "re-export it with this version of onsight",
    )
