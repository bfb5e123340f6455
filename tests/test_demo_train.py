"""The demo model's training: reproducible and resumable runs, warm starts, the router loss,
distillation and the straight-through gate."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from onsight.exporter.config import ModConfig
from onsight.exporter.demo.train import TrainConfig, build_model, make_source, to_tensors
from onsight.runtime.errors import OnsightError


def _train_weights(out: Path, steps: int, resume: bool = False, extend_to: int | None = None):
    from safetensors.torch import load_file

    from onsight.exporter.demo.train import train

    torch.set_num_threads(1)
    tcfg = TrainConfig(seed=3, steps=steps, batch_size=2, num_frames=6, warmup=1)
    native = train(out, tcfg, "cpu", resume=resume, minutes=None, extend_to=extend_to)
    return load_file(str(Path(native) / "model.safetensors"))


def test_train_demo_reproduces_weights_from_the_seed_and_resumes_exactly(tmp_path, monkeypatch):
    from onsight.exporter.demo import train as train_mod

    a = _train_weights(tmp_path / "a", 4)
    b = _train_weights(tmp_path / "b", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    real, calls = train_mod.compute_loss, []

    def ctrl_c_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "compute_loss", ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train_weights(tmp_path / "c", 4)
    monkeypatch.setattr(train_mod, "compute_loss", real)
    c = _train_weights(tmp_path / "c", 4, resume=True)  # Ctrl-C lost nothing
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_warm_start_adds_tower_blocks_without_changing_the_model(tmp_path):
    """--init-from: a run with a residual tower block and the patch position embedding starts
    from an earlier run's weights and computes exactly what it did (both start at zero), then
    trains them."""
    from safetensors.torch import load_file

    from onsight.exporter.demo.train import train
    from onsight.exporter.model import load_native

    torch.set_num_threads(1)
    base = TrainConfig(seed=3, steps=2, batch_size=2, num_frames=6, warmup=1)
    first = train(tmp_path / "a", base, "cpu", resume=False, minutes=None)
    tuned_cfg = dataclasses.replace(
        base,
        steps=0,
        tower_blocks=1,
        pos_embed=True,
        init_from=str(tmp_path / "a"),
        stage_fractions=(0.0, 0.0),
    )
    start = train(tmp_path / "b", tuned_cfg, "cpu", resume=False, minutes=None)
    old, _ = load_native(first)
    new, _ = load_native(start)
    assert new.cfg.vision.tiny_blocks == 1 and old.cfg.vision.tiny_blocks == 0
    assert new.cfg.vision.tiny_pos_embed and not old.cfg.vision.tiny_pos_embed
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(old.encoder(frames), new.encoder(frames))
    tuned = train(
        tmp_path / "c", dataclasses.replace(tuned_cfg, steps=2), "cpu", resume=False, minutes=None
    )
    block = load_file(str(Path(tuned) / "model.safetensors"))
    assert any(".tower.convs.6.conv." in k and block[k].abs().sum() > 0 for k in block)
    pos = [block[k] for k in block if k.endswith(".tower.pos")]
    assert len(pos) == 1 and pos[0].shape == (64, 96) and pos[0].abs().sum() > 0

    with pytest.raises(OnsightError, match="neither a train-demo run .* nor a native checkpoint"):
        bad = dataclasses.replace(tuned_cfg, init_from=str(tmp_path / "nowhere"))
        train(tmp_path / "d", bad, "cpu", resume=False, minutes=None)


def test_warm_start_from_a_native_checkpoint(tmp_path):
    """--init-from engines/demo-checkpoint: a native checkpoint (no train_state.pt, no
    auxiliary heads) starts a run that computes exactly what the checkpoint does; with
    --pooled-last the same weights read the pooled token after the grid cells."""
    from onsight.exporter.demo.objective import batched_logits
    from onsight.exporter.demo.train import train
    from onsight.exporter.model import load_native

    torch.set_num_threads(1)
    base = TrainConfig(seed=3, steps=2, batch_size=2, num_frames=6, warmup=1, gate="straight")
    native = train(tmp_path / "a", base, "cpu", resume=False, minutes=None)
    assert not (Path(native) / "train_state.pt").exists()
    old = load_native(native)[0]
    src = make_source(str(tmp_path / "a" / "tokenizer.json"), base, 10)
    b = to_tensors(src.batch(0, 2), "cpu")
    args = (b["ids"], b["frames"], b["frame_pos"])
    for pooled_last in (False, True):
        warm = dataclasses.replace(
            base, steps=0, init_from=str(native), pooled_last=pooled_last, keep_last=pooled_last
        )
        new = load_native(train(tmp_path / f"b{pooled_last}", warm, "cpu", False, None))[0]
        assert (tmp_path / f"b{pooled_last}" / "tokenizer.json").read_text() == (
            Path(native) / "tokenizer.json"
        ).read_text()
        frames = b["frames"].flatten(0, 1)
        with torch.no_grad():
            if not pooled_last:
                assert torch.equal(batched_logits(old, *args), batched_logits(new, *args))
                continue
            assert new.cfg.vision.pooled_last and new.cfg.mod.keep_last
            # the same tokens, the pooled one moved from first to last
            assert torch.equal(new.encoder(frames), old.encoder(frames).roll(-1, dims=1))
    tuned = dataclasses.replace(base, init_from=str(native), pooled_last=True)
    train(tmp_path / "c", tuned, "cpu", resume=False, minutes=None)  # trains from there


def test_pooled_last_puts_the_per_token_targets_in_the_model_order():
    """Targets are built pooled token first; a pooled-last model reads them rolled, so the
    whole-frame target sits on its last token and cell c's on token c - 1."""
    from onsight.exporter.demo.objective import in_token_order

    aux = torch.arange(2 * 3 * 10, dtype=torch.float32).view(2, 3, 10, 1)
    batch = {"aux": aux, "change": aux.clone(), "actor": aux[..., 0].clone(), "ids": aux}
    assert in_token_order(batch, False) is batch
    moved = in_token_order(batch, True)
    for key in ("aux", "change", "actor"):
        assert torch.equal(moved[key][:, :, -1], batch[key][:, :, 0])  # the pooled token
        assert torch.equal(moved[key][:, :, :-1], batch[key][:, :, 1:])  # cells 1..9
    assert moved["ids"] is batch["ids"]


