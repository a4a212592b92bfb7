"""`minimind-v data convert`: LLaVA JSON, ShareGPT jsonl and Hugging Face datasets -> training parquet, read back
with the training data code; bad rows counted by reason; the streaming JSON list reader."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from minimind_v import convert
from minimind_v.convert import REASONS, Columns, ConvertError, iter_json_list
from minimind_v.data import DataConfig, RowReader, TrainingData, index_chunks
from minimind_v.samples import chat_images, conversation, decode_record
from minimind_v.vision import ImagePreprocessor
from training_data import image_bytes


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


@pytest.fixture
def images(tmp_path) -> dict[str, bytes]:
    """Small PNG / JPEG files under tmp_path/img, by file name."""
    files = {"red_circle.png": image_bytes("red", "circle", "PNG"),
             "blue_square.jpg": image_bytes("blue", "square", "JPEG"),
             "broken.png": b"\x89PNG\r\n\x1a\n not really"}
    (tmp_path / "img").mkdir()
    for name, data in files.items():
        (tmp_path / "img" / name).write_bytes(data)
    return files


def read_back(path) -> list[tuple[list[dict], list[bytes]]]:
    """(messages, images) of every row, in file order, as the training data code reads them."""
    config = DataConfig(paths=[str(path)], kind="chat", max_seq_len=256, image_token_len=4)
    reader = RowReader(config.fields)
    rows = []
    for record in (decode_record(raw) for chunk in index_chunks(config) for raw in reader.read(chunk)):
        messages, _ = conversation(record["conversations"])
        rows.append((messages, chat_images(record, messages)))
    return rows


def assert_trains(path, tokenizer, rows: int) -> None:
    """Every row becomes a training document, with its images."""
    config = DataConfig(paths=[str(path)], kind="chat", max_seq_len=512, image_token_len=4, add_system_ratio=0)
    batch = TrainingData(config, tokenizer, ImagePreprocessor(32)).epoch(0, 0, batch_size=rows)[0]
    assert batch.bad == Counter() and batch.samples == rows


def run(tmp_path, source, **kwargs):
    out = tmp_path / "out.parquet"
    return convert.convert(str(source), str(out), **kwargs), out


def test_llava_json_round_trips_with_several_images_text_only_rows_and_markers_at_either_end(tmp_path, images,
                                                                                           tiny_tokenizer):
    entries = [
        {"id": "a", "image": "red_circle.png", "conversations": [human("<image>\nWhat is this?"), gpt("A circle.")]},
        {"id": "b", "image": "blue_square.jpg",
         "conversations": [human("Describe it.\n<image>"), gpt("A square."), human("Colour?"), gpt("Blue.")]},
        {"id": "c", "conversations": [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Hello!")]},
        {"id": "d", "image": ["red_circle.png", "blue_square.jpg"],
         "conversations": [human("<image>\n<image>\nCompare."), gpt("Red, then blue.")]},
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(entries, indent=1))
    stats, out = run(tmp_path, source, image_root=str(tmp_path / "img"), row_group_size=2)
    assert (stats.read, stats.written, stats.skipped) == (4, 4, Counter())
    # the first row group was written as binary, then rewritten as lists when row d came
    assert pq.read_schema(out).field("image_bytes").type == pa.list_(pa.binary())
    assert pq.ParquetFile(out).metadata.num_row_groups == 2
    rows = read_back(out)
    assert rows[0] == ([{"role": "user", "content": "<image>\nWhat is this?"},
                        {"role": "assistant", "content": "A circle."}], [images["red_circle.png"]])
    assert [m["content"] for m in rows[1][0]] == ["Describe it.\n<image>", "A square.", "Colour?", "Blue."]
    assert rows[1][1] == [images["blue_square.jpg"]]
    assert rows[2] == ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"}], [])
    assert rows[3][1] == [images["red_circle.png"], images["blue_square.jpg"]]
    assert_trains(out, tiny_tokenizer, 4)


def test_sharegpt_jsonl_round_trips_role_content_from_value_and_content_parts(tmp_path, images, tiny_tokenizer):
    records = [
        {"messages": [{"role": "user", "content": "<image>What shape?"}, {"role": "assistant", "content": "Circle."}],
         "images": ["red_circle.png"]},
        {"conversations": [human("Hello"), gpt("Hi!")]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
         "image": str(tmp_path / "img" / "blue_square.jpg")},  # an absolute path ignores --image_root
    ]
    source = tmp_path / "data" / "chat.jsonl"
    source.parent.mkdir()
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    stats, out = run(tmp_path, source, image_root=str(tmp_path / "img"))
    assert (stats.read, stats.written) == (3, 3)
    assert pq.read_schema(out).field("image_bytes").type == pa.binary()
    assert pq.read_table(out)["image_bytes"].to_pylist()[1] is None
    rows = read_back(out)
    assert rows[0] == ([{"role": "user", "content": "<image>What shape?"},
                        {"role": "assistant", "content": "Circle."}], [images["red_circle.png"]])
    assert rows[1] == ([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}], [])
    assert rows[2] == ([{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Blue."}],
                       [images["blue_square.jpg"]])
    assert_trains(out, tiny_tokenizer, 3)


def test_hf_datasets_round_trip_question_answer_and_messages_columns(tmp_path, images, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    pil = Image.open(io.BytesIO(images["red_circle.png"])).convert("RGB")
    qa = datasets.Dataset.from_dict(
        {"picture": [pil, images["blue_square.jpg"]], "question": ["What shape?", "Colour?"],
         "answer": ["A circle.", "Blue."]},
        features=datasets.Features({"picture": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    qa.save_to_disk(str(tmp_path / "qa"))
    stats, out = run(tmp_path, tmp_path / "qa")
    assert (stats.read, stats.written) == (2, 2)
    rows = read_back(out)
    assert rows[1] == ([{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Blue."}],
                       [images["blue_square.jpg"]])  # bytes given to datasets are stored as they are
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rows[0][1][0]))), np.asarray(pil))
    assert_trains(out, tiny_tokenizer, 2)
    with pytest.raises(ConvertError, match="drop --split"):
        run(tmp_path, tmp_path / "qa", split="test")

    messages = [[{"role": "user", "content": "<image>\n<image>\nSame?"}, {"role": "assistant", "content": "No."}],
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    chats = datasets.Dataset.from_dict(
        {"messages": messages, "images": [[images["red_circle.png"], images["blue_square.jpg"]], []]},
        features=datasets.Features({"messages": [{"role": datasets.Value("string"),
                                                  "content": datasets.Value("string")}],
                                    "images": [datasets.Image()]}))
    datasets.DatasetDict({"train": chats, "test": chats.select([1])}).save_to_disk(str(tmp_path / "chats"))
    stats, out = run(tmp_path, tmp_path / "chats", split="test")
    assert (stats.read, stats.written) == (1, 1)
    with pytest.raises(ConvertError, match="choose one with --split"):
        run(tmp_path, tmp_path / "chats", split="validation")
    stats, out = run(tmp_path, tmp_path / "chats")
    assert read_back(out) == [(messages[0], [images["red_circle.png"], images["blue_square.jpg"]]), (messages[1], [])]


def test_every_bad_row_reason_is_skipped_and_counted(tmp_path, images):
    good = {"conversations": [human("<image>\nQ?"), gpt("A.")], "image": "red_circle.png"}
    bad = {
        "invalid_json": "{not json",
        "missing_field": {"id": 1, "image": "red_circle.png"},
        "bad_conversation": {"conversations": [["human", "Q?"]]},
        "unknown_role": {"conversations": [{"from": "robot", "value": "Q?"}, gpt("A.")]},
        "empty_conversation": {"conversations": [human(" "), gpt("")]},
        "no_assistant_turn": {"conversations": [human("Q?")]},
        "image_mismatch": {"conversations": [human("<image><image>Q?"), gpt("A.")], "image": "red_circle.png"},
        "missing_image": {"conversations": [human("<image>Q?"), gpt("A.")], "image": "missing.png"},
        "bad_image": {"conversations": [human("<image>Q?"), gpt("A.")], "image": "broken.png"},
        "invalid_text": '{"conversations": [{"from": "human", "value": "Q\\ud800?"}, {"from": "gpt", "value": "A."}]}',
    }
    assert set(bad) == set(REASONS)
    lines = [json.dumps(good)] + [r if isinstance(r, str) else json.dumps(r) for r in bad.values()]
    (tmp_path / "img" / "mixed.jsonl").write_text("\n".join(lines))
    stats, out = run(tmp_path, tmp_path / "img" / "mixed.jsonl")
    assert (stats.read, stats.written) == (11, 1)
    assert stats.skipped == Counter(list(bad))
    assert "missing_image: 1 (an image is not a file" in convert.summary(stats)
    with pytest.raises(ConvertError, match="more than --max_bad_fraction"):
        run(tmp_path / "img", tmp_path / "img" / "mixed.jsonl", max_bad_fraction=0.5)
    assert not (tmp_path / "img" / "out.parquet").exists()


def test_cli_main_prints_the_summary_and_fails_when_nothing_is_written(tmp_path, images, capsys):
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    source = tmp_path / "img" / "one.jsonl"
    source.write_text(json.dumps({"conversations": [human("<image>Q?"), gpt("A.")], "images": ["red_circle.png"]}))
    out = tmp_path / "out" / "one.parquet"
    convert.main(parser.parse_args(["--input", str(source), "--out", str(out), "--image_format", "jpeg"]))
    assert "rows read: 1, written: 1, skipped: 0" in capsys.readouterr().out
    (stored,) = pq.read_table(out)["image_bytes"].to_pylist()
    assert stored[:3] == b"\xff\xd8\xff"  # the PNG was re-encoded as JPEG, as asked
    assert convert.stored_image("blue_square.jpg", str(tmp_path / "img"), "jpeg") == images["blue_square.jpg"]

    source.write_text(json.dumps({"conversations": [human("Q?")]}))
    with pytest.raises(SystemExit, match="no usable row(.|\n)*no_assistant_turn: 1"):
        convert.main(parser.parse_args(["--input", str(source), "--out", str(tmp_path / "none.parquet")]))
    assert not (tmp_path / "none.parquet").exists() and not (tmp_path / "none.parquet.tmp").exists()


def test_json_list_is_streamed_and_broken_json_is_an_error(tmp_path):
    entries = [{"id": i, "text": "é\\\"" * i, "n": [1.5, -2e3, None, True]} for i in range(30)] + [12345, "x"]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=2))
    assert list(iter_json_list(str(path))) == entries
    path.write_text("  [ ]")
    assert list(iter_json_list(str(path))) == []
    for broken in ('[{"a": 1}, {"b": ]', '[{"a": 1}'):
        path.write_text(broken)
        with pytest.raises(ConvertError, match="not valid JSON"):
            list(iter_json_list(str(path)))
    path.write_bytes(b'[{"a": "\xff\xfe"}]')
    with pytest.raises(ConvertError, match="not valid JSON"):
        list(iter_json_list(str(path)))
    path.write_text('{"a": 1}\n')
    with pytest.raises(ConvertError, match="--format sharegpt"):
        list(iter_json_list(str(path)))
    assert convert.detect_format(str(path)) == "sharegpt" and convert.detect_format(str(tmp_path)) == "hf"


def test_non_object_llava_entries_are_bad_json_and_named_columns_are_used(tmp_path, images):
    path = tmp_path / "img" / "llava.json"
    path.write_text(json.dumps([[1], {"q": "<image>Shape?", "a": "Circle.", "pic": "red_circle.png",
                                      "conversations": "ignored, a question column is named"}]))
    stats, out = run(tmp_path, path, columns=Columns(question="q", answer="a", image="pic"))
    assert stats.skipped == Counter({"invalid_json": 1})
    assert read_back(out) == [([{"role": "user", "content": "<image>Shape?"},
                                {"role": "assistant", "content": "Circle."}], [images["red_circle.png"]])]


def test_missing_datasets_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConvertError, match="pip install datasets"):
        run(tmp_path, tmp_path, input_format="hf")
