"""Next-token cross-entropy on the supervised positions (pretraining text, SFT answers): the reference loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..chat_encoder import IGNORE
from ..data import Batch
from .base import Output, forward, next_tokens


class CausalLM:
    metrics = ()

    def __init__(self, packing: bool, vision: bool):
        self.packing, self.vision = packing, vision

    def count(self, batch: Batch) -> torch.Tensor:
        return batch.targets

    def __call__(self, model, batch: Batch) -> Output:
        out = forward(model, batch, self.packing, self.vision)
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), next_tokens(batch), ignore_index=IGNORE,
                             reduction="sum")
        return Output(ce, out.aux_loss)
