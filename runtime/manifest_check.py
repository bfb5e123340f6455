"""What a bundle.json must hold: bundle.schema.json, checked without the jsonschema package
(a dev dependency only), and the facts the schema cannot say (fields that must agree, IO the
backends feed, files named elsewhere that `files` must list)."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

from onsight.runtime.graph_io import RUNTIME_IO, graph_io  # RUNTIME_IO re-exported

GRAPHS = ("vision", "text_step", "frame_step")
SCHEMA_PATH = Path(__file__).with_name("bundle.schema.json")
DEFAULT_TOKENIZER = "tokenizer.json"  # where bundles without a `tokenizer` field keep it


# ---- the schema, checked without the jsonschema package (a dev dependency only) ----

# every keyword bundle.schema.json may use; the rest of JSON Schema is not implemented
SCHEMA_KEYWORDS = frozenset(
    "$schema title description type required properties additionalProperties items enum "
    "const minimum maximum exclusiveMinimum minItems maxItems pattern".split()
)
_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


@functools.lru_cache(maxsize=1)
def bundle_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def is_json_type(value: Any, t: str) -> bool:
    if t == "integer":  # true is not an integer, and neither is 4.0 here (stricter than JSON)
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES[t])


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def show_json(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def schema_problems(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """What in `value` breaks `schema` (the keywords in SCHEMA_KEYWORDS), each as
    "field.path: what"; [] when it conforms."""
    at = where or "bundle.json"
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(is_json_type(value, t) for t in types):
            return [f"{at}: expected {' or '.join(types)}, got {show_json(value)}"]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{at}: {value} is not a JSON number"]
    if "const" in schema and not same_json(value, schema["const"]):
        return [f"{at}: must be {show_json(schema['const'])}, got {show_json(value)}"]
    if "enum" in schema and not any(same_json(value, e) for e in schema["enum"]):
        return [
            f"{at}: must be one of {', '.join(map(show_json, schema['enum']))}, got {show_json(value)}"
        ]
    out: list[str] = []
    if is_json_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{at}: {show_json(value)} is below the minimum {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            out.append(f"{at}: {show_json(value)} must be above {schema['exclusiveMinimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{at}: {show_json(value)} is above the maximum {schema['maximum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{at}: {show_json(value)} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{at}: needs at least {schema['minItems']} items, has {len(value)}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(f"{at}: holds at most {schema['maxItems']} items, has {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                out += schema_problems(item, schema["items"], f"{at}[{i}]")
    if isinstance(value, dict):
        prefix = f"{where}." if where else ""
        missing = [name for name in schema.get("required", ()) if name not in value]
        out += [f"{prefix}{name}: missing (a required field)" for name in missing]
        props = schema.get("properties", {})
        for key, item in value.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):  # unknown properties are allowed (and ignored)
                out += schema_problems(item, sub, f"{prefix}{key}")
    return out


# ---- facts the schema cannot state: fields that must agree with each other ----


def named_files(m: dict[str, Any]) -> dict[str, str]:
    """{file: the field naming it} for every file the manifest names (graphs, tokenizer,
    int8 / Q/DQ graphs, TensorRT plans); tolerates a malformed manifest."""

    def section(*keys: str) -> dict:
        d: Any = m
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d if isinstance(d, dict) else {}

    out: dict[str, str] = {}
    for g, spec in section("graphs").items():
        if isinstance(spec, dict) and isinstance(spec.get("file"), str):
            out[spec["file"]] = f"graphs.{g}.file"
    tok = m.get("tokenizer", DEFAULT_TOKENIZER)
    if isinstance(tok, str):
        out[tok] = "tokenizer"
    for where in (("graph_overrides",), ("qdq", "graphs"), ("tensorrt", "plans")):
        for g, f in section(*where).items():
            if isinstance(f, str):
                out[f] = ".".join((*where, g))
    return out


def unsafe_name(name: str) -> bool:
    """A file name that would reach outside the bundle directory."""
    p = Path(name)
    return not name or p.is_absolute() or ".." in p.parts or "\\" in name


def _expected_outputs(m: dict[str, Any]) -> dict[str, list[str]]:
    """The outputs each graph must declare, in the order the onnxruntime backend reads them."""
    io = graph_io(m["model"]["num_layers"], m["mod"]["routed_layers"])
    return {g: list(io[g].outputs) for g in GRAPHS}


def _feedable_inputs(m: dict[str, Any]) -> dict[str, set[str]]:
    """The inputs the backends can feed each graph (a graph may take fewer)."""
    io = graph_io(m["model"]["num_layers"], m["mod"]["routed_layers"])
    return {g: set(io[g].inputs) for g in GRAPHS}


def consistency_problems(m: dict[str, Any]) -> list[str]:
    """Disagreements between fields of a manifest that conforms to the schema."""
    out: list[str] = []
    L, kv, mod = m["model"]["num_layers"], m["kv"], m["mod"]
    n, k = m["vision"]["tokens_per_frame"], mod["k"]
    if k > n:
        out.append(f"mod.k: {k} is more than vision.tokens_per_frame ({n})")
    for field, layers in (
        ("mod.routed_layers", mod["routed_layers"]),
        ("kv.routed_layers", kv["routed_layers"]),
    ):
        bad = [i for i in layers if i >= L]
        if bad or len(set(layers)) != len(layers):
            out.append(f"{field}: {layers} must be distinct layers of the {L} in model.num_layers")
    # routed layers store k tokens per frame only when they drop some (exporter's layout_for)
    stored = list(mod["routed_layers"]) if k < n else []
    if sorted(kv["routed_layers"]) != sorted(stored):
        out.append(
            f"kv.routed_layers: {kv['routed_layers']}, expected {stored} (mod.routed_layers, "
            f"since k={k} of {n} tokens)"
        )
    routed = set(kv["routed_layers"])
    want = [
        (i, "mod", kv["capacity_mod"]) if i in routed else (i, "dense", kv["capacity_dense"])
        for i in range(L)
    ]
    if [(x["index"], x["group"], x["capacity"]) for x in kv["layers"]] != want:
        out.append(
            "kv.layers: does not match model.num_layers, kv.routed_layers and "
            "kv.capacity_dense / capacity_mod"
        )
    half = m["model"]["head_dim"] // 2
    if len(m["model"]["rope_inv_freq"]) != half:
        out.append(
            f"model.rope_inv_freq: {len(m['model']['rope_inv_freq'])} frequencies, "
            f"expected head_dim / 2 = {half}"
        )
    if m["kv"]["dtype"] != m["model"]["dtype"]:
        out.append(f"kv.dtype: {m['kv']['dtype']} differs from model.dtype {m['model']['dtype']}")
    io = {f"io.{key}": m["io"][key] for key in RUNTIME_IO if key != "masks"}
    io.update({f"io.masks.{key}": m["io"]["masks"][key] for key in RUNTIME_IO["masks"]})
    ours = {f"io.{key}": v for key, v in RUNTIME_IO.items() if key != "masks"}
    ours.update({f"io.masks.{key}": v for key, v in RUNTIME_IO["masks"].items()})
    differ = [
        f"{key}: {show_json(io[key])}, but this onsight feeds {show_json(v)}"
        for key, v in ours.items()
        if io[key] != v
    ]
    if differ:
        return out + differ  # the graphs' IO names would only repeat it
    outputs, inputs = _expected_outputs(m), _feedable_inputs(m)
    for g in GRAPHS:
        spec = m["graphs"][g]
        if spec["outputs"] != outputs[g]:
            out.append(
                f"graphs.{g}.outputs: {show_json(spec['outputs'])}, expected {show_json(outputs[g])}"
            )
        extra = sorted(set(spec["inputs"]) - inputs[g])
        if extra:
            out.append(f"graphs.{g}.inputs: this onsight cannot feed {', '.join(extra)}")
    for name in [*named_files(m), *m["files"]]:
        if unsafe_name(name):
            out.append(f"file name {name!r} reaches outside the bundle")
    for name, field in named_files(m).items():
        if name not in m["files"]:
            out.append(f"{field} names {name}, which has no sha256 in files")
    return out


def manifest_problems(m: Any) -> list[str]:
    """Everything wrong with a bundle.json's content: the schema first, then consistency."""
    problems = schema_problems(m, bundle_schema())
    return problems or consistency_problems(m)
