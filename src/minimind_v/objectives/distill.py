"""Knowledge distillation as the reference `train_distillation.py` computes it, per supervised (answer) token:

    loss = alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The teacher (a larger trained model with the same tokenizer) reads the same packed batch and images, without
gradients. Only the supervised positions go through the softmaxes: the [tokens, vocab] float32 tensors of the
two models are never built for the prompt positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Batch
from .base import Output, forward, frozen_logits, supervised_logits


class Distill:
    metrics = ("ce", "kl")

    def __init__(self, packing: bool, vision: bool, teacher, alpha: float = 0.5, temperature: float = 1.5):
        self.packing, self.vision, self.teacher = packing, vision, teacher
        self.alpha, self.temperature = alpha, temperature

    def count(self, batch: Batch) -> torch.Tensor:
        return batch.targets

    def __call__(self, model, batch: Batch) -> Output:
        out = forward(model, batch, self.packing, self.vision)
        student, targets, _ = supervised_logits(model, out.hidden_states, batch)
        teacher = frozen_logits(model, self.teacher, batch, self.packing, self.vision)
        ce = F.cross_entropy(student, targets, reduction="sum")
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                      reduction="sum") * t * t
        loss = self.alpha * ce + (1 - self.alpha) * kl
        return Output(loss, out.aux_loss, {"ce": ce.detach(), "kl": kl.detach()})
