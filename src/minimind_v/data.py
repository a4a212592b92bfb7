"""Training data: streaming reads of parquet / jsonl files, one deterministic row order per (seed, epoch),
rows turned into documents by `samples.SampleBuilder` (bad rows skipped and counted), and packing of several
documents into one row with positions reset per document.

Row order. Files are cut into chunks (a parquet row group, or a block of `JSONL_BLOCK` lines of a jsonl
file). Each epoch orders the chunks at random with every file spread evenly over the epoch, groups
consecutive chunks into windows of about `shuffle_window` rows and permutes the rows inside each window. Only
the window being read is held in memory (raw bytes, not decoded), so memory depends on the window and
row-group sizes, never on the file size, and any position of the epoch can be reached by loading one window.

Micro-batches. A step consumes a fixed number of rows: `batch_size` rows per process per micro-batch.
Position p of the epoch belongs to rank p % world_size, so the data position of a run is simply the number
of rows of the epoch consumed so far, whatever the packing and the bad rows. Micro-batch k of a rank is built
(in a DataLoader worker) from its rows, skipping bad ones, then packed into rows of at most `max_seq_len`
tokens: input_ids / labels / position_ids [R, T] with R <= the number of documents and T the longest packed row.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from .chat_encoder import IGNORE
from .config import IMAGE_TOKEN_ID
from .samples import BadSample, Prompt, Sample, SampleBuilder, decode_record, record_fields
from .vision_cache import FeatureReader

JSONL_BLOCK = 1024  # lines per jsonl chunk


@dataclass
class DataConfig:
    """How rows become documents. `kind` is text (pretraining), chat, pairs (preference data, two documents a
    row) or prompts (for sampling, not packed); `image_token_len=0` ignores images."""

    paths: list[str]
    kind: str
    max_seq_len: int
    image_token_len: int = 0
    video_frames: int = 8
    add_system_ratio: float = 0.2
    empty_think_ratio: float = 0.2
    seed: int = 42
    shuffle_window: int = 8192
    packing: bool = True
    pad_multiple: int = 1
    thinking_ratio: float = 0.0
    needs_answer: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        return record_fields(self.kind, bool(self.image_token_len))


# ----------------------------------------------------------------------------------------------------------
# Reading: chunks of raw rows


@dataclass(frozen=True)
class Chunk:
    """`rows` rows of `path`: parquet row group `locator`, or jsonl lines starting at byte `locator`."""

    path: str
    locator: int
    rows: int


def index_chunks(config: DataConfig) -> list[Chunk]:
    """Chunks of every data file, from parquet metadata or one streaming pass over a jsonl file. Parquet files whose
    footer (the index of their row groups) cannot be read are all named in one ValueError."""
    chunks, unreadable = [], []
    for path in config.paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no data file at {path!r}")
        if path.endswith(".parquet"):
            try:
                chunks += _parquet_chunks(path, config.fields)
            except UnreadableFile as err:
                unreadable.append(str(err))
        elif path.endswith(".jsonl"):
            chunks += _jsonl_chunks(path)
        else:
            raise ValueError(f"{path}: data files must be .parquet or .jsonl")
    if unreadable:
        raise ValueError(
            "cannot read the footer of " + "; ".join(unreadable) + ". A parquet file locates its rows from its "
            "footer, at its very end, so a truncated file (an interrupted download or copy) has no row that can "
            "be found; re-download or rewrite it, or leave it out of --data_path"
        )
    if not chunks:
        raise ValueError(f"no rows in {config.paths}")
    return chunks


class UnreadableFile(Exception):
    """A data file that cannot be indexed at all."""


def _parquet_chunks(path: str, fields: tuple[str, ...]) -> list[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise UnreadableFile(f"{path} ({err})") from err
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


@dataclass(frozen=True)
class Unreadable:
    """Stands for a row that could not be read from its file; `reason` is a key of BAD_REASONS."""

    reason: str


class RowReader:
    """Raw rows of chunks, one process's view. Parquet files are opened on first use (not pickled)."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields = fields
        self._files: dict = {}

    def read(self, chunk: Chunk) -> list:
        """The chunk's rows: parquet dicts of `fields`, or raw jsonl lines (decoded later, per row); `Unreadable` for
        rows that cannot be read (the whole of a corrupt row group, the lines missing from a shortened file)."""
        if chunk.path.endswith(".parquet"):
            return self._read_parquet(chunk)
        with open(chunk.path, "rb") as f:
            f.seek(chunk.locator)
            lines = []
            while len(lines) < chunk.rows and (line := f.readline()):
                if line.strip():
                    lines.append(line)
        return lines + [Unreadable("truncated_file")] * (chunk.rows - len(lines))

    def _read_parquet(self, chunk: Chunk) -> list:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if chunk.path not in self._files:
                self._files[chunk.path] = pq.ParquetFile(chunk.path)
            parquet = self._files[chunk.path]
            columns = [c for c in self.fields if c in parquet.schema_arrow.names]
            rows = parquet.read_row_group(chunk.locator, columns=columns).to_pylist()
        except (OSError, pa.ArrowException):
            rows = []
        return rows if len(rows) == chunk.rows else [Unreadable("unreadable_row_group")] * chunk.rows