def test_warm_start_deepens_the_decoder_without_changing_the_model(tmp_path):
    """--decoder-layers 6 --init-from a 4-layer run: the two new layers (a dense one and a
    routed one with its LayerExpert) start as identity, so the model computes exactly what
    the earlier one did; a shallower model than the earlier run's is refused."""
    from onsight.exporter.demo.objective import batched_logits
    from onsight.exporter.demo.train import load_run_model, train
    from onsight.exporter.model import load_native

    torch.set_num_threads(1)
    base = TrainConfig(seed=3, steps=2, batch_size=2, num_frames=6, warmup=1, gate="straight")
    train(tmp_path / "a", base, "cpu", resume=False, minutes=None)
    deep = dataclasses.replace(base, steps=0, decoder_layers=6, init_from=str(tmp_path / "a"))
    old = load_run_model(tmp_path / "a").eval()
    new = load_native(train(tmp_path / "b", deep, "cpu", resume=False, minutes=None))[0].eval()
    assert len(new.decoder.layers) == 6 and new.cfg.mod.layers == (1, 3, 5)
    src = make_source(str(tmp_path / "a" / "tokenizer.json"), base, 10)
    b = to_tensors(src.batch(0, 2), "cpu")
    with torch.no_grad():
        args = (b["ids"], b["frames"], b["frame_pos"])
        assert torch.equal(batched_logits(old, *args), batched_logits(new, *args))
    with pytest.raises(OnsightError, match="--decoder-layers at least"):
        shallow = dataclasses.replace(base, decoder_layers=2, init_from=str(tmp_path / "a"))
        train(tmp_path / "c", shallow, "cpu", resume=False, minutes=None)


def test_router_loss_ranks_the_cells_where_something_happens():
    from onsight.exporter.demo.data import AUX_DIM, CHANGE_DIM
    from onsight.exporter.demo.objective import router_loss

    change = torch.zeros(1, 2, 10, CHANGE_DIM)
    change[0, 0, 4, -1] = 1.0  # frame 0: an object moves in cell 4 (token 4)
    batch = {"change": change, "aux": torch.zeros(1, 2, 10, AUX_DIM)}
    right = torch.zeros(1, 2, 10)
    right[0, 0, 4] = 5.0
    wrong = torch.zeros(1, 2, 10)
    wrong[0, 0, 7] = 5.0
    assert router_loss([right], batch) < 0.1 < router_loss([wrong], batch)
    # shift-invariant: it ranks tokens, it does not move the gate's level
    assert torch.isclose(router_loss([right + 3.0], batch), router_loss([right], batch))
    assert router_loss([wrong], {"change": torch.zeros_like(change), "aux": batch["aux"]}) == 0


