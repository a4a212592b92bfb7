"""Training data: streaming reads of parquet / jsonl files, one deterministic row order per (seed, epoch),
samples rendered and labelled as the reference does, bad rows skipped and counted, and packing of several
samples into one row with positions reset per document.

Row order. Files are cut into chunks (a parquet row group, or a block of `JSONL_BLOCK` lines of a jsonl
file). Each epoch orders the chunks at random with every file spread evenly over the epoch, groups
consecutive chunks into windows of about `shuffle_window` rows and permutes the rows inside each window. Only
the window being read is held in memory (raw bytes, not decoded), so memory depends on the window and
row-group sizes, never on the file size, and any position of the epoch can be reached by loading one window.

Micro-batches. A step consumes a fixed number of rows: `batch_size` rows per process per micro-batch.
Position p of the epoch belongs to rank p % world_size, so the data position of a run is simply the number
of rows of the epoch consumed so far, whatever the packing and the bad rows. Micro-batch k of a rank is built
(in a DataLoader worker) from its rows, skipping bad ones, then packed into rows of at most `max_seq_len`
tokens: input_ids / labels / position_ids [R, T] with R <= batch_size rows and T the longest packed row.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from jinja2 import TemplateError

from .tokenizer import EMPTY_THINK, IMAGE_MARKER, IMAGE_TOKEN, expand_image_markers, render_chat
from .vision import load_image

JSONL_BLOCK = 1024  # lines per jsonl chunk
IGNORE = -100
# Reasons a row is skipped; reported in the log and the run summary.
BAD_REASONS = {
    "missing_field": "the text / conversations field is missing or null",
    "invalid_json": "the row is not valid JSON",
    "bad_conversation": "conversations is not a list of {role, content} messages",
    "no_assistant_turn": "the conversation has no assistant turn",
    "empty_text": "the pretraining text is empty",
    "image_mismatch": "the number of <image> markers differs from the number of images",
    "bad_image": "an image could not be decoded",
    "image_truncated": "--max_seq_len would cut an image's placeholder tokens",
    "answer_truncated": "--max_seq_len leaves no supervised token",
}
# Identity prompts occasionally prepended to SFT conversations (the reference does the same with its own list).
SYSTEM_PROMPTS = [
    "You are a helpful AI assistant.",
    "You are minimind, a small but useful language model.",
    "You are a knowledgeable assistant. Answer clearly and concisely.",
    "You are an AI that answers questions about text and images.",
    "You are a friendly assistant who explains things step by step.",
    "你是一个乐于助人的AI助手。",
    "你是minimind，一个小巧但实用的语言模型。",
    "你是一个知识渊博的助手，请清晰简洁地回答。",
    "你是一个能看懂图片并回答问题的AI。",
    "你是一个友好的助手，会一步一步地解释问题。",
]


class BadSample(Exception):
    """A row that cannot be trained on; `reason` is a key of BAD_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DataConfig:
    """How rows become samples. `chat=False` is plain pretraining text; `image_token_len=0` ignores images."""

    paths: list[str]
    chat: bool
    max_seq_len: int
    image_token_len: int = 0
    add_system_ratio: float = 0.2
    empty_think_ratio: float = 0.2
    seed: int = 42
    shuffle_window: int = 8192
    packing: bool = True
    pad_multiple: int = 1

    @property
    def fields(self) -> tuple[str, ...]:
        if not self.chat:
            return ("text",)
        return ("conversations", "image_bytes") if self.image_token_len else ("conversations",)


# ----------------------------------------------------------------------------------------------------------
# Reading: chunks of raw rows


@dataclass(frozen=True)
class Chunk:
    """`rows` rows of `path`: parquet row group `locator`, or jsonl lines starting at byte `locator`."""

    path: str
    locator: int
    rows: int


def index_chunks(config: DataConfig) -> list[Chunk]:
    """Chunks of every data file, from parquet metadata or one streaming pass over a jsonl file."""
    chunks = []
    for path in config.paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no data file at {path!r}")
        if path.endswith(".parquet"):
            chunks += _parquet_chunks(path, config.fields)
        elif path.endswith(".jsonl"):
            chunks += _jsonl_chunks(path)
        else:
            raise ValueError(f"{path}: data files must be .parquet or .jsonl")
    if not chunks:
        raise ValueError(f"no rows in {config.paths}")
    return chunks