def decode_row(raw) -> dict:
    """A raw row of `RowReader.read` -> record dict, or BadSample. A jsonl line that is not JSON and has no newline
    is the end of a file cut short."""
    if isinstance(raw, Unreadable):
        raise BadSample(raw.reason)
    try:
        return decode_record(raw)
    except BadSample as err:
        if isinstance(raw, bytes) and not raw.endswith(b"\n"):
            raise BadSample("truncated_file") from err
        raise


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
# Packing


class Movable:
    """What the loop needs of any micro-batch dataclass besides its counters: the tokens it processes, and its
    tensors (and lists of tensors, such as pixel_values, and nested Movables) moved or pinned."""

    @property
    def processed_tokens(self) -> int:
        return self.input_ids.numel()

    def _map(self, fn):
        def move(value):
            if isinstance(value, torch.Tensor):
                return fn(value)
            if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                return [fn(v) for v in value]
            if isinstance(value, Movable):
                return value._map(fn)
            return value

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def pin_memory(self):
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str):
        return self._map(lambda t: t.to(device, non_blocking=True))


@dataclass
class FeatureLookup(Movable):
    """What the vision cache holds of a micro-batch's M images (reading order: H hits, M - H misses).

    hits: [H, L, D] tower outputs (None without hits); slots [M] int64: where image m sits in cat(hits, tower
    outputs of the misses); miss_keys [M - H, 16] uint8 (host): the cache keys of the misses, whose pixels are
    the batch's pixel_values; row_counts: the number of images of each of the R rows."""

    hits: torch.Tensor | None
    slots: torch.Tensor
    miss_keys: np.ndarray
    row_counts: list[int]


