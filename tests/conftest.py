"""Shared fixtures: a private cache folder, tiny checkpoints built in seconds, the real videos' folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (TensorRT / CUDA); none here")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The suite's cache (the rendered demo video, the record of verified bundle files) lives
    in a temporary folder, not the user's ~/.cache/onsight; subprocesses inherit it."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (training runs pin one thread for determinism)
    does not leave it set for the tests after it."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real videos folder {SHARED_VIDEOS} is missing (it sits beside the repo)")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from builders import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def make_tiny_model(vocab: int, r: float = 0.2, max_new_tokens: int = 4, seed: int = 0):
    """A tiny random MoD model with learned routers (decisive, so top-k has no near-ties)."""
    import torch
    from builders import llama_config

    from onsight.exporter.config import (
        ModConfig,
        ModelConfig,
        PreprocessConfig,
        TemplateConfig,
        VisionConfig,
    )
    from onsight.exporter.model import StreamingModel

    cfg = ModelConfig(
        decoder=llama_config(vocab),
        vision=VisionConfig(
            kind="tiny", hidden_size=32, tiny_channels=(8, 16), tiny_blocks=1, tiny_pos_embed=True
        ),
        preprocess=PreprocessConfig(image_size=32),
        mod=ModConfig(keep_ratio=r, layers=(1, 3), router="learned"),
        template=TemplateConfig(system_prompt="You narrate video.", max_new_tokens=max_new_tokens),
        has_layer_experts=True,
    )
    torch.manual_seed(seed)
    model = StreamingModel(cfg).eval()
    for e in model.decoder.experts.values():
        torch.nn.init.normal_(e.proj.weight, std=1.0)
    torch.nn.init.normal_(model.encoder.tower.pos, std=0.5)  # it starts at zero: make it count
    return model


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_tokenizer):
    """(bundle dir, torch model, tokenizer.json): a small-capacity bundle that evicts often."""
    from onsight.exporter.bundle_writer import ExportOptions, export_bundle

    tok, vocab = tiny_tokenizer
    model = make_tiny_model(vocab)
    out, _ = export_bundle(
        model,
        tok,
        tmp_path_factory.mktemp("bundles") / "tiny",
        ExportOptions(keep_ratio=0.2, kv_capacity=160, keep_text_tokens=24),
    )
    return out, model, tok


@pytest.fixture(scope="session")
def demo_tok(tmp_path_factory):
    """(tokenizer.json, vocab, Tokenizer): the demo model's tokenizer, trained once."""
    from tokenizers import Tokenizer

    from onsight.exporter.demo.tokenizer import train_tokenizer

    path, vocab = train_tokenizer(tmp_path_factory.mktemp("demo_tok") / "tokenizer.json")
    return path, vocab, Tokenizer.from_file(str(path))
