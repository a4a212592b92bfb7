"""Next-token cross-entropy on the supervised positions (pretraining text, SFT answers): the reference loss."""

from __future__ import annotations

import torch

from ..data import Batch
from .base import Output, forward, supervised_loss


class CausalLM:
    metrics = ()

    def __init__(self, packing: bool, vision: bool):
        self.packing, self.vision = packing, vision

    def count(self, batch: Batch) -> torch.Tensor:
        return batch.targets

    def __call__(self, model, batch: Batch) -> Output:
        out = forward(model, batch, self.packing, self.vision)
        return Output(supervised_loss(model, out.hidden_states, batch), out.aux_loss)
