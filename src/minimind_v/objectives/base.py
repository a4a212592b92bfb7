"""What objectives share: their output, the model's forward on a packed batch, the output layer and losses on the
supervised positions only, a frozen model's forward, and per-document sums."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..chat_encoder import IGNORE
from ..data import Batch
from ..lora import adapters_disabled
from ..weights import unwrap
from .output_loss import linear_cross_entropy


@dataclass
class Output:
    """loss: summed over the objective's units; aux_loss: the model's auxiliary (MoE) loss; metrics: extra sums
    over the same units."""

    loss: torch.Tensor
    aux_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def forward(model, batch: Batch, packing: bool, vision: bool):
    """The model on a packed batch, up to its final hidden states (`logits` None: the objectives apply the output
    layer on the supervised positions only). Without packing a row is one document then right padding, so plain
    causal attention (the fast kernel, no mask) is exact for every real token; packed rows need the positions to
    keep documents apart. Images were checked against their placeholders when the batch was packed."""
    inputs = {"input_ids": batch.input_ids, "compute_logits": False}
    if packing:
        inputs["position_ids"] = batch.position_ids
    if vision:  # image_features: the tower outputs that a vision cache put in place of the pixels
        inputs.update(pixel_values=batch.pixel_values, image_features=batch.image_features, check_images=False)
    return model(**inputs)


def next_tokens(batch: Batch) -> torch.Tensor:
    """What each position predicts, token t + 1 (IGNORE where unsupervised): [R * T]. Shifting the labels, not
    the hidden states, avoids a copy."""
    return F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE).flatten()


def supervised(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The supervised positions [R * T] bool, the tokens they predict [N] and those tokens' documents [N]."""
    targets = next_tokens(batch)
    documents = F.pad(batch.documents[:, 1:], (0, 1), value=-1).flatten()
    positions = targets != IGNORE
    return positions, targets[positions], documents[positions]


def output_layer(model) -> torch.nn.Module:
    """The model's `lm_head` (inside DDP and compile wrappers)."""
    return unwrap(model).lm_head


def supervised_loss(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy on the supervised positions: hidden [R, T, H] -> float32 scalar. The
    output layer runs on those positions only, in chunks (`linear_cross_entropy`)."""
    positions, targets, _ = supervised(batch)
    return linear_cross_entropy(hidden.flatten(0, 1)[positions], output_layer(model), targets)


def supervised_logits(model, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits of the supervised positions [N, V] (the output layer runs on those positions only), the
    tokens they predict [N] and their documents [N]. hidden [R, T, H]."""
    positions, targets, documents = supervised(batch)
    return output_layer(model)(hidden.flatten(0, 1)[positions]).float(), targets, documents


def supervised_logps(model, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each supervised next token and its document: hidden [R, T, H] -> ([N], [N])."""
    logits, targets, documents = supervised_logits(model, hidden, batch)
    return -F.cross_entropy(logits, targets, reduction="none"), documents


def frozen_logits(model, frozen, batch: Batch, packing: bool, vision: bool) -> torch.Tensor:
    """Supervised-position logits [N, V] of a frozen model (a reference or a teacher) without gradients, or,
    when `frozen` is None, of the policy with its LoRA adapters switched off (the base model, without a second
    copy in memory)."""
    with torch.no_grad():
        if frozen is not None:
            return supervised_logits(frozen, forward(frozen, batch, packing, vision).hidden_states, batch)[0]
        policy = unwrap(model)  # outside DDP and compile: no gradient, nothing to synchronise
        training = policy.training
        policy.eval()
        try:
            with adapters_disabled(policy):
                return supervised_logits(policy, forward(policy, batch, packing, vision).hidden_states, batch)[0]
        finally:
            policy.train(training)


def frozen_logps(model, frozen, batch: Batch, packing: bool, vision: bool) -> torch.Tensor:
    """Log-probability [N] of each supervised next token under the frozen model (see `frozen_logits`)."""
    _, targets, _ = supervised(batch)
    return -F.cross_entropy(frozen_logits(model, frozen, batch, packing, vision), targets, reduction="none")


def sum_per_document(values: torch.Tensor, documents: torch.Tensor, count: int) -> torch.Tensor:
    """Sums of `values` [N] by document index [N]: [count] float32."""
    sums = torch.zeros(count, dtype=torch.float32, device=values.device)
    return sums.index_add(0, documents, values.float())