def _parquet_chunks(path: str, fields: tuple[str, ...]) -> list[Chunk]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if fields[0] not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: needs a `{fields[0]}` column, found {parquet.schema_arrow.names}")
    meta = parquet.metadata
    return [Chunk(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
            if meta.row_group(g).num_rows]


def _jsonl_chunks(path: str) -> list[Chunk]:
    chunks, start, count, offset = [], 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if count == 0:
                    start = offset
                count += 1
                if count == JSONL_BLOCK:
                    chunks.append(Chunk(path, start, count))
                    count = 0
            offset += len(line)
    if count:
        chunks.append(Chunk(path, start, count))
    return chunks


class RowReader:
    """Raw rows of chunks, one process's view. Parquet files are opened on first use (not pickled)."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields = fields
        self._files: dict = {}

    def read(self, chunk: Chunk) -> list:
        """The chunk's rows: parquet dicts of `fields`, or raw jsonl lines (decoded later, per row)."""
        if chunk.path.endswith(".parquet"):
            return self._read_parquet(chunk)
        with open(chunk.path, "rb") as f:
            f.seek(chunk.locator)
            lines = []
            while len(lines) < chunk.rows:
                line = f.readline()
                if not line:
                    raise ValueError(f"{chunk.path} changed while training: fewer lines than indexed")
                if line.strip():
                    lines.append(line)
        return lines

    def _read_parquet(self, chunk: Chunk) -> list:
        import pyarrow.parquet as pq

        if chunk.path not in self._files:
            self._files[chunk.path] = pq.ParquetFile(chunk.path)
        parquet = self._files[chunk.path]
        columns = [c for c in self.fields if c in parquet.schema_arrow.names]
        return parquet.read_row_group(chunk.locator, columns=columns).to_pylist()


def decode_record(raw) -> dict:
    """A parquet row (already a dict) or a jsonl line -> dict, or BadSample('invalid_json')."""
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadSample("invalid_json") from err
    if not isinstance(record, dict):
        raise BadSample("invalid_json")
    return record


# ----------------------------------------------------------------------------------------------------------
# Order: one permutation per (seed, epoch), windowed


def interleaved_chunk_order(chunks: list[Chunk], rng: np.random.Generator) -> np.ndarray:
    """A random order of the chunks [C] in which every file is spread evenly over the epoch: each file's chunks
    are shuffled, and a chunk covering rows [a, b) of its file's shuffled rows is placed at a random point of
    [a, b) / (the file's rows). Any stretch of the epoch (a shuffle window, the first steps of a short run)
    then holds the files in proportion to their rows, not a few row groups of whichever files came first."""
    files = np.unique([chunk.path for chunk in chunks], return_inverse=True)[1]  # [C] file index of each chunk
    sizes = np.array([chunk.rows for chunk in chunks], dtype=np.float64)
    shuffled = np.lexsort((rng.random(len(chunks)), files))  # grouped by file, random inside a file
    rows_before = np.cumsum(sizes[shuffled]) - sizes[shuffled]
    file_start = np.r_[0.0, np.cumsum(np.bincount(files, weights=sizes))]  # [F + 1] rows before each file
    start = np.empty(len(chunks))
    start[shuffled] = rows_before - file_start[files[shuffled]]
    place = (start + rng.random(len(chunks)) * sizes) / np.diff(file_start)[files]
    return np.argsort(place, kind="stable")


class EpochOrder:
    """Maps a position of the epoch to (chunk index, row in chunk) without materialising a permutation.

    The chunks are ordered by `interleaved_chunk_order` with rng(seed, epoch); consecutive chunks whose first
    row falls in the same `window` rows form a window; rows inside window w are permuted with
    rng(seed, epoch, w).
    """

    def __init__(self, chunks: list[Chunk], seed: int, epoch: int, window: int):
        self.seed, self.epoch = seed, epoch
        self.chunk_order = interleaved_chunk_order(chunks, np.random.default_rng([seed, epoch]))
        sizes = np.array([chunks[i].rows for i in self.chunk_order], dtype=np.int64)
        first_row = np.cumsum(sizes) - sizes
        window_of_chunk = np.unique(first_row // max(window, 1), return_inverse=True)[1]
        self.window_first_chunk = np.flatnonzero(np.r_[True, np.diff(window_of_chunk) > 0])  # [W]
        self.window_start = np.r_[first_row[self.window_first_chunk], sizes.sum()]  # [W + 1] row offsets
        self.sizes = sizes
        self.total = int(sizes.sum())

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.window_start, positions, side="right") - 1

    def window_rows(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Window w in its shuffled order: (chunk index [n], row inside that chunk [n])."""
        first = self.window_first_chunk[w]
        last = self.window_first_chunk[w + 1] if w + 1 < len(self.window_first_chunk) else len(self.sizes)
        sizes = self.sizes[first:last]
        order = np.random.default_rng([self.seed, self.epoch, w]).permutation(int(sizes.sum()))
        bounds = np.cumsum(sizes)
        local_chunk = np.searchsorted(bounds, order, side="right")
        rows = order - (bounds - sizes)[local_chunk]
        return self.chunk_order[first + local_chunk], rows


# ----------------------------------------------------------------------------------------------------------
# Samples: rendering, tokens and labels


@dataclass
class Sample:
    """One training document. ids / labels [L] int64 (labels unshifted, -100 = not supervised, the first
    token always -100); pixels [N, 3, S, S] float32 for its N images, or None."""

    ids: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray | None = None


def find_all(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start indices of every occurrence of `pattern` in `ids` (vectorised, no Python scan)."""
    k = len(pattern)
    if len(ids) < k:
        return np.empty(0, dtype=np.int64)
    candidates = np.flatnonzero(ids[: len(ids) - k + 1] == pattern[0])
    if k > 1 and len(candidates):
        hits = (ids[candidates[:, None] + np.arange(1, k)] == pattern[1:]).all(axis=1)
        candidates = candidates[hits]
    return candidates


def assistant_labels(ids: np.ndarray, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The reference label rule on ids [L]: supervise from just after each `begin` (assistant header) through
    the end of the first following `end` (`<|im_end|>\\n`) inclusive, or to the end of the sequence."""
    starts = find_all(ids, begin) + len(begin)
    end_starts = find_all(ids, end)
    following = np.searchsorted(end_starts, starts)  # the first `end` that starts at or after each start
    stops = np.append(end_starts + len(end), len(ids))[following]
    depth = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(depth, starts, 1)
    np.add.at(depth, stops, -1)
    return np.where(np.cumsum(depth[:-1]) > 0, ids, IGNORE)


def image_list(value) -> list[bytes]:
    """The `image_bytes` cell as a list of encoded images (binary, list of binary, or {"bytes": ...})."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [item["bytes"] if isinstance(item, dict) else item for item in items]


class SampleBuilder:
    """Record -> Sample, or BadSample. Randomness (system prompt, empty-think removal) comes from the `rng`
    passed in, seeded per row, so it does not depend on workers or processes."""

    def __init__(self, config: DataConfig, tokenizer, image_processor=None):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.begin = np.array(tokenizer.encode("<|im_start|>assistant\n"), dtype=np.int64)
        self.end = np.array(tokenizer.encode("<|im_end|>\n"), dtype=np.int64)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def build(self, record: dict, rng: random.Random) -> Sample:
        return self._chat(record, rng) if self.config.chat else self._text(record)

    def _text(self, record: dict) -> Sample:
        text = record.get("text")
        if not isinstance(text, str):
            raise BadSample("missing_field")
        if not text.strip():
            raise BadSample("empty_text")
        tokens = self.tokenizer(text, max_length=self.config.max_seq_len - 2, truncation=True).input_ids
        tok = self.tokenizer
        ids = np.array([tok.bos_token_id, *tokens, tok.eos_token_id], dtype=np.int64)
        labels = np.where(ids == tok.pad_token_id, IGNORE, ids)  # the reference also masks id 0 in the text
        labels[0] = IGNORE
        return Sample(ids, labels)

    def _chat(self, record: dict, rng: random.Random) -> Sample:
        messages, tools = conversation(record.get("conversations"))
        block = self.config.image_token_len
        images = chat_images(record, messages) if block else []
        if block:
            for m in messages:
                if m["role"] != "system" and isinstance(m["content"], str):
                    m["content"] = expand_image_markers(m["content"], block)
        if not tools and messages[0]["role"] != "system" and rng.random() < self.config.add_system_ratio:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        try:
            text = render_chat(self.tokenizer, messages, tools=tools)
        except (TemplateError, TypeError, ValueError) as err:  # e.g. tool calls of an unexpected shape
            raise BadSample("bad_conversation") from err
        if EMPTY_THINK in text and rng.random() > self.config.empty_think_ratio:
            text = text.replace(EMPTY_THINK, "")
        ids = np.array(self.tokenizer(text).input_ids, dtype=np.int64)
        if block and np.count_nonzero(ids == self.image_id) != len(images) * block:
            raise BadSample("image_mismatch")  # literal <|image_pad|> text would steal an image's slot
        truncated = ids[: self.config.max_seq_len]
        if block and np.count_nonzero(truncated == self.image_id) != len(images) * block:
            raise BadSample("image_truncated")
        labels = assistant_labels(truncated, self.begin, self.end)
        labels[0] = IGNORE
        if not np.any(labels != IGNORE):
            raise BadSample("answer_truncated")
        return Sample(truncated, labels, self._pixels(images) if images else None)

    def _pixels(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> [N, 3, size, size]; BadSample when any cannot be decoded (as `load_image` decides)."""
        try:
            return np.stack([self.image_processor.pixels(load_image(io.BytesIO(data))) for data in images])
        except ValueError as err:
            raise BadSample("bad_image") from err


def chat_images(record: dict, messages: list[dict]) -> list[bytes]:
    """The encoded images of a chat row, one per `<image>` marker. Rows without markers are text-only; any image
    they carry (the reference's 8x8 placeholder) is unused. BadSample when markers and images disagree."""
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages
                  if m["role"] != "system" and isinstance(m["content"], str))
    if not markers:
        return []
    if "image_bytes" not in record:
        raise BadSample("missing_field")
    images = image_list(record["image_bytes"])
    if markers != len(images):
        raise BadSample("image_mismatch")
    return images


def conversation(value) -> tuple[list[dict], list | None]:
    """The `conversations` cell (JSON string or list) -> (messages for the chat template, tools or None).

    Messages keep role, content, reasoning_content and tool_calls (JSON strings are parsed); tools come from
    a first system message's `tools` (LLM data) or `functions` (VLM data) key."""
    if value is None:
        raise BadSample("missing_field")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadSample("invalid_json") from err
    if not isinstance(value, list) or not value:
        raise BadSample("bad_conversation")
    messages = []
    for raw in value:
        if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
            raise BadSample("bad_conversation")
        message = {"role": raw["role"], "content": raw.get("content")}
        for key in ("reasoning_content", "tool_calls"):
            if raw.get(key):
                message[key] = _maybe_json(raw[key])
        messages.append(message)
    first = value[0]
    tools = _maybe_json(first.get("tools") or first.get("functions")) if messages[0]["role"] == "system" else None
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample("no_assistant_turn")
    return messages, tools or None


def _maybe_json(value):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise BadSample("invalid_json") from err


# ----------------------------------------------------------------------------------------------------------
# Packing


@dataclass
class Batch:
    """One micro-batch of R packed rows of T tokens.

    input_ids / labels / position_ids [R, T] int64: documents are concatenated in a row, positions restart at
    0 per document, tail padding is id 0 with label -100 and position 0 (one-token documents).
    pixel_values: None (no image in the batch) or R tensors [N_r, 3, S, S], the images of row r in reading
    order. targets: [] int64 tensor, the number of supervised positions (labels[:, 1:] != -100).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: list[torch.Tensor] | None
    targets: torch.Tensor
    samples: int
    real_tokens: int
    rows_read: int
    bad: Counter = field(default_factory=Counter)

    @property
    def processed_tokens(self) -> int:
        return self.input_ids.numel()

    def _map(self, fn) -> Batch:
        pixels = None if self.pixel_values is None else [fn(p) for p in self.pixel_values]
        return Batch(fn(self.input_ids), fn(self.labels), fn(self.position_ids), pixels, fn(self.targets),
                     self.samples, self.real_tokens, self.rows_read, self.bad)

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))


def assign_rows(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Row index of each document [n], rows holding <= capacity tokens. First-fit decreasing gives the
    fewest rows; the documents are then spread over that many rows longest-first onto the emptiest row,
    which usually shortens the longest row (the padded width) when that still fits."""
    order = np.argsort(-lengths, kind="stable")
    first_fit = np.empty(len(lengths), dtype=np.int64)
    room = np.empty(0, dtype=np.int64)
    for i in order:
        fits = np.flatnonzero(room >= lengths[i])
        first_fit[i] = fits[0] if len(fits) else len(room)
        if len(fits):
            room[fits[0]] -= lengths[i]
        else:
            room = np.append(room, capacity - lengths[i])
    balanced = np.empty(len(lengths), dtype=np.int64)
    load = np.zeros(len(room), dtype=np.int64)
    for i in order:
        balanced[i] = np.argmin(load)
        load[balanced[i]] += lengths[i]
    return balanced if load.max() < capacity - room.min() else first_fit


def pack(samples: list[Sample], max_seq_len: int, packing: bool = True, image_id: int = 12,
         image_token_len: int = 0, pad_multiple: int = 1, rows_read: int = 0, bad: Counter | None = None) -> Batch:
    """Samples -> Batch. With packing, documents share rows (first-fit decreasing); without, one per row.
    An empty list gives one padding token, so every process of a distributed run can still take a step."""
    bad = bad if bad is not None else Counter()
    if not samples:
        zeros = torch.zeros(1, 1, dtype=torch.long)
        return Batch(zeros, torch.full((1, 1), IGNORE), zeros.clone(), None, torch.tensor(0), 0, 0, rows_read, bad)
    lengths = np.array([len(s.ids) for s in samples], dtype=np.int64)
    row_of_doc = assign_rows(lengths, max_seq_len) if packing else np.arange(len(samples))
    order = np.argsort(row_of_doc, kind="stable")  # documents grouped by row, in reading order
    doc_rows, doc_lengths = row_of_doc[order], lengths[order]
    num_rows = int(doc_rows.max()) + 1
    row_lengths = np.bincount(doc_rows, weights=doc_lengths, minlength=num_rows).astype(np.int64)
    width = -(-int(row_lengths.max()) // pad_multiple) * pad_multiple
    token_doc = np.repeat(np.arange(len(order)), doc_lengths)  # [N] document of each token
    token_row = doc_rows[token_doc]
    flat = np.arange(len(token_doc))
    doc_start = np.cumsum(doc_lengths) - doc_lengths
    row_start = np.cumsum(row_lengths) - row_lengths
    column = flat - row_start[token_row]
    shape = (num_rows, width)
    input_ids = np.zeros(shape, dtype=np.int64)
    labels = np.full(shape, IGNORE, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    input_ids[token_row, column] = np.concatenate([samples[i].ids for i in order])
    labels[token_row, column] = np.concatenate([samples[i].labels for i in order])
    position_ids[token_row, column] = flat - doc_start[token_doc]
    pixel_values = _row_pixels(samples, order, doc_rows, num_rows)
    if image_token_len:
        _check_row_images(input_ids, pixel_values, image_id, image_token_len)
    targets = int(np.count_nonzero(labels[:, 1:] != IGNORE))
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(position_ids),
                 pixel_values, torch.tensor(targets), len(samples), int(lengths.sum()), rows_read, bad)


def _row_pixels(samples: list[Sample], order: np.ndarray, doc_rows: np.ndarray, num_rows: int):
    """The images of each row in reading order: R views [N_r, 3, S, S] of one tensor, or None without images."""
    pixels = [samples[i].pixels for i in order if samples[i].pixels is not None]
    if not pixels:
        return None
    counts = np.array([0 if samples[i].pixels is None else len(samples[i].pixels) for i in order])
    per_row = np.bincount(doc_rows, weights=counts, minlength=num_rows).astype(np.int64)
    return list(torch.from_numpy(np.concatenate(pixels)).split(per_row.tolist()))


def _check_row_images(input_ids: np.ndarray, pixel_values, image_id: int, block: int) -> None:
    counts = np.array([len(p) for p in pixel_values]) if pixel_values is not None else 0
    placeholders = np.count_nonzero(input_ids == image_id, axis=1)
    if np.any(placeholders != counts * block):
        raise RuntimeError(f"packed rows hold {placeholders.tolist()} image tokens for {counts} images")


# ----------------------------------------------------------------------------------------------------------
# Micro-batches of one process


class TrainingData:
    """Everything needed to produce micro-batches of any epoch: chunk index, sample builder, packing rules."""

    def __init__(self, config: DataConfig, tokenizer, image_processor=None):
        self.config = config
        self.chunks = index_chunks(config)
        self.builder = SampleBuilder(config, tokenizer, image_processor)
        self.total_rows = sum(c.rows for c in self.chunks)

    def epoch(self, epoch: int, start_row: int, batch_size: int, rank: int = 0, world_size: int = 1) -> MicroBatches:
        return MicroBatches(self, EpochOrder(self.chunks, self.config.seed, epoch, self.config.shuffle_window),
                            start_row, batch_size, rank, world_size)


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of one rank: epoch positions start_row + k*G + rank + world*j (j < batch_size, G =
    batch_size * world) that fall inside the epoch. Map-style, so DataLoader workers split the work and the
    order never depends on the number of workers."""

    def __init__(self, data: TrainingData, order: EpochOrder, start_row: int, batch_size: int, rank: int,
                 world_size: int):
        self.data, self.order = data, order
        self.start_row, self.batch_size = start_row, batch_size
        self.rank, self.world_size = rank, world_size
        self.reader = RowReader(data.config.fields)
        self._windows: dict[int, tuple[np.ndarray, np.ndarray, dict]] = {}

    @property
    def rows_per_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return -(-(self.order.total - self.start_row) // self.rows_per_batch)

    def __getitem__(self, k: int) -> Batch:
        first = self.start_row + k * self.rows_per_batch
        positions = first + self.rank + self.world_size * np.arange(self.batch_size)
        positions = positions[positions < self.order.total]
        samples, bad = self.samples(positions)
        config = self.data.config
        return pack(samples, config.max_seq_len, config.packing, self.data.builder.image_id,
                    config.image_token_len, config.pad_multiple, len(positions), bad)

    def samples(self, positions: np.ndarray) -> tuple[list[Sample], Counter]:
        """The usable samples at these (increasing) epoch positions, and the skipped rows counted by reason."""
        samples, bad = [], Counter()
        for position, window in zip(positions.tolist(), self.order.window_of(positions).tolist()):
            try:
                samples.append(self._sample(position, window))
            except BadSample as err:
                bad[err.reason] += 1
        return samples, bad

    def _sample(self, position: int, window: int) -> Sample:
        chunk_ids, rows, loaded = self._window(window)
        offset = position - int(self.order.window_start[window])
        record = decode_record(loaded[int(chunk_ids[offset])][int(rows[offset])])
        rng = random.Random(f"{self.data.config.seed}:{self.order.epoch}:{position}")
        return self.data.builder.build(record, rng)

    def _window(self, w: int):
        """(chunk ids, rows, raw rows per chunk) of window w. Only the window being read stays cached: each copy
        of this dataset (one per DataLoader worker) reads its positions in increasing order."""
        if w not in self._windows:
            chunk_ids, rows = self.order.window_rows(w)
            loaded = {int(c): self.reader.read(self.data.chunks[c]) for c in np.unique(chunk_ids)}
            self._windows = {w: (chunk_ids, rows, loaded)}
        return self._windows[w]


def unbatched(batch: Batch) -> Batch:
    """collate_fn for DataLoader(batch_size=None): items are already batches (module level, so picklable)."""
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave Ctrl-C / SIGTERM to the main process, which finishes its step and saves first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(micro_batches: MicroBatches, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """DataLoader over the micro-batches in order. Its own generator keeps the global RNG untouched."""
    return torch.utils.data.DataLoader(
        micro_batches, batch_size=None, sampler=range(len(micro_batches)), num_workers=num_workers,
        collate_fn=unbatched, pin_memory=pin_memory, generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
