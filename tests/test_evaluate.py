"""`minimind-v eval`: answer normalisation, per-type scores, the majority baseline, the blind run, generic VQA
parquets (plain and multiple choice), and one run of the command on a tiny random model."""

from __future__ import annotations

import io
import json
from collections import Counter
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from minimind_v import evaluate as ev
from minimind_v import synth
from minimind_v.cli import main as cli


def png(colour=(200, 30, 30), size=16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.generate(synth.SynthConfig(seed=5), str(out), {"vlm_sft": 60, "vlm_test": 48})
    return out


@pytest.mark.parametrize("prediction, reference", [
    ("Red.", "red"), ("  RED  ", "红色"), ("红", "red"), ("Top-left", "左上"), ("upper left", "top left"),
    ("3", "three"), ("三个", "three"), ("两个", "2"), ("Yes!", "是"), ("是的。", "有"), ("没有", "no"),
    ("A circle", "圆形"), ("the star", "星形"), ("Grey", "gray"), ("十字形", "cross"), ("左边", "left"),
    ("Below.", "下面"),
])
def test_equivalent_answers_match(prediction, reference):
    assert ev.normalize_answer(prediction) == ev.normalize_answer(reference)


@pytest.mark.parametrize("prediction, reference", [
    ("red circle", "red"), ("blue", "red"), ("yes", "no"), ("4", "three"), ("左下", "top left"), ("", "no"),
    ("右边", "left"), ("above", "below"),
])
def test_different_answers_do_not_match(prediction, reference):
    assert ev.normalize_answer(prediction) != ev.normalize_answer(reference)


def test_multiple_choice_takes_the_letter_or_the_option_text():
    options = ("cat", "dog", "bird")
    assert [ev.chosen_option(p, options) for p in ["B", "(b)", "B. dog", "b)", "Dog.", "D", "a bird", "fish"]] == \
        ["B", "B", "B", "B", "B", None, "C", None]


def test_summary_counts_per_type_and_blind_and_majority():
    scored = [
        ev.Scored("colour", ("red",), True, False), ev.Scored("colour", ("blue",), True, True),
        ev.Scored("colour", ("red",), False, False), ev.Scored("count", ("2",), True, False),
    ]
    result = ev.summarize(scored, {"colour": "red", "count": "3"})
    assert result["accuracy"] == 0.75 and result["blind_accuracy"] == 0.25 and result["majority_baseline"] == 0.5
    assert result["per_type"]["colour"] == {"n": 3, "accuracy": 0.6667, "blind_accuracy": 0.3333,
                                            "majority_baseline": 0.6667, "majority_answer": "red"}
    assert result["per_type"]["count"]["majority_baseline"] == 0.0
    without_blind = ev.summarize([ev.Scored("count", ("2",), True)], {"count": "2"})
    assert without_blind["blind_accuracy"] is None and without_blind["per_type"]["count"]["blind_accuracy"] is None


def test_majority_answer_ties_are_deterministic():
    assert ev.majority_answers([("t", "b"), ("t", "a"), ("u", "x"), ("u", "y"), ("u", "y")]) == {"t": "a", "u": "y"}


def test_synthetic_test_file_with_a_fake_model(synth_dir, tmp_path):
    """A model that knows every answer scores 1.0; answering "yes" blind scores the share of yes answers; the
    majority baseline comes from the training answers (both languages counted together)."""
    def answer(items, blind):
        return ["yes" if blind else item.answers[0] + "\n(extra line)" for item in items]

    test_path, train_path = synth_dir / "vlm_test.parquet", synth_dir / "vlm_sft.parquet"
    predictions = tmp_path / "predictions.jsonl"
    result = ev.evaluate(answer, str(test_path), str(train_path), blind=True, batch_size=7,
                         predictions_path=str(predictions))
    test = pq.read_table(test_path).to_pylist()
    answers = [ev.normalize_answer(r["answer"]) for r in test]
    assert result["n"] == len(test) == 48 and result["accuracy"] == 1.0
    assert result["blind_accuracy"] == round(answers.count("yes") / len(test), 4)
    train = pq.read_table(train_path).to_pylist()
    pairs = Counter((t, ev.normalize_answer(a)) for r in train for t, a in zip(r["question_type"], r["answer"]))
    majority = {t: max(sorted(a for (u, a) in pairs if u == t), key=lambda a: pairs[t, a]) for t, _ in pairs}
    expected = sum(majority[r["question_type"]] == a for r, a in zip(test, answers)) / len(test)
    assert result["majority_baseline"] == round(expected, 4) and result["majority_source"] == "train"
    assert sum(row["n"] for row in result["per_type"].values()) == 48
    assert set(result["per_type"]) <= set(synth.QUESTION_TYPES)
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 48 and all(line["correct"] and line["blind_prediction"] == "yes" for line in lines)

    from_test = ev.evaluate(answer, str(test_path), blind=False)
    assert from_test["majority_source"] == "test" and from_test["blind_accuracy"] is None


def test_multi_turn_rows_are_asked_one_turn_at_a_time(synth_dir):
    items = list(ev.iter_items(str(synth_dir / "vlm_sft.parquet")))
    assert len(items) == 60 * 3
    assert items[0].images and items[0].images is items[1].images
    assert all(i.question_type in synth.QUESTION_TYPES for i in items)


def test_blind_requests_get_one_grey_image_per_image():
    class FakeEngine:
        model = SimpleNamespace(image_processor=SimpleNamespace(size=32))
        requests = []

        def generate(self, requests, config):
            assert config.do_sample is False and config.max_new_tokens == 5
            self.requests.extend(requests)
            return [SimpleNamespace(text="ok") for _ in requests]

    engine = FakeEngine()
    answer = ev.engine_answerer(engine, max_new_tokens=5)
    image = Image.open(io.BytesIO(png()))
    items = [ev.Item("What colour?", ("red",), "colour", [image, image]), ev.Item("Text only?", ("no",), "t")]
    assert answer(items, False) == ["ok", "ok"] and answer(items, True) == ["ok", "ok"]
    seen, blind = engine.requests[:2], engine.requests[2:]
    assert seen[0].images == [image, image] and seen[0].messages == [{"role": "user", "content": "What colour?"}]
    assert len(blind[0].images) == 2 and blind[1].images == []
    assert all(i.size == (32, 32) and i.getpixel((5, 5)) == ev.BLIND_GREY for i in blind[0].images)
    assert not any(r.open_thinking for r in engine.requests)
    ev.engine_answerer(engine, max_new_tokens=5, open_thinking=True)(items, True)
    assert all(r.open_thinking for r in engine.requests[4:])


@pytest.mark.parametrize("task", ["multi", "video"])
def test_task_files_with_several_images_or_a_video(task, tmp_path):
    """Rows of the multi and video tasks load every image / the sampled frames of the video; the majority baseline
    reads the training answers without decoding media; a blind video is grey frames at the same timestamps."""
    synth.generate(synth.SynthConfig(seed=3, task=task, lang="en"), str(tmp_path),
                   {"vlm_sft": 8, "vlm_test": 12})
    test_path, train_path = str(tmp_path / "vlm_test.parquet"), str(tmp_path / "vlm_sft.parquet")
    items = list(ev.iter_items(test_path, video_frames=4))
    if task == "multi":
        assert all(len(i.images) == 2 and not i.videos for i in items)
    else:
        assert all(not i.images and len(i.videos) == 1 and len(i.videos[0].frames) == 4 for i in items)
    result = ev.evaluate(lambda batch, blind: [i.answers[0] for i in batch], test_path, train_path, blind=True,
                         video_frames=4)
    assert result["accuracy"] == 1.0 and result["skipped_rows"] == 0 and result["majority_source"] == "train"
    assert set(result["per_type"]) <= set(synth.TASK_QUESTION_TYPES[task])

    class FakeEngine:
        model = SimpleNamespace(image_processor=SimpleNamespace(size=32))
        requests = []

        def generate(self, requests, config):
            self.requests.extend(requests)
            return [SimpleNamespace(text="ok") for _ in requests]

    engine = FakeEngine()
    ev.engine_answerer(engine)(items[:1], True)
    (request,) = engine.requests
    if task == "video":
        (video,) = request.videos
        assert video.timestamps == items[0].videos[0].timestamps
        assert all(f.getpixel((3, 3)) == ev.BLIND_GREY for f in video.frames)
    else:
        assert len(request.images) == 2 and all(i.getpixel((3, 3)) == ev.BLIND_GREY for i in request.images)


def test_a_video_marker_without_a_video_is_skipped_and_counted(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"question": ["<video>\nWhich way?", "Plain?"], "answer": ["left", "no"]}), path)
    skipped = ev.Skipped()
    assert [i.question for i in ev.iter_items(str(path), skipped=skipped)] == ["Plain?"]
    assert skipped.count == 1 and "0 video(s)" in next(iter(skipped.reasons))


