"""`minimind-v data synth`: determinism, schema, labels that match the pixels, the held-out guarantee,
answer balance (a question alone must not reveal its answer) and streaming writes."""

from __future__ import annotations

import io
import json
import os
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from minimind_v import synth
from minimind_v.cli import main as cli
from minimind_v.tokenizer import render_chat

SMALL = ["--train_rows", "60", "--test_rows", "40", "--pretrain_rows", "20", "--text_rows", "20"]


def run_synth(out_dir, *extra: str) -> None:
    cli(["data", "synth", "--out_dir", str(out_dir), *SMALL, *extra])


def read_rows(path, **kwargs) -> list[dict]:
    return pq.read_table(path, **kwargs).to_pylist()


def test_same_arguments_give_identical_files_and_another_seed_does_not(tmp_path):
    every_file = ["--files", *synth.FILES, "--dpo_rows", "20", "--rl_rows", "20"]
    run_synth(tmp_path / "a", "--seed", "3", *every_file)
    run_synth(tmp_path / "b", "--seed", "3", *every_file)
    run_synth(tmp_path / "c", "--seed", "4", *every_file)
    for name in [*synth.FILE_NAMES.values(), "synth_info.json"]:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), name
        if name != "synth_info.json":
            assert first != (tmp_path / "c" / name).read_bytes(), name


def test_rows_do_not_depend_on_how_many_are_written(tmp_path):
    config = synth.SynthConfig(seed=1)
    synth.generate(config, str(tmp_path / "few"), {"vlm_sft": 5})
    synth.generate(config, str(tmp_path / "many"), {"vlm_sft": 30}, row_group_size=7)
    few = read_rows(tmp_path / "few" / "vlm_sft.parquet")
    assert few == read_rows(tmp_path / "many" / "vlm_sft.parquet")[:5]


def test_files_follow_the_reference_schema(tmp_path):
    run_synth(tmp_path, "--turns", "2", "--image_size", "48", "--image_format", "png")
    info = json.loads((tmp_path / "synth_info.json").read_text())
    assert info["rows"] == {"llm_pretrain": 20, "llm_sft": 20, "vlm_pretrain": 20, "vlm_sft": 60, "vlm_test": 40}
    for name in ("vlm_pretrain", "vlm_sft", "vlm_test"):
        path = tmp_path / f"{name}.parquet"
        reference_view = read_rows(path, columns=["conversations", "image_bytes"])  # what reference readers load
        assert len(reference_view) == info["rows"][name]
        turns = 2 if name == "vlm_sft" else 1
        for row in reference_view[:10]:
            messages = json.loads(row["conversations"])
            assert [m["role"] for m in messages] == ["user", "assistant"] * turns
            assert messages[0]["content"].startswith("<image>\n")
            assert all("<image>" not in m["content"] for m in messages[1:])
            image = Image.open(io.BytesIO(row["image_bytes"]))
            assert (image.format, image.size, image.mode) == ("PNG", (48, 48), "RGB")
    sft = read_rows(tmp_path / "vlm_sft.parquet")[0]
    messages = json.loads(sft["conversations"])
    assert sft["question"] == [messages[0]["content"].removeprefix("<image>\n"), messages[2]["content"]]
    assert sft["answer"] == [messages[1]["content"], messages[3]["content"]]
    assert all(t in synth.QUESTION_TYPES for t in sft["question_type"])
    assert {r["question_type"] for r in read_rows(tmp_path / "vlm_pretrain.parquet")} == {"caption"}
    text = [json.loads(line) for line in (tmp_path / "llm_pretrain.jsonl").read_text().splitlines()]
    assert len(text) == 20 and all(isinstance(r["text"], str) and r["text"] for r in text)
    chats = [json.loads(line) for line in (tmp_path / "llm_sft.jsonl").read_text().splitlines()]
    assert all([m["role"] for m in c["conversations"]] == ["user", "assistant"] * 2 for c in chats)


