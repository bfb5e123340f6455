"""Typed, frozen configuration of the streaming MoD model (one dataclass per part)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onsight.runtime.errors import CheckpointError

CONFIG_FORMAT_VERSION = 1

# VideoLLM-online's default system prompt (its training arguments' default).
DEFAULT_SYSTEM_PROMPT = (
    "A multimodal AI assistant is helping users with some activities. Below is their "
    "conversation, interleaved with the list of video frames received by the assistant."
)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a camera frame becomes the tower's input; the runtime mirrors resize+pad in OpenCV."""

    image_size: int = 384  # long side is resized to this, then padded to a square
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel, after x / 255
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel, after x / 255
    pad_value: int = 0  # black padding, as VideoLLM-online
    interpolation: str = "bicubic"  # OpenCV resize interpolation used by the runtime


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower and how its output is pooled into frame tokens."""

    kind: str = "siglip"  # "siglip" | "clip" | "tiny" (onsight's own small CNN)
    hidden_size: int = 1024  # width of the tower's output tokens
    grid: int = 3  # patch tokens are adaptive-average-pooled to grid x grid
    use_pooled: bool = True  # prepend the pooled / CLS token
    hf_config: dict[str, Any] | None = None  # transformers vision config (siglip / clip)
    tiny_channels: tuple[int, ...] = (32, 64, 128)  # conv widths of the tiny tower
    # residual 3x3 stride-1 convs at the tiny tower's last scale: each widens a patch's view
    # by 16 px, enough to see a whole object's shape, not only the part in its own cell
    tiny_blocks: int = 0
    # a learned embedding per patch-grid cell added to the tiny tower's patch tokens, as
    # SigLIP's patch embeddings carry their position: without it a frame token's content
    # says what is there but not where, and RoPE moves only attention scores, not values
    tiny_pos_embed: bool = False
    # the pooled token after the grid cells instead of before them: the frame's last token
    # is where the speak decision is read, and only a last token attends (causally) to all of
    # its frame's tokens; with ModConfig.keep_last the whole-frame summary is then the token
    # every routed layer keeps, and the router's picks are all grid cells
    pooled_last: bool = False

    @property
    def tokens_per_frame(self) -> int:
        return int(self.use_pooled) + self.grid * self.grid


# learned: the LayerExperts; novelty / norm: training-free signals; random / uniform: the
# ablation baselines (pseudo-random by token position, or evenly spaced tokens of the frame)
GATES = ("sigmoid", "straight")
ROUTERS = ("learned", "novelty", "norm", "random", "uniform")


@dataclass(frozen=True)
class ModConfig:
    """Mixture-of-Depths routing of vision tokens (VideoLLM-MoD's LayerExperts).

    keep_ratio 0 makes vision tokens skip the routed layers entirely (k = 0, no KV there);
    with the routed layers being the last ones (`from:E`) that is an early-exit model.
    """

    keep_ratio: float = 1.0  # share of each frame's vision tokens a routed layer processes
    layers: tuple[int, ...] = ()  # indices of routed decoder layers
    router: str = "novelty"  # one of ROUTERS (unused when keep_ratio is 0)
    # How a LayerExpert's score weighs a kept token's update, x + w * (block(x) - x):
    # "sigmoid" w = sigmoid(score) (MoD's router weight); "straight" w = 1, the sigmoid
    # reaching the router only through the gradient (straight-through), so a router can
    # choose tokens but cannot switch the layer off for them.
    gate: str = "sigmoid"
    # The frame's last vision token is where the speak-or-stay-silent decision is read; with
    # keep_last it is always one of the k kept tokens (an output position, computed at full
    # depth like text), and the router chooses the other k - 1. Same k, same FLOPs and KV.
    keep_last: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.keep_ratio <= 1.0:
            raise ValueError(f"keep ratio must be in [0, 1], got {self.keep_ratio}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}: use one of {', '.join(ROUTERS)}")
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}: use one of {', '.join(GATES)}")

    def k(self, tokens_per_frame: int) -> int:
        """Vision tokens per frame that a routed layer keeps: ceil(r * N), 0 only at r = 0."""
        if self.keep_ratio == 0.0:
            return 0
        return max(1, math.ceil(self.keep_ratio * tokens_per_frame - 1e-9))


def interleaved_layers(num_layers: int) -> tuple[int, ...]:
    """VideoLLM-MoD's best setting: every other layer, starting with the second."""
    return tuple(range(1, num_layers, 2))


def exit_layers(num_layers: int, exit_at: int) -> tuple[int, ...]:
    """Layers from `exit_at` on: routed with keep ratio 0, vision tokens leave after
    `exit_at` layers (early exit)."""
    return tuple(range(exit_at, num_layers))


def parse_mod_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`interleaved` (1, 3, ...) | `interleaved-even` (0, 2, ...) | `all` | `none` | `from:E`
    (layers E and later) | a list like `1,3,5`."""
    spec = spec.strip().lower()
    if spec == "interleaved":
        return interleaved_layers(num_layers)
    if spec == "interleaved-even":
        return tuple(range(0, num_layers, 2))
    if spec == "all":
        return tuple(range(num_layers))
    if spec in ("none", ""):
        return ()
    if spec.startswith("from:"):
        e = spec.removeprefix("from:")
        if not e.isdigit() or not 0 <= int(e) < num_layers:
            raise ValueError(
                f"--mod-layers {spec!r}: use from:E with E in 0..{num_layers - 1} "
                f"(the model has {num_layers} layers)"
            )
        return exit_layers(num_layers, int(e))
    try:
        layers = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError as e:
        raise ValueError(
            f"--mod-layers {spec!r}: use interleaved, interleaved-even, all, none, from:E or a "
            "list like 1,3,5"
        ) from e
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--mod-layers: layers {bad} do not exist (model has {num_layers})")
    return layers


def parse_tokens_per_frame(spec: str) -> tuple[bool, int]:
    """`1+3x3` -> (use_pooled=True, grid=3); `4x4` -> (False, 4)."""
    s = spec.replace(" ", "").lower()
    use_pooled = False
    if s.startswith("1+"):
        use_pooled, s = True, s[2:]
    parts = s.split("x")
    if len(parts) != 2 or parts[0] != parts[1] or not parts[0].isdigit() or int(parts[0]) < 1:
        raise ValueError(f"tokens per frame {spec!r}: use the form 1+3x3 or 1+5x5 (square grid)")
    return use_pooled, int(parts[0])


@dataclass(frozen=True)
class TemplateConfig:
    """VideoLLM-online's streaming template and speak-or-stay-silent rule."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    bos: str = "<|begin_of_text|>"  # prepended to the system prompt ("" if the LLM has none)
    eos: str = "<|eot_id|>"  # ends every assistant turn
    v_token: str = "<v>"  # frame placeholder (id outside the embedding matrix)
    interval_token: str = ","  # fed between frames when the model stays silent
    stream_open: str = "\n["  # opens a run of frames
    stream_close: str = "]"  # closes it before an assistant or user turn
    user_prefix: str = "\nUser: "
    assistant_prefix: str = "\nAssistant:"
    threshold: float = 0.725  # p(interval) below this is zeroed before the argmax
    max_new_tokens: int = 100  # cap on one narration or answer


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the streaming model; saved as onsight's config.json."""

    decoder: dict[str, Any]  # transformers config dict of the causal LM (has "architectures")
    vision: VisionConfig = field(default_factory=VisionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    projector_hidden: int = 0  # middle width of the projector; 0 means the LLM's hidden size
    mod: ModConfig = field(default_factory=ModConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    has_layer_experts: bool = False  # LayerExpert weights exist (trained routers)
    format_version: int = CONFIG_FORMAT_VERSION

    @property
    def architecture(self) -> str:
        archs = self.decoder.get("architectures") or []
        return archs[0] if archs else ""

    @property
    def llm_hidden(self) -> int:
        return int(self.decoder["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.decoder["num_hidden_layers"])

    @property
    def tokens_per_frame(self) -> int:
        return self.vision.tokens_per_frame

    @property
    def k(self) -> int:
        return self.mod.k(self.tokens_per_frame)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        _check_version(d, source)
        version = d["format_version"]
        _check_types(d, source)
        try:
            vision = dict(d["vision"])
            vision["tiny_channels"] = tuple(vision.get("tiny_channels", (32, 64, 128)))
            pre = dict(d["preprocess"])
            pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
            mod = dict(d["mod"])
            mod["layers"] = tuple(mod["layers"])
            return cls(
                decoder=dict(d["decoder"]),
                vision=VisionConfig(**vision),
                preprocess=PreprocessConfig(**pre),
                projector_hidden=d.get("projector_hidden", 0),
                mod=ModConfig(**mod),
                template=TemplateConfig(**d["template"]),
                has_layer_experts=d.get("has_layer_experts", False),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{source}: malformed onsight config ({type(e).__name__}: {e}); "
                "re-save it with `onsight` or fix the named key"
            ) from e

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), source=str(path))
        except FileNotFoundError as e:
            raise CheckpointError(
                f"{path}: missing; an onsight checkpoint needs config.json"
            ) from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e


# ---- checking a config.json before building from it ----

# transformers config keys the decoder is built from, and their JSON types
_DECODER_TYPES: dict[str, Any] = {
    "architectures": list[str],
    "hidden_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int | None,
    "intermediate_size": int,
    "vocab_size": int,
    "max_position_embeddings": int,
    "head_dim": int | None,
    "rms_norm_eps": float,
    "rope_theta": float,
    "tie_word_embeddings": bool,
}
_DECODER_REQUIRED = ("architectures", "hidden_size", "num_hidden_layers")
_SECTIONS = {
    "vision": VisionConfig,
    "preprocess": PreprocessConfig,
    "mod": ModConfig,
    "template": TemplateConfig,
}


def _check_version(d: Any, source: str) -> None:
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: holds a JSON {type(d).__name__}, not an object")
    if "format_version" not in d:
        raise CheckpointError(
            f"{source}: not an onsight checkpoint config (no format_version); a transformers "
            "model directory is exported with --format compose (or --format auto)"
        )
    version = d["format_version"]
    if not _matches(int, version):
        raise CheckpointError(f"{source}: format_version is {version!r}, expected a whole number")
    if version > CONFIG_FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format_version {version} was written by a newer onsight (this one reads "
            f"{CONFIG_FORMAT_VERSION}); upgrade onsight"
        )
    if version != CONFIG_FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format_version {version} is not supported (this onsight reads "
            f"{CONFIG_FORMAT_VERSION}); re-save the checkpoint with this version of onsight"
        )


def _check_types(d: dict[str, Any], source: str) -> None:
    """Refuse a value of the wrong JSON type, naming the field and the type it needs (the
    dataclasses would accept it and fail later, far from the file)."""
    hints = typing.get_type_hints(ModelConfig)
    for key in ("decoder", *_SECTIONS, "projector_hidden", "has_layer_experts"):
        if key in d and not _matches(hints[key] if key in hints else dict, d[key]):
            _wrong(source, key, d[key], dict if key in _SECTIONS else hints[key])
    decoder = d.get("decoder", {})
    for key in _DECODER_REQUIRED:
        if key not in decoder:
            raise CheckpointError(f"{source}: decoder.{key} is missing")
    for key, want in _DECODER_TYPES.items():
        if key in decoder and not _matches(want, decoder[key]):
            _wrong(source, f"decoder.{key}", decoder[key], want)
    for section, cls in _SECTIONS.items():
        fields = typing.get_type_hints(cls)
        for key, value in d.get(section, {}).items():
            if key in fields and not _matches(fields[key], value):
                _wrong(source, f"{section}.{key}", value, fields[key])


def _matches(want: Any, value: Any) -> bool:
    """Whether a JSON value fits a type hint (JSON lists stand for tuples)."""
    origin, args = typing.get_origin(want), typing.get_args(want)
    if want is Any:
        return True
    if want is type(None):
        return value is None
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if want is str:
        return isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in args)
    if want is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            return False
        return all(_matches(args[0] if args else Any, x) for x in value)
    return True


def _describe(want: Any) -> str:
    origin, args = typing.get_origin(want), typing.get_args(want)
    if origin in (typing.Union, types.UnionType):
        named = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        plural = {int: "whole numbers", float: "numbers", str: "strings"}.get(args[0], "values")
        return f"a list of {len(args)} {plural}" if fixed else f"a list of {plural}"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    return names.get(want, "an object" if want is dict or origin is dict else str(want))


def _wrong(source: str, field_name: str, value: Any, want: Any) -> None:
    raise CheckpointError(
        f"{source}: {field_name} is {json.dumps(value)}, expected {_describe(want)}; fix config.json"
    )