def cell(o, w, h):
    """The 3x3 grid token of an object's centre, clamped into the frame (data._cell)."""
    return 1 + min(2, max(0, int(o.y * 3 // h))) * 3 + min(2, max(0, int(o.x * 3 // w)))


def test_actor_targets_name_the_object_a_narration_is_about():
    from onsight.exporter.demo.data import actor_targets
    from onsight.runtime.synthetic import curriculum, generate_stream

    checked = 0
    for seed in range(6):
        stream = generate_stream(seed, 24, curriculum(2))
        target = actor_targets(stream)
        w, h = stream.config.width, stream.config.height
        for e in stream.events:
            goal = set(target[e.frame_index].nonzero()[0].tolist())
            if e.object_id is None:
                assert 0 in goal  # a global event: the pooled whole-frame token
                continue
            assert 0 not in goal
            before = stream.states[e.frame_index - 1] if e.frame_index else None
            for state in (stream.states[e.frame_index], before):
                actor = [o for o in (state.objects if state else ()) if o.object_id == e.object_id]
                if actor:
                    assert cell(actor[0], w, h) in goal
                    break
            # besides the actor, only cells with a moving object: never a still bystander
            moving = {cell(o, w, h) for o in stream.states[e.frame_index].objects if o.moving}
            assert len(goal - moving) <= 1
            checked += 1
    assert checked >= 10


def test_router_loss_with_the_actor_target():
    from onsight.exporter.demo.objective import router_loss

    actor = torch.zeros(1, 2, 10)
    actor[0, 1, 6] = 1.0  # frame 1: the narration is about the object in cell 6
    batch = {"actor": actor}
    right = torch.zeros(1, 2, 10)
    right[0, 1, 6] = 6.0
    pooled = torch.zeros(1, 2, 10)
    pooled[0, 1, 0] = 6.0
    assert router_loss([right], batch, "actor") < 0.1 < router_loss([pooled], batch, "actor")
    with pytest.raises(ValueError, match="router target 'nearest'"):
        router_loss([right], batch, "nearest")


def test_router_loss_with_the_onset_target():
    """ "onset": the scene target, except on a just-begun move's frames, where only the mover's
    cell and the pooled token count (a still object's cell there is no longer a goal)."""
    from onsight.exporter.demo.data import AUX_DIM, CHANGE_DIM, COLOURS
    from onsight.exporter.demo.objective import router_loss

    change = torch.zeros(1, 2, 10, CHANGE_DIM)
    change[0, :, 4, -1] = change[0, :, 0, -1] = 1.0  # both frames: something moves in cell 4
    change[0, 1, :, 0] = 1.0  # frame 1: an event, so every occupied cell is a scene goal
    aux = torch.zeros(1, 2, 10, AUX_DIM)
    aux[0, :, 7, COLOURS.index("red")] = 1.0  # a still object in cell 7
    onset = torch.zeros(1, 2, 10)
    onset[0, 1, 4] = onset[0, 1, 0] = 1.0  # frame 1: the move began
    batch = {"change": change, "aux": aux, "onset": onset}
    mover = torch.zeros(1, 2, 10)
    mover[0, :, 4] = mover[0, :, 0] = 6.0
    still = mover.clone()
    still[0, :, 7] = 6.0
    assert router_loss([mover], batch, "onset") < router_loss([still], batch, "onset")
    # the scene target wants the still object's cell at the event frame too
    assert router_loss([still], batch, "scene") < router_loss([mover], batch, "scene")
    no_onset = {**batch, "onset": torch.zeros_like(onset)}
    assert torch.isclose(router_loss([still], no_onset, "onset"), router_loss([still], batch))


def test_distillation_pulls_toward_the_teacher_and_needs_its_tokenizer(tmp_path):
    """--distill-from: the KL toward a teacher is 0 for a copy of the student, positive for
    another model, and enters the logged loss; a teacher with other token ids is refused."""
    import json as _json

    from onsight.exporter.demo.objective import compute_loss
    from onsight.exporter.demo.train import load_run_model, make_source, to_tensors, train

    torch.set_num_threads(1)
    base = TrainConfig(seed=3, steps=2, batch_size=2, num_frames=6, warmup=1)
    train(tmp_path / "twin", dataclasses.replace(base, keep_ratio=1.0), "cpu", False, None)
    train(tmp_path / "a", base, "cpu", resume=False, minutes=None)
    student, twin = load_run_model(tmp_path / "a"), load_run_model(tmp_path / "twin")
    src = make_source(str(tmp_path / "a" / "tokenizer.json"), base, student.cfg.tokens_per_frame)
    batch = to_tensors(src.batch(0, 2), "cpu")
    iid = src.template.interval_id
    with torch.no_grad():
        same = compute_loss(student, batch, iid, 3.0, 0.5, teacher=student, distill_weight=1.0)
        other = compute_loss(student, batch, iid, 3.0, 0.5, teacher=twin, distill_weight=1.0)
        plain = compute_loss(student, batch, iid, 3.0, 0.5)
    assert abs(same.distill) < 1e-5 and other.distill > 1e-3 and plain.distill == 0
    assert float(other.total) == pytest.approx(float(plain.total) + other.distill, rel=1e-5)

    kd = dataclasses.replace(base, distill_from=str(tmp_path / "twin"), distill_weight=1.0)
    train(tmp_path / "b", kd, "cpu", resume=False, minutes=None)
    logged = [_json.loads(line) for line in (tmp_path / "b" / "log.jsonl").open()]
    assert len(logged) == 2 and all(r["distill"] > 0 for r in logged)

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer.json").write_text('{"other": "ids"}')
    with pytest.raises(OnsightError, match="tokenizer differs"):
        train(tmp_path / "c", kd, "cpu", resume=False, minutes=None)


def test_straight_through_gate_gives_kept_tokens_the_whole_update(demo_tok):
    """--gate straight: forward, a kept token takes x + block(x) - x whatever its score (the
    router cannot switch a layer off); backward, the router still gets the sigmoid's gradient."""
    from onsight.exporter.demo.objective import batched_hidden

    path, _, _ = demo_tok
    src = make_source(str(path), TrainConfig(batch_size=2, num_frames=4), 10)
    t = to_tensors(src.batch(1, stage=2), "cpu")
    hidden, grads = {}, {}
    for gate in ("sigmoid", "straight"):
        model = build_model(path, TrainConfig(keep_ratio=0.2, seed=0, gate=gate))
        for expert in model.decoder.experts.values():  # gates near 0 under sigmoid
            torch.nn.init.zeros_(expert.proj.weight)
            torch.nn.init.constant_(expert.proj.bias, -8.0)
        x = batched_hidden(model, t["ids"], t["frames"], t["frame_pos"])
        x.pow(2).mean().backward()
        hidden[gate] = x.detach()
        grads[gate] = model.decoder.experts["1"].proj.bias.grad
    assert not torch.allclose(hidden["sigmoid"], hidden["straight"], atol=1e-4)
    assert grads["straight"] is not None and float(grads["straight"].abs()) > 0
    with pytest.raises(ValueError, match="unknown gate"):
        ModConfig(0.2, (1, 3), "learned", gate="soft")


def test_keep_ratio_anneal_lowers_k_then_ships_the_configured_ratio(tmp_path):
    """--anneal-keep-ratio: routed layers keep every token at first and k falls linearly to
    the configured ratio; the routers learn through the dense steps too (their loss is
    logged from step one); the saved model routes at the configured ratio."""
    import json

    from onsight.exporter.demo.train import keep_ratio_at, main, train
    from onsight.exporter.model import load_native

    cfg = TrainConfig(keep_ratio=0.2, steps=10, anneal_steps=4)
    assert [keep_ratio_at(cfg, s) for s in (0, 2, 4, 9)] == [1.0, 0.6, 0.2, 0.2]
    torch.set_num_threads(1)
    run = dataclasses.replace(
        cfg, seed=3, steps=6, batch_size=2, num_frames=6, warmup=1, gate="straight",
        router_weight=1.0,
    )  # fmt: skip
    native = train(tmp_path / "a", run, "cpu", resume=False, minutes=None)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["k"] for r in log] == [10, 8, 6, 4, 2, 2]
    scene_only = TrainConfig(seed=3, steps=1, batch_size=2, num_frames=6, keep_ratio=1.0)
    train(tmp_path / "b", scene_only, "cpu", resume=False, minutes=None)
    b = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[0])
    assert log[0]["aux"] > b["aux"] + 0.5  # the router loss (~1 at init) counts while dense
    model = load_native(native)[0]
    assert model.cfg.mod.keep_ratio == 0.2 and model.decoder.k == 2
    with pytest.raises(OnsightError, match="nothing to anneal"):
        main(["--out", str(tmp_path / "c"), "--full-compute", "--anneal-keep-ratio", "5"])
    with pytest.raises(OnsightError, match="keeps every token"):
        main(["--out", str(tmp_path / "c"), "--full-compute", "--keep-last"])
    with pytest.raises(OnsightError, match="between 0 and --steps"):
        main(["--out", str(tmp_path / "c"), "--steps", "4", "--anneal-keep-ratio", "5"])


def test_mover_questions_reach_the_training_batches(tmp_path):
    """--mover-questions P: the run's config keeps P, and its batches carry "what colour /
    shape is the moving object?" turns; out-of-range P is refused before any work."""
    import json

    from onsight.exporter.demo.data import stage_config
    from onsight.exporter.demo.train_args import config_from_args, parse_args
    from onsight.runtime.synthetic import generate_stream

    args = parse_args(
        ["--out", str(tmp_path / "r"), "--mover-questions", "0.5", "--onset-questions", "1"]
    )
    cfg = config_from_args(args)
    assert (cfg.mover_questions, cfg.onset_questions) == (0.5, 1.0)
    assert TrainConfig.from_json(json.dumps(dataclasses.asdict(cfg))).mover_questions == 0.5
    world = stage_config(2, 0.15, cfg.mover_questions)
    asked = [q.text for seed in range(6) for q in generate_stream(seed, 24, world).questions]
    assert "what colour is the moving object?" in asked
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "r"), "--mover-questions", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "r"), "--onset-questions", "-1"])


