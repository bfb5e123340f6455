"""The PyTorch reference: parity with transformers, cached steps vs no-cache recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import llama_config

from onsight.exporter.config import ModConfig, ModelConfig, PreprocessConfig, VisionConfig
from onsight.exporter.model import StreamingModel
from onsight.exporter.reference import Segment, TorchStepper, recompute_logits, reference_loop
from onsight.runtime.kv_policy import EvictionPolicy


class Recorder:
    """A Stepper that records every step's input and logits."""

    def __init__(self, inner):
        self.inner, self.log = inner, []

    def text(self, ids, kind, group):
        out = self.inner.text(ids, kind, group)
        self.log.append((Segment(ids=tuple(ids)), out))
        return out

    def frame(self, ids, embeds, group):
        out = self.inner.frame(ids, embeds, group)
        self.log.append((Segment(ids=tuple(ids)), None))
        self.log.append((Segment(frame=embeds), out))
        return out


def make_model(vocab, arch="LlamaForCausalLM", r=1.0, router="novelty", experts=False, seed=0):
    cfg = ModelConfig(
        decoder=llama_config(vocab, arch),
        vision=VisionConfig(kind="tiny", hidden_size=32, tiny_channels=(8, 16)),
        preprocess=PreprocessConfig(image_size=32),
        mod=ModConfig(keep_ratio=r, layers=(1, 3), router=router),
        has_layer_experts=experts,
    )
    torch.manual_seed(seed)
    m = StreamingModel(cfg).eval()
    if experts:  # make routers decisive so learned routing differs from norm routing
        for e in m.decoder.experts.values():
            torch.nn.init.normal_(e.proj.weight, std=1.0)
    return m


def run_stream(model, tok_path, frames=8, question_at=3, capacity=4096, max_new=4):
    loop = reference_loop(model, tok_path, capacity=capacity, max_new_tokens=max_new)
    rec = Recorder(loop.stepper)
    loop.stepper = rec
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (frames, 32, 32, 3), dtype=torch.uint8)
    embeds = model.encode_frames(pixels).numpy()
    outcomes = []
    for f in range(frames):
        if f == question_at:
            loop.ask("what is on the table?")
        outcomes.append(loop.on_frame(embeds[f]))
    return loop, rec, outcomes


def segments_and_logits(rec):
    segs = [s for s, _ in rec.log if s.frame is not None or len(s.ids)]
    checks = [
        (i, lg)
        for i, (_, lg) in enumerate(x for x in rec.log if x[0].frame is not None or len(x[0].ids))
        if lg is not None
    ]
    return segs, checks


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_r1_training_free_equals_transformers_forward(tiny_tokenizer, arch):
    tok_path, vocab = tiny_tokenizer
    model = make_model(vocab, arch=arch, r=1.0)
    _, rec, outcomes = run_stream(model, tok_path)
    assert any(o.answers for o in outcomes)
    # the same history through transformers' own forward, <v> slots filled with frame embeds
    embeds, ends, logits = [], [], []
    emb = model.decoder.embed
    for seg, lg in rec.log:
        if seg.frame is not None:
            embeds.append(torch.from_numpy(seg.frame))
        elif seg.ids:
            embeds.append(emb(torch.tensor(seg.ids)))
        else:
            continue
        if lg is not None:
            ends.append(sum(len(e) for e in embeds) - 1)
            logits.append(lg)
    x = torch.cat(embeds)[None]
    with torch.no_grad():
        hf = model.decoder.lm(inputs_embeds=x).logits[0]
    for end, lg in zip(ends, logits):
        np.testing.assert_allclose(lg, hf[end].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "router,experts,r",
    [
        ("novelty", False, 0.2),
        ("norm", False, 0.2),
        ("learned", True, 0.2),
        ("random", False, 0.2),
        ("uniform", False, 0.2),
        ("uniform", False, 0.0),  # r = 0: vision tokens skip the routed layers
    ],
)
def test_cached_mod_steps_equal_no_cache_recompute(tiny_tokenizer, router, experts, r):
    tok_path, vocab = tiny_tokenizer
    model = make_model(vocab, r=r, router=router, experts=experts)
    _, rec, _ = run_stream(model, tok_path)
    segs = [s for s, _ in rec.log if s.frame is not None or s.ids]
    logged = [lg for s, lg in rec.log if s.frame is not None or s.ids]
    ref = recompute_logits(model, segs)
    n = 0
    for lg, r in zip(logged, ref):
        if lg is not None:
            np.testing.assert_allclose(lg, r, atol=1e-4, rtol=0)
            n += 1
    assert n > 10


