"""The one generation routine behind `model.generate`, the CLI chat, the web UI and the API server.

`Decoder` does token-level decoding: one prefill (images encoded once), then one token per step into a
preallocated KV cache, batched with left padding, with per-row sampling settings. `Engine` turns chat
requests (messages + PIL images) into prompts and decodes them into text, streamed as UTF-8-safe deltas,
stopping on eos, stop strings or `max_new_tokens`.

Shapes: B rows, T prompt length (left padded), V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .chat_encoder import ChatEncoder, count_markers
from .config import IMAGE_TOKEN_ID
from .llm import KVCache
from .tokenizer import IMAGE_MARKER, THINK_CLOSE, THINK_OPEN


@dataclass
class GenerationConfig:
    """Sampling settings. `do_sample=False` or `temperature=0` decodes greedily."""

    max_new_tokens: int = 512
    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 50
    repetition_penalty: float = 1.0
    do_sample: bool = True
    stop: Sequence[str] = ()
    seed: int | None = None
    eos_token_id: int | None = 2

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


def _per_row(configs: Sequence[GenerationConfig], name: str, device) -> torch.Tensor:
    return torch.tensor([float(getattr(c, name)) for c in configs], device=device).unsqueeze(1)


def process_logits(logits: torch.Tensor, seen: torch.Tensor, configs: Sequence[GenerationConfig]) -> torch.Tensor:
    """Reference order: temperature, repetition penalty over the ids seen so far, top-k, top-p.

    logits [B, V] float32, seen [B, V] bool -> filtered logits [B, V] (removed entries are -inf).
    """
    temperature = _per_row(configs, "temperature", logits.device).clamp(min=1e-5)
    logits = logits / temperature
    penalty = _per_row(configs, "repetition_penalty", logits.device)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(seen & (penalty != 1.0), penalised, logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    top_k = torch.tensor([c.top_k if c.top_k > 0 else logits.shape[-1] for c in configs], device=logits.device)
    kth = sorted_logits.gather(1, (top_k.clamp(max=logits.shape[-1]) - 1).unsqueeze(1))
    remove_sorted = sorted_logits < kth
    top_p = _per_row(configs, "top_p", logits.device)
    cumulative = F.softmax(sorted_logits.masked_fill(remove_sorted, float("-inf")), dim=-1).cumsum(dim=-1)
    beyond_p = cumulative > top_p
    beyond_p = torch.cat([torch.zeros_like(beyond_p[:, :1]), beyond_p[:, :-1]], dim=1) & (top_p < 1.0)
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted | beyond_p)
    return logits.masked_fill(remove, float("-inf"))


class Decoder:
    """Token-level decoding of a batch: each `step()` returns the next token of every row.

    input_ids [B, T] left padded, attention_mask [B, T] or None (no padding), pixel_values in any form
    `MiniMindVLM.forward` accepts (encoded once, at prefill). Finished rows keep receiving eos (pad 0 when a
    row has no eos) and are ignored. `use_cache=False` recomputes the whole sequence every step (the naive
    path, kept for comparison). `banned_tokens` are never chosen.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 configs: Sequence[GenerationConfig], pixel_values=None, use_cache: bool = True,
                 check_images: bool = True, banned_tokens: Sequence[int] = ()):
        self.model = model
        self.banned = list(banned_tokens)
        self.configs = list(configs)
        self.ids = input_ids
        self.mask = attention_mask
        self.pixel_values = pixel_values
        self.check_images = check_images
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.long, device=device)
        self.seen = self.seen.scatter_add_(1, input_ids, real) > 0  # [B, V]: ids in each row so far
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.greedy = torch.tensor([c.greedy for c in self.configs], device=device)
        self.plain_greedy = all(c.greedy and c.repetition_penalty == 1.0 for c in self.configs)
        self.eos = torch.tensor([-1 if c.eos_token_id is None else c.eos_token_id for c in self.configs], device=device)
        self.filler = self.eos.clamp(min=0)
        self.limit = torch.tensor([c.max_new_tokens for c in self.configs], device=device)
        self.generators = [self._generator(c, device) for c in self.configs]
        longest = max(c.max_new_tokens for c in self.configs)
        dtype = next(model.parameters()).dtype
        self.cache = KVCache.for_model(model.config, batch, prompt_len + longest, dtype, device) if use_cache else None
        self.steps = 0
        self._pending = input_ids  # tokens not yet run through the model

    @staticmethod
    def _generator(config: GenerationConfig, device) -> torch.Generator | None:
        if config.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
        return generator

    def _next_logits(self) -> torch.Tensor:
        """Logits [B, V] (float32) for the next position."""
        if self.cache is None:
            out = self.model(self.ids, attention_mask=self.mask, logits_to_keep=1, pixel_values=self.pixel_values,
                             check_images=self.check_images)
        else:
            pixels = self.pixel_values if self.cache.length == 0 else None
            out = self.model(self._pending, attention_mask=self.mask, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1, pixel_values=pixels, check_images=self.check_images)
        logits = out.logits[:, -1].float()
        if self.banned:
            logits[:, self.banned] = float("-inf")
        return logits

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.plain_greedy:
            return logits.argmax(dim=-1)
        processed = process_logits(logits, self.seen, self.configs)
        if self.greedy.all():
            return processed.argmax(dim=-1)
        probs = F.softmax(processed, dim=-1)
        if any(g is not None for g in self.generators):
            sampled = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        else:
            sampled = torch.multinomial(probs, 1).squeeze(1)
        return torch.where(self.greedy, processed.argmax(dim=-1), sampled)

    def step(self) -> torch.Tensor:
        """Decode one token for every row: token ids [B]."""
        with torch.inference_mode():
            tokens = torch.where(self.finished, self.filler, self._choose(self._next_logits()))
        self.seen.scatter_(1, tokens.unsqueeze(1), True)
        self._pending = tokens.unsqueeze(1)
        if self.cache is None:
            self.ids = torch.cat([self.ids, self._pending], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.steps += 1
        self.finished |= (tokens == self.eos) | (self.steps >= self.limit)
        return tokens

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with `rows` only (in that order): the other rows stop being computed and their part of the KV
        cache is freed. Cached decoding, after the first step (the images are encoded by then)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.finished.device)
        self.cache.keys = [k.index_select(0, index) for k in self.cache.keys]
        self.cache.values = [v.index_select(0, index) for v in self.cache.values]
        self.configs = [self.configs[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        for name in ("seen", "finished", "greedy", "eos", "filler", "limit", "_pending"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        self.pixel_values = None

    @property
    def done(self) -> bool:
        return bool(self.finished.all())


def sample_completions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       configs: Sequence[GenerationConfig], pixel_values=None) -> list[list[int]]:
    """One completion per row (RL rollouts): input_ids [B, T] left padded -> the new ids of each row, through its
    eos, or `max_new_tokens` ids when it never ended. The model should be in eval mode. A VLM never samples its
    image placeholder token: an answer holding one could not be read back with its prompt's images."""
    banned = [IMAGE_TOKEN_ID] if getattr(model.config, "image_token_len", 0) else []
    decoder = Decoder(model, input_ids, attention_mask, configs, pixel_values, check_images=False,
                      banned_tokens=banned)
    steps = []
    while not decoder.done:
        steps.append(decoder.step())
    tokens = torch.stack(steps, dim=1)  # [B, S]
    ended = tokens == decoder.eos.unsqueeze(1)
    lengths = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, decoder.limit.clamp(max=tokens.shape[1]))
    return [row[:length] for row, length in zip(tokens.tolist(), lengths.tolist())]


def reference_generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       max_new_tokens: int = 8192, temperature: float = 0.85, top_p: float = 0.85, top_k: int = 50,
                       eos_token_id: int | None = 2, streamer=None, use_cache: bool = True,
                       num_return_sequences: int = 1, do_sample: bool = True, repetition_penalty: float = 1.0,
                       pixel_values=None, max_length: int | None = None, return_kv: bool = False, seed=None,
                       **kwargs):
    """`model.generate` with the reference signature and result: prompt + new ids [B*n, T + new], finished
    rows padded with eos. Unlike the reference, `max_length` (prompt + new) is honoured."""
    input_ids = kwargs.pop("inputs", None) if input_ids is None else input_ids
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0) if attention_mask is not None \
            else None
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.repeat_interleave(num_return_sequences, dim=0)
        elif isinstance(pixel_values, dict):
            pixel_values = {k: v.repeat_interleave(num_return_sequences, 0) for k, v in pixel_values.items()}
    if max_length is not None:
        max_new_tokens = min(max_new_tokens, max_length - input_ids.shape[1])
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    config = GenerationConfig(max_new_tokens=max(max_new_tokens, 0), temperature=temperature, top_p=top_p,
                              top_k=top_k or 0, repetition_penalty=repetition_penalty, do_sample=do_sample,
                              seed=seed, eos_token_id=eos_token_id)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new_tokens = []
    if config.max_new_tokens > 0:
        decoder = Decoder(model, input_ids, attention_mask, [config] * input_ids.shape[0], pixel_values, use_cache)
        while not decoder.done:
            tokens = decoder.step()
            new_tokens.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
    if streamer is not None:
        streamer.end()
    result = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids
    if return_kv:
        return {"generated_ids": result, "past_kv": decoder.cache if new_tokens else None}
    return result