def test_generic_vqa_parquet(tmp_path):
    (tmp_path / "cat.png").write_bytes(png((10, 10, 10)))
    table = pa.table({
        "image": [{"bytes": png(), "path": None}, {"bytes": None, "path": "cat.png"},
                  {"bytes": b"broken", "path": None}],
        "question": ["Colour?", "Animal?", "Broken?"],
        "answer": [["red", "crimson"], ["cat"], ["x"]],
        "category": ["colour", "animal", "animal"],
    })
    path = tmp_path / "vqa.parquet"
    pq.write_table(table, path)
    replies = {"Colour?": "Crimson.", "Animal?": "dog"}
    result = ev.evaluate(lambda items, blind: [replies[i.question] for i in items], str(path))
    assert result["n"] == 2 and result["skipped_rows"] == 1
    assert result["per_type"]["colour"]["accuracy"] == 1.0 and result["per_type"]["animal"]["accuracy"] == 0.0
    assert "UnidentifiedImageError" in next(iter(result["skipped_reasons"]))


def test_training_schema_rows_use_their_first_exchange(tmp_path):
    conversation = lambda user, answer: json.dumps([{"role": "user", "content": user},
                                                    {"role": "assistant", "content": answer}])
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({
        "conversations": [conversation("<image>\nColour?", "Red"), conversation("<image><image>\nSame?", "yes")],
        "image_bytes": [png(), png()],
    }), path)
    skipped = ev.Skipped()
    items = list(ev.iter_items(str(path), skipped=skipped))
    assert [(i.question, i.answers, len(i.images)) for i in items] == [("<image>\nColour?", ("red",), 1)]
    assert skipped.count == 1 and "2 <image> marker(s) but the row has 1 image(s)" in next(iter(skipped.reasons))