@dataclass
class Batch(Movable):
    """One micro-batch of R packed rows of T tokens.

    input_ids / labels / position_ids [R, T] int64: documents are concatenated in a row, positions restart at
    0 per document, tail padding is id 0 with label -100 and position 0 (one-token documents).
    documents [R, T] int64: the index of each token's document in the order they were read (-1: padding); a
    preference pair is documents 2k (chosen) and 2k + 1 (rejected).
    pixel_values: None (no image in the batch) or R tensors [N_r, 3, S, S], the images of row r in reading
    order. targets: [] int64 tensor, the number of supervised positions (labels[:, 1:] != -100).
    samples: the rows trained on (a pair is one row).
    With a vision cache, pixel_values hold only the images it lacks and `lookup` says what it holds; the
    training process then sets `image_features`, R tensors [N_r, L, D] (every image's tower output), in their
    place.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    documents: torch.Tensor
    pixel_values: list[torch.Tensor] | None
    targets: torch.Tensor
    samples: int
    real_tokens: int
    rows_read: int
    bad: Counter = field(default_factory=Counter)
    lookup: FeatureLookup | None = None
    image_features: list[torch.Tensor] | None = None


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


def pack(samples: list[Sample], max_seq_len: int, packing: bool = True, image_id: int = IMAGE_TOKEN_ID,
         image_token_len: int = 0, pad_multiple: int = 1, rows_read: int = 0, bad: Counter | None = None,
         rows_used: int | None = None) -> Batch:
    """Documents -> Batch. With packing, documents share rows (first-fit decreasing); without, one per row.
    `rows_used` is the number of data rows they came from (default: one per document). An empty list gives one
    padding token, so every process of a distributed run can still take a step."""
    bad = bad if bad is not None else Counter()
    if not samples:
        zeros = torch.zeros(1, 1, dtype=torch.long)
        return Batch(zeros, torch.full((1, 1), IGNORE), zeros.clone(), torch.full((1, 1), -1), None,
                     torch.tensor(0), 0, 0, rows_read, bad)
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
    documents = np.full(shape, -1, dtype=np.int64)
    documents[token_row, column] = order[token_doc]
    input_ids[token_row, column] = np.concatenate([samples[i].ids for i in order])
    labels[token_row, column] = np.concatenate([samples[i].labels for i in order])
    position_ids[token_row, column] = flat - doc_start[token_doc]
    images = np.array([_image_count(samples[i]) for i in order], dtype=np.int64)
    row_images = np.bincount(doc_rows, weights=images, minlength=num_rows).astype(np.int64)
    if image_token_len:
        _check_row_images(input_ids, row_images, image_id, image_token_len)
    targets = int(np.count_nonzero(labels[:, 1:] != IGNORE))
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(position_ids),
                 torch.from_numpy(documents), _row_pixels(samples, order, doc_rows, num_rows), torch.tensor(targets),
                 len(samples) if rows_used is None else rows_used, int(lengths.sum()), rows_read, bad,
                 _feature_lookup([samples[i] for i in order], row_images))


@dataclass
class PromptBatch(Movable):
    """B prompts to sample answers for (the prompts data kind; nothing is packed).

    input_ids / attention_mask [B, T] int64: left padded with id 0, mask 0. pixel_values: None or B tensors
    [N_b, 3, S, S]. messages, open_thinking, answers, seeds: per prompt (see `samples.Prompt`). The counters are
    those of `Batch`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: list[torch.Tensor] | None
    messages: list[list[dict]]
    open_thinking: list[bool]
    answers: list[tuple[str, ...]]
    seeds: list[int]
    samples: int
    real_tokens: int
    rows_read: int
    bad: Counter = field(default_factory=Counter)


def collate_prompts(prompts: list[Prompt], rows_read: int = 0, bad: Counter | None = None) -> PromptBatch:
    """Prompts -> PromptBatch, left padded to the longest. No prompt gives one padding token (a step that every
    process of a distributed run can still take)."""
    bad = bad if bad is not None else Counter()
    if not prompts:
        zeros = torch.zeros(1, 1, dtype=torch.long)
        return PromptBatch(zeros, zeros.clone(), None, [], [], [], [], 0, 0, rows_read, bad)
    lengths = np.array([len(p.ids) for p in prompts], dtype=np.int64)
    width = int(lengths.max())
    mask = np.arange(width) >= (width - lengths)[:, None]  # [B, T]: real tokens sit at the right
    input_ids = np.zeros(mask.shape, dtype=np.int64)
    input_ids[mask] = np.concatenate([p.ids for p in prompts])
    pixel_values = None
    if any(p.pixels is not None for p in prompts):
        shape = next(p.pixels.shape[1:] for p in prompts if p.pixels is not None)
        pixel_values = [torch.from_numpy(p.pixels) if p.pixels is not None else torch.empty(0, *shape)
                        for p in prompts]
    return PromptBatch(torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64)), pixel_values,
                       [p.messages for p in prompts], [p.open_thinking for p in prompts], [p.answers for p in prompts],
                       [p.seed for p in prompts], len(prompts), int(lengths.sum()), rows_read, bad)


