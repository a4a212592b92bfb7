"""Training data: label rule, sample rendering, bad rows, row order, streaming, packing equivalence."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from minimind_v import data
from minimind_v.chat_encoder import IGNORE, assistant_labels
from minimind_v.data import DataConfig, EpochOrder, TrainingData, pack, sample_builder
from minimind_v.samples import BadSample, Sample, image_list
from minimind_v.tokenizer import load_tokenizer
from minimind_v.vision import ImagePreprocessor
from training_data import conversation, image_bytes, sft_records, vlm_rows, write_jsonl, write_parquet

from conftest import reference_path


def scan_labels(ids: list[int], begin: list[int], end: list[int]) -> list[int]:
    """The reference's per-sample Python scan, as a test oracle."""
    labels, i = [IGNORE] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(begin)] == begin:
            start = i + len(begin)
            stop = start
            while stop < len(ids):
                if ids[stop:stop + len(end)] == end:
                    break
                stop += 1
            for j in range(start, min(stop + len(end), len(ids))):
                labels[j] = ids[j]
            i = stop + len(end) if stop < len(ids) else len(ids)
        else:
            i += 1
    return labels


def test_assistant_labels_match_the_reference_scan():
    rng = np.random.default_rng(0)
    begin, end = [1, 9, 8], [2, 7]
    for _ in range(300):
        ids = rng.choice([1, 2, 7, 8, 9, 5], size=int(rng.integers(1, 40)), p=[.15, .15, .15, .2, .2, .15])
        expected = scan_labels(ids.tolist(), begin, end)
        assert assistant_labels(ids, np.array(begin), np.array(end)).tolist() == expected


def test_chat_sample_with_the_reference_tokenizer():
    tokenizer = load_tokenizer(str(reference_path("upstream_tokenizer")))
    config = DataConfig(paths=[], kind="chat", max_seq_len=768, image_token_len=64, add_system_ratio=0,
                        empty_think_ratio=1.0)
    builder = sample_builder(config, tokenizer, ImagePreprocessor(256))
    assert builder.encoder.begin.tolist() == [1, 1388, 570, 811, 234] and builder.encoder.end.tolist() == [2, 234]
    record = {"conversations": json.dumps(conversation("<image>\nWhat is it?", "A red circle.")),
              "image_bytes": image_bytes("red", "circle", "JPEG", 256)}
    sample = builder.build(record, random.Random(0))
    ids, labels = sample.ids, sample.labels
    assert np.count_nonzero(ids == 12) == 64 and sample.pixels.shape == (1, 3, 256, 256)
    supervised = tokenizer.decode(ids[labels != IGNORE])
    assert supervised == "<think>\n\n</think>\n\nA red circle.<|im_end|>\n"  # empty think kept (ratio 1)
    assert labels[0] == IGNORE and np.all(labels[ids == 12] == IGNORE)


def test_empty_think_is_dropped_and_system_prompt_added_with_the_given_probabilities(tiny_tokenizer):
    config = DataConfig(paths=[], kind="chat", max_seq_len=2048, add_system_ratio=0.5, empty_think_ratio=0.25)
    builder = sample_builder(config, tiny_tokenizer)
    record = {"conversations": conversation("hi", "hello")}
    system = think = 0
    for i in range(400):
        text = tiny_tokenizer.decode(builder.build(dict(record), random.Random(i)).ids)
        system += text.startswith("<|im_start|>system")
        think += "<think>" in text
    assert 160 < system < 240 and 60 < think < 140
    tools = {"conversations": [{"role": "system", "content": "s", "tools": '[{"name": "f"}]'},
                               *conversation("hi", "hello")]}
    assert "# Tools" in tiny_tokenizer.decode(builder.build(tools, random.Random(0)).ids)


