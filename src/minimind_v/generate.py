"""The one generation routine behind `model.generate`, the CLI chat, the web UI and the API server.

`Decoder` does token-level decoding with continuous batching: rows join at any step (one prefill, images
encoded once) and leave as soon as they end; every step decodes one token of every row from a right-aligned KV
cache (`PaddedKVCache`), each row with its own sampling settings. `RunningBatch` does the same for chat requests
(messages + PIL images): it turns them into prompts and streams each reply as UTF-8-safe text deltas, stopping on
eos, stop strings or `max_new_tokens`. `Engine` holds the model and its tokenizer.

Shapes: B rows, T prompt length (left padded), S cached columns, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .chat_encoder import ChatEncoder, count_markers
from .config import IMAGE_TOKEN_ID
from .llm import KVCache
from .tokenizer import IMAGE_MARKER, THINK_CLOSE, THINK_OPEN
from .video import VIDEO_MARKER, splice_videos


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


@dataclass
class SamplingSettings:
    """The sampling settings of a batch's rows as tensors: temperature, repetition penalty and top-p [B, 1], top-k
    [B], greedy [B]. `all_greedy`: every row takes an argmax; `plain_greedy`: of its raw logits, so no filtering
    is needed."""

    temperature: torch.Tensor
    penalty: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor
    all_greedy: bool
    plain_greedy: bool

    @classmethod
    def of(cls, configs: Sequence[GenerationConfig], vocab_size: int, device: torch.device) -> SamplingSettings:
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=device).unsqueeze(1)

        return cls(
            temperature=column([float(c.temperature) for c in configs]).clamp(min=1e-5),
            penalty=column([float(c.repetition_penalty) for c in configs]),
            top_k=torch.tensor(
                [min(c.top_k, vocab_size) if c.top_k > 0 else vocab_size for c in configs], device=device
            ),
            top_p=column([float(c.top_p) for c in configs]),
            greedy=torch.tensor([c.greedy for c in configs], device=device),
            all_greedy=all(c.greedy for c in configs),
            plain_greedy=all(c.greedy and c.repetition_penalty == 1.0 for c in configs),
        )


def process_logits(logits: torch.Tensor, seen: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Reference order: temperature, repetition penalty over the ids seen so far, top-k, top-p.

    logits [B, V] float32, seen [B, V] bool -> filtered logits [B, V] (removed entries are -inf).
    """
    logits = logits / settings.temperature
    penalty = settings.penalty
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(seen & (penalty != 1.0), penalised, logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(1, (settings.top_k - 1).unsqueeze(1))
    remove_sorted = sorted_logits < kth
    cumulative = F.softmax(sorted_logits.masked_fill(remove_sorted, float("-inf")), dim=-1).cumsum(dim=-1)
    beyond_p = cumulative > settings.top_p
    beyond_p = torch.cat([torch.zeros_like(beyond_p[:, :1]), beyond_p[:, :-1]], dim=1) & (settings.top_p < 1.0)
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted | beyond_p)
    return logits.masked_fill(remove, float("-inf"))


def _generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if config.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    return generator


