"""Data decoding under fuzz: any conversation cell, message, `<image>` marker count, image bytes or jsonl line gives
training documents or a skip reason of BAD_REASONS, never another exception (which would end a DataLoader worker
and the run). Bounded example counts keep the file to seconds."""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minimind_v.chat_encoder import IGNORE
from minimind_v.data import DataConfig, TrainingData, decode_row, loader, sample_builder
from minimind_v.samples import BAD_REASONS, BadSample, Prompt, Sample
from minimind_v.vision import ImagePreprocessor
from training_data import image_bytes

FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BLOCK = 4  # placeholder tokens per image
SIZE = 16  # image side after preprocessing

# Text: any code point, and the pieces the chat format and images are built from; lone surrogates separately.
PIECES = ["<image>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|image_pad|>", "<tool_call>", "\n",
          "assistant", "user", "system"]
texts = st.lists(st.text(max_size=6) | st.sampled_from(PIECES), max_size=6).map("".join)
lone_surrogates = st.tuples(st.text(max_size=3), st.characters(categories=["Cs"])).map("".join)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | texts | lone_surrogates,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=10)
calls = st.fixed_dictionaries({"name": texts, "arguments": json_values | texts})
tool_calls = st.lists(calls | st.fixed_dictionaries({"function": calls}), min_size=1, max_size=2)


def message(role: str) -> st.SearchStrategy[dict]:
    """A message of a well-formed dialogue: text content, maybe reasoning, tool calls, tools (of any content)."""
    optional = {"reasoning_content": texts, "tool_calls": tool_calls | tool_calls.map(json.dumps)}
    if role == "system":
        optional = {"tools": st.lists(json_values, min_size=1, max_size=2), "functions": json_values}
    return st.fixed_dictionaries({"role": st.just(role), "content": texts}, optional=optional)


# Dialogues (an optional system message, user / assistant turns, maybe a last user turn), and message lists of any
# roles and any value in any key.
dialogues = st.builds(lambda system, turns, last: system + [m for pair in turns for m in pair] + last,
                      st.lists(message("system"), max_size=1),
                      st.lists(st.tuples(message("user"), message("assistant")), min_size=1, max_size=3),
                      st.lists(message("user"), max_size=1))
anything = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]) | texts},
                                 optional={key: json_values | texts for key in
                                           ("content", "reasoning_content", "tool_calls", "tools", "functions")})
conversations = dialogues | st.lists(anything, max_size=5)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR chunk (valid CRC) declaring any size, then the pixels of a 64x64 image."""
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
    real = image_bytes("red", "circle", "PNG")
    return real[:8] + chunk + real[8 + 25:]


PNG, JPEG = image_bytes("blue", "square", "PNG"), image_bytes("green", "circle", "JPEG")
images = (st.binary(max_size=64)
          | st.sampled_from([PNG, JPEG]).flatmap(lambda data: st.integers(0, len(data)).map(lambda n: data[:n]))
          | st.builds(png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
          | st.builds(png_header, st.integers(0, 3), st.integers(0, 3))
          | st.sampled_from([PNG, JPEG]))
image_cells = st.lists(images, max_size=3) | images | st.lists(st.fixed_dictionaries({"bytes": images}), max_size=2) | \
    json_values


@pytest.fixture(scope="module")
def builders(tiny_tokenizer) -> dict:
    """One sample builder per data kind, for a text model and (but pretraining text) for a vision model."""
    processor = ImagePreprocessor(SIZE)
    made = {}
    for kind in ("text", "chat", "pairs", "prompts"):
        for image_token_len in (0, BLOCK) if kind != "text" else (0,):
            config = DataConfig(paths=[], kind=kind, max_seq_len=96, image_token_len=image_token_len,
                                add_system_ratio=0.5)
            made[kind, image_token_len] = sample_builder(config, tiny_tokenizer, processor)
    return made


def documents_or_reason(builder, record: dict) -> list | str:
    """The row's documents (checked for shape) or its skip reason; any other exception fails the test."""
    try:
        documents = builder.documents(record, random.Random(0))
    except BadSample as err:
        assert err.reason in BAD_REASONS
        event(err.reason)
        return err.reason
    event("documents")
    for document in documents:
        if isinstance(document, Prompt):
            assert document.ids.dtype == np.int64 and 0 < len(document.ids) <= builder.max_seq_len
            continue
        assert isinstance(document, Sample) and document.ids.dtype == np.int64
        assert document.ids.shape == document.labels.shape and 0 < len(document.ids) <= builder.max_seq_len
        assert document.labels[0] == IGNORE and np.any(document.labels != IGNORE)
        images = 0 if document.pixels is None else len(document.pixels)
        if builder.encoder.image_token_len:  # (a text model reads a literal <|image_pad|> as an ordinary token)
            assert np.count_nonzero(document.ids == builder.encoder.image_id) == images * BLOCK
        if document.pixels is not None:
            assert document.pixels.shape == (images, 3, SIZE, SIZE) and np.isfinite(document.pixels).all()
    return documents


