"""What every objective shares: its output and the model's forward on a packed batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import Batch


@dataclass
class Output:
    """loss: summed over the objective's units; aux_loss: the model's auxiliary (MoE) loss; metrics: extra sums
    over the same units."""

    loss: torch.Tensor
    aux_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def forward(model, batch: Batch, packing: bool, vision: bool):
    """The model on a packed batch. Without packing a row is one document then right padding, so plain causal
    attention (the fast kernel, no mask) is exact for every real token; packed rows need the positions to keep
    documents apart. Images were checked against their placeholders when the batch was packed."""
    inputs = {"input_ids": batch.input_ids}
    if packing:
        inputs["position_ids"] = batch.position_ids
    if vision:
        inputs.update(pixel_values=batch.pixel_values, check_images=False)
    return model(**inputs)
