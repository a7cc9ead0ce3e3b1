"""Plain network building blocks: time embedding, residual MLP, image and vector encoders.

Nothing here knows about lenses or flows; ``flow.VectorField`` assembles these.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ImageEncoder", "ResidualMLP", "TimeEmbedding", "VectorEncoder"]


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the flow time ``t`` in [0, 1].

    Args:
        dim: Output features (even).
        max_frequency: Highest angular frequency, in cycles over the unit interval.

    Example:
        >>> TimeEmbedding(16)(torch.rand(3)).shape
        torch.Size([3, 16])
    """

    def __init__(self, dim: int = 64, max_frequency: float = 100.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"TimeEmbedding dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), dim // 2))
        self.register_buffer("freqs", freqs * 2 * math.pi)

    def forward(self, t: Tensor) -> Tensor:
        """Embed times, shape ``(B,)`` -> ``(B, dim)``."""
        angles = t[..., None] * self.freqs.to(t)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width),
        )  # fmt: skip

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class ResidualMLP(nn.Module):
    """MLP with pre-norm residual blocks.

    Args:
        in_dim: Input features.
        out_dim: Output features.
        width: Hidden width.
        n_blocks: Residual blocks.
        zero_init: Initialize the output layer to zero (the network starts as ``0``).

    Example:
        >>> ResidualMLP(5, 3, width=32, n_blocks=2)(torch.zeros(4, 5)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, width: int = 256, n_blocks: int = 4,
        zero_init: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim))
        if zero_init:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, h: Tensor) -> Tensor:
        """Map ``(..., in_dim)`` to ``(..., out_dim)``."""
        return self.out(self.blocks(self.inp(h)))


class VectorEncoder(nn.Module):
    """Embedding of a vector observation ``(B, in_dim)`` (the SBI tasks' data).

    Args:
        in_dim: Observation features.
        embed_dim: Embedding size.
        width: Hidden width.
        n_blocks: Residual blocks.
    """

    def __init__(self, in_dim: int, embed_dim: int = 64, *, width: int = 128,
                 n_blocks: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.net = ResidualMLP(in_dim, embed_dim, width=width, n_blocks=n_blocks)

    def forward(self, x: Tensor) -> Tensor:
        """Embed ``(B, in_dim)`` -> ``(B, embed_dim)``."""
        return self.net(x)


class ImageEncoder(nn.Module):
    """CNN embedding of multi-channel cutouts ``(B, C, H, W)``.

    Stages of two 3x3 convolutions (GroupNorm, SiLU) with a stride-2 downsampling between
    stages, global average and max pooling, and a linear head. Works for any ``H, W`` of at
    least ``2**(n_stages - 1)``.

    Args:
        in_channels: Input channels ``C``.
        embed_dim: Embedding size.
        base_channels: Channels of the first stage (doubled per stage, capped at 8x).
        n_stages: Resolution stages.

    Example:
        >>> ImageEncoder(2, 32, base_channels=8, n_stages=3)(torch.zeros(2, 2, 16, 16)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self, in_channels: int, embed_dim: int = 256, *, base_channels: int = 32,
        n_stages: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for s in range(n_stages):
            c = base_channels * min(2**s, 8)
            if s > 0:
                layers.append(nn.Conv2d(c_in, c, 3, stride=2, padding=1))
                c_in = c
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
            ]  # fmt: skip
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * c_in, embed_dim), nn.SiLU(),
                                  nn.Linear(embed_dim, embed_dim))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """Embed ``(B, C, H, W)`` -> ``(B, embed_dim)``."""
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(-2, -1)), f.amax(dim=(-2, -1))], dim=-1)
        return self.head(pooled)