def test_languages(tmp_path):
    run_synth(tmp_path / "en", "--lang", "en", "--files", "vlm_test")
    run_synth(tmp_path / "zh", "--lang", "zh", "--files", "vlm_test")
    run_synth(tmp_path / "both", "--files", "vlm_test")
    cjk = lambda text: any("\u4e00" <= ch <= "\u9fff" for ch in text)
    en = read_rows(tmp_path / "en" / "vlm_test.parquet")
    zh = read_rows(tmp_path / "zh" / "vlm_test.parquet")
    assert not any(cjk(r["conversations"]) for r in en) and {r["lang"] for r in en} == {"en"}
    assert all(cjk(r["question"]) and cjk(r["answer"]) for r in zh)
    assert {r["lang"] for r in read_rows(tmp_path / "both" / "vlm_test.parquet")} == {"en", "zh"}
    assert not (tmp_path / "en" / "vlm_sft.parquet").exists()


def test_labels_match_the_pixels():
    """Each shape's centre pixel has its colour, and the image shows nothing where no shape is."""
    config = synth.SynthConfig(image_format="png", noise=0.0, texture=0.0)
    palette = np.array(list(synth.COLOURS.values()), dtype=float)
    for index in range(40):
        row = synth.vlm_row(config, "vlm_test", index)
        pixels = np.asarray(Image.open(io.BytesIO(row["image_bytes"])), dtype=float)
        occupied = set()
        for shape in json.loads(row["scene"]):
            centre = pixels[int(shape["y"]), int(shape["x"])]
            nearest = list(synth.COLOURS)[int(np.argmin(np.abs(palette - centre).sum(axis=1)))]
            assert nearest == shape["colour"], (index, shape)
            assert shape["cell"] == 2 * int(shape["y"] >= 32) + int(shape["x"] >= 32)
            occupied.add(shape["cell"])
        for cell in set(range(4)) - occupied:  # empty cells are plain background
            top, left = 32 * (cell // 2), 32 * (cell % 2)
            assert np.ptp(pixels[top:top + 32, left:left + 32], axis=(0, 1)).max() <= 2


def test_answers_follow_from_the_scene():
    """Questions name a shape by its position or its colour; every answer is what the scene says."""
    config = synth.SynthConfig(lang="en")
    checked = Counter()
    for index in range(300):
        row = synth.vlm_row(config, "vlm_test", index)
        shapes = json.loads(row["scene"])
        by_colour = {s["colour"]: s for s in shapes}
        by_position = {synth.POSITIONS[s["cell"]]: s for s in shapes}
        question, answer, kind = row["question"], row["answer"], row["question_type"]
        colours = sorted((c for c in synth.COLOURS if f"the {c} shape" in question), key=question.index)
        position = next((p for p in synth.POSITIONS if question.endswith(f"at the {p}?")), None)
        if kind == "colour":
            assert answer == by_position[position]["colour"]
        elif kind == "shape":
            assert answer == (by_position[position] if position else by_colour[question.split()[-1][:-1]])["kind"]
        elif kind == "count":
            assert answer == synth.EN_NUMBERS[len(shapes) - 1]
        elif kind == "position":
            assert answer == synth.POSITIONS[by_colour[colours[0]]["cell"]]
        elif kind == "presence":
            words = {s["kind"] for s in shapes} | {s["colour"] for s in shapes}
            asked = question.split()[3].removesuffix("?")  # "Is there a(n) WORD[ shape]?"
            assert answer == ("yes" if asked in words else "no")
        elif kind == "relation":
            a, b = (by_colour[c] for c in colours)
            if "left or to the right" in question:
                assert a["cell"] % 2 != b["cell"] % 2
                assert answer == ("left" if a["cell"] % 2 < b["cell"] % 2 else "right")
            else:
                assert "above or below" in question and a["cell"] // 2 != b["cell"] // 2
                assert answer == ("above" if a["cell"] // 2 < b["cell"] // 2 else "below")
        checked[kind] += 1
    assert set(checked) == set(synth.QUESTION_TYPES)


def test_captions_describe_every_cell():
    for index in range(50):
        row = synth.vlm_row(synth.SynthConfig(lang="en"), "vlm_pretrain", index)
        by_cell = {s["cell"]: s for s in json.loads(row["scene"])}
        count, *slots = row["answer"].rstrip(".").split(". ")
        number = synth.EN_NUMBERS[len(by_cell) - 1]
        assert count.lower() == (f"{number} shapes" if len(by_cell) > 1 else "one shape")
        for cell, slot in enumerate(slots):
            position, content = slot.split(": ")
            assert position.lower() == synth.POSITIONS[cell]
            shape = by_cell.get(cell)
            assert content == (f"{synth._article(shape['colour'])} {shape['colour']} {shape['kind']}" if shape
                               else "nothing")


def test_test_layouts_never_appear_in_training(tmp_path):
    """The split is a fixed hash of the layout, so it holds across files and seeds."""
    run_synth(tmp_path / "a", "--seed", "0", "--train_rows", "400", "--test_rows", "200")
    run_synth(tmp_path / "b", "--seed", "1", "--files", "vlm_test", "--test_rows", "200")

    def layouts(path) -> set[str]:
        return {synth.layout_key((s["cell"], s["kind"], s["colour"]) for s in json.loads(r))
                for r in pq.read_table(path, columns=["scene"]).column("scene").to_pylist()}

    train = layouts(tmp_path / "a" / "vlm_sft.parquet") | layouts(tmp_path / "a" / "vlm_pretrain.parquet")
    test = layouts(tmp_path / "a" / "vlm_test.parquet") | layouts(tmp_path / "b" / "vlm_test.parquet")
    assert len(test) > 100 and len(train) > 300
    assert not train & test
    assert all(synth.is_held_out(key) for key in test) and not any(synth.is_held_out(key) for key in train)
    shares = [synth.is_held_out(f"{i}:circle:red") for i in range(4000)]
    assert abs(np.mean(shares) - synth.HELD_OUT_FRACTION) < 0.02


def test_a_question_alone_does_not_reveal_its_answer():
    """The best guess from the question text alone (each distinct question's most frequent training answer)
    does no better on held-out rows than the most frequent training answer of the question's options (a relation
    names its axis: left or right, above or below); and no answer dominates a type."""
    config = synth.SynthConfig(lang="both")
    train = [(lang, *a) for _, lang, _, asked in (synth.draw_row(config, "vlm_sft", i) for i in range(3000))
             for a in asked]
    test = [(lang, *asked[0]) for _, lang, _, asked in (synth.draw_row(config, "vlm_test", i) for i in range(3000))]
    options = lambda kind, question: (kind, kind == "relation" and ("above" in question or "上面" in question))
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[tuple, Counter] = defaultdict(Counter)
    by_options: dict[tuple, Counter] = defaultdict(Counter)
    for lang, kind, question, answer in train:
        by_question[question][answer] += 1
        by_type[kind, lang][answer] += 1
        by_options[(lang, *options(kind, question))][answer] += 1
    for (kind, lang), answers in by_type.items():
        assert max(answers.values()) / sum(answers.values()) < 0.6, (kind, lang, answers)
    guess = lambda counter: counter.most_common(1)[0][0]
    text_only = np.mean([q in by_question and guess(by_question[q]) == a for _, _, q, a in test])
    best_option = np.mean([guess(by_options[(lang, *options(kind, q))]) == a for lang, kind, q, a in test])
    majority = np.mean([guess(by_type[kind, lang]) == a for lang, kind, _, a in test])
    assert text_only <= best_option + 0.03, (text_only, best_option)
    assert majority < 0.36 and best_option < 0.4, (majority, best_option)


def test_parquet_rows_are_flushed_one_group_at_a_time(tmp_path):
    """Memory stays bounded: while rows are still being produced, earlier groups are already on disk."""
    path = str(tmp_path / "stream.parquet")
    sizes = []

    def rows():
        for index in range(50):
            if index % 10 == 0:
                sizes.append(os.path.getsize(path + ".tmp") if os.path.exists(path + ".tmp") else 0)
            yield synth.vlm_row(synth.SynthConfig(), "vlm_test", index)

    written = synth.write_parquet(rows(), path, synth.parquet_schema("vlm_test"), row_group_size=10)
    assert written == 50
    assert all(later > earlier for earlier, later in zip(sizes[1:], sizes[2:])), sizes
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    assert not os.path.exists(path + ".tmp")


def test_an_easier_task_uses_only_the_chosen_vocabulary(tmp_path):
    run_synth(tmp_path, "--kinds", "circle", "square", "triangle", "--colours", "red", "blue", "green",
              "--max_shapes", "2", "--lang", "en", "--turns", "6", "--test_rows", "200")
    rows = read_rows(tmp_path / "vlm_test.parquet")
    shapes = [s for r in rows for s in json.loads(r["scene"])]
    assert {s["kind"] for s in shapes} == {"circle", "square", "triangle"}
    assert {s["colour"] for s in shapes} == {"red", "blue", "green"}
    assert {len(json.loads(r["scene"])) for r in rows} == {1, 2}
    assert {r["answer"] for r in rows if r["question_type"] == "presence"} == {"yes", "no"}


def test_question_types_can_be_restricted_to_train_one_skill(tmp_path):
    run_synth(tmp_path, "--files", "vlm_sft", "--question_types", "position", "--lang", "en")
    rows = read_rows(tmp_path / "vlm_sft.parquet")
    assert all(r["question_type"] == ["position"] * 3 for r in rows)
    for row in rows:
        where = {s["colour"]: synth.POSITIONS[s["cell"]] for s in json.loads(row["scene"])}
        for question, answer in zip(row["question"], row["answer"]):
            assert answer == where[question.split()[3]]  # "Where is the red shape?"
    assert synth.read_config(str(tmp_path)).asked_types == ("position",)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--image_size"):
        run_synth(tmp_path, "--image_size", "16")
    with pytest.raises(SystemExit, match="--turns"):
        run_synth(tmp_path, "--turns", "0")
    with pytest.raises(SystemExit, match="--turns"):
        run_synth(tmp_path, "--turns", "6", "--max_shapes", "1")
    with pytest.raises(SystemExit, match="relation questions need --max_shapes 2"):
        run_synth(tmp_path, "--question_types", "relation", "--max_shapes", "1")
    with pytest.raises(SystemExit, match="--kinds needs more distinct entries than --max_shapes"):
        run_synth(tmp_path, "--kinds", "circle", "square", "--max_shapes", "2")
    with pytest.raises(SystemExit, match="row counts must not be negative"):
        run_synth(tmp_path, "--rl_rows", "-1")


def test_a_rejected_answer_is_a_wrong_one_from_the_same_answer_set(tmp_path):
    run_synth(tmp_path, "--files", "vlm_dpo", "--dpo_rows", "300")
    rows = read_rows(tmp_path / "vlm_dpo.parquet", columns=["chosen", "rejected", "answer", "rejected_answer",
                                                             "question_type", "lang"])
    answers = defaultdict(set)
    for row in rows:
        answers[row["question_type"], row["lang"]].add(row["answer"])
    assert {lang for _, lang in answers} == {"en", "zh"} and len(answers) == 12
    for row in rows:
        chosen, rejected = json.loads(row["chosen"]), json.loads(row["rejected"])
        assert chosen[:-1] == rejected[:-1] and rejected[-1]["content"] == row["rejected_answer"]
        assert row["rejected_answer"] != row["answer"]
        assert row["rejected_answer"] in answers[row["question_type"], row["lang"]], row
        if row["question_type"] == "count":
            numbers = synth.ZH_NUMBERS if row["lang"] == "zh" else synth.EN_NUMBERS
            assert abs(numbers.index(row["rejected_answer"]) - numbers.index(row["answer"])) == 1


def test_rl_prompt_files_ask_one_verifiable_question_about_training_layouts(tmp_path):
    """vlm_rl has vlm_test's columns on training layouts; llm_rl is the reference rlaif.jsonl prompt (ending in an
    empty assistant message) plus the answer a GRPO reward checks."""
    run_synth(tmp_path, "--files", "vlm_test", "vlm_rl", "llm_rl", "--rl_rows", "200")
    assert pq.read_schema(tmp_path / "vlm_rl.parquet") == pq.read_schema(tmp_path / "vlm_test.parquet")
    rows = read_rows(tmp_path / "vlm_rl.parquet")
    assert len(rows) == 200 and {r["lang"] for r in rows} == {"en", "zh"}
    for row in rows:
        messages = json.loads(row["conversations"])
        assert messages == [{"role": "user", "content": f"<image>\n{row['question']}"},
                            {"role": "assistant", "content": row["answer"]}]
        assert row["question_type"] in synth.QUESTION_TYPES
        layout = ((s["cell"], s["kind"], s["colour"]) for s in json.loads(row["scene"]))
        assert not synth.is_held_out(synth.layout_key(layout))
    prompts = [json.loads(line) for line in (tmp_path / "llm_rl.jsonl").read_text().splitlines()]
    assert len(prompts) == 200
    checked = Counter()
    for prompt in prompts:
        assert set(prompt) == {"conversations", "answer", "question_type"}
        user, assistant = prompt["conversations"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": ""}
        description, question = user["content"].split("\n")
        answer = prompt["answer"]
        if prompt["question_type"] == "count":  # "Two shapes. ..." / "两个形状。..."
            assert description.lower().startswith(answer + ("形状" if answer in synth.ZH_NUMBERS else " shape"))
        elif prompt["question_type"] == "presence" and question.startswith("Is there"):
            asked = question.split()[3].removesuffix("?")  # "Is there a(n) WORD[ shape]?"
            assert answer == ("yes" if f" {asked}" in description else "no")
        checked[prompt["question_type"]] += 1
    assert checked["count"] and checked["presence"] and set(checked) <= set(synth.QUESTION_TYPES)


def test_think_reasons_with_the_caption_before_every_sft_answer(tmp_path, tiny_tokenizer):
    """With --think 1 each vlm_sft / llm_sft answer carries the scene's caption as reasoning_content, rendered as a
    think block before the unchanged answer; the other files are not touched."""
    files = ["--files", "vlm_sft", "llm_sft", "vlm_test", "vlm_rl", "--rl_rows", "20"]
    run_synth(tmp_path / "plain", *files)
    run_synth(tmp_path / "think", *files, "--think", "1")
    assert synth.read_config(str(tmp_path / "think")).think and not synth.read_config(str(tmp_path / "plain")).think
    for name in ("vlm_test.parquet", "vlm_rl.parquet"):
        assert (tmp_path / "think" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    plain, think = (read_rows(tmp_path / folder / "vlm_sft.parquet") for folder in ("plain", "think"))
    for before, row in zip(plain, think):
        assert {k: v for k, v in row.items() if k != "conversations"} == \
            {k: v for k, v in before.items() if k != "conversations"}
        scene = synth.caption(tuple(synth.Shape(**s) for s in json.loads(row["scene"])), row["lang"])
        messages = json.loads(row["conversations"])
        answers = messages[1::2]
        assert all(m["reasoning_content"] == scene for m in answers)
        assert [m["content"] for m in answers] == row["answer"]
        assert [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages] == \
            json.loads(before["conversations"])
        rendered = render_chat(tiny_tokenizer, messages)
        assert all(f"<think>\n{scene}\n</think>\n\n{answer}<|im_end|>" in rendered for answer in row["answer"])
    plain, think = ((tmp_path / folder / "llm_sft.jsonl").read_text().splitlines() for folder in ("plain", "think"))
    for before, line in zip(plain, think, strict=True):
        messages = json.loads(line)["conversations"]
        description = messages[0]["content"].split("\n")[0]
        assert all(m["reasoning_content"] == description for m in messages[1::2])
        assert [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages] == \
            json.loads(before)["conversations"]


# ---------------------------------------------------------------------------------------------- tasks

TASK_ROWS = ["--train_rows", "40", "--test_rows", "30", "--pretrain_rows", "10"]
MEDIA = {"details": "image_bytes", "multi": "image_bytes", "video": "video_bytes"}


def task_rows(config: synth.SynthConfig, file: str, count: int) -> list[tuple[str, object, list]]:
    """(lang, scene, asked) of rows drawn without rendering."""
    return [synth.draw_task_row(config, file, i)[1:] for i in range(count)]


def test_the_shapes_task_is_the_default(tmp_path):
    run_synth(tmp_path / "plain", "--files", "vlm_sft", "vlm_test")
    run_synth(tmp_path / "shapes", "--files", "vlm_sft", "vlm_test", "--task", "shapes")
    for name in ("vlm_sft.parquet", "vlm_test.parquet"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "shapes" / name).read_bytes()


@pytest.mark.parametrize("task", ["details", "multi", "video"])
def test_task_files_are_well_formed_and_deterministic(tmp_path, task):
    for folder, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        cli(["data", "synth", "--task", task, "--out_dir", str(tmp_path / folder), *TASK_ROWS, "--seed", seed])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [synth.FILE_NAMES[f] for f in synth.TASK_FILES] + [synth.INFO_FILE])
    assert synth.read_config(str(tmp_path / "a")).task == task
    sizes = {"details": [(256, 192)], "multi": [(64, 64)] * 2, "video": [(64, 64)] * 8}[task]
    for file in synth.TASK_FILES:
        name = synth.FILE_NAMES[file]
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
        for row in read_rows(tmp_path / "a" / name):
            messages = json.loads(row["conversations"])
            questions = row["question"] if file == "vlm_sft" else [row["question"]]
            answers = row["answer"] if file == "vlm_sft" else [row["answer"]]
            assert messages == [m for q, a in zip(questions, answers)
                                for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            media = row[MEDIA[task]]
            media = media if isinstance(media, list) else [media]
            assert [Image.open(io.BytesIO(b)).size for b in media] == sizes
            marker = "<video>" if task == "video" else "<image>"
            assert questions[0].count(marker) == (1 if task != "multi" else 2)
            assert not any(marker in q for q in questions[1:])
            types = row["question_type"] if file == "vlm_sft" else [row["question_type"]]
            assert set(types) <= set(synth.TASK_QUESTION_TYPES[task]) | {"caption"}


@pytest.mark.parametrize("task", ["details", "multi", "video"])
def test_task_test_layouts_are_held_out(task):
    config = synth.SynthConfig(task=task)

    def layouts(scene) -> list[str]:
        if task == "multi":
            return [synth.layout_key((s.cell, s.kind, s.colour) for s in shapes) for shapes in scene.scenes]
        if task == "video":
            return [synth.layout_key(t.layout() for t in scene)]
        return [synth.layout_key((s.cell, s.kind, s.colour) for s in scene)]

    for file, held_out in (("vlm_test", True), ("vlm_sft", False), ("vlm_pretrain", False)):
        keys = [key for _, scene, _ in task_rows(config, file, 150) for key in layouts(scene)]
        assert all(synth.is_held_out(key) == held_out for key in keys), file


@pytest.mark.parametrize("task", ["details", "multi", "video"])
def test_task_answers_are_balanced(task):
    """Every answer of a question type is about equally frequent (the most frequent under 1.3 times its fair
    share), so a blind model stays near chance."""
    by_type: dict[tuple, Counter] = defaultdict(Counter)
    for lang, _, asked in task_rows(synth.SynthConfig(task=task), "vlm_sft", 1500):
        for question_type, _, answer in asked:
            by_type[question_type, lang][answer] += 1
    assert {t for t, _ in by_type} == set(synth.TASK_QUESTION_TYPES[task])
    for key, answers in by_type.items():
        assert len(answers) >= 2 and max(answers.values()) / sum(answers.values()) * len(answers) < 1.3, \
            (key, answers)


def test_details_answers_follow_from_the_scene():
    for _, shapes, asked in task_rows(synth.SynthConfig(task="details", lang="en"), "vlm_sft", 200):
        kinds = Counter(s.kind for s in shapes)
        for question_type, question, answer in asked:
            if question_type == "count":  # "How many triangles are there?"
                kind = next(k for k in synth.KINDS if f"many {synth._plural(k)} " in question)
                assert answer == synth.COUNT_WORDS["en"][kinds[kind]]
            elif question_type == "presence":
                kind = question.split()[-1].rstrip("?")
                assert kind in synth.KINDS and answer == ("yes" if kinds[kind] else "no")


@pytest.mark.parametrize("radius", [synth.SynthConfig.detail_radius, 0.3])
def test_details_shapes_are_read_in_tiles(radius):
    """The premise of the details task, with a 1-nearest-neighbour classifier on crops around each shape (its true
    centre given): the image at the resolution of a 2x2 grid of tiles gives the kinds; with the default
    `--detail_radius` (0.045) the whole image resized to image_size x image_size leaves them near chance (1 in 5)."""
    config = synth.SynthConfig(task="details", noise=8.0, detail_radius=radius)
    size = config.image_size
    width, height = config.canvas()

    def crops(file: str, count: int, side: int) -> tuple[np.ndarray, list[str]]:
        half = int(np.ceil(1.3 * radius * size * side / height)) + 2  # the largest shape and a margin
        features, kinds = [], []
        for index in range(count):
            row = synth.task_row(config, file, index)
            image = Image.open(io.BytesIO(row["image_bytes"])).resize((side, side), Image.Resampling.BICUBIC)
            pixels = np.pad(np.asarray(image, dtype=np.float32), ((half, half), (half, half), (0, 0)), mode="edge")
            for shape in json.loads(row["scene"]):
                x, y = int(shape["x"] * side / width) + half, int(shape["y"] * side / height) + half
                crop = pixels[y - half:y + half + 1, x - half:x + half + 1]
                contrast = np.abs(crop - np.median(crop.reshape(-1, 3), axis=0)).sum(-1).ravel()
                features.append(contrast / contrast.sum())
                kinds.append(shape["kind"])
        return np.stack(features), kinds

    accuracy = {}
    for name, side in (("one square", size), ("2x2 tiles", 2 * size)):
        train, train_kinds = crops("vlm_sft", 250, side)
        test, test_kinds = crops("vlm_test", 120, side)
        nearest = ((test[:, None] - train[None]) ** 2).sum(-1).argmin(1)
        accuracy[name] = np.mean([train_kinds[i] == kind for i, kind in zip(nearest, test_kinds)])
    assert accuracy["2x2 tiles"] > 0.85, accuracy
    if radius < 0.05:
        assert accuracy["one square"] < 0.45, accuracy


def test_multi_answers_need_the_second_image(tmp_path):
    """From the first image alone (its shape count, its kinds) the best guess of the comparison questions is near
    chance; questions about the second image's colours need it; --images_shown first keeps the first image and
    the questions exactly."""
    config = synth.SynthConfig(task="multi", lang="en")
    table: dict[tuple, Counter] = defaultdict(Counter)
    rows = task_rows(config, "vlm_sft", 3000)
    for _, pair, asked in rows:
        first = pair.scenes[0]
        for question_type, question, answer in asked:
            if question_type == "colour" and "second" not in question:
                continue
            seen = len(first) if question_type == "more" else tuple(sorted(s.kind for s in first))
            table[question_type, seen, question if question_type != "colour" else ""][answer] += 1
    tests = [a for _, _, asked in task_rows(config, "vlm_test", 600) for a in asked]
    for question_type, ceiling in (("more", 0.55), ("both", 0.68), ("colour", 0.3)):
        best = sum(max(c.values()) for (t, *_), c in table.items() if t == question_type)
        total = sum(sum(c.values()) for (t, *_), c in table.items() if t == question_type)
        assert best / total < ceiling, (question_type, best / total)
    assert {t for t, _, _ in tests} == set(synth.TASK_QUESTION_TYPES["multi"])

    files = ["--task", "multi", "--files", "vlm_test", "--test_rows", "20", "--lang", "en"]
    run_synth(tmp_path / "all", *files)
    run_synth(tmp_path / "first", *files, "--images_shown", "first")
    for both, first in zip(*(read_rows(tmp_path / d / "vlm_test.parquet") for d in ("all", "first"))):
        assert first["image_bytes"] == both["image_bytes"][:1]
        assert first["question"] == both["question"].replace("Image 2: <image>\n", "")
        assert first["question"].startswith("Image 1: <image>\n") and first["answer"] == both["answer"]


def test_video_middle_frame_does_not_give_the_answer():
    """What the middle frame shows (which side of the lines between the cells the mover is on, the turner's colour,
    the kinds in view) predicts few answers: the best table from it, fitted on training rows, scores about half on
    motion (the axis shows, the direction does not) and near chance on the rest of the held-out rows, while the
    first and last frames answer every question. The same table reads the direction of a mover at constant speed
    (2 pixels past the line towards its goal in frame 4 of 8) most of the time: the mover waits on the line."""
    config = synth.SynthConfig(task="video", lang="en")
    frames, line = config.frames, config.image_size / 2
    middle = synth.middle_frames(frames)[-1]  # the frame a one-frame sample shows (`--video_frames 1`)

    def seen(question_type: str, tracks, constant_speed: bool = False) -> tuple:
        shown = {t.role: t.at(middle, frames) for t in tracks}
        if question_type == "motion":
            mover = next(t for t in tracks if t.role == "move")
            share = middle / (frames - 1)
            x, y = ((mover.x + share * mover.dx, mover.y + share * mover.dy) if constant_speed
                    else (shown["move"].x, shown["move"].y))
            return abs(x - line) < abs(y - line), x > line, y > line
        if question_type == "turn":
            return (shown["turn"].colour,)
        return tuple(sorted(s.kind for s in shown.values() if s is not None))

    def answer_from_ends(question_type: str, question: str, tracks) -> str:
        first, last = ({t.role: t.at(k, frames) for t in tracks} for k in (0, frames - 1))
        if question_type == "motion":
            dx, dy = last["move"].x - first["move"].x, last["move"].y - first["move"].y
            return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        if question_type == "turn":
            return last["turn"].colour
        assert first["appear"] is None and synth.POSITIONS[last["appear"].cell] in question
        return last["appear"].kind

    def hit_rates(constant_speed: bool) -> dict[str, float]:
        table: dict[tuple, Counter] = defaultdict(Counter)
        for _, tracks, asked in task_rows(config, "vlm_sft", 3000):
            for question_type, _, answer in asked:
                table[question_type, seen(question_type, tracks, constant_speed)][answer] += 1
        hits = Counter()
        for _, tracks, asked in task_rows(config, "vlm_test", 600):
            (question_type, question, answer), = asked
            assert answer_from_ends(question_type, question, tracks) == answer
            guess = table.get((question_type, seen(question_type, tracks, constant_speed)))
            hits[question_type, guess is not None and guess.most_common(1)[0][0] == answer] += 1
        return {t: hits[t, True] / (hits[t, True] + hits[t, False]) for t in synth.TASK_QUESTION_TYPES["video"]}

    rates = hit_rates(constant_speed=False)
    ceilings = {"motion": 0.6, "turn": 0.4, "appear": 0.4}
    for question_type in synth.TASK_QUESTION_TYPES["video"]:
        rate = rates[question_type]
        assert rate < ceilings[question_type], (question_type, rate)
    assert hit_rates(constant_speed=True)["motion"] > 0.85


def test_task_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="writes only vlm_pretrain vlm_sft vlm_test"):
        run_synth(tmp_path, "--task", "details", "--files", "llm_sft")
    with pytest.raises(SystemExit, match="--images_shown is for --task multi"):
        run_synth(tmp_path, "--images_shown", "first")
    with pytest.raises(SystemExit, match="--frames must be at least 4"):
        run_synth(tmp_path, "--task", "video", "--frames", "3")
    with pytest.raises(SystemExit, match=r"the video task asks \['motion', 'turn', 'appear'\], not \['colour'\]"):
        run_synth(tmp_path, "--task", "video", "--question_types", "colour")
    with pytest.raises(SystemExit, match="--width and --height"):
        run_synth(tmp_path, "--task", "details", "--width", "40")
    with pytest.raises(SystemExit, match="--detail_radius 0.6 does not fit"):
        run_synth(tmp_path, "--task", "details", "--detail_radius", "0.6")
    with pytest.raises(SystemExit, match="--detail_radius is for --task details"):
        run_synth(tmp_path, "--task", "multi", "--detail_radius", "0.3")
