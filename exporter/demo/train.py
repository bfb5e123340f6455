"""`onsight train-demo`: train the demo model on synthetic streams, resumably, on CPU or GPU.

The model, batches made in a worker process, warm starts, resumable checkpoints and the loop;
the flags are in `train_args`, the config and its schedule in `train_config`, the batched
forward and the loss in `objective`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onsight.exporter.config import (
    ModConfig,
    ModelConfig,
    PreprocessConfig,
    VisionConfig,
    parse_mod_layers,
)
from onsight.exporter.demo.data import AUX_DIM, CHANGE_DIM, Batch, BatchSource
from onsight.exporter.demo.objective import compute_loss
from onsight.exporter.demo.run_files import (
    STATE_FILE,
    is_native_dir,
    load_state,
    save_state,
    warm_start,
)
from onsight.exporter.demo.tokenizer import V_TOKEN, demo_template, train_tokenizer
from onsight.exporter.demo.train_args import config_from_args, parse_args
from onsight.exporter.demo.train_config import (
    TrainConfig,
    config_files,
    keep_ratio_at,
    lr_at,
    stage_at,
)
from onsight.exporter.model import StreamingModel, save_native
from onsight.runtime.errors import OnsightError

log = logging.getLogger(__name__)


# ---- the model ----


def demo_config(
    vocab: int,
    keep_ratio: float = 0.2,
    tower_blocks: int = 0,
    gate: str = "sigmoid",
    layers: int = 4,
    keep_last: bool = False,
    pos_embed: bool = False,
    mod_layers: str = "interleaved",
    pooled_last: bool = False,
) -> ModelConfig:
    """The demo architecture: tiny CNN tower, a small Llama decoder (4 layers unless told),
    LayerExperts on every other layer (1, 3, ...)."""
    decoder = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        bos_token_id=0,
        eos_token_id=1,
    )
    return ModelConfig(
        decoder=decoder,
        # 64x64 frames -> an 8x8 patch grid -> 1 + 3x3 tokens, as VideoLLM-online's 10
        vision=VisionConfig(
            kind="tiny",
            hidden_size=96,
            grid=3,
            tiny_channels=(24, 48, 96),
            tiny_blocks=tower_blocks,
            tiny_pos_embed=pos_embed,
            pooled_last=pooled_last,
        ),
        preprocess=PreprocessConfig(image_size=64),
        projector_hidden=128,
        mod=ModConfig(
            keep_ratio=keep_ratio,
            layers=parse_mod_layers(mod_layers, layers),
            router="learned",
            gate=gate,
            keep_last=keep_last,
        ),
        template=demo_template(),
        has_layer_experts=True,
    )


# ---- batches in a worker process, so stream generation overlaps the step ----

_SOURCE: BatchSource | None = None


def _init_worker(tokenizer_json: str, tcfg: dict, tokens_per_frame: int) -> None:
    global _SOURCE
    _SOURCE = make_source(tokenizer_json, TrainConfig(**tcfg), tokens_per_frame)


def _make_batch(step: int, stage: int) -> Batch:
    assert _SOURCE is not None
    return _SOURCE.batch(step, stage)


def make_source(tokenizer_json: str, tcfg: TrainConfig, tokens_per_frame: int) -> BatchSource:
    from tokenizers import Tokenizer

    from onsight.runtime.template import build_template_ids

    tok = Tokenizer.from_file(str(tokenizer_json))
    return BatchSource(
        template=build_template_ids(tok, asdict(demo_template())),
        encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        v_id=tok.token_to_id(V_TOKEN),
        tokens_per_frame=tokens_per_frame,
        batch_size=tcfg.batch_size,
        num_frames=tcfg.num_frames,
        question_prob=tcfg.question_prob,
        mover_questions=tcfg.mover_questions,
        onset_questions=tcfg.onset_questions,
        seed=tcfg.seed,
        delay=tcfg.delay,
    )


def naming_token_ids(tokenizer_json: Path) -> torch.Tensor:
    """Ids of the words that name an object in the world's grammar (colours and shapes)."""
    from tokenizers import Tokenizer

    from onsight.runtime.synthetic.grammar import COLOURS, SHAPES

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = {
        i
        for word in (*COLOURS, *SHAPES)
        for i in tok.encode(" " + word, add_special_tokens=False).ids
    }
    return torch.tensor(sorted(ids), dtype=torch.int64)