@dataclass
class ChatRequest:
    """A conversation to continue. User messages mark where images go with `<image>` (one per image, in
    order); when no message has a marker, the images go at the start of the last user message."""

    messages: list[dict]
    images: list = field(default_factory=list)
    open_thinking: bool = False
    tools: list | None = None


@dataclass
class Completion:
    text: str
    reasoning: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0


def split_thinking(text: str, open_thinking: bool) -> tuple[str | None, str]:
    """Generated text -> (reasoning or None, answer). With thinking on, the prompt ended in `<think>\\n`, so
    everything up to `</think>` is reasoning (all of it if the block never closed). With thinking off, only a
    reply that opens its own `<think>` block has reasoning."""
    if not open_thinking and not text.lstrip("\n").startswith(THINK_OPEN):
        return None, text
    reasoning, _, answer = text.partition(THINK_CLOSE)
    return reasoning.replace(THINK_OPEN, "").strip("\n"), answer.lstrip("\n")


def _partial_tag_length(text: str) -> int:
    """Length of the longest end of `text` that could still grow into `<think>` or `</think>`."""
    for n in range(min(len(text), len(THINK_CLOSE) - 1), 0, -1):
        if THINK_OPEN.startswith(text[-n:]) or THINK_CLOSE.startswith(text[-n:]):
            return n
    return 0