def test_warm_start_between_change_targets_starts_the_mid_head_fresh(tmp_path, caplog):
    """--init-from a run whose --change-layer head reads the change targets into one that reads
    the onset (a head of another width), and back: the head starts fresh, said in the log."""
    from onsight.exporter.demo.train import train

    torch.set_num_threads(1)
    base = TrainConfig(seed=3, steps=1, batch_size=2, num_frames=6, warmup=1, change_layer=2)
    train(tmp_path / "a", base, "cpu", resume=False, minutes=None)
    onset = dataclasses.replace(base, change_target="onset", init_from=str(tmp_path / "a"))
    with caplog.at_level("INFO", logger="onsight.exporter.demo.run_files"):
        train(tmp_path / "b", onset, "cpu", resume=False, minutes=None)
    assert "auxiliary heads ['change_mid'] differ" in caplog.text
    back = dataclasses.replace(base, init_from=str(tmp_path / "b"))
    train(tmp_path / "c", back, "cpu", resume=False, minutes=None)


def test_warm_start_with_other_routed_layers(tmp_path):
    """--mod-layers interleaved-even from a run that routed 1, 3 (e.g. the twin's weights):
    everything but the routers carries over; the routers of layers 0 and 2 start fresh."""
    from onsight.exporter.demo.train import train
    from onsight.exporter.model import load_native

    torch.set_num_threads(1)
    base = TrainConfig(seed=3, steps=1, batch_size=2, num_frames=6, warmup=1, keep_ratio=1.0)
    first = train(tmp_path / "a", base, "cpu", resume=False, minutes=None)
    even = dataclasses.replace(
        base, steps=0, keep_ratio=0.2, mod_layers="interleaved-even", init_from=str(tmp_path / "a")
    )
    start = train(tmp_path / "b", even, "cpu", resume=False, minutes=None)
    (old, _), (new, _) = load_native(first), load_native(start)
    assert new.decoder.routed == (0, 2) and sorted(new.decoder.experts) == ["0", "2"]
    old_sd, new_sd = old.state_dict(), new.state_dict()
    shared = [k for k in new_sd if ".experts." not in k]
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in shared)


