"""Direct preference optimisation (Rafailov et al., 2023) as the reference `train_dpo.py` computes it:

    loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))

per preference pair, where pi and ref are the summed log-probabilities of a conversation's supervised (assistant)
tokens under the policy and under the frozen reference model. A batch holds each pair as documents 2k (chosen)
and 2k + 1 (rejected), packed like any other documents (the reference pads both to max_seq_len).

`rpo_alpha` > 0 adds the chosen answer's negative log-likelihood per token, times rpo_alpha, to each pair's loss
(RPO: Pang et al., 2024; TRL's `rpo_alpha`). Plain DPO also lowers the probability of what follows a rejected
answer, `<|im_end|>` included, and a small model can then forget to stop; the NLL term holds the chosen answer,
its end included, in place. 0 (the default) is the reference's plain DPO.

The reference model is a frozen copy of the starting weights, or, for a LoRA run, the policy itself with its
adapters switched off (no second copy in memory). Its log-probabilities are computed once per pair per step,
without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Batch
from .base import Output, forward, frozen_logps, sum_per_document, supervised_logps


class DPO:
    metrics = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")

    def __init__(self, packing: bool, vision: bool, beta: float = 0.15, rpo_alpha: float = 0.0, reference=None):
        """`reference`: the frozen reference model, or None to use the policy with its LoRA adapters off."""
        self.packing, self.vision, self.beta, self.rpo_alpha = packing, vision, beta, rpo_alpha
        self.reference = reference

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.full((), batch.samples, dtype=torch.long, device=batch.input_ids.device)

    def __call__(self, model, batch: Batch) -> Output:
        out = forward(model, batch, self.packing, self.vision)
        logps, owner = supervised_logps(model, out.hidden_states, batch)
        policy = sum_per_document(logps, owner, 2 * batch.samples)
        reference = sum_per_document(frozen_logps(model, self.reference, batch, self.packing, self.vision), owner,
                                     2 * batch.samples)
        chosen_reward = self.beta * (policy[0::2] - reference[0::2])
        rejected_reward = self.beta * (policy[1::2] - reference[1::2])
        losses = -F.logsigmoid(chosen_reward - rejected_reward)
        if self.rpo_alpha:
            lengths = sum_per_document(torch.ones_like(logps), owner, 2 * batch.samples)
            losses = losses - self.rpo_alpha * policy[0::2] / lengths[0::2].clamp(min=1)
        metrics = {
            "reward_accuracy": (chosen_reward > rejected_reward).float().sum(),
            "reward_margin": (chosen_reward - rejected_reward).detach().sum(),
            "chosen_logp": policy[0::2].detach().sum(), "rejected_logp": policy[1::2].detach().sum(),
        }
        return Output(losses.sum(), out.aux_loss, metrics)