class Rows:
    """The decoding state of a batch's rows: their settings (from their `GenerationConfig`s), the ids each row has
    seen [B, V] (prompt and output, for the repetition penalty), tokens produced [B], finished [B] and the token
    each row feeds to the model next [B, 1]. Rows are appended (`extend`) and dropped (`keep`) between steps."""

    STATE = ("seen", "produced", "finished", "pending")

    def __init__(
        self,
        configs: Sequence[GenerationConfig],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        vocab_size: int,
    ):
        """The rows of prompts input_ids [B, T] (attention_mask [B, T], None: no padding)."""
        device = input_ids.device
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        seen = torch.zeros(len(configs), vocab_size, dtype=torch.long, device=device)
        self.seen = seen.scatter_add_(1, input_ids, real) > 0
        self.produced = torch.zeros(len(configs), dtype=torch.long, device=device)
        self.finished = torch.zeros(len(configs), dtype=torch.bool, device=device)
        self.pending = torch.zeros(len(configs), 1, dtype=torch.long, device=device)
        self.configs = list(configs)
        self.generators = [_generator(c, device) for c in self.configs]
        self._settle()

    def _settle(self) -> None:
        """The per-row tensors of the settings, rebuilt when the rows change rather than at every step."""
        device = self.finished.device
        self.settings = SamplingSettings.of(self.configs, self.seen.shape[1], device)
        self.eos = torch.tensor([-1 if c.eos_token_id is None else c.eos_token_id for c in self.configs], device=device)
        self.filler = self.eos.clamp(min=0)
        self.limit = torch.tensor([c.max_new_tokens for c in self.configs], device=device)
        self.seeded = any(g is not None for g in self.generators)

    def extend(self, other: Rows) -> None:
        for name in self.STATE:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.configs += other.configs
        self.generators += other.generators
        self._settle()

    def keep(self, rows: Sequence[int], index: torch.Tensor) -> None:
        for name in self.STATE:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.configs = [self.configs[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self._settle()

    def advance(self, logits: torch.Tensor) -> torch.Tensor:
        """Choose every row's next token from logits [B, V] (float32); finished rows get eos (0 without one).
        Returns tokens [B]."""
        tokens = torch.where(self.finished, self.filler, self._choose(logits))
        self.seen.scatter_(1, tokens.unsqueeze(1), True)
        self.pending = tokens.unsqueeze(1)
        self.produced += 1
        self.finished |= (tokens == self.eos) | (self.produced >= self.limit)
        return tokens

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        settings = self.settings
        if settings.plain_greedy:
            return logits.argmax(dim=-1)
        processed = process_logits(logits, self.seen, settings)
        if settings.all_greedy:
            return processed.argmax(dim=-1)
        probs = F.softmax(processed, dim=-1)
        if self.seeded:
            sampled = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        else:
            sampled = torch.multinomial(probs, 1).squeeze(1)
        return torch.where(settings.greedy, processed.argmax(dim=-1), sampled)


def _aligned(pieces: Sequence[torch.Tensor], length: int, capacity: int, dim: int) -> torch.Tensor:
    """The rows of `pieces` stacked, each piece's columns (along `dim`) moved right so that they end at column
    `length`, zeros before them; `capacity` columns in all, those from `length` on left unset."""
    shape = list(pieces[0].shape)
    shape[0], shape[dim] = sum(p.shape[0] for p in pieces), capacity
    out = pieces[0].new_empty(shape)
    first_row = 0
    for piece in pieces:
        rows, filled = out[first_row : first_row + piece.shape[0]], piece.shape[dim]
        rows.narrow(dim, 0, length - filled).zero_()
        rows.narrow(dim, length - filled, filled).copy_(piece)
        first_row += piece.shape[0]
    return out


class PaddedKVCache(KVCache):
    """Keys and values of rows that hold different numbers of tokens, right aligned so that one decode step writes
    the same column for every row: row b's tokens are the columns of [0, length) where mask[b] is 1, the columns
    before them are left padding. keys, values: per layer [B, nkv, capacity, hd]; mask [B, capacity] (columns
    from `length` on are already 1, for the tokens to come).

    Memory follows what the rows need: the storage grows by doubling, but never past `limit` columns (the filled
    ones plus the most tokens a row may still write: its prompt plus `max_new_tokens` bound it); rows join
    (`extend`) and leave (`keep`) between forwards, and a leading column that no row uses any more is dropped.
    """

    def __init__(
        self, config, attention_mask: torch.Tensor | None, input_ids: torch.Tensor, dtype: torch.dtype, limit: int
    ):
        """Room for the prompts input_ids [B, T] with their padding mask [B, T] (None: no padding)."""
        batch, columns = input_ids.shape
        super().__init__(
            config.num_hidden_layers,
            batch,
            config.num_key_value_heads,
            config.head_dim,
            columns,
            dtype,
            input_ids.device,
        )
        self.mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.padded = attention_mask is not None
        self.limit = limit

    def attention_mask(self, new: int) -> torch.Tensor | None:
        """The model's attention_mask [B, length + new] for `new` more tokens per row; None without padding."""
        self.reserve(self.length + new)
        return self.mask[:, : self.length + new] if self.padded else None

    def reserve(self, needed: int) -> None:
        if needed > self.capacity:
            self._replace(
                [[store.narrow(dim, 0, self.length)] for store, dim in self._stores()], self.length, self.limit, needed
            )

    def extend(self, other: PaddedKVCache, room: int) -> None:
        """Append the rows of `other` (the shorter history gets left padding); `room`: the most tokens a row may
        still write."""
        length = max(self.length, other.length)
        self.padded = self.padded or other.padded or self.length != other.length
        pieces = [
            [ours.narrow(dim, 0, self.length), theirs.narrow(dim, 0, other.length)]
            for (ours, dim), (theirs, _) in zip(self._stores(), other._stores())
        ]
        self._replace(pieces, length, length + room, length + 1)

    def keep(self, index: torch.Tensor, room: int) -> None:
        """Keep the rows `index` [B'] (in that order); `room`: the most tokens one of them may still write."""
        used = self.mask[:, : self.length].index_select(0, index).bool()
        trim = int(used.any(dim=0).int().argmax())  # leading columns that are padding in every kept row
        self.padded = not bool(used[:, trim:].all())
        length = self.length - trim
        pieces = [[store.narrow(dim, trim, length).index_select(0, index)] for store, dim in self._stores()]
        self._replace(pieces, length, length + room, length + 1)

    def _stores(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor of the cache with its column dimension: the keys and values of each layer, the mask."""
        return [(k, 2) for k in self.keys] + [(v, 2) for v in self.values] + [(self.mask, 1)]

    def _replace(self, pieces: list[list[torch.Tensor]], length: int, limit: int, needed: int) -> None:
        """New storage of max(needed, min(limit, 2 * needed)) columns: for each store (in `_stores` order) its
        pieces stacked row-wise and right aligned at `length`."""
        capacity = max(needed, min(limit, 2 * needed))
        stores = [_aligned(p, length, capacity, dim) for p, (_, dim) in zip(pieces, self._stores())]
        layers = len(self.keys)
        self.keys, self.values, self.mask = stores[:layers], stores[layers : 2 * layers], stores[-1]
        self.mask[:, length:] = 1
        self.length, self.limit = length, limit


@dataclass
class Prompts:
    """Rows waiting for their prefill: input_ids [N, T] left padded, attention_mask [N, T] or None, pixel_values."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    configs: list[GenerationConfig]
    pixel_values: object = None


class Decoder:
    """Token-level decoding with continuous batching: each `step()` returns the next token of every row.

    Rows `join` as left-padded input_ids [N, T] with attention_mask [N, T] (None: no padding) and pixel_values in
    any form `MiniMindVLM.forward` accepts. The next step prefills them (images encoded once) for their first
    token while the rows already there decode one token each from the KV cache; joined rows come after the
    earlier ones. Finished rows keep receiving eos (0 when a row has no eos) until `keep` drops them.
    `use_cache=False` recomputes the whole sequence every step (the naive path, kept for comparison; its rows all
    join before the first step). `banned_tokens` are never chosen.
    """

    def __init__(
        self,
        model,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        configs: Sequence[GenerationConfig] = (),
        pixel_values=None,
        use_cache: bool = True,
        check_images: bool = True,
        banned_tokens: Sequence[int] = (),
    ):
        self.model = model
        self.use_cache, self.check_images = use_cache, check_images
        self.banned = list(banned_tokens)
        self.dtype = next(model.parameters()).dtype
        self.rows: Rows | None = None
        self.cache: PaddedKVCache | None = None
        self.joining: list[Prompts] = []
        self.budget_ends: list[int] = []  # per row (and joining row): the step that produces its last token
        self.steps = 0
        self.sequence: Prompts | None = None  # the naive path's ids so far
        if input_ids is not None:
            self.join(input_ids, attention_mask, configs, pixel_values)

    def join(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        configs: Sequence[GenerationConfig],
        pixel_values=None,
    ) -> None:
        """Add rows; the next `step` prefills them and gives their first token."""
        if not self.use_cache and (self.rows is not None or self.joining):
            raise ValueError("rows can join a running batch only with use_cache=True")
        self.joining.append(Prompts(input_ids, attention_mask, list(configs), pixel_values))
        self.budget_ends += [self.steps + c.max_new_tokens for c in configs]

    def step(self) -> torch.Tensor:
        """One token for every row: token ids [B]."""
        with torch.inference_mode():
            self.steps += 1
            tokens = [] if self.rows is None else [self._decode()]
            tokens += [self._prefill(prompts) for prompts in self.joining]
            self.joining = []
        return torch.cat(tokens)

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with `rows` only (in that order), between steps: the other rows stop being computed and their KV
        memory is freed. Needs the KV cache."""
        if not self.use_cache:
            raise ValueError("rows can leave a running batch only with use_cache=True")
        self.budget_ends = [self.budget_ends[r] for r in rows]
        if not rows:
            self.rows = self.cache = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.rows.finished.device)
        self.rows.keep(rows, index)
        self.cache.keep(index, room=self._room())

    @property
    def done(self) -> bool:
        return not self.joining and (self.rows is None or bool(self.rows.finished.all()))

    def _room(self) -> int:
        """The most tokens a row may still write into the cache (its pending one included)."""
        return max(self.budget_ends) - self.steps

    def _logits(self, out) -> torch.Tensor:
        logits = out.logits[:, -1].float()
        if self.banned:
            logits[:, self.banned] = float("-inf")
        return logits

    def _prefill(self, prompts: Prompts) -> torch.Tensor:
        """The first token of each row of `prompts` [N]; the rows then join the batch."""
        ids, mask = prompts.input_ids, prompts.attention_mask
        cache = PaddedKVCache(self.model.config, mask, ids, self.dtype, limit=ids.shape[1]) if self.use_cache else None
        out = self.model(
            ids,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=self.use_cache,
            logits_to_keep=1,
            pixel_values=prompts.pixel_values,
            check_images=self.check_images,
        )
        rows = Rows(prompts.configs, ids, mask, self.model.config.vocab_size)
        tokens = rows.advance(self._logits(out))
        if self.rows is None:
            self.rows, self.cache = rows, cache
            if cache is None:
                self.sequence = prompts
            else:
                cache.limit = cache.length + self._room()
        else:
            self.rows.extend(rows)
            self.cache.extend(cache, room=self._room())
        return tokens

    def _decode(self) -> torch.Tensor:
        """The next token of each running row [B]."""
        if self.cache is None:
            return self._recompute()
        out = self.model(
            self.rows.pending,
            attention_mask=self.cache.attention_mask(new=1),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            check_images=False,
        )
        return self.rows.advance(self._logits(out))

    def _recompute(self) -> torch.Tensor:
        """The naive step: the whole sequence so far through the model again, images included."""
        sequence = self.sequence
        sequence.input_ids = torch.cat([sequence.input_ids, self.rows.pending], dim=1)
        if sequence.attention_mask is not None:
            mask = sequence.attention_mask
            sequence.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = self.model(
            sequence.input_ids,
            attention_mask=sequence.attention_mask,
            logits_to_keep=1,
            pixel_values=sequence.pixel_values,
            check_images=self.check_images,
        )
        return self.rows.advance(self._logits(out))


def sample_completions(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    configs: Sequence[GenerationConfig],
    pixel_values=None,
) -> list[list[int]]:
    """One completion per row (RL rollouts): input_ids [B, T] left padded -> the new ids of each row, through its
    eos, or `max_new_tokens` ids when it never ended. The model should be in eval mode. A VLM never samples its
    image placeholder token: an answer holding one could not be read back with its prompt's images."""
    banned = [IMAGE_TOKEN_ID] if getattr(model.config, "image_token_len", 0) else []
    decoder = Decoder(model, input_ids, attention_mask, configs, pixel_values, check_images=False, banned_tokens=banned)
    steps = []
    while not decoder.done:
        steps.append(decoder.step())
    tokens = torch.stack(steps, dim=1)  # [B, S]
    ended = tokens == decoder.rows.eos.unsqueeze(1)
    lengths = torch.where(
        ended.any(dim=1), ended.int().argmax(dim=1) + 1, decoder.rows.limit.clamp(max=tokens.shape[1])
    )
    return [row[:length] for row, length in zip(tokens.tolist(), lengths.tolist())]


def reference_generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 8192,
    temperature: float = 0.85,
    top_p: float = 0.85,
    top_k: int = 50,
    eos_token_id: int | None = 2,
    streamer=None,
    use_cache: bool = True,
    num_return_sequences: int = 1,
    do_sample: bool = True,
    repetition_penalty: float = 1.0,
    pixel_values=None,
    max_length: int | None = None,
    return_kv: bool = False,
    seed=None,
    **kwargs,
):
    """`model.generate` with the reference signature and result: prompt + new ids [B*n, T + new], finished
    rows padded with eos. Unlike the reference, `max_length` (prompt + new) is honoured."""
    input_ids = kwargs.pop("inputs", None) if input_ids is None else input_ids
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        attention_mask = (
            attention_mask.repeat_interleave(num_return_sequences, 0) if attention_mask is not None else None
        )
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.repeat_interleave(num_return_sequences, dim=0)
        elif isinstance(pixel_values, dict):
            pixel_values = {k: v.repeat_interleave(num_return_sequences, 0) for k, v in pixel_values.items()}
    if max_length is not None:
        max_new_tokens = min(max_new_tokens, max_length - input_ids.shape[1])
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    config = GenerationConfig(
        max_new_tokens=max(max_new_tokens, 0),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k or 0,
        repetition_penalty=repetition_penalty,
        do_sample=do_sample,
        seed=seed,
        eos_token_id=eos_token_id,
    )
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
    order) and where videos go with `<video>` (`video.Video`s, one per marker); when no message has a marker of
    their kind, the videos then the images go at the start of the last user message."""

    messages: list[dict]
    images: list = field(default_factory=list)
    open_thinking: bool = False
    tools: list | None = None
    videos: list = field(default_factory=list)


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
        new = reasoning[self.sent_reasoning :], answer[self.sent_answer :]
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
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        for stop in self.stop:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        end = max(len(self.text) - hold, self.sent)
        delta, self.sent = self.text[self.sent : end], end
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


@dataclass
class PreparedPrompt:
    """A request rendered once for the decoder: its prompt ids and its images in marker order (video frames
    spliced in), which the prefill turns into squares."""

    ids: list[int]
    images: list


class Engine:
    """Chat-level generation for a model (on its device, eval mode) and its tokenizer."""

    def __init__(self, model, tokenizer, max_prompt_tokens: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.encoder = ChatEncoder(tokenizer, getattr(model.config, "image_token_len", 0))
        self.device = next(model.parameters()).device

    def prepare(self, request: ChatRequest) -> PreparedPrompt:
        """The request's generation prompt through the chat encoder (as training encodes it) and its images;
        ValueError when markers and images disagree, PromptTooLong over the limit."""
        messages, images = self.visuals(request)
        processor = getattr(self.model, "image_processor", None)
        grids = [processor.grid(image) for image in images] if processor is not None else len(images)
        ids = self.encoder.encode(
            messages, grids, request.tools, generation_prompt=True, open_thinking=request.open_thinking
        ).ids.tolist()
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens, more than the limit of {self.max_prompt_tokens}")
        return PreparedPrompt(ids, images)

    def visuals(self, request: ChatRequest) -> tuple[list[dict], list]:
        """The request's messages and images, videos spliced in (`video.splice_videos`: each frame one
        thumbnail-size image after its timestamp). Images or videos without any marker of their kind go at the
        start of the last user message, videos first; ValueError when there is no user message or markers and
        media disagree."""
        messages = request.messages
        missing = (VIDEO_MARKER * len(request.videos) if count_markers(messages, VIDEO_MARKER) == 0 else "") + (
            IMAGE_MARKER * len(request.images) if count_markers(messages) == 0 else "")
        if missing:
            last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            if last_user is None:
                raise ValueError("images or videos were given but the conversation has no user message")
            messages = [dict(m) for m in messages]
            messages[last_user]["content"] = missing + "\n" + (messages[last_user].get("content") or "")
        if not request.videos:
            return messages, request.images
        return splice_videos(messages, request.images, request.videos, frame_size=self.model.config.image_size)

    def _batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        padded = any(len(p) < longest for p in prompts)
        return ids.to(self.device), mask.to(self.device) if padded else None

    def _pixels(self, images: Sequence[list]):
        """Each request's squares (every image's thumbnail and tiles, video frames included) [N_r, 3, S, S] from
        its prepared images, or None without images."""
        if not any(images):
            return None
        processor = self.model.image_processor
        empty = torch.empty(0, 3, processor.size, processor.size)
        return [(processor(row) if row else empty).to(self.device) for row in images]

    def run(
        self,
        requests: Sequence[ChatRequest],
        configs: GenerationConfig | Sequence[GenerationConfig],
        prepared: Sequence[PreparedPrompt] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> Iterator[StreamEvent]:
        """Decode a batch; yields new text per row as it becomes final, then one event per row with its
        `Completion` as soon as that row ends. `prepared` are the requests' `prepare` results when the caller
        already has them; a row for which `cancelled(row)` turns true stops with finish_reason "cancelled"."""
        configs = [configs] * len(requests) if isinstance(configs, GenerationConfig) else list(configs)
        batch = RunningBatch(self)
        for row, (request, config) in enumerate(zip(requests, configs)):
            batch.add(row, request, config, None if prepared is None else prepared[row])
        while batch:
            yield from batch.step(cancelled)

    def generate(
        self, requests: Sequence[ChatRequest], configs: GenerationConfig | Sequence[GenerationConfig]
    ) -> list[Completion]:
        """Complete every request (batched); results in request order."""
        results: list[Completion | None] = [None] * len(requests)
        for event in self.run(requests, configs):
            if event.completion is not None:
                results[event.row] = event.completion
        return results

    def stream(self, request: ChatRequest, config: GenerationConfig,
               prepared: PreparedPrompt | None = None) -> Iterator[StreamEvent]:
        """The events of one request (`prepared`: its `prepare` result, if the caller has it): answer/reasoning
        deltas, then its `Completion`."""
        yield from self.run([request], config, None if prepared is None else [prepared])


@dataclass
class Reply:
    """A request in a `RunningBatch` and the text it has produced so far."""

    key: int
    request: ChatRequest
    config: GenerationConfig
    prompt: PreparedPrompt
    stream: TextStream
    splitter: ThinkingSplitter
    start: float


class RunningBatch:
    """Chat requests decoded together with continuous batching. `add` a request at any time: it joins at the next
    `step` (its prefill, with its images), which decodes one token of every request; a request leaves the batch
    the moment it ends (eos, a stop string, `max_new_tokens`, or cancelled), freeing its row and KV memory."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.decoder = Decoder(engine.model, check_images=False)
        self.replies: list[Reply] = []  # in decoder row order
        self.waiting: list[Reply] = []

    def __len__(self) -> int:
        return len(self.replies) + len(self.waiting)

    def add(self, key: int, request: ChatRequest, config: GenerationConfig,
            prompt: PreparedPrompt | None = None) -> None:
        """Queue `request` (its `Engine.prepare` result when the caller already has it) for the next step; its
        events carry `key` as their row."""
        prompt = self.engine.prepare(request) if prompt is None else prompt
        self.waiting.append(
            Reply(
                key,
                request,
                config,
                prompt,
                TextStream(self.engine.tokenizer, config.stop),
                ThinkingSplitter(request.open_thinking),
                time.perf_counter(),
            )
        )

    def step(self, cancelled: Callable[[int], bool] | None = None) -> list[StreamEvent]:
        """Prefill the waiting requests and decode one token of every other: the new text of each, and a
        `Completion` for each that ended (or for which `cancelled(key)` turned true)."""
        if self.waiting:
            ids, mask = self.engine._batch([r.prompt.ids for r in self.waiting])
            pixels = self.engine._pixels([r.prompt.images for r in self.waiting])
            self.decoder.join(ids, mask, [r.config for r in self.waiting], pixels)
            self.replies += self.waiting
            self.waiting = []
        events, kept = [], []
        for row, (reply, token) in enumerate(zip(self.replies, self.decoder.step().tolist())):
            if not self._push(reply, token, cancelled is not None and cancelled(reply.key), events):
                kept.append(row)
        if len(kept) < len(self.replies):
            self.decoder.keep(kept)
            self.replies = [self.replies[row] for row in kept]
        return events

    def _push(self, reply: Reply, token: int, cancelled: bool, events: list[StreamEvent]) -> bool:
        """Add `token` to `reply`, appending its events; True when the reply has ended."""
        config, stream = reply.config, reply.stream
        ended_by_eos = token == config.eos_token_id
        reasoning, content = reply.splitter.push("" if ended_by_eos else stream.push(token))
        if reasoning or content:
            events.append(StreamEvent(reply.key, content, reasoning))
        if not (ended_by_eos or stream.stopped or cancelled or len(stream.ids) >= config.max_new_tokens):
            return False
        reason = "cancelled" if cancelled else "stop" if ended_by_eos or stream.stopped else "length"
        reasoning, content = reply.splitter.push(stream.flush(), final=True)
        if reasoning or content:
            events.append(StreamEvent(reply.key, content, reasoning))
        reasoning, answer = split_thinking(stream.text, reply.request.open_thinking)
        completion = Completion(
            text=answer,
            reasoning=reasoning,
            token_ids=list(stream.ids),
            finish_reason=reason,
            prompt_tokens=len(reply.prompt.ids),
            completion_tokens=len(stream.ids) + int(ended_by_eos),
            seconds=time.perf_counter() - reply.start,
        )
        events.append(StreamEvent(reply.key, completion=completion))
        return True