def test_onset_targets_mark_a_move_on_the_frames_it_is_narrated():
    """onset_targets: the mover's cell and the pooled token on a move's event frame and the
    frame after it (while it moves); nothing on other frames, never a still object's cell."""
    from onsight.exporter.demo.data import onset_targets
    from onsight.runtime.synthetic import EventKind, curriculum, generate_stream

    moves = 0
    for seed in range(8):
        stream = generate_stream(seed, 24, curriculum(2))
        target = onset_targets(stream)
        w, h = stream.config.width, stream.config.height
        expected = np.zeros_like(target)
        for e in stream.events:
            if e.kind is not EventKind.MOVE:
                continue
            moves += 1
            for f in (e.frame_index, e.frame_index + 1):
                mover = [
                    o
                    for o in (stream.states[f].objects if f < stream.num_frames else ())
                    if o.object_id == e.object_id and o.moving
                ]
                if mover:
                    expected[f, 0] = expected[f, cell(mover[0], w, h)] = 1.0
        assert np.array_equal(target, expected)
        for f in target[:, 0].nonzero()[0]:  # every marked cell shows a moving object
            moving = {cell(o, w, h) for o in stream.states[f].objects if o.moving}
            assert set(target[f, 1:].nonzero()[0] + 1) <= moving
    assert moves >= 5


