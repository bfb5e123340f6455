"""What decides a train-demo run's weights (`TrainConfig`, saved with every checkpoint) and
its schedule: learning rate, keep-ratio anneal and world curriculum per step."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from onsight.exporter.demo.data import NarrationDelay
from onsight.runtime.errors import CheckpointError

# A native checkpoint written by `train-demo --snapshot` keeps the run's TrainConfig here.
CONFIG_FILE = "train_config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (saved with every checkpoint)."""

    seed: int = 0  # model init and stream seeds
    steps: int = 3000  # optimizer steps (fixed up front so the schedule is reproducible)
    batch_size: int = 8  # streams per step
    num_frames: int = 24  # frames per training stream
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to this share of the peak
    warmup: int = 100  # linear warmup steps (at most 5% of the run)
    weight_decay: float = 0.05
    speak_weight: float = 3.0  # stream-loss weight of speak frames (~1 in 5 frames speaks)
    question_prob: float = 0.15  # chance a training frame carries a question
    # chance a training frame in which exactly one object moves asks "what colour/shape is the
    # moving object?" (WorldConfig.mover_questions)
    mover_questions: float = 0.0
    onset_questions: float = 0.0  # the same on the frame a move starts (WorldConfig)
    stage_fractions: tuple[float, float] = (0.1, 0.3)  # curriculum 0 -> 1 -> 2 boundaries
    keep_ratio: float = 0.2  # MoD keep ratio (1.0: the full-compute twin)
    aux_weight: float = 0.5  # weight of the per-frame scene loss (0: VideoLLM-online's alone)
    # residual convs at the tower's last scale (see VisionConfig); 0 here so that runs saved
    # before the field existed resume as they were, while the CLI's default is 1
    tower_blocks: int = 0
    init_from: str = ""  # a run directory whose weights start this run (new tower blocks at 0)
    router_weight: float = 0.0  # weight of the routers' where-the-action-is loss (router_loss)
    distill_from: str = ""  # a run directory whose model (the r = 1 twin) is the teacher
    distill_weight: float = 0.0  # weight of the KL toward the teacher (objective.compute_loss)
    gate: str = "sigmoid"  # how the routers weigh kept tokens' updates (ModConfig.gate)
    router_target: str = "scene"  # what router_loss ranks first (objective.ROUTER_TARGETS)
    decoder_layers: int = 4  # decoder depth; layers beyond an --init-from run's start as identity
    # steps over which the routed layers' training keep ratio falls linearly from 1 to
    # keep_ratio (0: keep_ratio from the first step); lets a dense start (the twin's weights)
    # get used to routing gradually instead of losing 80% of its vision tokens at once
    anneal_steps: int = 0
    keep_last: bool = False  # routed layers always keep the frame's last token (ModConfig)
    pos_embed: bool = False  # the tower's patch tokens carry their grid cell (VisionConfig)
    # which decoder layers route (config.parse_mod_layers): "interleaved" routes 1, 3, ...;
    # "interleaved-even" routes 0, 2, ..., so the last layer reads every vision token's KV
    mod_layers: str = "interleaved"
    pooled_last: bool = False  # the pooled token after the grid cells (VisionConfig)
    # a second change head reading the vision tokens' states at the input of this decoder
    # layer (-1: none; objective.compute_loss's change_mid)
    change_layer: int = -1
    # what that head reads: "change" (change_targets: event kinds, moving cells) or "onset"
    # (onset_targets: the cells of moves begun in the last two frames)
    change_target: str = "change"
    name_weight: float = 1.0  # LM-loss weight of the words naming an object (colour, shape)
    # narrate events of delay_kinds (comma-separated EventKind values) this many frames after
    # they happen (data.NarrationDelay)
    narration_delay: int = 0
    delay_kinds: str = ""

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """A config saved by an earlier run (JSON turns its tuples into lists)."""
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def delay(self) -> NarrationDelay:
        return NarrationDelay.parse(self.narration_delay, self.delay_kinds)


def config_files(tcfg: TrainConfig) -> dict[str, str]:
    """The files a native checkpoint of this run carries besides its weights ({name: text})."""
    return {CONFIG_FILE: json.dumps(asdict(tcfg), indent=2) + "\n"}


def checkpoint_delay(checkpoint: str | Path) -> NarrationDelay:
    """Where a demo checkpoint narrates events (its run's --narration-delay); on the event
    frame for checkpoints without a training config (older snapshots, other models)."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        return NarrationDelay()
    try:
        d = json.loads(path.read_text())
        return NarrationDelay.parse(int(d.get("narration_delay", 0)), d.get("delay_kinds", ""))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: not a train-demo config ({e}); delete it to score the checkpoint as "
            "narrating on the event frame, or write it again with `train-demo --snapshot`"
        ) from e


def lr_at(cfg: TrainConfig, step: int) -> float:
    warmup = max(1, min(cfg.warmup, cfg.steps // 20))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def keep_ratio_at(cfg: TrainConfig, step: int) -> float:
    """The routed layers' keep ratio at a step: linear from 1 to cfg.keep_ratio over anneal."""
    if step >= cfg.anneal_steps:
        return cfg.keep_ratio
    return 1.0 - (1.0 - cfg.keep_ratio) * step / cfg.anneal_steps


def stage_at(cfg: TrainConfig, step: int) -> int:
    p = step / max(1, cfg.steps)
    return 0 if p < cfg.stage_fractions[0] else 1 if p < cfg.stage_fractions[1] else 2