DTYPES = ("auto", "float32", "bfloat16")


def inference_dtype(device: str | torch.device, dtype: str = "auto") -> tuple[torch.dtype, str]:
    """The dtype of the weights for inference (`dtype` auto, float32 or bfloat16) and why it was chosen. Auto:
    bfloat16 on CUDA GPUs that support it and on CPUs with native bf16 (AVX512-BF16 or AMX), where decoding reads
    half the bytes per token (and int8 weights are dequantized to bf16 rather than to float32, 2.4x faster);
    float32 elsewhere."""
    from .distributed import native_cpu_bf16

    if dtype != "auto":
        return getattr(torch, dtype), f"--dtype {dtype}"
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bf16"
        return torch.float32, "auto: this GPU has no bf16"
    if native_cpu_bf16():
        return torch.bfloat16, "auto: this CPU multiplies bf16 natively"
    return torch.float32, "auto: this CPU has no native bf16"


class PackedLinear(nn.Module):
    """Inference-only stand-in for a bias-free bf16 `nn.Linear` on a CPU: its weight is reordered once into
    oneDNN's blocked layout (as torch.compile's CPU weight freezing does), so no call pays that reorder, which
    makes the matrix-vector products of decoding faster. Results equal `F.linear`'s up to bf16 rounding (the same
    bits for the few rows of a decode step)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def pack_linear_weights(model: nn.Module) -> int:
    """Replace the decoder's plain bias-free bf16 `nn.Linear` layers and lm_head of a CPU model by `PackedLinear`s,
    for inference only (no gradients, no state_dict entries); layers with a LoRA adapter or int8 weights stay.
    Returns how many were replaced (none off a CPU with native bf16)."""
    from .distributed import native_cpu_bf16

    if not native_cpu_bf16() or next(model.parameters()).device.type != "cpu":
        return 0
    names = [
        name
        for name, module in model.named_modules()
        if (name == "lm_head" or name.startswith("model.")) and ".lora." not in name and _packable(module)
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedLinear(model.get_submodule(name)))
    return len(names)


def _packable(module: nn.Module) -> bool:
    plain = type(module) is nn.Linear and module.bias is None and not hasattr(module, "lora")
    return plain and module.weight.dtype == torch.bfloat16