def test_onset_head_reads_the_onset_targets_weighed_up(demo_tok):
    """--change-target onset: a one-output head at --change-layer reads onset_targets with its
    rare positives weighed up; without --change-layer the flag is refused with what to add."""
    import torch.nn.functional as F
    from torch import nn

    from onsight.exporter.demo.objective import (
        ONSET_POS_WEIGHT,
        batched_hidden,
        compute_loss,
        rms_normalise,
    )
    from onsight.exporter.demo.train_args import config_from_args, parse_args

    path, _, tok = demo_tok
    src = make_source(str(path), TrainConfig(batch_size=2, num_frames=8), 10)
    t = to_tensors(src.batch(3, stage=2), "cpu")
    assert t["onset"].shape == t["actor"].shape
    model = build_model(path, TrainConfig(keep_ratio=0.2, seed=0, gate="straight"))
    head = nn.Linear(model.cfg.llm_hidden, 1)
    interval = tok.token_to_id(",")
    base = compute_loss(model, t, interval, 3.0, 0.5, aux_head=None)
    mid = (2, head, "onset")
    with_onset = compute_loss(model, t, interval, 3.0, 0.5, aux_head=None, change_mid=mid)
    taps = {2: None}
    batched_hidden(model, t["ids"], t["frames"], t["frame_pos"], taps=taps)
    fp = t["frame_pos"].flatten(1)
    xv = taps[2].gather(1, fp[..., None].expand(-1, -1, taps[2].shape[-1])).float()
    pred = head(rms_normalise(xv)).view(t["onset"].shape)
    weight = torch.tensor(ONSET_POS_WEIGHT)
    want = F.binary_cross_entropy_with_logits(pred, t["onset"], pos_weight=weight)
    assert abs(with_onset.aux - float(want.detach())) < 1e-5 and base.aux == 0.0
    args = parse_args(["--out", "x", "--change-target", "onset"])
    with pytest.raises(OnsightError, match="--change-target onset needs --change-layer"):
        config_from_args(args)


def test_mod_layers_takes_a_list_for_diagnostics_and_names_a_bad_one():
    from onsight.exporter.demo.train_args import config_from_args, parse_args

    assert config_from_args(parse_args(["--out", "x", "--mod-layers", "3"])).mod_layers == "3"
    for bad, said in [("7", r"layers \[7\] do not exist"), ("odd", "a list like 1,3,5")]:
        with pytest.raises(OnsightError, match=said):
            config_from_args(parse_args(["--out", "x", "--mod-layers", bad]))


def test_change_targets_read_where_text_still_reads_every_vision_token(demo_tok, tmp_path):
    """--change-layer 2: a second change head reads the vision tokens' states at the input of
    layer 2 (the last layer every token's key reaches, with LayerExperts on 1 and 3); its loss
    trains only the layers before it, and out-of-range layers are refused."""
    from torch import nn

    from onsight.exporter.demo.data import CHANGE_DIM
    from onsight.exporter.demo.objective import batched_hidden, compute_loss
    from onsight.exporter.demo.train import train

    path, _, tok = demo_tok
    src = make_source(str(path), TrainConfig(batch_size=2, num_frames=4), 10)
    t = to_tensors(src.batch(1, stage=2), "cpu")
    model = build_model(path, TrainConfig(keep_ratio=0.2, seed=0, gate="straight"))
    taps = {2: None}
    batched_hidden(model, t["ids"], t["frames"], t["frame_pos"], taps=taps)
    assert taps[2] is not None and taps[2].shape == (*t["ids"].shape, model.cfg.llm_hidden)
    head = nn.Linear(model.cfg.llm_hidden, CHANGE_DIM)
    interval = tok.token_to_id(",")
    base = compute_loss(model, t, interval, 3.0, 0.5, aux_head=None)
    with_mid = compute_loss(model, t, interval, 3.0, 0.5, aux_head=None, change_mid=(2, head))
    assert with_mid.aux > base.aux == 0.0  # the mid head's loss is counted
    model.zero_grad()
    (with_mid.total - base.total).backward()  # the mid head's loss alone: the rest cancels
    layers = model.decoder.layers
    before = float(layers[0].mlp.down_proj.weight.grad.abs().max())
    after = [layers[2].mlp.down_proj.weight, layers[3].mlp.down_proj.weight]
    after.append(model.decoder.lm_head.weight)
    assert before > 1e-6
    assert all(float(p.grad.abs().max()) < 1e-4 * before for p in after)  # rounding only
    with pytest.raises(OnsightError, match="--change-layer 4: give a decoder layer in 1..3"):
        bad = TrainConfig(seed=3, steps=1, batch_size=2, num_frames=4, change_layer=4)
        train(tmp_path / "bad", bad, "cpu", resume=False, minutes=None)


