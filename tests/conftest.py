"""Shared fixtures: tiny checkpoints built in seconds, the real videos' folder."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real videos folder {SHARED_VIDEOS} is missing (it sits beside the repo)")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from builders import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok"))
