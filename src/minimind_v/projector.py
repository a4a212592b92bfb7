"""The vision projector: SigLIP patch features -> decoder embeddings, one visual token per patch."""

from __future__ import annotations

import torch
from torch import nn


class VisionProjector(nn.Module):
    """LayerNorm -> Linear -> GELU (exact erf) -> Linear, per token: [..., in_dim] -> [..., out_dim].

    State-dict keys are `mlp.0` (LayerNorm), `mlp.1` and `mlp.3` (Linear), as in the reference.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(in_dim, eps=1e-5),
            nn.Linear(in_dim, out_dim),
            nn.GELU(),
            nn.Linear(out_dim, out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)