def test_name_weight_weighs_the_words_that_name_an_object(demo_tok):
    """--name-weight W: the LM loss is a weighted mean with the colour and shape words at W and
    every other word at 1; W = 1 is the plain mean."""
    import torch.nn.functional as F

    from onsight.exporter.demo.data import IGNORE
    from onsight.exporter.demo.objective import batched_hidden, compute_loss
    from onsight.exporter.demo.train import naming_token_ids

    path, _, tok = demo_tok
    ids = naming_token_ids(path)
    words = {tok.id_to_token(i).lstrip("Ġ") for i in ids.tolist()}
    assert {"red", "purple", "circle", "ring"} <= words and "moves" not in words
    src = make_source(str(path), TrainConfig(batch_size=2, num_frames=6), 10)
    t = to_tensors(src.batch(2, stage=2), "cpu")
    model = build_model(path, TrainConfig(keep_ratio=0.2, seed=0, gate="straight")).eval()
    interval = tok.token_to_id(",")
    with torch.no_grad():
        plain = compute_loss(model, t, interval, 3.0, 0.5, name_ids=ids, name_weight=1.0).lm
        heavy = compute_loss(model, t, interval, 3.0, 0.5, name_ids=ids, name_weight=4.0).lm
        dec = model.decoder
        x = batched_hidden(model, t["ids"], t["frames"], t["frame_pos"])
        mask = t["labels"] != IGNORE
        y = t["labels"][mask]
        ce = F.cross_entropy(dec.lm_head(dec.final_norm(x[mask])).float(), y, reduction="none")
    named = torch.isin(y, ids)
    assert named.any() and (~named).any()
    w = 1.0 + 3.0 * named.float()
    assert plain == pytest.approx(float(ce.mean()), rel=1e-5)
    assert heavy == pytest.approx(float((w * ce).sum() / w.sum()), rel=1e-5)


def test_motion_probe_reports_every_layer(tmp_path):
    """probe --motion: per decoder layer input and at the end, recall on moving tokens,
    accuracy on static ones, and recall at a move's onset, all rates."""
    from onsight.exporter.demo.probe import probe_motion
    from onsight.exporter.demo.train import train

    torch.set_num_threads(1)
    cfg = TrainConfig(seed=3, steps=1, batch_size=2, num_frames=6, warmup=1, gate="straight")
    native = train(tmp_path / "a", cfg, "cpu", resume=False, minutes=None)
    got = probe_motion(str(native), streams=8, steps=5)
    assert set(got) == {"onset_tokens", "layer 1", "layer 2", "layer 3", "final"}
    for name in ("layer 1", "layer 2", "layer 3", "final"):
        assert set(got[name]) == {"moving_recall", "static_accuracy", "onset_recall"}
        assert all(0.0 <= v <= 1.0 for v in got[name].values())


def test_narration_delay_moves_the_chosen_kinds_speak_frames(demo_tok):
    """--narration-delay 1 --delay-kinds move: a move is narrated (speak label, narration
    tokens) one frame after its event frame and stays silent on it; other kinds do not move;
    a delay that would reach the next event, or an unknown kind, is refused with the reason."""
    from onsight.exporter.demo.data import NarrationDelay, narration_frames
    from onsight.runtime.synthetic import curriculum, generate_stream

    path, _, tok = demo_tok
    close, interval = tok.token_to_id("]"), tok.token_to_id(",")
    plain = make_source(str(path), TrainConfig(batch_size=4, num_frames=24), 10)
    late = dataclasses.replace(plain, delay=NarrationDelay.parse(1, "move"))
    seen = 0
    for step in range(4):
        a, b = plain.batch(step, stage=2), late.batch(step, stage=2)
        seeds = np.random.default_rng([plain.seed, step]).integers(0, 100_000, 4)
        for i, seed in enumerate(seeds):
            stream = generate_stream(int(seed), 24, curriculum(2))
            for e in stream.events:
                f = e.frame_index
                assert a.stream_label[i, f] == close
                if e.kind.value == "move" and f + 1 < 24:
                    assert b.stream_label[i, f] == interval and b.stream_label[i, f + 1] == close
                    seen += 1
                elif e.kind.value != "move":
                    assert b.stream_label[i, f] == close
            assert (a.stream_label[i] == close).sum() >= (b.stream_label[i] == close).sum()
    assert seen >= 2
    stream = generate_stream(7, 24, curriculum(2))
    with pytest.raises(ValueError, match="reaches the next event"):
        narration_frames(stream, NarrationDelay(3, ("move",)))
    with pytest.raises(ValueError, match="unknown event kind"):
        NarrationDelay.parse(1, "move,jump")
    assert NarrationDelay.parse(1, "all").kinds[0] == "enter"
    assert NarrationDelay.parse(0, "all") == NarrationDelay()
    # the CLI's checks: kinds only with a delay, below the event gap, at least one known kind
    from onsight.exporter.demo.train_args import narration_delay

    assert narration_delay(1, None) == NarrationDelay(1, ("move",))
    assert narration_delay(0, None) == NarrationDelay()
    for frames, kinds, says in (
        (0, "leave", "does nothing without --narration-delay"),
        (3, None, "give 0 to 2 frames"),
        (1, "jump", "unknown event kind"),
        (1, ",", "is empty"),
    ):
        with pytest.raises(OnsightError, match=says):
            narration_delay(frames, kinds)


