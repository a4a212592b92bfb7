"""The output layer and loss on the supervised positions only equal the plain loss over full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minimind_v.chat_encoder import IGNORE
from minimind_v.config import MiniMindConfig
from minimind_v.data import Sample, pack
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.lora import add_lora
from minimind_v.objectives.causal_lm import CausalLM
from minimind_v.objectives.output_loss import linear_cross_entropy


def plain(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


@pytest.mark.parametrize("chunk_size", [7, 64, 149])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(150, 32, requires_grad=True)
    head = nn.Linear(32, 97, bias=False)
    targets = torch.randint(0, 97, (150,))
    expected = plain(hidden, head, targets)
    expected_grads = torch.autograd.grad(expected * 0.3, [hidden, head.weight])
    got = linear_cross_entropy(hidden, head, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad(got * 0.3, [hidden, head.weight])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_the_plain_loss():
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, requires_grad=True)
    head = nn.Linear(64, 200, bias=False)
    targets = torch.randint(0, 200, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(hidden, head, targets)
        got = linear_cross_entropy(hidden, head, targets, chunk_size=128)  # 3 chunks
    expected_grad, = torch.autograd.grad(expected, hidden)
    grad, = torch.autograd.grad(got, hidden)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected.item()) / expected.item() < 1e-3
    assert (grad - expected_grad).abs().max() < 0.02 * expected_grad.abs().max()


def test_a_head_that_is_not_a_plain_linear_takes_the_plain_path():
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=True)
    hidden, targets = torch.randn(10, 16), torch.randint(0, 40, (10,))
    torch.testing.assert_close(linear_cross_entropy(hidden, head, targets), plain(hidden, head, targets))


def tiny_lm(tie: bool) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=120, tie_word_embeddings=tie)
    return MiniMindForCausalLM(config).train()


def packed_batch():
    rng = torch.Generator().manual_seed(1)
    samples = []
    for length in (9, 14, 5, 11):
        ids = torch.randint(1, 120, (length,), generator=rng).numpy()
        labels = ids.copy()
        labels[: length // 2] = IGNORE
        samples.append(Sample(ids, labels, None))
    return pack(samples, 20)


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_objective_equals_cross_entropy_over_full_logits(tie):
    """The objective never builds [tokens, vocab] logits, yet its loss and every parameter gradient equal the
    plain cross-entropy over the full logits of the packed batch."""
    batch = packed_batch()
    model = tiny_lm(tie)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE).flatten()
    expected = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE, reduction="sum")
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = CausalLM(packing=True, vision=False)(model, batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_the_output_layer_still_trains_through_the_objective():
    model = tiny_lm(tie=False)
    add_lora(model, ["lm_head"], rank=4)
    torch.nn.init.normal_(model.lm_head.lora.B.weight)
    batch = packed_batch()
    CausalLM(packing=True, vision=False)(model, batch).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if n.startswith("lm_head.lora.")]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
