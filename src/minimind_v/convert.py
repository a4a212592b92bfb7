"""`minimind-v data convert`: LLaVA JSON, ShareGPT-style JSON lines or a Hugging Face dataset saved with
`save_to_disk` -> a training parquet: `conversations` (a JSON string of {"role", "content"} messages with `<image>`
markers) and `image_bytes` (the original encoded images: binary, or list<binary> once a row has several; null for
text-only rows).

Everything is streamed: memory holds one JSON entry and one row group, whatever the input size. Rows the trainer
would refuse are skipped and counted by reason (the names of `samples.BAD_REASONS` where they exist); every image
is decoded as training decodes it (`vision.load_image`), but its original bytes are stored. See
docs/data_formats.md.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import ijson
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .chat_encoder import count_markers
from .samples import BAD_REASONS, BadSample, check_text, conversation, decode_record
from .synth import ROW_GROUP_SIZE, encode_image
from .tokenizer import IMAGE_MARKER
from .vision import load_image

FORMATS = ("llava", "sharegpt", "hf")
IMAGE_FORMATS = ("keep", "jpeg", "png")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "tool": "tool"}
# Column names tried in order when no flag names them.
MESSAGE_COLUMNS = ("conversations", "messages")
QUESTION_COLUMNS = ("question", "query", "prompt", "instruction")
ANSWER_COLUMNS = ("answer", "response", "output")
IMAGE_COLUMNS = ("images", "image", "image_bytes")
REASONS = {
    **{key: BAD_REASONS[key] for key in ("invalid_json", "invalid_text", "bad_conversation", "no_assistant_turn",
                                         "image_mismatch", "bad_image")},
    "missing_field": "the row has no conversations / messages field and no question and answer",
    "unknown_role": f"a message's role is not one of {', '.join(ROLES)}",
    "empty_conversation": "the conversation has no message with text",
    "missing_image": "an image is not a file; relative paths start at --image_root",
}
SCHEMAS = {several: pa.schema([("conversations", pa.string()),
                               ("image_bytes", pa.list_(pa.binary()) if several else pa.binary())])
           for several in (False, True)}


class ConvertError(Exception):
    """The input cannot be converted at all (as opposed to a bad row, which is skipped)."""


@dataclass(frozen=True)
class Columns:
    """Which fields of a record hold what; None: the first of the usual names that the record has."""

    messages: str | None = None
    question: str | None = None
    answer: str | None = None
    image: str | None = None


@dataclass
class ConvertStats:
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)


# ----------------------------------------------------------------------------------------------------------
# Reading: records of each input format


def detect_format(path: str) -> str:
    """hf for a folder; llava for a file holding a JSON list, sharegpt for JSON lines (from its first character)."""
    if os.path.isdir(path):
        return "hf"
    with open(path, "rb") as f:
        start = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if start in (b"[", b"{"):
        return "llava" if start == b"[" else "sharegpt"
    raise ConvertError(f"cannot tell the format of {path}: it is neither a JSON list nor JSON lines; pass --format")


def iter_json_list(path: str) -> Iterator:
    """The entries of a file holding one JSON list, decoded one at a time by ijson's streaming parser, so a
    multi-GB LLaVA file never sits in memory. A malformed file raises ConvertError."""
    with open(path, "rb") as f:
        if f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"[":
            raise ConvertError(f"{path} does not hold a JSON list (for JSON lines use --format sharegpt)")
        f.seek(0)
        try:
            yield from ijson.items(f, "item", use_float=True)
        except (ijson.JSONError, UnicodeDecodeError) as err:
            raise ConvertError(f"{path} is not valid JSON: {err}") from err


def iter_jsonl(path: str) -> Iterator[bytes]:
    """The non-blank lines of a JSON lines file, undecoded (a bad line is a bad row, not a failure)."""
    with open(path, "rb") as f:
        yield from (line for line in f if line.strip())


def _holds_images(feature) -> bool:
    """A datasets feature that is Image, or a list / Sequence of Image."""
    import datasets

    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", feature)
    return isinstance(inner, datasets.Image)


def hf_records(path: str, split: str | None, batch_size: int) -> tuple[Iterator[dict], int, str | None]:
    """(records, their number, the first column with a datasets Image feature) of a `save_to_disk` folder.
    Rows are read as Arrow, so images stay encoded: {"bytes", "path"} as datasets stores them."""
    try:
        import datasets
    except ImportError as err:
        raise ConvertError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") \
            from err
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = split or (splits[0] if len(splits) == 1 else "train")
        if split not in loaded:
            raise ConvertError(f"{path} has the splits {splits}; choose one with --split")
        loaded = loaded[split]
    elif split:
        raise ConvertError(f"{path} holds one dataset without splits; drop --split")
    image_column = next((name for name, feature in loaded.features.items() if _holds_images(feature)), None)
    records = (row for table in loaded.with_format("arrow").iter(batch_size=batch_size) for row in table.to_pylist())
    return records, len(loaded), image_column


def read_records(source: str, input_format: str, columns: Columns, split: str | None,
                 batch_size: int) -> tuple[Iterator, int | None, Columns]:
    """(raw records, their number if known, the columns with the image column filled in for hf datasets)."""
    if input_format == "llava":
        return iter_json_list(source), None, columns
    if input_format == "sharegpt":
        return iter_jsonl(source), None, columns
    records, total, image_column = hf_records(source, split, batch_size)
    return records, total, Columns(columns.messages, columns.question, columns.answer, columns.image or image_column)


# ----------------------------------------------------------------------------------------------------------
# One record -> one output row


def _column(record: dict, named: str | None, usual: tuple[str, ...]) -> str | None:
    if named is not None:
        return named if named in record else None
    return next((name for name in usual if name in record), None)


def _content(value) -> str:
    """Message content: a string, or a list of parts ({"type": "text", "text"} / {"type": "image"}) joined by
    newlines with an `<image>` marker for each image part."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadSample("bad_conversation")
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            texts.append(IMAGE_MARKER)
        else:
            raise BadSample("bad_conversation")
    return "\n".join(texts)


