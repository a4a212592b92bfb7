"""GRPO and its rewards: the packed objective equals the reference's padded computation, an answer does not depend
on the batch it is sampled in, prompt rows are read as the reference's RLAIF data (bad ones refused by reason), and
each reward kind scores as specified (the reward model loaded from a folder as a real one would be)."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimind_v.data import DataConfig, collate_prompts, sample_builder
from minimind_v.evaluate import normalize_answer
from minimind_v.generate import ChatRequest, Engine, GenerationConfig
from minimind_v.lora import adapters, add_lora, target_names
from minimind_v.objectives import make_objective
from minimind_v.rewards import Response, RewardModel, Rewards, format_reward, parse_rewards, repetition_penalty
from minimind_v.samples import BadSample

G = 3


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def row(question: str, answer, colour=(200, 30, 30), final_assistant: bool = True) -> dict:
    messages = [{"role": "user", "content": f"<image>\n{question}"}]
    if final_assistant:
        messages.append({"role": "assistant", "content": ""})
    return {"conversations": json.dumps(messages), "image_bytes": png(colour), "answer": answer}


ROWS = [row("What colour is it?", "red"), row("Is there a circle in the picture?", ["yes", "是"], (20, 200, 40)),
        row("How many?", "3", (20, 40, 200))]


def prompts(tokenizer, processor, rows=ROWS, needs_answer: bool = True, max_seq_len: int = 300):
    config = DataConfig(paths=[], kind="prompts", max_seq_len=max_seq_len, image_token_len=64, add_system_ratio=0,
                        needs_answer=needs_answer)
    builder = sample_builder(config, tokenizer, processor)
    return [builder.build_prompt(r, random.Random(i)) for i, r in enumerate(rows)]


class FixedRewards:
    """Rewards that do not depend on the text (so the test controls the advantages)."""

    kinds = ("fixed",)

    def __call__(self, responses, device):
        total = torch.tensor([float(i % 4) for i in range(len(responses))], device=device)
        return {"fixed": total}, total


def grpo(tokenizer, loss_type: str, beta: float, reference=None, max_new_tokens: int = 6):
    generation = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                                  eos_token_id=tokenizer.eos_token_id)
    return make_objective("grpo", packing=True, vision=True, tokenizer=tokenizer, rewards=FixedRewards(),
                          generation=generation, num_generations=G, beta=beta, loss_type=loss_type,
                          image_token_len=64, reference=reference)


def reference_grpo_loss(model, reference, batch, completions, rewards, loss_type, beta, eos, epsilon=0.2,
                        epsilon_high=5.0) -> torch.Tensor:
    """The reference `train_grpo.py` on one batch: left-padded prompts repeated per generation, completions
    right-padded, per-token log-probs gathered at the completion positions, the mask through the first eos,
    group-normalised advantages, then the clipped (grpo) or detached-ratio (cispo) loss with the k3 KL."""
    prompt_ids = batch.input_ids.repeat_interleave(G, dim=0)
    prompt_mask = batch.attention_mask.repeat_interleave(G, dim=0)
    width = max(len(c) for c in completions)
    completion_ids = torch.full((len(completions), width), eos)
    for i, c in enumerate(completions):
        completion_ids[i, :len(c)] = torch.tensor(c)
    outputs = torch.cat([prompt_ids, completion_ids], dim=1)
    full_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)
    pixels = torch.cat([p for p in batch.pixel_values for _ in range(G)])
    logp_pos = prompt_ids.shape[1] - 1 + torch.arange(width).unsqueeze(0)

    def per_token(m):
        logits = m(outputs, attention_mask=full_mask, pixel_values=pixels).logits
        return F.log_softmax(logits[:, :-1], dim=-1).gather(2, outputs[:, 1:].unsqueeze(-1)).squeeze(-1).gather(
            1, logp_pos.expand(len(completions), -1))

    logps = per_token(model)
    with torch.no_grad():
        ref_logps = per_token(reference)
    grouped = rewards.view(-1, G)
    advantages = (rewards - grouped.mean(1).repeat_interleave(G)) / (grouped.std(1, unbiased=False)
                                                                      .repeat_interleave(G) + 1e-4)
    is_eos = completion_ids == eos
    eos_idx = torch.full((len(completions),), width - 1)
    eos_idx[is_eos.any(1)] = is_eos.int().argmax(1)[is_eos.any(1)]
    mask = (torch.arange(width).expand(len(completions), -1) <= eos_idx.unsqueeze(1)).int()
    kl = ref_logps - logps
    per_token_kl = torch.exp(kl) - kl - 1
    ratio = torch.exp(logps - logps.detach())
    if loss_type == "cispo":
        loss = -(torch.clamp(ratio, max=epsilon_high).detach() * advantages.unsqueeze(1) * logps - beta * per_token_kl)
    else:
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
        loss = -(torch.min(ratio * advantages.unsqueeze(1), clipped * advantages.unsqueeze(1)) - beta * per_token_kl)
    return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_packed_grpo_loss_equals_the_reference_padded_computation(lively_vlm, tiny_tokenizer, loss_type):
    import copy

    reference = copy.deepcopy(lively_vlm).requires_grad_(False)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in lively_vlm.model.layers[0].parameters():
            p.add_(torch.randn_like(p) * 0.02)
    objective = grpo(tiny_tokenizer, loss_type, beta=0.1, reference=reference)
    sampled = []
    sample = objective._sample
    objective._sample = lambda policy, b: sampled.append(sample(policy, b)) or sampled[-1]
    batch = collate_prompts(prompts(tiny_tokenizer, lively_vlm.image_processor))
    lively_vlm.train()
    out = objective(lively_vlm, batch)
    loss = out.loss / (batch.samples * G)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in lively_vlm.named_parameters() if p.grad is not None}
    lively_vlm.zero_grad()
    rewards = FixedRewards()(range(batch.samples * G), "cpu")[1]
    expected = reference_grpo_loss(lively_vlm, reference, batch, sampled[0], rewards, loss_type, 0.1,
                                   tiny_tokenizer.eos_token_id)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-5), (loss.item(), expected.item())
    for name, grad in ours.items():
        assert torch.allclose(grad, lively_vlm.get_parameter(name).grad, atol=1e-5), name
    assert out.metrics["kl"] > 0 and out.metrics["response_len"] == sum(len(c) for c in sampled[0])


def test_an_answer_does_not_depend_on_the_batch_it_is_sampled_in(lively_vlm, tiny_tokenizer):
    """Sampling is seeded per prompt, so processes and resumed runs draw the same answers for the same rows."""
    objective = grpo(tiny_tokenizer, "cispo", beta=0.0, max_new_tokens=8)
    all_prompts = prompts(tiny_tokenizer, lively_vlm.image_processor)
    together = objective._sample(lively_vlm, collate_prompts(all_prompts))
    alone = [c for p in all_prompts for c in objective._sample(lively_vlm, collate_prompts([p]))]
    assert together == alone
    assert len({tuple(c) for c in together[:G]}) > 1, "the answers of one prompt should differ"


def test_a_prompt_is_the_generation_prompt_the_engine_builds(lively_vlm, tiny_tokenizer):
    rlaif, bare = prompts(tiny_tokenizer, lively_vlm.image_processor, [ROWS[0], row("What colour is it?", "red",
                                                                                    final_assistant=False)])
    request = ChatRequest([{"role": "user", "content": "<image>\nWhat colour is it?"}],
                          images=[Image.new("RGB", (8, 8))])
    engine_ids = Engine(lively_vlm, tiny_tokenizer).prepare(request).ids
    assert rlaif.ids.tolist() == bare.ids.tolist() == engine_ids
    answer_from_turn = {"conversations": json.dumps([{"role": "user", "content": "Name a colour."},
                                                     {"role": "assistant", "content": "Red."}])}
    config = DataConfig(paths=[], kind="prompts", max_seq_len=300, needs_answer=True)
    built = sample_builder(config, tiny_tokenizer).build_prompt(answer_from_turn, random.Random(0))
    assert built.answers == ("red",) and built.messages == [{"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize("record, reason", [
    ({"conversations": json.dumps([{"role": "assistant", "content": "hi"}]), "answer": "x"}, "no_user_turn"),
    ({"conversations": json.dumps([{"role": "user", "content": "<image>\nhi"}]), "image_bytes": png((0, 0, 0))},
     "no_answer"),
    ({"conversations": json.dumps([{"role": "user", "content": "<image>\n" + "long " * 400}]),
      "image_bytes": png((0, 0, 0)), "answer": "x"}, "prompt_too_long"),
    ({"conversations": json.dumps([{"role": "user", "content": "hi"}]), "answer": "x"}, None),  # text only: fine
    ({"conversations": json.dumps([{"role": "user", "content": "<image><image>\nhi"}]), "image_bytes": png((0, 0, 0)),
      "answer": "x"}, "image_mismatch"),
])
def test_prompt_rows_that_cannot_be_used_are_refused_by_reason(record, reason, tiny_vlm, tiny_tokenizer):
    config = DataConfig(paths=[], kind="prompts", max_seq_len=300, image_token_len=64, needs_answer=True)
    builder = sample_builder(config, tiny_tokenizer, tiny_vlm.image_processor)
    if reason is None:
        assert builder.build_prompt(record, random.Random(0)).pixels is None
        return
    with pytest.raises(BadSample) as caught:
        builder.build_prompt(record, random.Random(0))
    assert caught.value.reason == reason


def response(text: str, answers=(), open_thinking: bool = False, messages=None) -> Response:
    return Response(messages or [{"role": "user", "content": "Q?"}], text, open_thinking, tuple(answers))


def test_exact_match_scores_the_answer_as_eval_does():
    rewards = Rewards({"exact_match": 1.0})
    texts = ["Red.", "红色", "blue", "red\nand more", "It is red", "reasoning about red</think>\n\nred",
             "reasoning</think>\n\nblue"]
    scores, total = rewards([response(t, ("red",), open_thinking=i >= 5) for i, t in enumerate(texts)], "cpu")
    assert scores["exact_match"].tolist() == [1, 1, 0, 1, 0, 1, 0] and torch.equal(total, scores["exact_match"])


def test_format_reward_follows_the_reference_rules():
    short, right = "ok", "An answer of a sensible length."
    think = "I look at the image and count the shapes</think>\n" + right
    assert format_reward(response(short)) == -0.5
    assert format_reward(response(right)) == 0.5
    assert format_reward(response(think)) == 0.5 + 1.0 + 0.25
    assert format_reward(response("x</think>y</think>" + right)) == 0.5 - 0.5 - 0.25
    assert repetition_penalty("a b c a b c a b c a b c") == 0.5 and repetition_penalty(right) == 0.0
    weighted = Rewards({"format": 0.5, "exact_match": 2.0})
    scores, total = weighted([response(right, (normalize_answer(right),))], "cpu")
    assert total.item() == 0.5 * 0.5 + 2.0 * 1.0 and set(scores) == {"format", "exact_match"}


def test_reward_flags_are_checked():
    assert parse_rewards(["exact_match", "format:0.25"]) == {"exact_match": 1.0, "format": 0.25}
    assert parse_rewards(["exact_match"], "some/folder") == {"exact_match": 1.0, "reward_model": 1.0}
    with pytest.raises(ValueError, match="unknown reward 'accuracy'"):
        parse_rewards(["accuracy"])
    with pytest.raises(ValueError, match="needs --reward_model_path"):
        parse_rewards(["reward_model"])
    with pytest.raises(ValueError, match="must be a number"):
        parse_rewards(["format:high"])


@pytest.fixture(scope="module")
def reward_model_dir(tiny_tokenizer, tmp_path_factory):
    """A random one-output Llama sequence classifier saved as a reward model would be, with a tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("reward") / "tiny-reward"
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_a_reward_model_folder_scores_prompt_and_answer(reward_model_dir):
    model = RewardModel(str(reward_model_dir), batch_size=2)
    responses = [response(t, messages=[{"role": "user", "content": q}]) for q, t in
                 [("What colour is it?", "red"), ("What colour is it?", "a long and winding answer about colours"),
                  ("How many shapes?", "three"), ("How many shapes?", "</think>three")]]
    batched = model(responses)
    alone = [model([r])[0] for r in responses]
    assert np.allclose(batched, alone, atol=1e-4), "padding must not change a score"
    assert len(set(batched)) > 1
    with torch.no_grad():
        model.model.score.weight.mul_(1000)  # raw scores far beyond the reference's clip
    assert set(model(responses)) <= {-3.0, 3.0}
    scores, total = Rewards({"reward_model": 0.5}, str(reward_model_dir))(responses, "cpu")
    assert torch.allclose(total, 0.5 * torch.tensor(batched), atol=1e-4)