def test_snapshot_keeps_the_run_config_and_eval_narrates_where_it_was_trained_to(tmp_path):
    """A snapshot carries train_config.json; the teacher-forced eval reads its narration delay
    and lays the narrations out there (a checkpoint without one: on the event frame)."""
    import shutil

    from onsight.exporter.demo.data import NarrationDelay
    from onsight.exporter.demo.evaluate import held_out_streams
    from onsight.exporter.demo.teacher_forced import teacher_forced_metrics
    from onsight.exporter.demo.train import snapshot, train
    from onsight.exporter.demo.train_config import CONFIG_FILE, checkpoint_delay
    from onsight.runtime.errors import CheckpointError

    torch.set_num_threads(1)
    tcfg = TrainConfig(seed=3, steps=2, batch_size=2, num_frames=6, warmup=1)
    tcfg = dataclasses.replace(tcfg, narration_delay=1, delay_kinds="move,leave")
    native = train(tmp_path / "run", tcfg, "cpu", resume=False, minutes=None)
    assert checkpoint_delay(native) == NarrationDelay(1, ("move", "leave"))  # end-of-run too
    ckpt = snapshot(tmp_path / "run", tmp_path / "ckpt", threshold=0.5)
    assert TrainConfig.from_json((ckpt / CONFIG_FILE).read_text()) == tcfg
    umask = os.umask(0)
    os.umask(umask)
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~umask  # as a plain mkdir, not mkdtemp's 0700
    assert checkpoint_delay(ckpt).frames == 1 and checkpoint_delay(ckpt).kinds == ("move", "leave")
    plain = shutil.copytree(ckpt, tmp_path / "plain")
    (plain / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a train-demo config"):
        checkpoint_delay(plain)
    (plain / CONFIG_FILE).unlink()
    assert checkpoint_delay(plain).frames == 0
    data = [
        s
        for s in held_out_streams(streams=6, frames=20)
        if any(e.kind.value in ("move", "leave") and e.frame_index < 19 for e in s.events)
    ]
    assert data
    late, on_time = teacher_forced_metrics(ckpt, data), teacher_forced_metrics(plain, data)
    assert late.n_turns == on_time.n_turns  # the same narrations, laid out elsewhere
    assert late.perplexity != on_time.perplexity


def test_resume_says_which_new_flags_it_ignores(tmp_path, caplog):
    """--resume continues with the run's saved settings; flags that differ are named."""
    from onsight.exporter.demo.train import train

    torch.set_num_threads(1)
    tcfg = TrainConfig(seed=3, steps=2, batch_size=2, num_frames=6, warmup=1)
    with caplog.at_level("WARNING"):  # nothing to resume yet: say so, then start
        train(tmp_path / "run", tcfg, "cpu", resume=True, minutes=None)
    assert "nothing saved in" in caplog.text and "starting a new run" in caplog.text
    caplog.clear()
    other = dataclasses.replace(tcfg, narration_delay=1, delay_kinds="move", lr=1e-4)
    with caplog.at_level("WARNING"):
        train(tmp_path / "run", other, "cpu", resume=True, minutes=None, extend_to=3)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "lr, narration_delay, delay_kinds" in said and "start a new --out" in said


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--steps", "0"], "--steps 0: give at least 1"),
        (["--lr", "-1"], "--lr -1.0: the learning rate must be positive"),
        (["--keep-ratio", "0"], "give a ratio in (0, 1]"),
        (["--batch-size", "0"], "--batch-size 0: give at least 1"),
        (["--speak-weight", "-1"], "a loss weight is 0 or more"),
    ],
)
def test_train_demo_refuses_numbers_out_of_range(argv, said, capsys):
    from onsight.exporter.demo.train_args import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_train_demo_refuses_a_file_as_its_run_directory(tmp_path, capsys):
    from onsight.exporter.demo.train_args import parse_args

    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "f")])
    assert "is a file; give a run directory" in capsys.readouterr().err


def test_train_demo_refusals_are_onsight_errors_with_exit_2(tmp_path, capsys):
    """An existing run without --resume, or contradictory flags: `onsight: error: ...`, exit 2,
    and the run directory untouched."""
    from onsight.runtime.cli import main

    run = tmp_path / "t1"
    run.mkdir()
    (run / "train_state.pt").write_bytes(b"an earlier run")
    assert main(["train-demo", "--out", str(run), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert f"onsight: error: {run / 'train_state.pt'} exists: pass --resume" in err
    assert sorted(p.name for p in run.iterdir()) == ["train_state.pt"]
    argv = ["train-demo", "--out", str(tmp_path / "t2"), "--keep-last", "--full-compute"]
    assert main(argv) == 2
    assert "onsight: error: --keep-last chooses which tokens" in capsys.readouterr().err
