"""What objectives share: their output, the model's forward on a packed batch, a frozen model's forward, and
per-token and per-document sums over the supervised positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..chat_encoder import IGNORE
from ..data import Batch
from ..lora import adapters_disabled
from ..weights import unwrap


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


def frozen_logits(model, frozen, batch: Batch, packing: bool, vision: bool) -> torch.Tensor:
    """Logits of a frozen model (a reference or a teacher) without gradients, or, when `frozen` is None, of the
    policy with its LoRA adapters switched off (the base model, without a second copy in memory)."""
    with torch.no_grad():
        if frozen is not None:
            return forward(frozen, batch, packing, vision).logits
        policy = unwrap(model)  # outside DDP and compile: no gradient, nothing to synchronise
        training = policy.training
        policy.eval()
        try:
            with adapters_disabled(policy):
                return forward(policy, batch, packing, vision).logits
        finally:
            policy.train(training)


def next_tokens(batch: Batch) -> torch.Tensor:
    """What each position predicts, token t + 1 (IGNORE where unsupervised): [R * T]. Shifting the labels, not
    the logits, avoids copying the logits."""
    return F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE).flatten()


def supervised(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The supervised positions [R * T] bool, the tokens they predict [N] and those tokens' documents [N]."""
    targets = next_tokens(batch)
    documents = F.pad(batch.documents[:, 1:], (0, 1), value=-1).flatten()
    positions = targets != IGNORE
    return positions, targets[positions], documents[positions]


def supervised_logps(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each supervised next token and its document: logits [R, T, V] -> ([N], [N]); the
    softmax runs over the supervised positions only."""
    positions, targets, documents = supervised(batch)
    return -F.cross_entropy(logits.flatten(0, 1)[positions].float(), targets, reduction="none"), documents


def sum_per_document(values: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
    """Sums of `values` [N] by document index [N]: [count] float32."""
    sums = torch.zeros(count, dtype=torch.float32, device=values.device)
    return sums.index_add(0, documents, values.float())
