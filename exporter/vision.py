"""Frame -> frame tokens: normalisation, the vision tower, pooling, and the projector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onsight.exporter.config import ModelConfig, PreprocessConfig, VisionConfig
from onsight.runtime.errors import CheckpointError


def adaptive_pool_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(out*out, in*in) averaging matrix equal to adaptive_avg_pool2d on a square grid.

    A constant MatMul exports to ONNX for any sizes (adaptive pooling does not when the
    sizes are not divisible) and runs well under TensorRT.
    """
    rows = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)  # ceil, as PyTorch's adaptive pooling
        rows[i, start:end] = 1.0 / (end - start)
    # (out, in) x (out, in) -> (out*out, in*in) via outer product of the 1-D operators
    return torch.einsum("ab,cd->acbd", rows, rows).reshape(size_out * size_out, size_in * size_in)


class Normalize(nn.Module):
    """uint8 (B, H, W, 3) RGB -> float (B, 3, H, W), (x/255 - mean) / std."""

    def __init__(self, pre: PreprocessConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0  # (B, 3, H, W)
        return (x - self.mean) / self.std


class ResidualConv(nn.Module):
    """x + GELU(conv3x3(x)): with the conv at zero it is the identity, so a block can be added
    to a trained tower without changing what it computes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


class TinyTower(nn.Module):
    """onsight's own small CNN tower (the demo model): strided convs to a patch grid, then
    `tiny_blocks` residual convs at that grid, then (`tiny_pos_embed`) a learned embedding of
    each patch's place in the grid."""

    def __init__(self, cfg: VisionConfig, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in cfg.tiny_channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        layers += [ResidualConv(c_in) for _ in range(cfg.tiny_blocks)]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, cfg.hidden_size)
        self.pool_head = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.side = image_size // (2 ** len(cfg.tiny_channels))
        # starts at zero: a warm start from a tower without it computes what that tower did
        self.pos = (
            nn.Parameter(torch.zeros(self.side * self.side, cfg.hidden_size))
            if cfg.tiny_pos_embed
            else None
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.convs(pixels)  # (B, C, h, w)
        patches = self.proj(f.flatten(2).transpose(1, 2))  # (B, h*w, hidden)
        if self.pos is not None:
            patches = patches + self.pos
        pooled = self.pool_head(patches.mean(dim=1))  # (B, hidden)
        return pooled, patches


class HFTower(nn.Module):
    """SigLIP or CLIP vision model from transformers: (pooled, patch tokens)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import (
            CLIPVisionConfig,
            CLIPVisionModel,
            SiglipVisionConfig,
            SiglipVisionModel,
        )

        if cfg.hf_config is None:
            raise CheckpointError(f"vision kind {cfg.kind!r} needs its transformers config")
        hf = {k: v for k, v in cfg.hf_config.items() if k not in ("model_type", "architectures")}
        if cfg.kind == "siglip":
            self.model = SiglipVisionModel(SiglipVisionConfig(**hf))
        else:
            self.model = CLIPVisionModel(CLIPVisionConfig(**hf))
        self.kind = cfg.kind
        c = self.model.config
        self.side = c.image_size // c.patch_size

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixels)
        patches = out.last_hidden_state  # (B, P(+1), hidden)
        if self.kind == "clip":
            patches = patches[:, 1:]  # CLIP's CLS is token 0; its pooled form is pooler_output
        return out.pooler_output, patches


class Projector(nn.Module):
    """VideoLLM-online's connector: Linear -> exact GELU -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class FrameEncoder(nn.Module):
    """uint8 frames (B, S, S, 3), already resized and padded -> (B, N, llm_hidden)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        self.normalize = Normalize(cfg.preprocess)
        if v.kind == "tiny":
            self.tower: nn.Module = TinyTower(v, cfg.preprocess.image_size)
        elif v.kind in ("siglip", "clip"):
            self.tower = HFTower(v)
        else:
            raise CheckpointError(f"unknown vision kind {v.kind!r}: use siglip, clip or tiny")
        side = self.tower.side
        if v.grid > side:
            raise CheckpointError(
                f"tokens per frame 1+{v.grid}x{v.grid} do not fit the tower: its patch grid is "
                f"{side}x{side}; choose a grid of at most {side}"
            )
        self.use_pooled = v.use_pooled
        self.pooled_last = v.pooled_last
        self.register_buffer("pool", adaptive_pool_matrix(side, v.grid), persistent=False)
        self.projector = Projector(
            v.hidden_size, cfg.projector_hidden or cfg.llm_hidden, cfg.llm_hidden
        )

    def tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Tower features before the projector: (B, N, vision_hidden)."""
        pooled, patches = self.tower(self.normalize(frames))
        grid = torch.matmul(self.pool, patches)  # (B, grid*grid, hidden), row-major
        if not self.use_pooled:
            return grid
        if self.pooled_last:
            return torch.cat([grid, pooled.unsqueeze(1)], dim=1)
        return torch.cat([pooled.unsqueeze(1), grid], dim=1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tokens(frames))
