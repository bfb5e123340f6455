"""Checkpoint loaders on the layouts real releases have: sharded bf16/fp16 files, tied
embeddings and q/k/v biases (Qwen2), Llama-3.1's rope_scaling, Mistral's sliding window,
VideoLLM-online's regex target_modules, and the ways real directories come incomplete."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from builders import llama_config, save_hf_lm
from ckpt_builders import (
    copy_dir,
    edit_json,
    save_full_clip,
    save_full_siglip,
    save_llm_as_released,
    save_projector,
    save_videollm_adapter,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_loaders import HIDDEN, VISION_HIDDEN, _raises, ck  # noqa: F401 - session fixture
from tokenizers import Tokenizer

from onsight.exporter.bundle_writer import (
    ExportOptions,
    default_kv_capacity,
    export_bundle,
    kv_capacity_limit,
)
from onsight.exporter.loaders import load_checkpoint
from onsight.exporter.reference import Segment, recompute_logits
from onsight.runtime.errors import ExportError

# Llama-3.1's rope_scaling, with original_max_position_embeddings scaled down to the tiny
# model so that the llama3 frequency adjustment changes some of its frequencies.
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# VideoLLM-online's LoraConfig(target_modules=...): one regex string, not a list
RELEASE_TARGETS = "model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head$"


def _compose(ck, llm, **kwargs):  # noqa: F811
    kwargs = {"vision": ck.siglip_vision, "projector": ck.proj, **kwargs}
    return load_checkpoint(llm, fmt="compose", **kwargs)[0]


def _logits_equal_transformers(model, llm_dir, n: int, atol: float = 2e-5) -> None:
    """Every position's logits: onsight's decoder against transformers' own forward."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        llm_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = [int(x) for x in torch.randint(2, 200, (n,), generator=torch.Generator().manual_seed(1))]
    ours = recompute_logits(model, [Segment(ids=(i,)) for i in ids])  # one per position
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.stack(ours), ref, atol=atol, rtol=0)


# ---- what real LLM directories hold ----


def test_sharded_bf16_llm_and_fp16_sharded_siglip_load_as_float32(ck, tmp_path):  # noqa: F811
    from transformers import SiglipModel

    llm = save_llm_as_released(
        tmp_path / "llm", ck.vocab, ck.tok_plain, dtype=torch.bfloat16, max_shard_size="60KB"
    )
    assert (llm / "model.safetensors.index.json").is_file()
    assert not (llm / "model.safetensors").exists()
    vision = save_full_siglip(tmp_path / "siglip", dtype=torch.float16, max_shard_size="40KB")
    assert len(list(vision.glob("model-*.safetensors"))) > 1
    proj = tmp_path / "proj.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(str(ck.proj)).items()}, str(proj))

    model = _compose(ck, llm, vision=vision, projector=proj)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert "dtype" not in model.cfg.decoder and "torch_dtype" not in model.cfg.decoder
    torch.testing.assert_close(
        model.encoder.projector.fc1.weight, load_file(str(proj))["fc1.weight"].float()
    )
    ref = SiglipModel.from_pretrained(vision, dtype=torch.float32).vision_model.state_dict()
    for k, v in model.encoder.tower.model.vision_model.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=0, rtol=0)
    _logits_equal_transformers(model, llm, n=12)


