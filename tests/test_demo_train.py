"""The demo model's training runs: reproducible and resumable, warm starts, distillation,
the keep-ratio anneal, snapshots and train-demo's arguments."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from onsight.exporter.demo.train import TrainConfig, make_source, to_tensors
from onsight.runtime.errors import OnsightError


def _train_weights(
    out: Path, steps: int, resume: bool = False, extend_to: int | None = None, **config
):
    from safetensors.torch import load_file

    from onsight.exporter.demo.train import train

    tcfg = TrainConfig(seed=3, steps=steps, batch_size=2, num_frames=6, warmup=1, **config)
    native = train(out, tcfg, "cpu", resume=resume, minutes=None, extend_to=extend_to)
    return load_file(str(Path(native) / "model.safetensors"))


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """Training on one torch thread and on two (the shipped weights were trained on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_train_demo_reproduces_weights_from_the_seed_and_resumes_exactly(
    tmp_path, monkeypatch, torch_threads
):
    from onsight.exporter.demo import train as train_mod

    shipped = {"gate": "straight", "router_weight": 1.0}  # the shipped recipe's routing
    a = _train_weights(tmp_path / "a", 4, **shipped)
    b = _train_weights(tmp_path / "b", 4, **shipped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    real, calls = train_mod.compute_loss, []

    def ctrl_c_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "compute_loss", ctrl_c_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train_weights(tmp_path / "c", 4, **shipped)
    monkeypatch.setattr(train_mod, "compute_loss", real)
    c = _train_weights(tmp_path / "c", 4, resume=True, **shipped)  # Ctrl-C lost nothing
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


def test_mod_layers_takes_a_list_for_diagnostics_and_names_a_bad_one():
    from onsight.exporter.demo.train_args import config_from_args, parse_args

    assert config_from_args(parse_args(["--out", "x", "--mod-layers", "3"])).mod_layers == "3"
    for bad, said in [("7", r"layers \[7\] do not exist"), ("odd", "a list like 1,3,5")]:
        with pytest.raises(OnsightError, match=said):
            config_from_args(parse_args(["--out", "x", "--mod-layers", bad]))


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


def test_train_demo_on_cuda_without_a_gpu_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA GPU: the refusal is for machines without one")
    from onsight.exporter.demo.train import main

    with pytest.raises(OnsightError, match="sees no CUDA GPU.*--device cpu"):
        main(["--out", str(tmp_path / "run"), "--steps", "2", "--device", "cuda"])
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_a_short_training_run_on_cuda_lowers_the_loss_and_writes_a_cpu_checkpoint(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    import json

    from onsight.exporter.demo.train import train
    from onsight.exporter.model import load_native

    tcfg = TrainConfig(seed=3, steps=60, batch_size=4, num_frames=8, warmup=5, lr=3e-3)
    native = train(tmp_path / "run", tcfg, "cuda", resume=False, minutes=None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 60
    first = sum(r["lm"] + r["stream"] for r in log[:5])
    last = sum(r["lm"] + r["stream"] for r in log[-5:])
    assert last < 0.7 * first
    assert load_native(native)[0].decoder.k == 2
    # a machine without the GPU snapshots the CUDA run's train_state.pt (saved tensors carry
    # their device; the run files are read onto the CPU)
    import os
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    snap = tmp_path / "snap"
    cmd = [sys.executable, "-m", "onsight.runtime.cli", "train-demo"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "run"), "--snapshot", str(snap)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (snap / "model.safetensors").is_file()