def test_a_lora_run_measures_its_kl_against_the_base_without_a_copy(lively_vlm, tiny_tokenizer):
    names = target_names(lively_vlm, ["attention", "mlp"])
    add_lora(lively_vlm, names, rank=4)
    objective = grpo(tiny_tokenizer, "cispo", beta=0.1, reference=None)
    batch = collate_prompts(prompts(tiny_tokenizer, lively_vlm.image_processor))
    assert objective(lively_vlm, batch).metrics["kl"] == 0  # B = 0: the adapted policy is still the base
    with torch.no_grad():
        for lora in adapters(lively_vlm).values():
            lora.B.weight.normal_(0, 0.05)
    out = objective(lively_vlm, batch)
    assert out.metrics["kl"] > 0 and lively_vlm.training is False


@pytest.mark.parametrize("stage, settings, message", [
    ("vlm-grpo", {"num_generations": 1}, "--num_generations must be at least 2"),
    ("llm-grpo", {"temperature": 0.0}, "--temperature must be above 0"),
    ("llm-grpo", {"rewards": ["exact_match", "accuracy"]}, "unknown reward 'accuracy'"),
    ("llm-grpo", {"rewards": ["reward_model"]}, "needs --reward_model_path"),
    ("llm-distill", {"alpha": 1.5}, "must be in \\[0, 1\\]"),
])
def test_post_training_flags_that_cannot_work_are_refused_before_any_loading(stage, settings, message):
    from minimind_v import distributed
    from minimind_v.train_config import TrainConfig
    from minimind_v.trainer import Trainer, TrainingError

    with pytest.raises(TrainingError, match=message):
        Trainer(TrainConfig(stage=stage, device="cpu", tokenizer="/nonexistent", **settings).resolved(),
                distributed.setup("cpu"))