class ThinkingSplitter:
    """Splits a growing reply into reasoning and answer deltas as it streams. The deltas only carry text that
    no continuation can change, so they add up to `split_thinking` of the whole reply."""

    def __init__(self, open_thinking: bool):
        self.open_thinking = open_thinking
        self.text = ""
        self.sent_reasoning = 0
        self.sent_answer = 0

    def push(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Add raw text; returns the new (reasoning, answer) text. `final` marks the end of the reply."""
        self.text += delta
        reasoning, answer = split_thinking(self.text, self.open_thinking) if final else self._settled()
        reasoning = reasoning or ""
        new = reasoning[self.sent_reasoning:], answer[self.sent_answer:]
        self.sent_reasoning, self.sent_answer = len(reasoning), len(answer)
        return new

    def _settled(self) -> tuple[str, str]:
        text = self.text
        if not self.open_thinking:
            start = text.lstrip("\n")
            if THINK_OPEN.startswith(start):  # the reply may still be opening a think block
                return "", ""
            if not start.startswith(THINK_OPEN):
                return "", text
        if THINK_CLOSE in text:
            return split_thinking(text, True)
        # Hold back a tag that may be half written and trailing newlines (stripped if `</think>` follows).
        held = text[: len(text) - _partial_tag_length(text)]
        return held.replace(THINK_OPEN, "").strip("\n"), ""


class TextStream:
    """Incremental detokenisation of one row: each `push` returns only complete text, never half of a
    multi-byte character, and holds back what could be the start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._prefix = 0
        self._read = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        end = max(len(self.text) - hold, self.sent)
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def flush(self) -> str:
        """The rest of the text once decoding has ended."""
        self.stopped = True
        return self._release()


@dataclass
class StreamEvent:
    """New text of row `row` (answer and reasoning already separated), or (with `completion`) that row's end."""

    row: int
    content: str = ""
    reasoning: str = ""
    completion: Completion | None = None


class PromptTooLong(ValueError):
    """The rendered prompt exceeds the engine's `max_prompt_tokens`."""


class Engine:
    """Chat-level generation for a model (on its device, eval mode) and its tokenizer."""

    def __init__(self, model, tokenizer, max_prompt_tokens: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.encoder = ChatEncoder(tokenizer, getattr(model.config, "image_token_len", 0))
        self.device = next(model.parameters()).device

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """The request's generation prompt through the chat encoder (as training encodes it); ValueError when
        markers and images disagree, PromptTooLong over the limit."""
        messages = request.messages
        if request.images and count_markers(messages) == 0:
            last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            if last_user is None:
                raise ValueError("images were given but the conversation has no user message")
            messages = [dict(m) for m in messages]
            messages[last_user]["content"] = IMAGE_MARKER * len(request.images) + "\n" + \
                (messages[last_user].get("content") or "")
        ids = self.encoder.encode(messages, len(request.images), request.tools, generation_prompt=True,
                                  open_thinking=request.open_thinking).ids.tolist()
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens, more than the limit of {self.max_prompt_tokens}")
        return ids

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        padded = any(len(p) < longest for p in prompts)
        return ids.to(self.device), mask.to(self.device) if padded else None

    def _pixels(self, requests: Sequence[ChatRequest]):
        if not any(r.images for r in requests):
            return None
        processor = self.model.image_processor
        return [processor(r.images).to(self.device) if r.images else
                torch.empty(0, 3, processor.size, processor.size, device=self.device) for r in requests]

    def run(self, requests: Sequence[ChatRequest], configs: GenerationConfig | Sequence[GenerationConfig],
            prompts: Sequence[list[int]] | None = None,
            cancelled: Callable[[int], bool] | None = None) -> Iterator[StreamEvent]:
        """Decode a batch; yields new text per row as it becomes final, then one event per row with its
        `Completion` as soon as that row ends. `prompts` are the requests' `prompt_ids` when the caller
        already has them; a row for which `cancelled(row)` turns true stops with finish_reason "cancelled"."""
        configs = [configs] * len(requests) if isinstance(configs, GenerationConfig) else list(configs)
        start = time.perf_counter()
        prompts = [self.prompt_ids(r) for r in requests] if prompts is None else prompts
        ids, mask = self._batch(prompts)
        decoder = Decoder(self.model, ids, mask, configs, self._pixels(requests), check_images=False)
        streams = [TextStream(self.tokenizer, c.stop) for c in configs]
        splitters = [ThinkingSplitter(r.open_thinking) for r in requests]
        live = list(range(len(requests)))  # the request row of each decoder row
        while live:
            tokens = decoder.step().tolist()
            ended = set()
            for row, token in zip(live, tokens):
                config, stream = configs[row], streams[row]
                ended_by_eos = token == config.eos_token_id
                reasoning, content = splitters[row].push("" if ended_by_eos else stream.push(token))
                if reasoning or content:
                    yield StreamEvent(row, content, reasoning)
                stopped = cancelled is not None and cancelled(row)
                if not (ended_by_eos or stream.stopped or stopped or len(stream.ids) >= config.max_new_tokens):
                    continue
                reason = "cancelled" if stopped else "stop" if ended_by_eos or stream.stopped else "length"
                ended.add(row)
                reasoning, content = splitters[row].push(stream.flush(), final=True)
                if reasoning or content:
                    yield StreamEvent(row, content, reasoning)
                reasoning, answer = split_thinking(stream.text, requests[row].open_thinking)
                yield StreamEvent(row, completion=Completion(
                    text=answer, reasoning=reasoning, token_ids=list(stream.ids), finish_reason=reason,
                    prompt_tokens=len(prompts[row]), completion_tokens=len(stream.ids) + int(ended_by_eos),
                    seconds=time.perf_counter() - start))
            if ended:  # finished and cancelled rows leave the batch: no more compute or KV memory for them
                kept = [i for i, row in enumerate(live) if row not in ended]
                live = [live[i] for i in kept]
                if live:
                    decoder.keep(kept)

    def generate(self, requests: Sequence[ChatRequest],
                 configs: GenerationConfig | Sequence[GenerationConfig]) -> list[Completion]:
        """Complete every request (batched); results in request order."""
        results: list[Completion | None] = [None] * len(requests)
        for event in self.run(requests, configs):
            if event.completion is not None:
                results[event.row] = event.completion
        return results

    def stream(self, request: ChatRequest, config: GenerationConfig) -> Iterator[StreamEvent]:
        """The events of one request: answer/reasoning deltas, then its `Completion`."""
        yield from self.run([request], config)


def inference_dtype(device: str | torch.device, quantize: str = "none") -> torch.dtype:
    """bfloat16 on CUDA GPUs that support it, and for int8 weights on a CPU with native bf16 (int8 weights times
    float32 activations are dequantized on every call, 2.4x slower than float32 weights); float32 elsewhere."""
    from .distributed import native_cpu_bf16

    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if quantize != "none" and native_cpu_bf16() else torch.float32