def test_pretraining_text_sample(tiny_tokenizer):
    config = DataConfig(paths=[], kind="text", max_seq_len=8)
    sample = sample_builder(config, tiny_tokenizer).build({"text": "The red circle is on the left."}, random.Random())
    assert len(sample.ids) == 8 and sample.ids[0] == tiny_tokenizer.bos_token_id
    assert sample.ids[-1] == tiny_tokenizer.eos_token_id
    assert sample.labels[0] == IGNORE and sample.labels[1:].tolist() == sample.ids[1:].tolist()
    with pytest.raises(BadSample, match="empty_text"):
        sample_builder(config, tiny_tokenizer).build({"text": "  "}, random.Random())


def bad_rows_parquet(path) -> tuple[int, Counter]:
    """A parquet mixing good rows with one row per bad reason; returns (good rows, expected bad counts)."""
    good = vlm_rows(20)
    jpeg = image_bytes("red", "circle", "JPEG")
    bad = [
        ({"conversations": json.dumps(conversation("<image>\nQ?", "A.")), "image_bytes": b"not an image"},
         "bad_image"),
        ({"conversations": json.dumps(conversation("<image>\nQ?", "A.")), "image_bytes": jpeg[: len(jpeg) // 2]},
         "bad_image"),
        ({"conversations": '[{"role": "user", "content": "Q?"', "image_bytes": jpeg}, "invalid_json"),
        ({"conversations": None, "image_bytes": jpeg}, "missing_field"),
        ({"conversations": json.dumps([{"role": "user", "content": "<image>\nQ?"}]), "image_bytes": jpeg},
         "no_assistant_turn"),
        ({"conversations": json.dumps(conversation("<image><image>\nQ?", "A.")), "image_bytes": jpeg},
         "image_mismatch"),
        ({"conversations": json.dumps(conversation("x " * 60 + "<image>\nQ?", "A.")), "image_bytes": jpeg},
         "image_truncated"),
        ({"conversations": json.dumps(conversation("<image>\n" + "x " * 40, "A.")), "image_bytes": jpeg},
         "answer_truncated"),
        ({"conversations": json.dumps(["not a message"]), "image_bytes": jpeg}, "bad_conversation"),
    ]
    rows = good[:10] + [row for row, _ in bad] + good[10:]
    write_parquet(path, rows, row_group_size=7)
    return len(good), Counter(reason for _, reason in bad)


def test_bad_rows_are_skipped_and_counted_and_no_good_row_is_lost(tmp_path, tiny_tokenizer):
    processor = ImagePreprocessor(64)
    good, expected = bad_rows_parquet(tmp_path / "mixed.parquet")
    config = DataConfig(paths=[str(tmp_path / "mixed.parquet")], kind="chat", max_seq_len=120, image_token_len=64,
                        add_system_ratio=0)
    micro = TrainingData(config, tiny_tokenizer, processor).epoch(0, 0, batch_size=5)
    batches = [micro[k] for k in range(len(micro))]
    assert sum((b.bad for b in batches), Counter()) == expected
    assert sum(b.samples for b in batches) == good
    assert sum(b.rows_read for b in batches) == good + sum(expected.values())


def test_jsonl_reading_with_blank_lines_invalid_json_and_several_blocks(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data, "JSONL_BLOCK", 4)
    lines = [json.dumps(r) for r in sft_records(10)]
    lines[3] = "{not json"
    lines.insert(5, "")
    path = write_jsonl(tmp_path / "sft.jsonl", lines)
    config = DataConfig(paths=[str(path)], kind="chat", max_seq_len=256, add_system_ratio=0)
    training = TrainingData(config, tiny_tokenizer)
    assert [c.rows for c in training.chunks] == [4, 4, 2]
    micro = training.epoch(0, 0, batch_size=3)
    batches = [micro[k] for k in range(len(micro))]
    assert sum(b.samples for b in batches) == 9 and sum(b.bad["invalid_json"] for b in batches) == 1


def test_epoch_order_is_a_seeded_permutation_that_any_position_can_reach(tmp_path):
    chunks = [data.Chunk("f", i, n) for i, n in enumerate([5, 3, 8, 1, 7, 6])]
    order = EpochOrder(chunks, seed=1, epoch=0, window=8)
    seen = []
    for w in range(len(order.window_start) - 1):
        chunk_ids, rows = order.window_rows(w)
        seen += [(int(c), int(r)) for c, r in zip(chunk_ids, rows)]
        assert len(set(chunk_ids.tolist())) <= 3  # a window holds only a few chunks
    assert sorted(seen) == sorted((c, r) for c, n in enumerate([5, 3, 8, 1, 7, 6]) for r in range(n))
    again = EpochOrder(chunks, seed=1, epoch=0, window=8)
    other = EpochOrder(chunks, seed=1, epoch=1, window=8)
    flat = lambda o: np.concatenate([np.stack(o.window_rows(w)) for w in range(len(o.window_start) - 1)], 1)
    assert np.array_equal(flat(order), flat(again)) and not np.array_equal(flat(order), flat(other))


def test_every_stretch_of_an_epoch_mixes_the_files_in_proportion():
    """A run much shorter than an epoch (or one shuffle window) must see every file of a mix, not the few row
    groups that a plain permutation of the chunks happens to put first."""
    chunks = [data.Chunk("captions", i, 2048) for i in range(30)]
    chunks += [data.Chunk("questions", i, 2048) for i in range(10)]
    for seed in range(20):
        order = EpochOrder(chunks, seed=seed, epoch=0, window=8192).chunk_order
        from_questions = np.cumsum([chunks[i].path == "questions" for i in order])  # [C] in each prefix
        assert np.all(np.abs(from_questions - np.arange(1, 41) / 4) <= 1.5), from_questions
        assert from_questions[3] == 1  # the first window (4 row groups): 3 of captions, 1 of questions
    assert sorted(order.tolist()) == list(range(40))


def test_ranks_split_the_rows_and_a_resumed_epoch_continues_the_same_batches(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": f"row {i}"} for i in range(50)])
    config = DataConfig(paths=[str(path)], kind="text", max_seq_len=32, shuffle_window=16)
    training = TrainingData(config, tiny_tokenizer)
    decode = lambda b: sorted(tiny_tokenizer.decode(d, skip_special_tokens=True) for d in documents(b))
    single = training.epoch(3, 0, batch_size=4)
    full = [decode(single[k]) for k in range(len(single))]
    ranks = [training.epoch(3, 0, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for k in range(len(single)):
        assert sorted(decode(ranks[0][k]) + decode(ranks[1][k])) == full[k]
    resumed = training.epoch(3, 8, batch_size=4)
    assert [decode(resumed[k]) for k in range(len(resumed))] == full[2:]
    assert sorted(t for batch in full for t in batch) == sorted(f"row {i}" for i in range(50))


def documents(batch) -> list[list[int]]:
    """The token ids of every document of a packed batch (padding left out)."""
    docs = []
    for ids, positions in zip(batch.input_ids.tolist(), batch.position_ids.tolist()):
        for token, position in zip(ids, positions):
            if position == 0:
                docs.append([])
            docs[-1].append(token)
    return [d for d in docs if d != [0]]


def test_streaming_reads_only_the_window_it_needs(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_parquet(tmp_path / "many.parquet", vlm_rows(60), row_group_size=5)
    config = DataConfig(paths=[str(path)], kind="chat", max_seq_len=200, image_token_len=64, shuffle_window=10)
    training = TrainingData(config, tiny_tokenizer, ImagePreprocessor(64))
    reads = []
    original = data.RowReader.read
    monkeypatch.setattr(data.RowReader, "read", lambda self, chunk: reads.append(chunk) or original(self, chunk))
    micro = training.epoch(0, 30, batch_size=4)
    micro[0]
    assert len(training.chunks) == 12 and len(reads) <= 4  # one or two windows of two row groups


def test_dataloader_workers_do_not_change_the_batches(tmp_path, tiny_tokenizer):
    path = write_parquet(tmp_path / "vlm.parquet", vlm_rows(24), row_group_size=6)
    config = DataConfig(paths=[str(path)], kind="chat", max_seq_len=200, image_token_len=64)
    training = TrainingData(config, tiny_tokenizer, ImagePreprocessor(64))
    runs = [list(data.loader(training.epoch(0, 0, 4), workers, pin_memory=False)) for workers in (0, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert [p.shape for p in a.pixel_values] == [p.shape for p in b.pixel_values]


def test_pack_layout(tiny_tokenizer):
    samples = [Sample(np.arange(1, n + 1), np.r_[IGNORE, np.arange(2, n + 1)]) for n in (5, 3, 7, 2)]
    batch = pack(samples, max_seq_len=8)
    assert batch.input_ids.shape == (3, 7) and batch.real_tokens == 17 and batch.samples == 4  # 7 | 5 | 3+2
    starts = batch.position_ids == 0
    real = batch.input_ids != 0
    assert torch.all(batch.labels[starts] == IGNORE)  # first token of every document and every pad
    assert torch.all(batch.labels[~real] == IGNORE) and int(batch.targets) == 13
    unpacked = pack(samples, max_seq_len=8, packing=False)
    assert unpacked.input_ids.shape == (4, 7) and unpacked.real_tokens == 17
    empty = pack([], max_seq_len=8)
    assert empty.input_ids.shape == (1, 1) and int(empty.targets) == 0


def test_assign_rows_uses_the_fewest_rows_and_balances_them():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 100, size=int(rng.integers(1, 20)))
        rows = data.assign_rows(lengths, 100)
        loads = np.bincount(rows, weights=lengths)
        assert loads.max() <= 100 and np.all(loads > 0)
        assert len(loads) <= 2 * np.ceil(lengths.sum() / 100)  # first-fit decreasing bound
    assert data.assign_rows(np.array([400, 350, 300, 250]), 768).tolist() == [0, 1, 1, 0]


def per_document_losses(model, batch) -> list[float]:
    """Mean CE of each document in a packed batch, in packing order."""
    out = model(batch.input_ids, position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                check_images=False)
    ce = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], reduction="none")
    doc = (batch.position_ids == 0).cumsum(1)[:, 1:]
    losses = []
    for row in range(batch.input_ids.shape[0]):
        for d in doc[row].unique().tolist():
            mask = (doc[row] == d) & (batch.labels[row, 1:] != IGNORE)
            if mask.any():
                losses.append(ce[row][mask].mean().item())
    return losses


def test_packed_batch_gives_each_sample_its_own_loss(tmp_path, tiny_tokenizer, tiny_vlm):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: one thread avoids waiting on a busy second core
    try:
        check_packed_losses(tmp_path, tiny_tokenizer, tiny_vlm)
    finally:
        torch.set_num_threads(threads)


def check_packed_losses(tmp_path, tiny_tokenizer, tiny_vlm):
    path = write_parquet(tmp_path / "vlm.parquet", vlm_rows(12), row_group_size=12)
    config = DataConfig(paths=[str(path)], kind="chat", max_seq_len=300, image_token_len=64, shuffle_window=1)
    training = TrainingData(config, tiny_tokenizer, tiny_vlm.image_processor)
    micro = training.epoch(0, 0, batch_size=12)
    samples, _ = micro.samples(np.arange(12))
    assert any(s.pixels is None for s in samples) and any(s.pixels is not None for s in samples)
    packed = pack(samples, 300, image_token_len=64)
    assert packed.input_ids.shape[0] < 12
    with torch.no_grad():
        alone = [tiny_vlm(torch.from_numpy(s.ids)[None],
                          pixel_values=None if s.pixels is None else torch.from_numpy(s.pixels)[None],
                          labels=torch.from_numpy(s.labels)[None]).loss.item() for s in samples]
        packed_losses = per_document_losses(tiny_vlm, packed)
    order = np.argsort(data.assign_rows(np.array([len(s.ids) for s in samples]), 300), kind="stable")
    assert np.allclose(packed_losses, [alone[i] for i in order], atol=1e-5)


def test_text_only_rows_carry_no_image(tmp_path, tiny_tokenizer):
    path = write_parquet(tmp_path / "vlm.parquet", vlm_rows(5), row_group_size=5)
    config = DataConfig(paths=[str(path)], kind="chat", max_seq_len=300, image_token_len=64, shuffle_window=1)
    training = TrainingData(config, tiny_tokenizer, ImagePreprocessor(64))
    micro = training.epoch(0, 0, batch_size=5)
    text_only, _ = micro.samples(np.arange(5))
    text_only = [s for s in text_only if s.pixels is None]
    assert len(text_only) == 1 and not np.any(text_only[0].ids == 12)
    batch = pack(text_only, 300, image_token_len=64)
    assert batch.pixel_values is None


def test_image_list_accepts_the_usual_cell_forms():
    assert image_list(None) == []
    assert image_list(b"x") == [b"x"]
    assert image_list([b"x", b"y"]) == [b"x", b"y"]
    assert image_list({"bytes": b"x", "path": None}) == [b"x"]


def test_parquet_without_the_required_column_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"caption": ["a"]}), path)
    with pytest.raises(ValueError, match="needs a `conversations` column"):
        TrainingData(DataConfig(paths=[str(path)], kind="chat", max_seq_len=64), tiny_tokenizer)


def test_preview_shows_images_text_and_skip_reasons(tmp_path):
    from PIL import Image

    from minimind_v import cli
    from minimind_v.preview import describe, first_rows

    path = tmp_path / "mixed.parquet"
    bad_rows_parquet(path)
    rows = first_rows(str(path), 14)
    described = [describe(row) for row in rows]
    assert described[0][0] is not None and "assistant: A " in described[0][1]
    assert described[4] == (None, "[text only: its image is not used]\nuser: Say hello.\nassistant: Hello!")
    assert [text for _, text in described[10:13]] == [f"SKIPPED BY THE TRAINER: {r}" for r in
                                                      ("bad_image", "bad_image", "invalid_json")]
    cli.main(["data", "preview", str(path), "--num", "6", "--cols", "3", "--out", str(tmp_path / "grid.png")])
    assert Image.open(tmp_path / "grid.png").size == (960, 840)


def test_image_rows_need_their_image_column(tiny_tokenizer):
    config = DataConfig(paths=[], kind="chat", max_seq_len=200, image_token_len=64)
    builder = sample_builder(config, tiny_tokenizer, ImagePreprocessor(64))
    record = {"conversations": conversation("<image>\nWhat is it?", "A circle.")}
    with pytest.raises(BadSample, match="missing_field"):
        builder.build(dict(record), random.Random(0))
    with pytest.raises(BadSample, match="image_mismatch"):
        builder.build({**record, "image_bytes": None}, random.Random(0))
    text_only = builder.build({"conversations": conversation("Hi", "Hello")}, random.Random(0))
    assert text_only.pixels is None


def test_malformed_tool_calls_make_a_bad_conversation_not_a_crash(tiny_tokenizer):
    builder = sample_builder(DataConfig(paths=[], kind="chat", max_seq_len=200), tiny_tokenizer)
    calls = {"conversations": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a", "tool_calls": '["not a call"]'}]}
    with pytest.raises(BadSample, match="bad_conversation"):
        builder.build(calls, random.Random(0))
    calls["conversations"][1]["tool_calls"] = '[{"name": "f", "arguments": {"x": 1}}]'
    sample = builder.build(calls, random.Random(0))
    assert '{"name": "f", "arguments": {"x": 1}}' in tiny_tokenizer.decode(sample.ids[sample.labels != IGNORE])