def test_mod_layer_kv_lengths_are_exact(tiny_tokenizer):
    tok_path, vocab = tiny_tokenizer
    model = make_model(vocab, r=0.2)
    loop, rec, _ = run_stream(model, tok_path, frames=6)
    st = loop.stepper.inner
    n_frames = sum(1 for s, _ in rec.log if s.frame is not None)
    n_text = sum(len(s.ids) for s, _ in rec.log if s.frame is None)
    k, N = model.cfg.k, model.cfg.tokens_per_frame
    assert k == 2 and N == 10
    for i, length in enumerate(st.cache.lengths):
        if i in (1, 3):
            assert length == n_text + k * n_frames
        else:
            assert length == n_text + N * n_frames


def test_topk_is_per_frame_not_across_frames(tiny_tokenizer):
    """Each frame contributes exactly k tokens to a routed layer, even when another frame's
    tokens all score higher."""
    tok_path, vocab = tiny_tokenizer
    model = make_model(vocab, r=0.2, router="norm")
    stepper = TorchStepper(model, capacity=512)
    stepper.text([0, 5, 6], 0, 0)
    loud = np.full((10, 64), 50.0, np.float32)
    quiet = np.full((10, 64), 0.01, np.float32) + np.random.default_rng(0).normal(
        0, 1e-3, (10, 64)
    ).astype(np.float32)
    stepper.frame([7], loud, 1)
    stepper.frame([8], quiet, 2)
    table_pos = stepper.cache.positions[1][: stepper.cache.lengths[1]]
    quiet_start = 3 + 1 + 10 + 1
    assert ((table_pos >= quiet_start) & (table_pos < quiet_start + 10)).sum() == 2
    assert ((table_pos >= 4) & (table_pos < 14)).sum() == 2


def test_learned_routing_differs_only_on_routed_vision_tokens(tiny_tokenizer):
    tok_path, vocab = tiny_tokenizer
    learned = make_model(vocab, r=0.2, router="learned", experts=True)
    norm = learned.with_config(learned.cfg.replace(mod=ModConfig(0.2, (1, 3), "norm")))
    segs = [
        Segment(ids=(0, 5, 6, 7)),
        Segment(frame=np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)),
    ]
    # text before any frame: identical, since text is never routed or scaled
    a = recompute_logits(learned, segs[:1])[0]
    b = recompute_logits(norm, segs[:1])[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
    a = recompute_logits(learned, segs)[1]
    b = recompute_logits(norm, segs)[1]
    assert np.abs(a - b).max() > 1e-3


def test_r1_routed_layers_equal_dense_model(tiny_tokenizer):
    tok_path, vocab = tiny_tokenizer
    routed = make_model(vocab, r=1.0, router="norm")
    dense = routed.with_config(routed.cfg.replace(mod=ModConfig(1.0, (), "novelty")))
    segs = [
        Segment(ids=(0, 5, 6)),
        Segment(frame=np.random.default_rng(1).normal(size=(10, 64)).astype(np.float32)),
    ]
    np.testing.assert_allclose(
        recompute_logits(routed, segs)[1], recompute_logits(dense, segs)[1], atol=1e-6
    )


def test_eviction_keeps_sink_and_bounds_positions(tiny_tokenizer):
    tok_path, vocab = tiny_tokenizer
    model = make_model(vocab, r=0.2)
    loop = reference_loop(
        model, tok_path, capacity=320, max_new_tokens=3, policy=EvictionPolicy(keep_text_tokens=32)
    )
    embeds = np.random.default_rng(0).normal(size=(60, 10, 64)).astype(np.float32)
    for e in embeds:
        loop.on_frame(e)
    st = loop.stepper
    assert st.evictions >= 1
    sink = len(loop.t.sink)
    for i, n in enumerate(st.cache.lengths):
        pos = st.cache.positions[i][:n]
        assert pos.max() < 320
        assert (pos[:sink] == np.arange(sink)).all()  # the sink is never evicted
