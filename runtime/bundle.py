"""Read and verify a bundle directory: bundle.json is the contract between exporter and runtime."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onsight.runtime.errors import BundleError
from onsight.runtime.files import write_text_atomic
from onsight.runtime.kv_cache import KVLayout
from onsight.runtime.kv_policy import EvictionPolicy

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "onsight-bundle"
BUNDLE_FORMAT_VERSION = 1
GRAPHS = ("vision", "text_step", "frame_step")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(d: Path, manifest: dict[str, Any]) -> None:
    """bundle.json with fresh checksums of every other file, written atomically."""
    manifest["files"] = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != "bundle.json" and not p.name.startswith(".")
    }
    write_text_atomic(d / "bundle.json", json.dumps(manifest, indent=2))


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
        return self.path / "tokenizer.json"


def _fail(path: Path, what: str, fix: str = "re-export it with `onsight export`") -> BundleError:
    return BundleError(f"bundle {path}: {what}; {fix}")


def _refill(d: Path, m: dict, name: str) -> str:
    """How to bring back a bundle file: `onsight build` made the int8, Q/DQ and TensorRT
    files, `onsight export` the rest."""
    if name in (m.get("graph_overrides") or {}).values():
        return f"run `onsight build {d} --backend onnxruntime --quantize int8` again"
    if name in ((m.get("qdq") or {}).get("graphs") or {}).values():
        return f"run `onsight build {d} --precision int8 --calibrate-only` again"
    if name.endswith(".plan"):
        return f"run `onsight build {d} --backend tensorrt` again on the GPU that will run it"
    return "re-export it with `onsight export`"


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


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle; refuse missing files, checksum mismatches and unknown versions."""
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
    version = m.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise _fail(
            d,
            f"format version {version!r} is not supported by this onsight (reads "
            f"{BUNDLE_FORMAT_VERSION})",
            "re-export it with this version of onsight, or upgrade onsight",
        )
    for name, info in m.get("files", {}).items():
        f = d / name
        if not f.is_file():
            raise _fail(d, f"file {name} listed in bundle.json is missing", _refill(d, m, name))
        if verify and sha256_file(f) != info["sha256"]:
            raise _fail(
                d, f"file {name} does not match its sha256 in bundle.json (corrupt or modified)"
            )
    for g in GRAPHS:
        if g not in m.get("graphs", {}):
            raise _fail(d, f"bundle.json names no {g} graph")
    try:
        kv = m["kv"]
        layout = KVLayout(
            num_layers=int(m["model"]["num_layers"]),
            kv_heads=int(m["model"]["num_kv_heads"]),
            head_dim=int(m["model"]["head_dim"]),
            capacity_dense=int(kv["capacity_dense"]),
            capacity_mod=int(kv["capacity_mod"]),
            routed=tuple(kv["routed_layers"]),
            tokens_per_frame=int(m["vision"]["tokens_per_frame"]),
            k=int(m["mod"]["k"]),
            dtype=kv["dtype"],
        )
        ev = m.get("eviction", {})
        return Bundle(
            path=d,
            manifest=m,
            layout=layout,
            inv_freq=np.asarray(m["model"]["rope_inv_freq"], np.float32),
            routed_layers=tuple(m["mod"]["routed_layers"]),
            policy=EvictionPolicy(
                free_fraction=float(ev.get("free_fraction", 0.25)),
                keep_text_tokens=int(ev.get("keep_text_tokens", 256)),
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(
            d, f"bundle.json is missing or has a malformed field ({type(e).__name__}: {e})"
        ) from e