def test_qwen2_tied_embeddings_and_qkv_biases_match_transformers(ck, tmp_path):  # noqa: F811
    qwen = save_llm_as_released(
        tmp_path / "qwen",
        ck.vocab + 8,
        ck.tok_plain,
        "Qwen2ForCausalLM",
        bos=None,
        random_biases=True,
        tie_word_embeddings=True,
    )
    with safe_open(str(qwen / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: saved once, as the embedding
        bias = f.get_tensor("model.layers.0.self_attn.k_proj.bias")
    model = _compose(ck, qwen)
    lm = model.decoder.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    torch.testing.assert_close(lm.model.layers[0].self_attn.k_proj.bias, bias)
    _logits_equal_transformers(model, qwen, n=12)


def test_llama31_rope_scaling_matches_transformers(ck, tmp_path):  # noqa: F811
    llm = save_llm_as_released(
        tmp_path / "llama31",
        ck.vocab,
        ck.tok_plain,
        rope_scaling=LLAMA31_ROPE,
        rope_theta=500000.0,
        eos_token_id=[1, 0],  # Llama-3.1 lists several
    )
    model = _compose(ck, llm)
    assert model.cfg.decoder["rope_scaling"]["rope_type"] == "llama3"
    plain = _compose(ck, ck.base)
    assert not torch.allclose(model.decoder.inv_freq, plain.decoder.inv_freq)
    _logits_equal_transformers(model, llm, n=40)


def test_mistral_sliding_window_is_named_with_the_kv_capacity_that_matches(
    ck,  # noqa: F811
    tmp_path,
    caplog,
):
    llm = save_llm_as_released(
        tmp_path / "mistral", ck.vocab, ck.tok_plain, "MistralForCausalLM", sliding_window=16
    )
    with caplog.at_level(logging.WARNING, logger="onsight"):
        model = _compose(ck, llm)
    assert "sliding_window 16" in caplog.text and "--kv-capacity 16 or less" in caplog.text
    _logits_equal_transformers(model, llm, n=16)  # within the window, exactly transformers'


def test_qwen2_with_use_sliding_window_false_gives_no_warning(ck, tmp_path, caplog):  # noqa: F811
    # Qwen2's configs carry sliding_window with use_sliding_window false: full attention
    qwen = save_llm_as_released(
        tmp_path / "qwen",
        ck.vocab,
        ck.tok_plain,
        "Qwen2ForCausalLM",
        bos=None,
        sliding_window=16,
        use_sliding_window=False,
    )
    with caplog.at_level(logging.WARNING, logger="onsight"):
        _compose(ck, qwen)
    assert "sliding_window" not in caplog.text


@pytest.fixture(scope="module")
def mistral16(ck, tmp_path_factory):  # noqa: F811
    """A Mistral whose sliding_window (16) is far below its trained positions (2048)."""
    llm = save_llm_as_released(
        tmp_path_factory.mktemp("m16") / "mistral",
        ck.vocab,
        ck.tok_plain,
        "MistralForCausalLM",
        sliding_window=16,
    )
    return load_checkpoint(llm, fmt="compose", vision=ck.siglip_vision, projector=ck.proj)


@pytest.mark.parametrize("capacity", [17, 1024, 10**6])  # past the window; also past 2048
def test_kv_capacity_past_the_sliding_window_is_refused_naming_the_largest_exact_one(
    mistral16, tmp_path, capacity
):
    model, tok = mistral16
    with pytest.raises(ExportError, match=r"exceeds the model's sliding_window \(16\)") as info:
        export_bundle(model, tok, tmp_path / "b", ExportOptions(kv_capacity=capacity))
    assert "use at most 16, the largest cache that keeps the model exact" in str(info.value)
    assert "attends over the whole cache" in str(info.value)
    assert not (tmp_path / "b").exists()


def test_kv_capacity_at_the_window_passes_and_says_when_the_window_is_too_small(
    mistral16, tmp_path
):
    # 16 is within the window; the stream needs more, which no --kv-capacity can give
    model, tok = mistral16
    with pytest.raises(ExportError, match="is too small") as info:
        export_bundle(model, tok, tmp_path / "b", ExportOptions(kv_capacity=16))
    assert "sliding_window (16) allows at most 16: export fewer --tokens-per-frame" in str(
        info.value
    )


def test_default_kv_capacity_is_the_sliding_window_when_smaller(mistral16, caplog):
    with caplog.at_level(logging.WARNING, logger="onsight"):
        assert default_kv_capacity(mistral16[0]) == 16
    assert "kv capacity 16 tokens instead of the default 4096" in caplog.text
    assert "sliding_window (16)" in caplog.text


def test_cli_export_defaults_the_cache_to_the_sliding_window(
    ck,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
    capsys,
):
    # no --kv-capacity: the window (1000) instead of 4096 or the trained positions (2048),
    # accepted by the writer; the export stops where the graphs would be written
    import onsight.exporter.bundle_writer as bw
    from onsight.runtime.cli import main as cli_main

    llm = save_llm_as_released(
        tmp_path / "mistral", ck.vocab, ck.tok_plain, "MistralForCausalLM", sliding_window=1000
    )
    layouts = []

    def stop(model, layout, *a, **k):
        layouts.append(layout)
        raise ExportError("stopped before writing graphs")

    monkeypatch.setattr(bw, "export_graphs", stop)
    args = ["export", str(llm), "--vision", str(ck.siglip_vision), "--projector", str(ck.proj)]
    with caplog.at_level(logging.WARNING, logger="onsight"):
        assert cli_main([*args, "--out", str(tmp_path / "b")]) == 2
    assert [layout.capacity_dense for layout in layouts] == [1000]
    assert "kv capacity 1000 tokens instead of the default 4096" in caplog.text
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "c"), "--kv-capacity", "1001"]) == 2
    assert "sliding_window (1000)" in capsys.readouterr().err and len(layouts) == 1
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_qwen2_window_that_reaches_no_layer_limits_nothing(ck, tmp_path, caplog):  # noqa: F811
    # use_sliding_window true, but max_window_layers covers all 4 layers: full attention
    qwen = save_llm_as_released(
        tmp_path / "qwen",
        ck.vocab,
        ck.tok_plain,
        "Qwen2ForCausalLM",
        bos=None,
        sliding_window=16,
        use_sliding_window=True,
        max_window_layers=4,
    )
    with caplog.at_level(logging.WARNING, logger="onsight"):
        model = _compose(ck, qwen)
        assert default_kv_capacity(model) == 2048  # the trained positions, not 16
    assert kv_capacity_limit(model).what == "the model's trained positions (2048)"
    assert "sliding_window" not in caplog.text