@FUZZ
@given(cell=json_values, as_json=st.booleans(), kind=st.sampled_from(["text", "chat", "pairs", "prompts"]),
       vision=st.booleans())
def test_any_cell_gives_documents_or_a_reason(builders, cell, as_json, kind, vision):
    value = json.dumps(cell) if as_json else cell
    record = {"conversations": value, "chosen": value, "rejected": value, "text": value, "answer": cell,
              "image_bytes": None}
    documents_or_reason(builders[kind, BLOCK if vision and kind != "text" else 0], record)


@FUZZ
@given(line=st.binary(max_size=80) | st.builds(lambda value, cut: json.dumps(value).encode()[:cut] + b"\n"[:cut % 2],
                                                json_values, st.integers(0, 200)))
def test_any_jsonl_line_gives_documents_or_a_reason(builders, line):
    try:
        record = decode_row(line)
    except BadSample as err:
        assert err.reason in ("invalid_json", "truncated_file")
        assert (err.reason == "truncated_file") == (not line.endswith(b"\n"))
        return
    documents_or_reason(builders["chat", BLOCK], record)


@FUZZ
@given(conversation=conversations, kind=st.sampled_from(["chat", "pairs", "prompts"]), vision=st.booleans(),
       cell=st.lists(st.sampled_from([PNG, JPEG]), max_size=3))
def test_any_messages_and_marker_count_give_documents_or_a_reason(builders, conversation, kind, vision, cell):
    """Roles, content, reasoning, tool calls and tools of any shape, `<image>` markers in any number against any
    number of images; a vision document holds one placeholder block per image it decoded."""
    record = {"conversations": conversation, "chosen": conversation, "rejected": conversation[:-1] + [
        {"role": "assistant", "content": "no"}], "image_bytes": cell}
    documents_or_reason(builders[kind, BLOCK if vision else 0], record)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused anyway (MAX_IMAGE_PIXELS)
@FUZZ
@given(cell=image_cells, markers=st.integers(0, 3))
def test_any_image_bytes_give_pixels_or_bad_image(builders, cell, markers):
    question = "What is this? " + "<image>" * markers
    record = {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": "A shape."}],
              "image_bytes": cell}
    result = documents_or_reason(builders["chat", BLOCK], record)
    if isinstance(result, str):
        assert result in ("bad_image", "image_mismatch", "missing_field", "image_truncated")
    elif markers:
        assert len(result[0].pixels) == markers


def test_hostile_rows_are_counted_in_dataloader_workers(tmp_path, tiny_tokenizer):
    """The findings of the fuzz tests in two files read by two workers: every row trains or is counted."""
    deep = "[" * 600 + "]" * 600

    def chat(content, **fields) -> str:
        return json.dumps({"conversations": [{"role": "user", "content": content, **fields.pop("message", {})},
                                             {"role": "assistant", "content": "ok"}], **fields})

    lines = [
        '{"conversations": ' + "1" * 5000 + "}",  # invalid_json: an integer over Python's 4300-digit limit
        "[" * 100_000,  # invalid_json: deeper than the JSON decoder's recursion limit
        chat("\ud800 is a lone surrogate"),  # invalid_text
        chat([json.loads(deep)]),  # bad_conversation: nested too deep for the chat template
        chat("hi", message={"tool_calls": [{"name": "f", "arguments": json.loads(deep)}]}),  # bad_conversation
        json.dumps({"conversations": [{"role": "system", "content": "s", "tools": deep},  # bad_conversation
                                      {"role": "assistant", "content": "ok"}]}),
        chat("<image>", image_bytes="not bytes"),  # bad_image
        chat("<image>", image_bytes={"path": "x.png"}),  # bad_image
        chat("fine"),
    ]
    (tmp_path / "hostile.jsonl").write_text("\n".join(lines) + "\n" + chat("cut")[:-5])  # truncated_file
    cells = [[PNG[:40]], [png_header(60_000, 60_000)], [PNG]]  # bad_image, bad_image (too many pixels), a sample
    pq.write_table(pa.table({"conversations": [json.dumps(json.loads(chat("<image>"))["conversations"])] * 3,
                             "image_bytes": cells}),
                   tmp_path / "hostile.parquet", row_group_size=2)
    config = DataConfig(paths=[str(tmp_path / "hostile.jsonl"), str(tmp_path / "hostile.parquet")], kind="chat",
                        max_seq_len=96, image_token_len=BLOCK)
    data = TrainingData(config, tiny_tokenizer, ImagePreprocessor(SIZE))
    batches = list(loader(data.epoch(0, 0, 3), num_workers=2, pin_memory=False))
    assert sum(b.rows_read for b in batches) == 13 and sum(b.samples for b in batches) == 2
    assert sum((b.bad for b in batches), start=Counter()) == {
        "invalid_json": 2, "invalid_text": 1, "bad_conversation": 3, "bad_image": 4, "truncated_file": 1}