def test_multiple_choice_parquet(tmp_path):
    rows = {
        "image_bytes": [png(), png()], "question": ["Which animal?", "Which colour?"],
        "A": ["cat", "red"], "B": ["dog", "green"], "C": ["bird", None], "answer": ["B", "red"],
        "hint": [None, "Look closely."],
    }
    path = tmp_path / "mc.parquet"
    pq.write_table(pa.table(rows), path)
    items = list(ev.iter_items(str(path)))
    assert items[0].question == f"Which animal?\nA. cat\nB. dog\nC. bird\n{ev.MC_INSTRUCTION}"
    assert items[1].question.startswith("Look closely.\nWhich colour?\nA. red\nB. green\n")
    assert [i.answers for i in items] == [("B",), ("A",)]
    result = ev.evaluate(lambda items, blind: ["(B) dog", "B"], str(path), batch_size=2)
    assert result["accuracy"] == 0.5 and result["per_type"]["all"]["n"] == 2

    listed = tmp_path / "listed.parquet"
    pq.write_table(pa.table({"question": ["Pick"], "options": [json.dumps(["x", "y"])], "answer": ["y"]}), listed)
    only = next(ev.iter_items(str(listed)))
    assert only.answers == ("B",) and only.images == [] and ev.is_correct("y", only)


def test_files_without_questions_are_refused(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["hello"]}), path)
    with pytest.raises(ValueError, match="needs `question`"):
        next(ev.iter_items(str(path)))


def test_eval_command_on_a_tiny_random_model(synth_dir, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir
    out, predictions = tmp_path / "report" / "eval.json", tmp_path / "predictions.jsonl"
    test_path, train_path = synth_dir / "vlm_test.parquet", synth_dir / "vlm_sft.parquet"
    cli(["eval", "--load_from", str(model_dir), "--data_path", str(test_path), "--train_path", str(train_path),
         "--blind", "--out", str(out), "--predictions", str(predictions), "--max_new_tokens", "3",
         "--batch_size", "16", "--max_samples", "32", "--device", "cpu"])
    result = json.loads(out.read_text())
    assert {"accuracy", "blind_accuracy", "majority_baseline", "per_type", "n"} <= set(result)
    assert result["n"] == 32 and sum(row["n"] for row in result["per_type"].values()) == 32
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert result["accuracy"] == round(sum(line["correct"] for line in lines) / 32, 4)
    assert result["blind_accuracy"] == round(sum(line["blind_correct"] for line in lines) / 32, 4)
    blind_by_question: dict[str, set] = {}
    for line in lines:  # one constant image: the blind answer depends on the question only
        blind_by_question.setdefault(line["question"], set()).add(line["blind_prediction"])
    assert all(len(answers) == 1 for answers in blind_by_question.values())
    reference = ev.evaluate(lambda items, blind: ["?"] * len(items), str(test_path), str(train_path), max_samples=32)
    assert result["majority_baseline"] == reference["majority_baseline"]
    assert result["per_type"].keys() == reference["per_type"].keys()