def _messages(value) -> list[dict]:
    """A conversation (list or JSON string) of {from, value} or {role, content} messages -> {role, content}."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadSample("invalid_json") from err
    if not isinstance(value, list):
        raise BadSample("bad_conversation")
    messages = []
    for raw in value:
        if not isinstance(raw, dict):
            raise BadSample("bad_conversation")
        role = raw.get("role", raw.get("from"))
        if not isinstance(role, str):
            raise BadSample("bad_conversation")
        if role.lower() not in ROLES:
            raise BadSample("unknown_role")
        messages.append({"role": ROLES[role.lower()], "content": _content(raw.get("content", raw.get("value")))})
    return messages


def _question_answer(question, answer, images: int) -> list[dict]:
    """Question and answer fields (strings, or lists with one entry per turn) -> messages; questions without
    markers get one `<image>\\n` per image in front of the first, as LLaVA writes it."""
    questions, answers = (list(question), answer) if isinstance(question, list) else ([question], [answer])
    if not isinstance(answers, list) or len(questions) != len(answers) or \
            not all(isinstance(text, str) for text in questions + answers):
        raise BadSample("bad_conversation")
    if questions and not any(IMAGE_MARKER in text for text in questions):
        questions[0] = (IMAGE_MARKER + "\n") * images + questions[0]
    return [{"role": role, "content": text} for q, a in zip(questions, answers)
            for role, text in (("user", q), ("assistant", a))]


def record_messages(record: dict, columns: Columns, images: int) -> list[dict]:
    """The record's conversation as {role, content}: its messages column, or (when none is found, or a question
    or answer column is named) its question and answer columns."""
    if not (columns.question or columns.answer):
        name = _column(record, columns.messages, MESSAGE_COLUMNS)
        if name is not None and record[name] is not None:
            return _messages(record[name])
        if columns.messages:
            raise BadSample("missing_field")
    question = _column(record, columns.question, QUESTION_COLUMNS)
    answer = _column(record, columns.answer, ANSWER_COLUMNS)
    if question is None or answer is None:
        raise BadSample("missing_field")
    return _question_answer(record[question], record[answer], images)


def image_refs(value) -> list:
    """An image field as a list of references: paths, encoded bytes or {"bytes", "path"} dicts."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_image(ref, image_root: str) -> bytes:
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    path = os.path.join(image_root, ref) if isinstance(ref, str) and ref else None
    if path is None or not os.path.isfile(path):
        raise BadSample("missing_image")
    with open(path, "rb") as f:
        return f.read()