# ---- broken LLM directories ----


def _set(**changes):
    return lambda llm: edit_json(llm / "config.json", **changes)


def _write(name, text):
    return lambda llm: (llm / name).write_text(text)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        pytest.param(
            _set(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
            ["not a valid LlamaConfig", "config.json", "low_freq_factor"],
            id="malformed-rope-scaling",
        ),
        pytest.param(
            _set(hidden_size="64"),
            ["key 'hidden_size' is \"64\", expected a whole number"],
            id="size-as-text",
        ),
        pytest.param(
            _set(architectures="LlamaForCausalLM"),
            ["expected a list like"],
            id="architectures-not-a-list",
        ),
        pytest.param(
            _write("config.json", "[]"),
            ["config.json", "holds a JSON list, not an object"],
            id="config-not-an-object",
        ),
        # a list naming the keys: `"bos_token" in tc` holds, and tc.get would be AttributeError
        pytest.param(
            _write("tokenizer_config.json", '["bos_token", "eos_token"]'),
            ["tokenizer_config.json: holds a JSON list, not an object"],
            id="tokenizer-config-not-an-object",
        ),
    ],
)
def test_broken_llm_config_is_refused_naming_the_file_and_key(
    ck,  # noqa: F811
    tmp_path,
    breakage,
    expected,
):
    llm = copy_dir(ck.base, tmp_path / "llm")
    breakage(llm)
    # fmt given: with config.json broken, detecting the format would fail first
    kw = {"vision": ck.siglip_vision, "projector": ck.proj, "fmt": "compose"}
    msg = _raises(re.escape(expected[0]), llm, **kw)
    assert all(part in msg for part in expected)


def test_llm_weights_with_no_place_in_the_config_are_refused(ck, tmp_path):  # noqa: F811
    # a config.json that says fewer layers than the weights hold: transformers drops the rest
    cfg = {**llama_config(ck.vocab, layers=6)}
    big = save_hf_lm(tmp_path / "big", cfg, ck.tok_plain)
    llm = copy_dir(ck.base, tmp_path / "llm")
    shutil.copyfile(big / "model.safetensors", llm / "model.safetensors")
    msg = _raises("has no place in the model", llm, vision=ck.siglip_vision, projector=ck.proj)
    assert "model.layers.4." in msg and "num_hidden_layers" in msg


def test_llm_without_tokenizer_json_says_how_to_write_it(ck, tmp_path):  # noqa: F811
    llm = copy_dir(ck.base, tmp_path / "llm", drop=("tokenizer.json",))
    (llm / "tokenizer.model").write_bytes(b"\0")  # a sentencepiece model, as Mistral ships
    msg = _raises("tokenizer.json: missing", llm, vision=ck.siglip_vision, projector=ck.proj)
    assert "tokenizer.model" in msg and "backend_tokenizer.save" in msg