def to_tensors(batch: Batch, device: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in asdict(batch).items()}


def build_model(tokenizer_json: Path, tcfg: TrainConfig) -> StreamingModel:
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_json)).token_to_id(V_TOKEN)
    torch.manual_seed(tcfg.seed)
    model = StreamingModel(
        demo_config(
            vocab,
            tcfg.keep_ratio,
            tcfg.tower_blocks,
            tcfg.gate,
            tcfg.decoder_layers,
            tcfg.keep_last,
            tcfg.pos_embed,
            tcfg.mod_layers,
            tcfg.pooled_last,
        )
    )
    init_vision(model)
    return model


@torch.no_grad()
def init_vision(model: StreamingModel) -> None:
    """Variance-preserving convs and a bias-free projector at the LM's init scale.

    With PyTorch's default init every frame token starts as nearly the same vector (the
    projector's bias; cosine ~0.99 between any two tokens), ~3x the norm of a text embedding,
    and training then inflates it further; the decision read at the last <v> is then mostly
    that token's own input, and the speak decision never learns to use the other frames.
    """
    for m in model.encoder.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    proj = model.encoder.projector
    std = float(model.decoder.lm.config.initializer_range)
    for lin in (proj.fc1, proj.fc2):
        nn.init.zeros_(lin.bias)
    nn.init.normal_(proj.fc2.weight, std=std)


# ---- the loop ----


def load_run(run_dir: Path) -> tuple[StreamingModel, TrainConfig]:
    """The model of a train-demo run directory at its latest checkpoint, and its config."""
    if not (run_dir / STATE_FILE).is_file():
        raise OnsightError(f"{run_dir}: no {STATE_FILE} there; pass a train-demo --out")
    state = load_state(run_dir / STATE_FILE)
    tcfg = TrainConfig.from_json(state["train_config"])
    model = build_model(run_dir / "tokenizer.json", tcfg)
    model.load_state_dict(state["model"])
    return model, tcfg


def load_run_model(run_dir: Path) -> StreamingModel:
    """The model of a train-demo run directory at its latest checkpoint."""
    return load_run(run_dir)[0]


def load_teacher(run_dir: Path, tok_path: Path, device: str) -> StreamingModel:
    """A frozen teacher for distillation; it must share this run's tokenizer."""
    if (run_dir / "tokenizer.json").read_text() != tok_path.read_text():
        raise OnsightError(
            f"--distill-from {run_dir}: its tokenizer differs from this run's; a teacher must "
            "come from the same tokenizer (start both from the same --init-from run)"
        )
    teacher = load_run_model(run_dir).to(device).eval()
    teacher.requires_grad_(False)
    log.info("distilling from %s (keep ratio %g)", run_dir, teacher.cfg.mod.keep_ratio)
    return teacher