def stored_image(ref, image_root: str, image_format: str = "keep") -> bytes:
    """The encoded image of a reference, decoded once to check that training can read it. Its original bytes,
    unless `image_format` (jpeg / png) asks for another format than its own: then the RGB image training would
    see, re-encoded."""
    data = _read_image(ref, image_root)
    try:
        image = load_image(io.BytesIO(data))
    except ValueError as err:
        raise BadSample("bad_image") from err
    if image_format == "keep":
        return data
    with Image.open(io.BytesIO(data)) as original:
        own = (original.format or "").lower()
    return data if own == image_format else encode_image(image, image_format)


def convert_record(raw, columns: Columns, image_root: str, image_format: str = "keep") -> dict:
    """A raw record (a dict, or an undecoded JSON line) -> an output row, or BadSample."""
    record = decode_record(raw) if isinstance(raw, (bytes, str)) else raw
    if not isinstance(record, dict):
        raise BadSample("invalid_json")
    image_column = _column(record, columns.image, IMAGE_COLUMNS)
    refs = image_refs(record[image_column]) if image_column else []
    messages = record_messages(record, columns, len(refs))
    if not any(m["content"].strip() for m in messages):
        raise BadSample("empty_conversation")
    if count_markers(messages) != len(refs):
        raise BadSample("image_mismatch")
    conversation(messages)  # the trainer's own checks
    check_text(messages)
    return {"conversations": json.dumps(messages, ensure_ascii=False),
            "image_bytes": [stored_image(ref, image_root, image_format) for ref in refs]}


# ----------------------------------------------------------------------------------------------------------
# Writing


class RowWriter:
    """Output rows -> parquet, one row group at a time, through a temporary file renamed by `close`.
    `image_bytes` is binary until a row has several images; the file written so far is then rewritten, one row
    group at a time, as list<binary>."""

    def __init__(self, path: str, row_group_size: int):
        self.path, self.tmp, self.row_group_size = path, path + ".tmp", row_group_size
        self.rows: list[dict] = []
        self.several = False
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) == self.row_group_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if not self.several and any(len(row["image_bytes"]) > 1 for row in self.rows):
            self._to_lists()
        cells = [(images or None) if self.several else (images[0] if images else None)
                 for images in (row["image_bytes"] for row in self.rows)]
        self._write([row["conversations"] for row in self.rows], cells)
        self.rows = []

    def _write(self, conversations: list[str], cells: list) -> None:
        schema = SCHEMAS[self.several]
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        table = pa.table([pa.array(conversations, pa.string()), pa.array(cells, schema.field("image_bytes").type)],
                         schema=schema)
        self.writer.write_table(table, row_group_size=self.row_group_size)

    def _to_lists(self) -> None:
        self.several = True
        if self.writer is None:
            return
        self.writer.close()
        self.writer, old = None, self.tmp + ".binary"
        os.replace(self.tmp, old)
        source = pq.ParquetFile(old)
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            cells = [None if image is None else [image] for image in table["image_bytes"].to_pylist()]
            self._write(table["conversations"].to_pylist(), cells)
        os.remove(old)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for path in (self.tmp, self.tmp + ".binary"):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def convert(source: str, out: str, *, input_format: str | None = None, image_root: str | None = None,
            columns: Columns | None = None, split: str | None = None, max_rows: int | None = None,
            row_group_size: int = ROW_GROUP_SIZE, image_format: str = "keep", max_bad_fraction: float | None = None,
            progress: Callable[[Iterator, int | None], Iterator] | None = None) -> ConvertStats:
    """Convert `source` into the parquet `out` (at most `max_rows` rows written). Image paths are relative to
    `image_root` (default: the folder of `source`, or the dataset folder itself for hf). Raises ConvertError when
    nothing is written or more than `max_bad_fraction` of the rows read were skipped; `out` is then not written."""
    if not os.path.exists(source):
        raise ConvertError(f"no such file or folder: {source}")
    input_format = input_format or detect_format(source)
    if image_root is None:
        image_root = source if os.path.isdir(source) else os.path.dirname(source)
    records, total, columns = read_records(source, input_format, columns or Columns(), split, row_group_size)
    if progress is not None:
        records = progress(records, total)
    stats = ConvertStats()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with RowWriter(out, row_group_size) as writer:
        for raw in records:
            if max_rows is not None and stats.written >= max_rows:
                break
            stats.read += 1
            try:
                writer.add(convert_record(raw, columns, image_root, image_format))
                stats.written += 1
            except BadSample as err:
                stats.skipped[err.reason] += 1
        if not stats.written:
            raise ConvertError(f"no usable row in {source}\n{summary(stats)}")
        skipped = stats.read - stats.written
        if max_bad_fraction is not None and skipped > max_bad_fraction * stats.read:
            raise ConvertError(f"{skipped} of {stats.read} rows are bad, more than --max_bad_fraction "
                               f"{max_bad_fraction}\n{summary(stats)}")
    return stats


