"""The output layer and cross-entropy on the supervised positions only, in chunks.

A training forward returns the final hidden states; the objective gathers the N positions whose next token is
supervised and computes `lm_head` and the loss there. Up to `chunk_size` positions that is the plain
cross-entropy. Beyond, for a plain `lm_head`, `linear_cross_entropy` computes logits, loss and both gradients chunk
by chunk inside one autograd node, so at most `chunk_size` rows of float32 logits exist at a time and nothing is
kept for the backward but the two gradients. Liger's fused kernel does the same on CUDA with Triton; this version
is plain torch, so it runs on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_SIZE = 4096  # rows of logits at a time: 4096 x 6400 float32 is 105 MB


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) with the gradients computed during the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = None  # accumulated in float32 over chunks
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows, chunk_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            log_probs = torch.log_softmax(F.linear(rows, weight).float(), dim=-1)
            loss -= log_probs.gather(1, chunk_targets.unsqueeze(1)).sum()
            if needs_hidden or needs_weight:
                grad_logits = log_probs.exp_()  # softmax - one_hot(target): d loss / d logits
                grad_logits[torch.arange(len(chunk_targets), device=rows.device), chunk_targets] -= 1
                grad_logits = grad_logits.to(rows.dtype)
                if needs_hidden:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight
                if needs_weight:
                    chunk_grad = grad_logits.t() @ rows
                    grad_weight = chunk_grad.float() if grad_weight is None else grad_weight.add_(chunk_grad)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) against targets: hidden [N, H], targets [N] -> float32 scalar.

    Equal in value and gradients to `F.cross_entropy(head(hidden).float(), targets, reduction="sum")`, which it
    is up to `chunk_size` positions, and for a head that is not a plain bias-free Linear (one with a LoRA hook, a
    quantized one).
    """
    plain_linear = type(head) is nn.Linear and head.bias is None
    if hidden.shape[0] <= chunk_size or not plain_linear or head._forward_hooks or head._forward_pre_hooks:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
