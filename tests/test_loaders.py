"""Checkpoint loaders: the three on-disk formats, parity with peft/transformers, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import save_clip, save_siglip
from ckpt_builders import (
    copy_dir,
    edit_json,
    make_connector,
    save_experts,
    save_full_siglip,
    save_llm,
    save_projector,
    save_videollm_adapter,
    tokenizer_without_v,
)
from safetensors.torch import load_file, save_file
from test_reference_model import Recorder
from tokenizers import Tokenizer

from onsight.exporter.config import ModConfig
from onsight.exporter.llm_tokenizer import prepare_tokenizer
from onsight.exporter.loaders import detect_format, load_checkpoint
from onsight.exporter.model import save_native
from onsight.exporter.reference import Segment, recompute_logits, reference_loop
from onsight.runtime.errors import CheckpointError

VISION_HIDDEN, HIDDEN = 48, 64


@pytest.fixture(scope="session")
def ck(tmp_path_factory, tiny_tokenizer) -> SimpleNamespace:
    """Every checkpoint the tests load, built once."""
    root = tmp_path_factory.mktemp("ckpts")
    tok_v, vocab = tiny_tokenizer
    tok_plain = tokenizer_without_v(tok_v, root / "tok_plain")
    base = save_llm(root / "base", vocab, tok_plain)
    return SimpleNamespace(
        root=root,
        vocab=vocab,
        tok_v=tok_v,
        tok_plain=tok_plain,
        base=base,
        siglip=save_full_siglip(root / "siglip"),
        adapter=save_videollm_adapter(root / "adapter", base, VISION_HIDDEN, tok_v),
        siglip_vision=save_siglip(root / "siglip_vision"),
        clip=save_clip(root / "clip"),
        # like Qwen2: no bos, and more embedding rows than the tokenizer has tokens
        qwen=save_llm(root / "qwen", vocab + 8, tok_plain, arch="Qwen2ForCausalLM", bos=None),
        proj=save_projector(root / "proj.safetensors", VISION_HIDDEN, HIDDEN),
        proj_seq=save_projector(
            root / "seq.safetensors", VISION_HIDDEN, HIDDEN, middle=96, naming="seq"
        ),
        experts=save_experts(root / "experts.safetensors", (1, 3), HIDDEN),
    )


@pytest.fixture(scope="session")
def compose_model(ck):
    return load_checkpoint(ck.base, vision=ck.siglip_vision, projector=ck.proj, experts=ck.experts)


def _raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(*args, **kwargs)
    return str(info.value)


# ---- detection ----


def test_detect_format(ck, compose_model, tmp_path):
    assert detect_format(ck.adapter) == "videollm-online"
    assert detect_format(ck.base) == "compose"
    native = save_native(compose_model[0], compose_model[1], tmp_path / "native")
    assert detect_format(native) == "onsight"
    with pytest.raises(CheckpointError, match="cannot tell"):
        detect_format(ck.root / "tok_plain")
    with pytest.raises(CheckpointError, match="nowhere: does not exist"):
        detect_format(tmp_path / "nowhere")


# ---- VideoLLM-online ----


def _peft_oracle(ck):
    """transformers + peft on their own: the unmerged adapter over the base, and SigLIP."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM, SiglipModel

    lm = LlamaForCausalLM.from_pretrained(ck.base, dtype=torch.float32, attn_implementation="eager")
    lm.connector = make_connector(VISION_HIDDEN, HIDDEN)
    peft_lm = PeftModel.from_pretrained(lm, ck.adapter).eval()
    return peft_lm, SiglipModel.from_pretrained(ck.siglip).vision_model.eval()


