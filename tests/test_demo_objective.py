"""The demo model's training objective: the per-token targets (scene, actor, onset), the
router loss and its targets, the mid-decoder heads, the straight-through gate, the name weight
and the narration delay."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from onsight.exporter.config import ModConfig
from onsight.exporter.demo.train import TrainConfig, build_model, make_source, to_tensors
from onsight.runtime.errors import OnsightError


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
