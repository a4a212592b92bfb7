"""Distillation: the packed objective equals the reference `train_distillation.py` computation on padded rows."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F

from minimind_v.chat_encoder import IGNORE
from minimind_v.data import DataConfig, pack, sample_builder
from minimind_v.objectives import make_objective
from test_dpo import png

from conftest import liven


def conversation(question: str, answer: str, colour) -> dict:
    messages = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]
    return {"conversations": json.dumps(messages), "image_bytes": png(colour)}


ROWS = [conversation("What colour is it?", "red", (200, 30, 30)),
        conversation("Is there a circle?", "yes, there is one", (20, 200, 40)),
        conversation("Describe the image.", "A blue square in the middle.", (20, 40, 200))]


def reference_distill_loss(student, teacher, documents, alpha: float, temperature: float) -> torch.Tensor:
    """The reference: padded rows, student logits [..., :-1], the shifted label mask, CE averaged over the
    supervised tokens, and T^2 * kl_div(log_softmax(student / T), softmax(teacher / T), 'batchmean') over the
    supervised positions only."""
    length = max(len(d.ids) for d in documents)
    ids = torch.zeros(len(documents), length, dtype=torch.long)
    labels = torch.full((len(documents), length), IGNORE)
    for row, document in enumerate(documents):
        ids[row, :len(document.ids)] = torch.from_numpy(document.ids)
        labels[row, :len(document.ids)] = torch.from_numpy(document.labels)
    pixels = torch.stack([torch.from_numpy(d.pixels[0]) for d in documents])
    student_logits = student(ids, pixel_values=pixels).logits[..., :-1, :]
    with torch.no_grad():
        teacher_logits = teacher(ids, pixel_values=pixels).logits[..., :-1, :]
    shift_labels = labels[..., 1:]
    mask = (shift_labels != IGNORE).flatten()
    ce = F.cross_entropy(student_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE, reduction="none")
    ce = (ce * mask).sum() / (mask.sum() + 1e-8)
    student_sel = student_logits.flatten(0, 1)[mask]
    teacher_probs = F.softmax(teacher_logits.flatten(0, 1)[mask] / temperature, dim=-1)
    kl = F.kl_div(F.log_softmax(student_sel / temperature, dim=-1), teacher_probs, reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.5), (0.0, 1.0), (0.9, 2.0)])
def test_packed_distillation_loss_equals_the_reference_padded_computation(lively_vlm, tiny_tokenizer, alpha,
                                                                          temperature):
    teacher = liven(copy.deepcopy(lively_vlm), seed=1).requires_grad_(False)
    config = DataConfig(paths=[], kind="chat", max_seq_len=300, image_token_len=64, add_system_ratio=0,
                        empty_think_ratio=1.0)
    builder = sample_builder(config, tiny_tokenizer, lively_vlm.image_processor)
    documents = [builder.build(r, random.Random(0)) for r in ROWS]
    batch = pack(documents, 300, image_token_len=64)
    objective = make_objective("distill", packing=True, vision=True, teacher=teacher, alpha=alpha,
                               temperature=temperature)
    out = objective(lively_vlm, batch)
    loss = out.loss / objective.count(batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in lively_vlm.named_parameters() if p.grad is not None}
    lively_vlm.zero_grad()
    expected = reference_distill_loss(lively_vlm, teacher, documents, alpha, temperature)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-5), (loss.item(), expected.item())
    for name, grad in ours.items():
        assert torch.allclose(grad, lively_vlm.get_parameter(name).grad, atol=1e-5), name
    assert out.metrics["kl"] > 0 and out.metrics["ce"] > 0