def _row_pixels(samples: list[Sample], order: np.ndarray, doc_rows: np.ndarray, num_rows: int):
    """The images of each row in reading order: R views [N_r, 3, S, S] of one tensor, or None without images."""
    pixels = [samples[i].pixels for i in order if samples[i].pixels is not None]
    if not pixels:
        return None
    counts = np.array([0 if samples[i].pixels is None else len(samples[i].pixels) for i in order])
    per_row = np.bincount(doc_rows, weights=counts, minlength=num_rows).astype(np.int64)
    return list(torch.from_numpy(np.concatenate(pixels)).split(per_row.tolist()))


def _image_count(sample: Sample) -> int:
    if sample.cached is not None:
        return len(sample.cached.hit)
    return 0 if sample.pixels is None else len(sample.pixels)


def _feature_lookup(samples: list[Sample], row_images: np.ndarray) -> FeatureLookup | None:
    """What the vision cache holds of the images of these documents (in row order), or None without a cache or
    without images."""
    cached = [sample.cached for sample in samples if sample.cached is not None]
    if not cached:
        return None
    hit = np.concatenate([c.hit for c in cached])  # [M]
    hits = [c.features for c in cached if c.features is not None]
    slots = np.empty(len(hit), dtype=np.int64)
    slots[hit] = np.arange(np.count_nonzero(hit))
    slots[~hit] = np.count_nonzero(hit) + np.arange(np.count_nonzero(~hit))
    return FeatureLookup(torch.cat(hits) if hits else None, torch.from_numpy(slots),
                         np.concatenate([c.keys for c in cached])[~hit], row_images.tolist())


def _check_row_images(input_ids: np.ndarray, counts: np.ndarray, image_id: int, block: int) -> None:
    placeholders = np.count_nonzero(input_ids == image_id, axis=1)
    if np.any(placeholders != counts * block):
        raise RuntimeError(f"packed rows hold {placeholders.tolist()} image tokens for {counts} images")


# ----------------------------------------------------------------------------------------------------------
# Micro-batches of one process


def sample_builder(config: DataConfig, tokenizer, image_processor=None,
                   vision_cache: FeatureReader | None = None) -> SampleBuilder:
    return SampleBuilder(config.kind, tokenizer, config.max_seq_len, config.image_token_len, image_processor,
                         config.add_system_ratio, config.empty_think_ratio, config.thinking_ratio, config.needs_answer,
                         vision_cache=vision_cache, video_frames=config.video_frames)


class TrainingData:
    """Everything needed to produce micro-batches of any epoch: chunk index, sample builder, packing rules.
    With `vision_cache`, images it holds come as tower features, neither decoded nor encoded again."""

    def __init__(self, config: DataConfig, tokenizer, image_processor=None, vision_cache: FeatureReader | None = None):
        self.config = config
        self.chunks = index_chunks(config)
        self.builder = sample_builder(config, tokenizer, image_processor, vision_cache)
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

    def __getitem__(self, k: int) -> Batch | PromptBatch:
        first = self.start_row + k * self.rows_per_batch
        positions = first + self.rank + self.world_size * np.arange(self.batch_size)
        positions = positions[positions < self.order.total]
        samples, bad = self.samples(positions)
        config = self.data.config
        if config.kind == "prompts":
            return collate_prompts(samples, len(positions), bad)
        used = len(positions) - sum(bad.values())
        return pack(samples, config.max_seq_len, config.packing, self.data.builder.encoder.image_id,
                    config.image_token_len, config.pad_multiple, len(positions), bad, used)

    def samples(self, positions: np.ndarray) -> tuple[list[Sample], Counter]:
        """The documents of the usable rows at these (increasing) epoch positions, in order, and the skipped
        rows counted by reason."""
        samples, bad = [], Counter()
        for position, window in zip(positions.tolist(), self.order.window_of(positions).tolist()):
            try:
                samples += self._documents(position, window)
            except BadSample as err:
                bad[err.reason] += 1
        return samples, bad

    def _documents(self, position: int, window: int) -> list[Sample]:
        chunk_ids, rows, loaded = self._window(window)
        offset = position - int(self.order.window_start[window])
        record = decode_row(loaded[int(chunk_ids[offset])][int(rows[offset])])
        rng = random.Random(f"{self.data.config.seed}:{self.order.epoch}:{position}")
        return self.data.builder.documents(record, rng)

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
