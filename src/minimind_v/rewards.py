"""Rewards for reinforcement learning (GRPO): each kind scores a batch of responses, and a run sums the kinds it
uses with weights (`--rewards exact_match format:0.5 reward_model`).

    exact_match   1 when the answer (the text after any think block, up to its first line break) normalises to
                  one of the row's accepted answers, as `minimind-v eval` scores it; else 0
    format        the reference's rules: length of the response, a think block of sensible length closed exactly
                  once, minus a penalty for repeated 3-grams in the answer
    reward_model  a transformers sequence-classification (reward) model scoring (prompt, answer), clipped to
                  [-3, 3] as the reference clips its InternLM2 reward model
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .evaluate import first_line, normalize_answer
from .generate import split_thinking
from .tokenizer import THINK_CLOSE

KINDS = ("exact_match", "format", "reward_model")
REWARD_MODEL_CLIP = 3.0


@dataclass
class Response:
    """One sampled response. messages: the prompt conversation; text: the generated text (special tokens
    removed); answers: the row's accepted answers, normalised (empty when it has none)."""

    messages: list[dict]
    text: str
    open_thinking: bool
    answers: tuple[str, ...] = ()

    @property
    def answer(self) -> str:
        """The text after the think block."""
        return split_thinking(self.text, self.open_thinking)[1]


def parse_rewards(specs: Sequence[str], reward_model_path: str | None = None) -> dict[str, float]:
    """`kind` or `kind:weight` entries -> {kind: weight}. A reward model path adds `reward_model` (weight 1)
    when it is not listed; listing it without a path is an error."""
    weights = {}
    for spec in specs:
        kind, _, weight = spec.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown reward {kind!r} in --rewards; choose from {', '.join(KINDS)}")
        try:
            weights[kind] = float(weight) if weight else 1.0
        except ValueError as err:
            raise ValueError(f"--rewards {spec!r}: the weight after ':' must be a number") from err
    if reward_model_path and "reward_model" not in weights:
        weights["reward_model"] = 1.0
    if "reward_model" in weights and not reward_model_path:
        raise ValueError("--rewards reward_model needs --reward_model_path (a transformers reward model folder)")
    if not weights:
        raise ValueError("--rewards is empty: name at least one reward")
    return weights


def exact_match(responses: Sequence[Response]) -> list[float]:
    return [float(normalize_answer(first_line(r.answer)) in r.answers) for r in responses]


def repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """The reference's penalty: the share of repeated word n-grams, scaled to at most `cap`."""
    tokens = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def format_reward(response: Response) -> float:
    """The reference's rule-based score of a response (its `calculate_rewards` without the reward model)."""
    text = response.text
    score = 0.5 if 20 <= len(text.strip()) <= 800 else -0.5
    answer = text
    if THINK_CLOSE in text:
        thinking, answer = text.split(THINK_CLOSE, 1)
        score += 1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5
        score += 0.25 if text.count(THINK_CLOSE) == 1 else -0.25
        answer = answer.strip()
    return score - repetition_penalty(answer)


class RewardModel:
    """A transformers reward model: `AutoModelForSequenceClassification` with one output, or a remote-code model
    with the InternLM2-reward `get_score(tokenizer, messages)` method (the reference's, loaded as it does)."""

    def __init__(self, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 16):
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=True)
        except ValueError:  # no sequence-classification class: a remote-code reward model with get_score
            model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=True)
            if not hasattr(model, "get_score"):
                raise ValueError(f"{path} is neither a sequence-classification model nor a reward model with "
                                 "get_score") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _conversation(self, response: Response) -> list[dict]:
        """The reference's framing: earlier turns folded into the last user message, then the answer."""
        turns = [m for m in response.messages if isinstance(m.get("content"), str)]
        history = "\n".join(f"{m['role']}: {m['content']}" for m in turns[:-1])
        query = turns[-1]["content"] if turns else ""
        context = f"{history}\n以上是对话历史。我的新问题是：\n{query}" if history else query
        return [{"role": "user", "content": context}, {"role": "assistant", "content": response.answer}]

    def _text(self, conversation: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in conversation)

    @torch.no_grad()
    def __call__(self, responses: Sequence[Response]) -> list[float]:
        conversations = [self._conversation(r) for r in responses]
        if hasattr(self.model, "get_score"):
            scores = [float(self.model.get_score(self.tokenizer, c)) for c in conversations]
        else:
            scores = []
            for start in range(0, len(conversations), self.batch_size):
                texts = [self._text(c) for c in conversations[start:start + self.batch_size]]
                inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                        add_special_tokens=False).to(self.device)
                scores += self.model(**inputs).logits[:, 0].float().tolist()
        return [max(min(s, REWARD_MODEL_CLIP), -REWARD_MODEL_CLIP) for s in scores]


class Rewards:
    """The weighted sum of the chosen reward kinds. Calling it returns each kind's scores [N] and the total."""

    def __init__(self, weights: dict[str, float], reward_model_path: str | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.weights = weights
        self.model = RewardModel(reward_model_path, device, dtype) if "reward_model" in weights else None

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def score(self, kind: str, responses: Sequence[Response]) -> list[float]:
        if kind == "exact_match":
            return exact_match(responses)
        if kind == "format":
            return [format_reward(r) for r in responses]
        return self.model(responses)

    def __call__(self, responses: Sequence[Response], device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({kind: scores [N] float32}, weighted total [N])."""
        scores = {k: torch.tensor(self.score(k, responses), dtype=torch.float32, device=device) for k in self.kinds}
        total = sum(self.weights[k] * scores[k] for k in self.kinds)
        return scores, total
