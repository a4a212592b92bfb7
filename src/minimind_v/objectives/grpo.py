"""Group relative policy optimisation (Shao et al., 2024) as the reference `train_grpo.py` computes it.

For each prompt of the batch, `num_generations` answers are sampled from the policy (the generation engine: batched,
KV cache), scored by the rewards, and normalised within their group: A = (r - mean) / (std + 1e-4). Then, per
answer token, with ratio = pi / pi_old and KL = exp(ref - logp) - (ref - logp) - 1 to the frozen reference model:

    grpo    -(min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) - beta * KL)
    cispo   -(min(ratio, epsilon_high).detach() * A * logp - beta * KL)

averaged over each answer's tokens (through its eos), then over answers. As in the reference, the answers of a
batch are used for one update, so pi_old is the policy that sampled them: ratio is 1 in value and carries the
gradient of logp.

Sampling is seeded per prompt from the run seed, the epoch and the row's data position, so the answers do not
depend on the process that samples them or on where a run was resumed.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ..chat_encoder import IGNORE
from ..data import PromptBatch, pack
from ..generate import GenerationConfig, sample_completions
from ..rewards import Response, Rewards
from ..samples import Sample
from ..weights import unwrap
from .base import Output, forward, frozen_logps, sum_per_document, supervised_logps

LOSS_TYPES = ("grpo", "cispo")


class GRPO:
    def __init__(self, packing: bool, vision: bool, tokenizer, rewards: Rewards, generation: GenerationConfig,
                 num_generations: int = 6, beta: float = 0.1, loss_type: str = "cispo", epsilon: float = 0.2,
                 epsilon_high: float = 5.0, image_token_len: int = 0, reference=None):
        """`generation`: the sampling settings of every answer (its seed is replaced per answer); `reference`: the
        frozen reference model, or None to use the policy with its LoRA adapters off (unused when beta is 0)."""
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown --loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        self.packing, self.vision, self.tokenizer, self.rewards = packing, vision, tokenizer, rewards
        self.generation, self.num_generations = generation, num_generations
        self.beta, self.loss_type, self.epsilon, self.epsilon_high = beta, loss_type, epsilon, epsilon_high
        self.image_token_len, self.reference = image_token_len, reference
        self.metrics = ("reward", *(f"reward_{kind}" for kind in rewards.kinds), "zero_std_groups",
                        *(("kl",) if beta else ()), "response_len", "rollout_s")

    def count(self, batch: PromptBatch) -> torch.Tensor:
        return torch.full((), batch.samples * self.num_generations, dtype=torch.long, device=batch.input_ids.device)

    def __call__(self, model, batch: PromptBatch) -> Output:
        answers = batch.samples * self.num_generations
        if answers == 0:  # every row of this micro-batch was bad: a step with nothing to learn
            return self._nothing(model, batch)
        started = time.perf_counter()
        completions = self._sample(unwrap(model), batch)
        rollout_seconds = time.perf_counter() - started
        scores, rewards = self._score(batch, completions)
        advantages, zero_std = self._advantages(rewards)
        documents = self._documents(batch, completions).to(batch.input_ids.device)
        out = forward(model, documents, self.packing, self.vision)
        logps, owner = supervised_logps(model, out.hidden_states, documents)
        token_loss = self._policy_loss(logps, advantages[owner])
        lengths = sum_per_document(torch.ones_like(logps), owner, answers)
        metrics = {"reward": rewards.sum(), "zero_std_groups": zero_std.float().sum(),
                   "response_len": lengths.sum(), "rollout_s": torch.tensor(rollout_seconds, device=rewards.device)}
        metrics.update({f"reward_{kind}": value.sum() for kind, value in scores.items()})
        if self.beta:
            reference = frozen_logps(model, self.reference, documents, self.packing, self.vision)
            delta = reference - logps
            token_kl = torch.exp(delta) - delta - 1
            token_loss = token_loss + self.beta * token_kl
            metrics["kl"] = (sum_per_document(token_kl.detach(), owner, answers) / lengths).sum()
        loss = (sum_per_document(token_loss, owner, answers) / lengths).sum()
        return Output(loss, out.aux_loss, metrics)

    def _policy_loss(self, logps: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
        """Per-token policy loss [N]; the ratio to the policy that sampled the answers is 1 in value."""
        ratio = torch.exp(logps - logps.detach())
        if self.loss_type == "cispo":
            return -(ratio.clamp(max=self.epsilon_high).detach() * advantage * logps)
        clipped = ratio.clamp(1 - self.epsilon, 1 + self.epsilon)
        return -torch.min(ratio * advantage, clipped * advantage)

    def _sample(self, policy, batch: PromptBatch) -> list[list[int]]:
        """`num_generations` answers per prompt, grouped by prompt: [B * G] id lists."""
        g = self.num_generations
        configs = [replace(self.generation, seed=(seed + k * 1_000_003) % 2**63) for seed in batch.seeds
                   for k in range(g)]
        pixels = None if batch.pixel_values is None else [p for p in batch.pixel_values for _ in range(g)]
        training = policy.training
        policy.eval()
        try:
            return sample_completions(policy, batch.input_ids.repeat_interleave(g, dim=0),
                                      batch.attention_mask.repeat_interleave(g, dim=0), configs, pixels)
        finally:
            policy.train(training)

    def _score(self, batch: PromptBatch, completions: list[list[int]]):
        g = self.num_generations
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        responses = [Response(batch.messages[i // g], text, batch.open_thinking[i // g], batch.answers[i // g])
                     for i, text in enumerate(texts)]
        return self.rewards(responses, batch.input_ids.device)

    def _advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group-normalised advantages [B * G] and whether each answer's group had no spread [B * G]."""
        grouped = rewards.view(-1, self.num_generations)
        mean = grouped.mean(dim=1, keepdim=True)
        std = grouped.std(dim=1, unbiased=False, keepdim=True)
        advantages = ((grouped - mean) / (std + 1e-4)).flatten()
        return advantages, (std == 0).expand_as(grouped).flatten()

    def _documents(self, batch: PromptBatch, completions: list[list[int]]):
        """Prompt + answer documents, the answers supervised, packed with their prompts' images."""
        g = self.num_generations
        mask = batch.attention_mask.bool().cpu()
        prompts = [row[keep].numpy() for row, keep in zip(batch.input_ids.cpu(), mask)]
        pixels = [p.cpu().numpy() if len(p) else None for p in batch.pixel_values or []] or [None] * batch.samples
        samples = []
        for i, completion in enumerate(completions):
            prompt, answer = prompts[i // g], np.asarray(completion, dtype=np.int64)
            samples.append(Sample(np.concatenate([prompt, answer]),
                                  np.concatenate([np.full(len(prompt), IGNORE), answer]), pixels[i // g]))
        longest = max(len(s.ids) for s in samples)
        return pack(samples, longest, self.packing, image_token_len=self.image_token_len)

    def _nothing(self, model, batch: PromptBatch) -> Output:
        """A zero loss through the model on one padding token, as other objectives get from an empty batch: every
        process of a distributed run still takes part in the step."""
        out = forward(model, pack([], 1).to(batch.input_ids.device), self.packing, self.vision)
        metrics = {name: torch.zeros((), device=batch.input_ids.device) for name in self.metrics}
        return Output(out.hidden_states.sum() * 0.0, out.aux_loss, metrics)