@torch.no_grad()
def _hand_frame_embeds(peft_lm, vision_model, frames: torch.Tensor) -> torch.Tensor:
    """live1+ by hand: SigLIP pooler output + adaptive_avg_pool2d(3x3) of the patch grid."""
    pixels = (frames.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    out = vision_model(pixel_values=pixels)
    b, p, c = out.last_hidden_state.shape
    side = int(p**0.5)
    grid = out.last_hidden_state.transpose(1, 2).reshape(b, c, side, side)
    grid = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # (B, 9, C) row-major
    tokens = torch.cat([out.pooler_output[:, None], grid], dim=1)
    return peft_lm.base_model.model.connector(tokens)


def test_videollm_online_stream_equals_peft_forward(ck):
    model, tok = load_checkpoint(ck.adapter, base=ck.base, vision=ck.siglip)
    assert tok == ck.adapter / "tokenizer.json"
    assert Tokenizer.from_file(str(tok)).token_to_id("<v>") == ck.vocab
    cfg = model.cfg
    assert (cfg.tokens_per_frame, cfg.vision.kind, cfg.preprocess.image_size) == (10, "siglip", 32)
    assert cfg.template.eos == "<|eot_id|>" and cfg.template.threshold == 0.725
    assert not hasattr(model.decoder.lm, "connector")
    # r = 1 on routed layers must change nothing
    model = model.with_config(cfg.replace(mod=ModConfig(1.0, (1, 3), "novelty")))

    peft_lm, vision_model = _peft_oracle(ck)
    torch.manual_seed(7)
    frames = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    embeds = _hand_frame_embeds(peft_lm, vision_model, frames)
    torch.testing.assert_close(model.encode_frames(frames), embeds, atol=1e-5, rtol=0)

    loop = reference_loop(model, tok, max_new_tokens=4)
    rec = loop.stepper = Recorder(loop.stepper)
    for f, e in enumerate(embeds.numpy()):
        if f == 2:
            loop.ask("what is on the table?")
        loop.on_frame(e)

    pieces, checks = [], []
    emb = peft_lm.get_input_embeddings()
    with torch.no_grad():
        for seg, logits in rec.log:
            if seg.frame is not None:
                pieces.append(torch.from_numpy(seg.frame))
            elif seg.ids:
                pieces.append(emb(torch.tensor(seg.ids)))
            if logits is not None:
                checks.append((sum(len(p) for p in pieces) - 1, logits))
        oracle = peft_lm(inputs_embeds=torch.cat(pieces)[None]).logits[0]
    assert len(checks) > 8
    for end, logits in checks:
        np.testing.assert_allclose(logits, oracle[end].numpy(), atol=1e-4, rtol=0)
    # the adapter really changed the base (lora_B is non-zero)
    base_q = load_file(str(ck.base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert (model.decoder.lm.model.layers[0].self_attn.q_proj.weight - base_q).abs().max() > 1e-3


def test_videollm_online_tokenizer_without_v_gets_a_copy(ck, tmp_path):
    adapter = copy_dir(ck.adapter, tmp_path / "adapter")
    (adapter / "tokenizer.json").write_bytes(ck.tok_plain.read_bytes())
    _, tok = load_checkpoint(adapter, base=ck.base, vision=ck.siglip)
    assert tok != adapter / "tokenizer.json"
    assert Tokenizer.from_file(str(tok)).token_to_id("<v>") == ck.vocab


def test_videollm_online_v_colliding_with_a_real_id(ck, tmp_path):
    bigger = save_llm(tmp_path / "bigger", ck.vocab + 8, ck.tok_plain)
    msg = _raises("collides", ck.adapter, base=bigger, vision=ck.siglip)
    assert "tokenizer.json" in msg and str(ck.vocab + 8) in msg


def test_videollm_online_needs_base_and_vision(ck):
    _raises("--base", ck.adapter, vision=ck.siglip)


# ---- LoRA targets that do not match the base ----


def test_adapter_with_more_layers_than_base(ck, tmp_path):
    short = save_llm(tmp_path / "short", ck.vocab, ck.tok_plain, layers=2)
    msg = _raises("refers to layer 2", ck.adapter, base=short, vision=ck.siglip)
    assert "adapter_model.safetensors" in msg and "layers.2." in msg and "has 2 layers" in msg


def test_adapter_shapes_not_matching_base(ck, tmp_path):
    narrow = save_llm(tmp_path / "narrow", ck.vocab, ck.tok_plain, hidden=32)
    msg = _raises("has shape", ck.adapter, base=narrow, vision=ck.siglip)
    assert "adapter_model.safetensors: key base_model.model." in msg and "--base" in msg


def test_adapter_targets_a_module_the_base_lacks(ck, tmp_path):
    adapter = copy_dir(ck.adapter, tmp_path / "adapter")
    edit_json(adapter / "adapter_config.json", target_modules=["q_proj", "c_attn"])
    msg = _raises("target_modules", adapter, base=ck.base, vision=ck.siglip)
    assert "adapter_config.json" in msg and "c_attn" in msg


def test_adapter_connector_not_matching_vision(ck, tmp_path):
    wide = save_full_siglip(tmp_path / "siglip32", hidden=32)
    msg = _raises("connector.0.weight", ck.adapter, base=ck.base, vision=wide)
    assert "--vision" in msg


# ---- compose ----


def test_compose_llama_siglip_with_experts(ck, compose_model):
    from transformers import SiglipVisionModel

    model, tok = compose_model
    cfg = model.cfg
    assert cfg.has_layer_experts and cfg.mod.layers == (1, 3) and cfg.mod.router == "learned"
    assert (cfg.template.bos, cfg.template.eos) == ("<|begin_of_text|>", "<|eot_id|>")
    assert Tokenizer.from_file(str(tok)).token_to_id("<v>") == ck.vocab  # added in a copy
    proj, experts = load_file(str(ck.proj)), load_file(str(ck.experts))
    torch.testing.assert_close(model.encoder.projector.fc1.weight, proj["fc1.weight"])
    torch.testing.assert_close(model.encoder.projector.fc2.bias, proj["fc2.bias"])
    torch.testing.assert_close(model.decoder.experts["3"].proj.weight, experts["layers.3.weight"])
    ref = SiglipVisionModel.from_pretrained(ck.siglip_vision).state_dict()
    for k, v in model.encoder.tower.model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    # routed with the loaded experts, the model runs end to end
    routed = model.with_config(cfg.replace(mod=ModConfig(0.2, (1, 3), "learned")))
    embeds = routed.encode_frames(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))[0].numpy()
    logits = recompute_logits(routed, [Segment(ids=(0, 5)), Segment(frame=embeds)])
    assert np.isfinite(logits[-1]).all()


def test_compose_qwen_clip_sequential_projector(ck):
    from transformers import CLIPVisionModel

    model, tok = load_checkpoint(ck.qwen, vision=ck.clip, projector=ck.proj_seq, fmt="compose")
    cfg = model.cfg
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.vision.kind == "clip"
    assert cfg.projector_hidden == 96 and not cfg.has_layer_experts
    assert cfg.template.bos == "" and cfg.template.eos == "<|eot_id|>"
    assert cfg.preprocess.mean[0] == pytest.approx(0.48145466)  # CLIP's own normalisation
    # the tokenizer has fewer tokens than the embedding rows: <v> takes the next free id
    assert Tokenizer.from_file(str(tok)).token_to_id("<v>") == ck.vocab
    torch.testing.assert_close(
        model.encoder.projector.fc1.weight, load_file(str(ck.proj_seq))["0.weight"]
    )
    ref = CLIPVisionModel.from_pretrained(ck.clip).state_dict()
    for k, v in model.encoder.tower.model.state_dict().items():
        torch.testing.assert_close(v, ref[k])


# ---- native ----


def test_native_round_trip(compose_model, tmp_path):
    model, tok = compose_model
    out = save_native(model, tok, tmp_path / "native")
    loaded, tok2 = load_checkpoint(out)
    assert loaded.cfg == model.cfg and tok2 == out / "tokenizer.json"
    mod = ModConfig(0.2, (1, 3), "learned")
    a, b = (m.with_config(m.cfg.replace(mod=mod)) for m in (model, loaded))
    frame = np.random.default_rng(0).normal(size=(10, HIDDEN)).astype(np.float32)
    segs = [Segment(ids=(0, 5, 6)), Segment(frame=frame), Segment(ids=(7,))]
    for x, y in zip(recompute_logits(a, segs), recompute_logits(b, segs)):
        np.testing.assert_array_equal(x, y)


# ---- malformed inputs ----


def test_missing_projector_file(ck):
    msg = _raises(
        "missing", ck.base, vision=ck.siglip_vision, projector=ck.root / "none.safetensors"
    )
    assert "none.safetensors" in msg


def test_missing_adapter_weights(ck, tmp_path):
    adapter = copy_dir(ck.adapter, tmp_path / "adapter", drop=("adapter_model.safetensors",))
    _raises("adapter_model.safetensors: missing", adapter, base=ck.base, vision=ck.siglip)


def test_bad_json(ck, tmp_path):
    llm = copy_dir(ck.base, tmp_path / "llm")
    (llm / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    msg = _raises("not valid JSON", llm, vision=ck.siglip_vision, projector=ck.proj, fmt="compose")
    assert "config.json" in msg


def test_projector_shape_mismatch(ck, tmp_path):
    bad = save_projector(
        tmp_path / "bad.safetensors", VISION_HIDDEN + 8, HIDDEN, naming="connector"
    )
    msg = _raises("'fc1.weight' has shape", ck.base, vision=ck.siglip_vision, projector=bad)
    assert "bad.safetensors" in msg and "(64, 48)" in msg


def test_projector_missing_key(ck, tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(str(ck.proj)).items() if k != "fc2.bias"}, str(path))
    _raises("'fc2.bias' is missing", ck.base, vision=ck.siglip_vision, projector=path)


def test_unsupported_architecture(ck, tmp_path):
    llm = copy_dir(ck.base, tmp_path / "llm")
    edit_json(llm / "config.json", architectures=["GPT2LMHeadModel"])
    msg = _raises("GPT2LMHeadModel", llm, vision=ck.siglip_vision, projector=ck.proj)
    assert "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM" in msg


def test_unsupported_vision_tower(ck, tmp_path):
    vision = copy_dir(ck.siglip_vision, tmp_path / "vision")
    edit_json(vision / "config.json", model_type="dinov2")
    _raises("'dinov2' is not a supported vision tower", ck.base, vision=vision, projector=ck.proj)


def test_experts_for_a_missing_layer(ck, tmp_path):
    path = save_experts(tmp_path / "e.safetensors", (1, 9), HIDDEN, naming="proj")
    _raises(
        "'9.proj.(weight|bias)' names layer 9",
        ck.base,
        vision=ck.siglip_vision,
        projector=ck.proj,
        experts=path,
    )


def test_unknown_format_name(ck):
    _raises("unknown checkpoint format", ck.base, fmt="gguf")


def test_v_declared_on_a_taken_id(ck, tmp_path):
    raw = json.loads(ck.tok_v.read_text())
    for t in raw["added_tokens"]:
        if t["content"] == "<v>":
            t["id"] = 5  # a real BPE token's id; tokenizers would silently move <v>
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="added_tokens gives <v> id 5"):
        prepare_tokenizer(path, ck.vocab, exact=False)


def test_tokenizer_larger_than_embedding(ck):
    with pytest.raises(CheckpointError, match="more tokens than the LLM's"):
        prepare_tokenizer(ck.tok_plain, ck.vocab - 1, exact=False)


def test_tokenizer_copy_is_removed_at_exit(ck):
    # the copy with <v> added must not pile up in /tmp, one per load
    code = (
        "import sys; from pathlib import Path; "
        "from onsight.exporter.llm_tokenizer import prepare_tokenizer; "
        f"out = prepare_tokenizer(Path({str(ck.tok_plain)!r}), {ck.vocab}, exact=False); "
        "assert out.is_file() and '<v>' in out.read_text(); print(out)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    copy = Path(done.stdout.strip())
    assert copy.name == "tokenizer.json" and not copy.parent.exists()


def test_truncated_llm_weights_name_the_file(ck, tmp_path):
    llm = copy_dir(ck.base, tmp_path / "llm")
    weights = llm / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    msg = _raises(
        "not a readable safetensors file", llm, vision=ck.siglip_vision, projector=ck.proj
    )
    assert str(weights) in msg
