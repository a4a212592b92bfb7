"""Decoder behaviour beyond the fixtures: KV cache, padding, packed documents, YaRN, MoE routing."""

import math

import pytest
import torch

from minimind_v.config import MiniMindConfig
from minimind_v.llm import KVCache, MiniMindForCausalLM, RotaryEmbedding

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def small_model(**overrides) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(**{**SMALL, **overrides})).eval()


@pytest.fixture(params=[{}, {"use_moe": True, "num_experts_per_tok": 2}], ids=["dense", "moe-top2"])
def model(request):
    return small_model(**request.param)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cached_decode_equals_full_forward(model):
    ids = random_ids(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for start, end in [(7, 8), (8, 12), (12, 13), (13, 20)]:  # single tokens and chunks
            out = model(ids[:, start:end], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_cache_is_preallocated_and_grows_by_doubling():
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=1, head_dim=2, capacity=4, dtype=torch.float32, device="cpu")
    storage = cache.keys[0].data_ptr()
    cache.update(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    cache.length = 3
    cache.reserve(4)
    assert cache.keys[0].data_ptr() == storage  # fits: written in place, no copy
    cache.reserve(5)
    assert cache.capacity == 8 and torch.equal(cache.keys[0][:, :, :3], torch.ones(1, 1, 3, 2))


def test_reference_style_past_key_values_are_accepted(model):
    ids = random_ids(1, 12)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        legacy = [tuple(t.clone() for t in out.past_key_values[i]) for i in range(len(out.past_key_values))]
        assert legacy[0][0].shape == (1, 8, 2, 16)  # reference layout [B, T, nkv, hd]
        step = model(ids[:, 8:], past_key_values=legacy, use_cache=True).logits
    assert torch.allclose(step, model(ids).logits[:, 8:], atol=1e-5)


def test_left_padded_batch_equals_each_row_alone(model):
    rows = [random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            assert torch.allclose(batched[i, width - len(row):], alone, atol=1e-5)


def test_left_padded_batch_decodes_like_each_row_alone(model):
    rows = [random_ids(1, 6, seed=5)[0], random_ids(1, 3, seed=6)[0]]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = rows[0], 1
    ids[1, 3:], mask[1, 3:] = rows[1], 1
    nxt = torch.tensor([[7], [9]])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     past_key_values=cache, use_cache=True).logits
        for i in range(2):
            alone = model(torch.cat([rows[i], nxt[i]])[None]).logits[0, -1]
            assert torch.allclose(step[i, -1], alone, atol=1e-5)


def test_packed_documents_equal_separate_forwards(model):
    docs = [random_ids(1, n, seed=10 + n)[0] for n in (5, 7, 3)]
    packed = torch.cat(docs + [torch.zeros(2, dtype=torch.long)])[None]  # two pad tokens at the end
    positions = torch.cat([torch.arange(len(d)) for d in docs] + [torch.zeros(2, dtype=torch.long)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions).logits[0]
        start = 0
        for doc in docs:
            alone = model(doc[None]).logits[0]
            assert torch.allclose(out[start : start + len(doc)], alone, atol=1e-5)
            start += len(doc)


def test_packed_gradients_equal_the_sum_over_separate_documents():
    """Packed rows train exactly like separate documents: every parameter gradient of the summed loss agrees."""
    docs = [random_ids(1, n, seed=30 + n)[0] for n in (9, 4, 6)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), d[1:]]) for d in docs])[None]
    model = small_model().train()
    (model(packed, position_ids=positions, labels=labels).loss * (len(packed[0]) - len(docs))).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_flex_attention_block_mask_equals_the_dense_mask(monkeypatch):
    """The CUDA kernel choice for packed rows (flex_attention with a block mask) against the dense-mask oracle,
    forward only: flex_attention has no backward on a CPU."""
    from minimind_v import llm

    docs = [random_ids(1, n, seed=40 + n)[0] for n in (50, 70, 30)]
    packed = torch.cat(docs + [torch.zeros(6, dtype=torch.long)])[None].repeat(2, 1)
    positions = torch.cat([torch.arange(len(d)) for d in docs] + [torch.zeros(6, dtype=torch.long)])[None]
    positions = positions.repeat(2, 1)
    model = small_model()
    with torch.no_grad():
        dense = model(packed, position_ids=positions).logits
        monkeypatch.setattr(llm, "use_flex_attention", lambda device, packed, dropout: packed)
        flexed = model(packed, position_ids=positions).logits
    torch.testing.assert_close(flexed[:, :150], dense[:, :150], rtol=1e-4, atol=1e-4)


def test_packed_documents_give_the_same_losses():
    model = small_model()
    docs = [random_ids(1, n, seed=20 + n)[0] for n in (6, 4)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = packed.clone()
    labels[0, len(docs[0])] = -100  # a document's first token is never predicted from the previous one
    with torch.no_grad():
        packed_loss = model(packed, position_ids=positions, labels=labels).loss
        token_losses = [model(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    assert packed_loss.item() == pytest.approx((sum(token_losses) / (len(packed[0]) - 2)).item(), rel=1e-5)


def test_yarn_frequency_multipliers_match_the_worked_values():
    rope = RotaryEmbedding(MiniMindConfig(inference_rope_scaling=True))
    base = RotaryEmbedding(MiniMindConfig())
    ratio = rope.inv_freq(torch.device("cpu")) / base.inv_freq(torch.device("cpu"))
    assert torch.allclose(ratio[:9], torch.ones(9))
    assert ratio[9].item() == pytest.approx(0.9279, abs=1e-4)
    assert ratio[10].item() == pytest.approx(0.9279 - 0.0721, abs=1e-4)
    assert torch.allclose(ratio[21:], torch.full((27,), 1 / 16))


def test_rope_angles_are_computed_not_stored():
    model = small_model()
    assert not any("freq" in k for k in model.state_dict())
    cos, sin = model.model.rotary(torch.tensor([[0, 1, 1000]]))
    inv = 1 / (1e6 ** (torch.arange(0, 16, 2).float() / 16))
    assert cos.shape == (1, 3, 1, 16)
    assert torch.allclose(cos[0, 2, 0, :8], torch.cos(1000 * inv), atol=1e-4)
    assert math.isclose(sin[0, 0, 0, 0].item(), 0.0)


def test_moe_top1_matches_a_per_expert_loop():
    model = small_model(use_moe=True)
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _ = moe(x)
        flat = x.reshape(-1, 64)
        chosen = moe.gate(flat).softmax(-1).argmax(-1)
        expected = torch.stack([moe.experts[e](flat[i]) for i, e in enumerate(chosen.tolist())])
    assert torch.allclose(out.reshape(-1, 64), expected, atol=1e-6)


def test_moe_every_expert_gets_a_gradient_in_training():
    model = small_model(use_moe=True).train()
    out = model(random_ids(1, 2), labels=random_ids(1, 2))
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())