def train(
    out: Path,
    tcfg: TrainConfig,
    device: str,
    resume: bool,
    minutes: float | None,
    fit_steps: bool = False,
    extend_to: int | None = None,
    given: frozenset[str] | None = None,
) -> Path:
    """Train into `out` (tokenizer.json, train_state.pt, log.jsonl); returns the native dir.
    `given`: the TrainConfig fields the caller set on purpose (None: all), the only ones a
    resumed run warns it ignores."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    state_path = out / STATE_FILE
    start = 0
    if resume and state_path.is_file():
        state = load_state(state_path)
        saved = TrainConfig.from_json(state["train_config"])
        start = int(state["step"])
        ignored = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if f.name != "steps" and (given is None or f.name in given)
            if getattr(tcfg, f.name) != getattr(saved, f.name)
        ]
        if ignored:
            log.warning(
                "--resume continues with the run's saved settings; these differ from the "
                "flags given and are ignored: %s (start a new --out to change them)",
                ", ".join(ignored),
            )
        # A longer --steps extends the run: the cosine is re-drawn over the new total.
        tcfg = dataclasses.replace(saved, steps=max(saved.steps, extend_to or 0))
    elif state_path.exists():
        raise OnsightError(f"{state_path} exists: pass --resume, or choose another --out")
    elif resume:
        log.warning(
            "--resume: nothing saved in %s yet (no %s); starting a new run", out, STATE_FILE
        )
    if tcfg.init_from and not start:
        init_dir = Path(tcfg.init_from)
        if not (init_dir / STATE_FILE).is_file() and not is_native_dir(init_dir):
            raise OnsightError(
                f"--init-from {init_dir}: neither a train-demo run ({STATE_FILE}) nor a native "
                "checkpoint (config.json, model.safetensors, tokenizer.json); pass a "
                "train-demo --out or a checkpoint such as engines/demo-checkpoint"
            )
        shutil.copyfile(init_dir / "tokenizer.json", tok_path)  # the same token ids
    if not tok_path.is_file():
        train_tokenizer(tok_path)
    teacher = None
    if tcfg.distill_from and tcfg.distill_weight > 0:
        teacher = load_teacher(Path(tcfg.distill_from), tok_path, device)
    model = build_model(tok_path, tcfg)
    model = model.to(device).train()
    aux_head = change_head = None
    if tcfg.aux_weight > 0:
        aux_head = nn.Linear(model.cfg.llm_hidden, AUX_DIM).to(device)
        change_head = nn.Linear(model.cfg.llm_hidden, CHANGE_DIM).to(device)
    heads = nn.ModuleDict({"scene": aux_head, "change": change_head}) if aux_head else None
    change_mid = None
    if tcfg.change_layer >= 0:
        if heads is None or not 0 < tcfg.change_layer < tcfg.decoder_layers:
            raise OnsightError(
                f"--change-layer {tcfg.change_layer}: give a decoder layer in 1.."
                f"{tcfg.decoder_layers - 1}, with the auxiliary losses on (--aux-weight > 0)"
            )
        dim = 1 if tcfg.change_target == "onset" else CHANGE_DIM
        heads["change_mid"] = nn.Linear(model.cfg.llm_hidden, dim).to(device)
        change_mid = (tcfg.change_layer, heads["change_mid"], tcfg.change_target)
    params = list(model.parameters()) + (list(heads.parameters()) if heads else [])
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.95))
    if start:
        model.load_state_dict(state["model"])
        if heads is not None and state.get("aux"):
            heads.load_state_dict(state["aux"])
        opt.load_state_dict(state["optim"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed at step %d", start)
    elif tcfg.init_from:
        warm_start(model, heads, Path(tcfg.init_from))
    tpl = model.cfg.template
    tpf = model.cfg.tokens_per_frame
    src = make_source(str(tok_path), tcfg, tpf)
    interval_id = src.template.interval_id
    name_ids = naming_token_ids(tok_path).to(device)
    pool = ProcessPoolExecutor(
        1,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(tok_path), asdict(tcfg), model.cfg.tokens_per_frame),
    )
    ahead: dict[int, Future] = {}
    t0, last_save = time.time(), time.time()
    deadline = t0 + minutes * 60 if minutes else None
    bar = tqdm(total=tcfg.steps, initial=start, desc="train-demo", dynamic_ncols=True)
    logf = (out / "log.jsonl").open("a")
    step = start
    try:
        while step < tcfg.steps:
            for s in range(step, min(step + 3, tcfg.steps)):
                if s not in ahead:
                    ahead[s] = pool.submit(_make_batch, s, stage_at(tcfg, s))
            batch = to_tensors(ahead.pop(step).result(), device)
            for g in opt.param_groups:
                g["lr"] = lr_at(tcfg, step)
            if tcfg.anneal_steps:
                r = keep_ratio_at(tcfg, step)
                model.decoder.k = dataclasses.replace(model.cfg.mod, keep_ratio=r).k(tpf)
            parts = compute_loss(
                model,
                batch,
                interval_id,
                tcfg.speak_weight,
                tpl.threshold,
                aux_head,
                tcfg.aux_weight,
                change_head,
                tcfg.router_weight,
                teacher,
                tcfg.distill_weight,
                tcfg.router_target,
                change_mid,
                name_ids,
                tcfg.name_weight,
            )
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            opt.step()
            step += 1
            if fit_steps and step == start + 5:
                # Fit the schedule to the budget once; the checkpoint remembers the result.
                per_step = (time.time() - t0) / 5
                fitted = max(step + 1, int(minutes * 60 / per_step))
                anneal = min(tcfg.anneal_steps, fitted)  # the run still ends at keep_ratio
                tcfg = dataclasses.replace(tcfg, steps=fitted, anneal_steps=anneal)
                bar.total = fitted
                log.info("%.1f s/step: the schedule is fitted to %d steps", per_step, fitted)
            rec = {
                "step": step,
                "stage": stage_at(tcfg, step - 1),
                "lr": lr_at(tcfg, step - 1),
                "lm": round(parts.lm, 4),
                "aux": round(parts.aux, 4),
                "stream": round(parts.stream, 4),
                "speak_recall": round(parts.speak_recall, 3),
                "silent_acc": round(parts.silent_acc, 3),
                "distill": round(parts.distill, 4),
                "k": model.decoder.k,
                "grad_norm": round(gnorm, 3),
                "elapsed_s": round(time.time() - t0, 1),
            }
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            bar.update(1)
            bar.set_postfix(
                lm=f"{parts.lm:.3f}",
                st=f"{parts.stream:.3f}",
                spk=f"{parts.speak_recall:.2f}",
                sil=f"{parts.silent_acc:.2f}",
            )
            if time.time() - last_save > 180 or step == tcfg.steps:
                save_state(state_path, model, heads, opt, step, tcfg)
                last_save = time.time()
            if deadline and time.time() > deadline:
                save_state(state_path, model, heads, opt, step, tcfg)
                log.warning("time budget reached at step %d of %d", step, tcfg.steps)
                break
    except KeyboardInterrupt:
        # nothing lost: the state after the last finished step is saved before stopping
        save_state(state_path, model, heads, opt, step, tcfg)
        log.warning("interrupted at step %d of %d; continue with --resume", step, tcfg.steps)
        raise
    finally:
        bar.close()
        logf.close()
        pool.shutdown(cancel_futures=True)
        model.decoder.k = model.cfg.k  # the configured keep ratio, whatever step it stopped at
    native = out / f"native-step{step}"
    if native.exists():
        shutil.rmtree(native)
    return save_native(model.cpu().eval(), tok_path, native, extra_files=config_files(tcfg))


def snapshot(run_dir: Path, native_out: Path, threshold: float | None = None) -> Path:
    """The run's latest resumable checkpoint as a native checkpoint, optionally with a speak
    threshold calibrated on validation streams (`onsight eval --threshold`)."""
    model, tcfg = load_run(run_dir)
    if threshold is not None:
        tpl = dataclasses.replace(model.cfg.template, threshold=threshold)
        model = model.with_config(model.cfg.replace(template=tpl))
    tok = run_dir / "tokenizer.json"
    return save_native(model.eval(), tok, native_out, extra_files=config_files(tcfg))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.snapshot:
        native = snapshot(Path(args.out), Path(args.snapshot), args.threshold)
        print(f"native checkpoint: {native}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OnsightError(
            f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU "
            "(torch.cuda.is_available() is False); install a CUDA build of torch on a machine "
            "with an NVIDIA GPU, or train with --device cpu"
        )
    tcfg = config_from_args(args)
    # the fields the flags set away from their defaults: a plain --resume gives none of them
    bare = config_from_args(parse_args(["--out", args.out]))
    given = frozenset(
        f.name
        for f in dataclasses.fields(TrainConfig)
        if getattr(tcfg, f.name) != getattr(bare, f.name)
    )
    t0 = time.time()
    fit = args.minutes is not None and args.steps is None
    native = train(
        Path(args.out),
        tcfg,
        args.device,
        args.resume,
        args.minutes,
        fit,
        extend_to=args.steps,
        given=given,
    )
    print(f"trained in {time.time() - t0:.0f} s; native checkpoint: {native}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
