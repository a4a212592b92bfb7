"""Training objectives. An objective turns a micro-batch into a loss and its metrics; the training loop does the
rest (accumulation, normalisation over processes, the optimizer step, logging), so a new objective is one module
here and one entry in `OBJECTIVES`, with no change to the loop.

An objective provides:
    count(batch)        the units its loss is averaged over in the batch (supervised tokens, preference pairs,
                        sampled answers): a tensor on the batch's device, known before the forward
    __call__(model, batch) -> Output
                        loss: the loss summed over those units; aux_loss: the model's auxiliary (MoE) loss;
                        metrics: extra sums over the same units (the loop logs each as sum / units)
    metrics             the names of those metrics, in logging order
"""

from __future__ import annotations

from .causal_lm import CausalLM
from .distill import Distill
from .dpo import DPO
from .grpo import GRPO

OBJECTIVES = {"causal_lm": CausalLM, "dpo": DPO, "grpo": GRPO, "distill": Distill}


def make_objective(name: str, packing: bool, vision: bool, **options):
    """The objective called `name` (a key of OBJECTIVES) with its options."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](packing=packing, vision=vision, **options)