def test_untied_llm_without_lm_head_names_tie_word_embeddings(ck, tmp_path):  # noqa: F811
    llm = copy_dir(ck.base, tmp_path / "llm")
    assert json.loads((llm / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(str(llm / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(llm / "model.safetensors"), metadata={"format": "pt"})
    msg = _raises("'lm_head.weight' is missing", llm, vision=ck.siglip_vision, projector=ck.proj)
    assert "with tie_word_embeddings false in config.json it has weights of its own" in msg


# ---- vision towers ----


def test_full_clip_model_with_legacy_nested_config_as_vision(ck, tmp_path):  # noqa: F811
    from transformers import CLIPModel

    clip = save_full_clip(tmp_path / "clip")
    assert json.loads((clip / "config.json").read_text())["model_type"] == "clip"
    model = _compose(ck, ck.base, vision=clip)
    assert model.cfg.vision.kind == "clip" and model.cfg.vision.hidden_size == VISION_HIDDEN
    assert model.cfg.vision.hf_config["hidden_act"] == "quick_gelu"
    ref = CLIPModel.from_pretrained(clip).vision_model.state_dict()
    for k, v in model.encoder.tower.model.vision_model.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=0, rtol=0)


def test_projector_with_a_third_layer_is_refused(ck, tmp_path):  # noqa: F811
    path = save_projector(tmp_path / "p.safetensors", VISION_HIDDEN, HIDDEN, naming="seq")
    tensors = load_file(str(path))
    tensors |= {"4.weight": torch.zeros(HIDDEN, HIDDEN), "4.bias": torch.zeros(HIDDEN)}
    save_file(tensors, str(path))
    msg = _raises("'4.bias' has no place", ck.base, vision=ck.siglip_vision, projector=path)
    assert "p.safetensors" in msg


@pytest.mark.parametrize(
    ("naming", "name"),
    [("llava", "mm_projector.bin"), ("mm_projector", "mm_projector.safetensors")],
)
def test_llava_mm_projector_loads_as_the_two_layer_mlp(ck, tmp_path, naming, name):  # noqa: F811
    # LLaVA's mlp2x_gelu (Linear, GELU, Linear) as its pretraining stage saves it
    path = save_projector(
        tmp_path / name, VISION_HIDDEN, HIDDEN, middle=96, naming=naming, dtype=torch.float16
    )
    model = _compose(ck, ck.base, projector=path)
    saved = torch.load(path) if path.suffix == ".bin" else load_file(str(path))
    prefix = "model.mm_projector" if naming == "llava" else "mm_projector"
    proj = model.encoder.projector
    torch.testing.assert_close(proj.fc1.weight, saved[f"{prefix}.0.weight"].float())
    torch.testing.assert_close(proj.fc2.bias, saved[f"{prefix}.2.bias"].float())
    assert model.cfg.projector_hidden == 96


@pytest.mark.parametrize(
    ("extra", "bad"),
    [
        ({"model.mm_projector.4.weight": (HIDDEN, HIDDEN)}, "model.mm_projector.4.weight"),
        ({"model.mm_projector.1.weight": (HIDDEN,)}, "model.mm_projector.1.weight"),
        ({"model.embed_tokens.weight": (8, HIDDEN)}, "model.embed_tokens.weight"),
    ],
    ids=["mlp3x_gelu", "norm", "unknown"],
)
def test_llava_projector_with_other_keys_is_refused_listing_them(ck, tmp_path, extra, bad):  # noqa: F811
    path = save_projector(tmp_path / "p.safetensors", VISION_HIDDEN, HIDDEN, naming="llava")
    tensors = load_file(str(path)) | {k: torch.zeros(shape) for k, shape in extra.items()}
    save_file(tensors, str(path))
    msg = _raises(f"key '{bad}' has no place", ck.base, vision=ck.siglip_vision, projector=path)
    found = msg.split("; found ")[1].split(". ")[0]
    assert found.split(", ") == sorted(tensors)  # every key, the projector's own included
    assert "[model.]mm_projector.0.*/2.*" in msg


def test_projector_with_one_layer_under_two_names_is_refused(ck, tmp_path):  # noqa: F811
    path = save_projector(tmp_path / "p.safetensors", VISION_HIDDEN, HIDDEN, naming="llava")
    tensors = load_file(str(path))
    tensors["fc1.weight"] = tensors["model.mm_projector.0.weight"]
    save_file({k: v.clone() for k, v in tensors.items()}, str(path))
    _raises(
        r"keys \['fc1.weight', 'model.mm_projector.0.weight'\] all name the projector's fc1",
        ck.base,
        vision=ck.siglip_vision,
        projector=path,
    )


# ---- VideoLLM-online adapters ----


def _q_proj(model) -> torch.Tensor:
    return model.decoder.lm.model.layers[1].self_attn.q_proj.weight


def test_adapter_with_the_releases_regex_target_modules(ck, tmp_path):  # noqa: F811
    adapter = copy_dir(ck.adapter, tmp_path / "adapter")
    edit_json(adapter / "adapter_config.json", target_modules=RELEASE_TARGETS)
    regex, _ = load_checkpoint(adapter, base=ck.base, vision=ck.siglip)
    listed, _ = load_checkpoint(ck.adapter, base=ck.base, vision=ck.siglip)
    torch.testing.assert_close(_q_proj(regex), _q_proj(listed), atol=0, rtol=0)
    torch.testing.assert_close(regex.decoder.lm.lm_head.weight, listed.decoder.lm.lm_head.weight)


def test_adapter_with_an_embedding_lora_is_merged(ck, tmp_path):  # noqa: F811
    # peft's LoRA of embed_tokens (lora_embedding_A/B, no .weight) is no wrong base
    adapter = save_videollm_adapter(
        tmp_path / "adapter", ck.base, VISION_HIDDEN, ck.tok_v, target_modules=["embed_tokens"]
    )
    model, _ = load_checkpoint(adapter, base=ck.base, vision=ck.siglip)
    base = load_file(str(ck.base / "model.safetensors"))["model.embed_tokens.weight"]
    assert (model.decoder.lm.model.embed_tokens.weight - base).abs().max() > 1e-3


def test_pickled_adapter_is_refused_without_reading_it(ck, tmp_path):  # noqa: F811
    adapter = copy_dir(ck.adapter, tmp_path / "adapter", drop=("adapter_model.safetensors",))
    (adapter / "adapter_model.bin").write_bytes(b"not even a pickle: must never be read")
    msg = _raises("adapter_model.bin: a pickled adapter", adapter, base=ck.base, vision=ck.siglip)
    assert "unpickles nothing" in msg and "save_file(torch.load(" in msg


def test_adapter_without_tokenizer_uses_the_bases_with_v_appended(ck, tmp_path):  # noqa: F811
    adapter = copy_dir(ck.adapter, tmp_path / "adapter", drop=("tokenizer.json",))
    model, tok = load_checkpoint(adapter, base=ck.base, vision=ck.siglip)
    assert tok not in (adapter / "tokenizer.json", ck.base / "tokenizer.json")  # a copy
    assert Tokenizer.from_file(str(tok)).token_to_id("<v>") == ck.vocab  # len(tokenizer) - 1
    assert model.cfg.template.eos == "<|eot_id|>"


def test_adapter_missing_a_lora_tensor_is_refused(ck, tmp_path):  # noqa: F811
    adapter = copy_dir(ck.adapter, tmp_path / "adapter")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    del tensors[key]
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    msg = _raises(f"key {key} is missing", adapter, base=ck.base, vision=ck.siglip)
    assert "unadapted" in msg


def test_adapter_missing_a_connector_tensor_is_refused(ck, tmp_path):  # noqa: F811
    adapter = copy_dir(ck.adapter, tmp_path / "adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    del tensors["base_model.model.connector.2.bias"]
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    _raises(
        "connector.2.bias is missing, so the trained connector is incomplete",
        adapter,
        base=ck.base,
        vision=ck.siglip,
    )


def test_adapter_config_that_is_not_an_object_is_refused(ck, tmp_path):  # noqa: F811
    adapter = copy_dir(ck.adapter, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text('"LORA"')
    _raises(
        "adapter_config.json: holds a JSON str, not an object",
        adapter,
        base=ck.base,
        vision=ck.siglip,
    )


def test_bf16_adapter_merges_like_the_fp32_one(ck, tmp_path):  # noqa: F811
    # the release stores its tensors in bf16; peft upcasts them before merging into fp32
    adapter = copy_dir(ck.adapter, tmp_path / "adapter")
    path = adapter / "adapter_model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(str(path)).items()}, str(path))
    low, _ = load_checkpoint(adapter, base=ck.base, vision=ck.siglip)
    full, _ = load_checkpoint(ck.adapter, base=ck.base, vision=ck.siglip)
    torch.testing.assert_close(_q_proj(low), _q_proj(full), atol=2e-3, rtol=0)
    assert all(p.dtype == torch.float32 for p in low.parameters())