def summary(stats: ConvertStats) -> str:
    lines = [f"rows read: {stats.read}, written: {stats.written}, skipped: {stats.read - stats.written}"]
    lines += [f"  {reason}: {count} ({REASONS[reason]})" for reason, count in stats.skipped.most_common()]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True,
                        help="a LLaVA JSON list, a ShareGPT-style .jsonl or a Hugging Face save_to_disk folder")
    parser.add_argument("--out", required=True, help="the parquet file to write")
    parser.add_argument("--format", choices=FORMATS,
                        help="input format (default: hf for a folder, llava for a JSON list, sharegpt for JSON lines)")
    parser.add_argument("--image_root", help="folder that image paths are relative to (default: the input's folder)")
    parser.add_argument("--max_rows", type=int, help="stop after writing this many rows")
    parser.add_argument("--row_group_size", type=int, default=ROW_GROUP_SIZE,
                        help="rows per parquet row group (also the rows held in memory)")
    parser.add_argument("--image_format", choices=IMAGE_FORMATS, default="keep",
                        help="keep: store every image's original bytes; jpeg / png: re-encode images in other formats")
    parser.add_argument("--max_bad_fraction", type=float,
                        help="fail (and write nothing) when more than this fraction of the rows read is skipped")
    parser.add_argument("--split", help="split of a saved DatasetDict (default: its only split, else train)")
    parser.add_argument("--messages_column", help="conversation column (default: conversations, else messages)")
    parser.add_argument("--question_column", help=f"question column without a conversation column "
                                                   f"(default: the first of {', '.join(QUESTION_COLUMNS)})")
    parser.add_argument("--answer_column", help=f"answer column (default: the first of {', '.join(ANSWER_COLUMNS)})")
    parser.add_argument("--image_column", help="image column (default: an Image feature column of a datasets "
                                               f"folder, else the first of {', '.join(IMAGE_COLUMNS)})")


def main(args) -> None:
    from tqdm import tqdm

    if args.row_group_size < 1 or (args.max_rows is not None and args.max_rows < 1):
        raise SystemExit("data convert: --row_group_size and --max_rows must be at least 1")
    if args.max_bad_fraction is not None and not 0 <= args.max_bad_fraction <= 1:
        raise SystemExit(f"data convert: --max_bad_fraction is a fraction in [0, 1] (got {args.max_bad_fraction})")
    columns = Columns(args.messages_column, args.question_column, args.answer_column, args.image_column)
    bar = lambda records, total: tqdm(records, total=total, unit="row", disable=None)
    start = time.perf_counter()
    try:
        stats = convert(args.input, args.out, input_format=args.format, image_root=args.image_root, columns=columns,
                        split=args.split, max_rows=args.max_rows, row_group_size=args.row_group_size,
                        image_format=args.image_format, max_bad_fraction=args.max_bad_fraction, progress=bar)
    except ConvertError as err:
        raise SystemExit(f"data convert: {err}") from err
    print(summary(stats))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")
