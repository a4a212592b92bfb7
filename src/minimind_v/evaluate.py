"""`minimind-v eval`: held-out exact-match accuracy per question type, with a blind control and a majority
baseline, on a synthetic test parquet or a generic VQA parquet.

Scores go to `eval.json`: `accuracy`, `blind_accuracy` (null unless `--blind`), `majority_baseline` and
`per_type`. The blind run replaces every image and every video frame by one mid-grey image: the gap between
`accuracy` and `blind_accuracy` is what the model reads from the images.

Accepted columns (see docs/synthetic_data.md):
  images     `image_bytes`, `image` or `images`: encoded bytes, a {"bytes", "path"} struct (Hugging Face image
             feature), a path relative to the parquet's folder, or a list of those; absent or null: text only
  video      `video_bytes` or `video`: one video per row, an encoded video file (bytes or a path relative to the
             parquet's folder) or a list of frame images; `--video_frames` frames are sampled uniformly from it.
             The question marks it with `<video>` (and each image with `<image>`).
  question   `question`; a list of questions is a multi-turn row whose turns are asked one at a time.
             Without it, the first user / assistant messages of `conversations` are the question / answer.
  answer     `answer`: a string, or a list of acceptable strings (with a scalar question)
  choices    `options` (a list or a JSON list) or columns `A`, `B`, `C`, ...: multiple choice; the options
             are listed in the prompt and the chosen letter is scored; `hint` is prepended when present
  type       `question_type`, else `category`, else everything is one type, "all"
  pairs      `chosen` and `rejected` (preference data, as `minimind-v data synth --files vlm_dpo_test` writes):
             `preference` in eval.json gives the mean log-probability margin of the chosen over the rejected
             answer and how often it is positive (a file with only these columns is scored this way alone)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from .synth import EN_NUMBERS, MOTION_ZH, ORDINALS, POSITIONS, ZH, ZH_NUMBERS
from .tokenizer import IMAGE_MARKER
from .video import VIDEO_MARKER, Video, load_video
from .vision import load_image

BLIND_GREY = (128, 128, 128)
IMAGE_COLUMNS = ("image_bytes", "image", "images")
VIDEO_COLUMNS = ("video_bytes", "video")
TYPE_COLUMNS = ("question_type", "category")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_ZH_DIGITS = "零一二三四五六七八九十"


def _equivalents() -> dict[str, str]:
    """Normalised answer -> canonical form: Chinese and English synonyms, number words -> digits."""
    table = {zh: en for en, zh in ZH.items()}
    table.update({zh[:-1]: en for en, zh in ZH.items() if zh.endswith("色")})  # 红色 / 红
    table.update({"圆": "circle", "方形": "square", "正方形": "square", "三角": "triangle", "星": "star",
                  "星星": "star", "五角星": "star", "十字": "cross", "加号": "cross", "plus": "cross"})
    for en in POSITIONS:
        table.update({ZH[en] + "方": en, ZH[en] + "角": en, en.replace("top", "upper").replace("bottom", "lower"): en})
    for value in range(11):
        digit = str(value)
        table[_NUMBER_WORDS[value]] = digit
        table[_ZH_DIGITS[value]] = digit
        table[_ZH_DIGITS[value] + "个"] = digit
        table[digit + "个"] = digit
    table.update({"两": "2", "两个": "2"})
    table.update({zh: en for en, zh in MOTION_ZH.items()})  # 向左 / left (a video's motion)
    table.update({zh: en for zh, en in zip(ORDINALS["zh"], ORDINALS["en"])})  # 第二张 / second (which image)
    table.update({zh[:-1]: en for zh, en in zip(ORDINALS["zh"], ORDINALS["en"])})
    table.update({w: "yes" for w in ("yes", "yeah", "true", "是", "是的", "对", "对的", "有", "有的")})
    table.update({w: "no" for w in ("no", "false", "不是", "否", "不", "没有", "无", "不对")})
    table.update({"grey": "gray", "灰色": "gray", "白色": "white", "黑色": "black"})
    assert all(table[ZH_NUMBERS[i]] == table[EN_NUMBERS[i]] for i in range(len(EN_NUMBERS)))
    return table


EQUIVALENT = _equivalents()
_EDGE_PUNCTUATION = " \t\r\n.,!?;:'\"`()[]{}<>。、「」『』“”‘’《》"
_ARTICLE = re.compile(r"^(a|an|the) ")
_CJK = re.compile(r"[\u3400-\u9fff]")
_LETTER_CHOICE = re.compile(r"^\(?([a-z])(?:[).:、]|$)")  # "b", "(b)", "b)", "b. dog", not "a dog"


def normalize_answer(text: str) -> str:
    """Case, width, surrounding punctuation and whitespace, hyphens, a leading article and Chinese /
    English / number-word synonyms do not matter: "Red." == "红色" == "red", "三个" == "three" == "3",
    "Top-left" == "左上", "是的" == "Yes"."""
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ").replace("_", " ")
    text = " ".join(text.strip(_EDGE_PUNCTUATION).split())
    text = _ARTICLE.sub("", text)
    if _CJK.search(text):
        text = text.replace(" ", "")
    return EQUIVALENT.get(text, text)


@dataclass
class Item:
    """One question to ask. `answers` are normalised acceptable answers (letters for multiple choice)."""

    question: str
    answers: tuple[str, ...]
    question_type: str
    images: list = field(default_factory=list)  # PIL images
    options: tuple[str, ...] = ()  # normalised option texts, multiple choice only
    videos: list = field(default_factory=list)  # video.Video


def chosen_option(prediction: str, options: Sequence[str]) -> str | None:
    """The letter a multiple-choice prediction picks: a leading letter ("B", "(b)", "B. dog") or the
    text of one option ("a dog"); None when it picks nothing."""
    text = unicodedata.normalize("NFKC", prediction).strip().lower()
    match = _LETTER_CHOICE.match(text)
    if match and LETTERS.lower().index(match.group(1)) < len(options):
        return match.group(1).upper()
    normalised = normalize_answer(prediction)
    return next((LETTERS[i] for i, option in enumerate(options) if option == normalised), None)


def is_correct(prediction: str, item: Item) -> bool:
    if item.options:
        return chosen_option(prediction, item.options) in item.answers
    return normalize_answer(prediction) in item.answers


def first_line(text: str) -> str:
    """The answer is what the model says before its first line break."""
    stripped = text.strip()
    return stripped.split("\n", 1)[0] if stripped else ""


# ---------------------------------------------------------------------------------------------- reading


def _images(value, folder: str) -> list[Image.Image]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [image for v in value for image in _images(v, folder)]
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            return []
    return [load_image(os.path.join(folder, value) if isinstance(value, str) else io.BytesIO(value))]


def _videos(value, folder: str, num_frames: int) -> list[Video]:
    """A row's video: none, an encoded file (bytes or a path) or a list of frame images -> [Video]."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        value = [v.get("bytes") or os.path.join(folder, v["path"]) if isinstance(v, dict) else v for v in value]
    elif isinstance(value, str):
        value = os.path.join(folder, value)
    return [load_video(value, num_frames)]


def _options(row: dict) -> list[str]:
    options = row.get("options")
    if isinstance(options, str):
        options = json.loads(options)
    if options is None:
        options = [row[letter] for letter in LETTERS if row.get(letter) not in (None, "")]
    return [str(o) for o in options]


def _first_exchange(conversations) -> tuple[str, str]:
    messages = json.loads(conversations) if isinstance(conversations, str) else conversations
    user = next(m["content"] for m in messages if m["role"] == "user")
    assistant = next(m["content"] for m in messages if m["role"] == "assistant")
    return user, assistant


def _answer_letter(answer: str, options: list[str], normalised: tuple[str, ...]) -> str:
    """A multiple-choice answer given as a letter or as the text of an option -> its letter."""
    letter = answer.strip().upper()
    if len(letter) == 1 and letter in LETTERS[:len(options)]:
        return letter
    if normalize_answer(answer) in normalised:
        return LETTERS[normalised.index(normalize_answer(answer))]
    raise ValueError(f"the answer {answer!r} is neither an option letter nor one of the options {options}")


def items_from_row(row: dict, images: list, videos: Sequence[Video] = (), check_media: bool = True) -> list[Item]:
    """The questions of one row (several for a multi-turn row). `check_media`: the question's `<image>` and
    `<video>` markers must match the row's images and videos (False when they were not loaded)."""
    question_type = next((str(row[c]) for c in TYPE_COLUMNS if row.get(c) is not None), "all")
    question, answer = row.get("question"), row.get("answer")
    if question is None:
        if row.get("conversations") is None:
            raise ValueError("the row has neither `question` nor `conversations`")
        question, answer = _first_exchange(row["conversations"])
    if answer is None:
        raise ValueError("the row has no `answer`")
    first = question[0] if isinstance(question, (list, tuple)) and question else question
    markers = str(first).count(IMAGE_MARKER)
    if check_media and markers and markers != len(images):
        raise ValueError(f"the question has {markers} {IMAGE_MARKER} marker(s) but the row has {len(images)} image(s)")
    if check_media and str(first).count(VIDEO_MARKER) != len(videos):
        raise ValueError(f"the question has {str(first).count(VIDEO_MARKER)} {VIDEO_MARKER} marker(s) but the row has "
                         f"{len(videos)} video(s)")
    videos = list(videos)
    if isinstance(question, (list, tuple)):  # one entry per turn
        types = row.get("question_type")
        types = types if isinstance(types, (list, tuple)) else [question_type] * len(question)
        return [Item(q, (normalize_answer(a),), t, images, videos=videos) for q, a, t in zip(question, answer, types)]
    accepted = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    options = _options(row)
    if not options:
        return [Item(question, tuple(normalize_answer(a) for a in accepted), question_type, images, videos=videos)]
    normalised = tuple(normalize_answer(o) for o in options)
    letters = tuple(_answer_letter(a, options, normalised) for a in accepted)
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    hint = f"{row['hint']}\n" if row.get("hint") else ""
    prompt = f"{hint}{question}\n{listed}\n{MC_INSTRUCTION}"
    return [Item(prompt, letters, question_type, images, normalised, videos)]


class Skipped:
    """Counts rows that could not be read, by reason."""

    def __init__(self):
        self.reasons: Counter = Counter()

    @property
    def count(self) -> int:
        return self.reasons.total()

    def add(self, reason: str) -> None:
        self.reasons[reason] += 1


def iter_items(path: str, with_images: bool = True, max_samples: int | None = None,
               skipped: Skipped | None = None, video_frames: int = 8) -> Iterator[Item]:
    """Items of a parquet file, streamed a row group at a time, `video_frames` frames of each video (`with_images`
    False: neither images nor videos, for answers alone). Unreadable rows are skipped and counted."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no parquet file at {path!r}")
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if "question" not in names and "conversations" not in names:
        raise ValueError(f"{path}: needs `question` and `answer` columns (or `conversations`); found {names}")
    image_column = next((c for c in IMAGE_COLUMNS if c in names), None)
    video_column = next((c for c in VIDEO_COLUMNS if c in names), None)
    columns = [c for c in names if with_images or c not in (image_column, video_column)]
    folder = os.path.dirname(os.path.abspath(path))
    count = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=256):
        for row in batch.to_pylist():
            try:
                images = _images(row.get(image_column), folder) if with_images and image_column else []
                videos = _videos(row.get(video_column), folder, video_frames) if with_images and video_column else []
                items = items_from_row(row, images, videos, check_media=with_images)
            except (OSError, ValueError, KeyError, StopIteration, json.JSONDecodeError) as err:
                if skipped is None:
                    raise
                skipped.add(f"{type(err).__name__}: {err}"[:120])
                continue
            for item in items:
                yield item
                count += 1
                if max_samples is not None and count >= max_samples:
                    return


# ---------------------------------------------------------------------------------------------- scoring


def majority_answers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """question type -> its most frequent normalised answer (ties: the alphabetically first)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for question_type, answer in pairs:
        counts[question_type][answer] += 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}


@dataclass
class Scored:
    """The outcome of one item; no image kept."""

    question_type: str
    answers: tuple[str, ...]
    correct: bool
    blind_correct: bool | None = None


def summarize(scored: Sequence[Scored], majority: dict[str, str]) -> dict:
    """The `eval.json` numbers: overall and per type accuracy, blind accuracy (None when not run) and the
    accuracy of always answering `majority[type]`."""
    def rate(flags: list) -> float | None:
        return round(sum(flags) / len(flags), 4) if flags and None not in flags else None

    by_type: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        by_type[s.question_type].append(s)
    hits = {id(s): majority.get(s.question_type) in s.answers for s in scored}
    per_type = {
        t: {"n": len(rows), "accuracy": rate([s.correct for s in rows]),
            "blind_accuracy": rate([s.blind_correct for s in rows]),
            "majority_baseline": rate([hits[id(s)] for s in rows]), "majority_answer": majority.get(t)}
        for t, rows in sorted(by_type.items())
    }
    return {
        "accuracy": rate([s.correct for s in scored]),
        "blind_accuracy": rate([s.blind_correct for s in scored]),
        "majority_baseline": rate([hits[id(s)] for s in scored]),
        "n": len(scored),
        "per_type": per_type,
    }


Answerer = Callable[[Sequence[Item], bool], list[str]]


def score_items(items: Iterable[Item], answer: Answerer, batch_size: int = 64, blind: bool = False,
                on_prediction: Callable[[Item, str, str | None, Scored], None] | None = None) -> list[Scored]:
    """Ask every item in batches: `answer(items, blind)` returns one text per item (blind: with every image
    replaced by the grey image). `on_prediction(item, prediction, blind prediction, scored)` sees each one."""
    scored: list[Scored] = []
    batch: list[Item] = []

    def flush() -> None:
        predictions = [first_line(p) for p in answer(batch, False)]
        blind_predictions = [first_line(p) for p in answer(batch, True)] if blind else [None] * len(batch)
        for item, prediction, blind_prediction in zip(batch, predictions, blind_predictions):
            blind_correct = None if blind_prediction is None else is_correct(blind_prediction, item)
            scored.append(Scored(item.question_type, item.answers, is_correct(prediction, item), blind_correct))
            if on_prediction is not None:
                on_prediction(item, prediction, blind_prediction, scored[-1])
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return scored


def engine_answerer(engine, max_new_tokens: int = 16, open_thinking: bool = False) -> Answerer:
    """Greedy answers from a `generate.Engine` (the text after any think block); blind requests get one grey image
    per image and per video frame."""
    from .generate import ChatRequest, GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    size = engine.model.image_processor.size if hasattr(engine.model, "image_processor") else 1
    grey = Image.new("RGB", (size, size), BLIND_GREY)

    def answer(items: Sequence[Item], blind: bool) -> list[str]:
        requests = [ChatRequest(messages=[{"role": "user", "content": item.question}],
                                images=[grey] * len(item.images) if blind else list(item.images),
                                open_thinking=open_thinking,
                                videos=[Video([grey] * len(v.frames), v.timestamps) for v in item.videos] if blind
                                else list(item.videos))
                    for item in items]
        return [completion.text for completion in engine.generate(requests, config)]

    return answer


def evaluate(answer: Answerer, data_path: str, train_path: str | None = None, blind: bool = False,
             batch_size: int = 64, max_samples: int | None = None, predictions_path: str | None = None,
             progress: Callable[[Iterator], Iterator] | None = None, video_frames: int = 8) -> dict:
    """Score a parquet file (`video_frames` frames of each video); the majority answers come from `train_path`
    when given (types it lacks fall back to the test answers), else from the test answers."""
    start = time.perf_counter()
    skipped = Skipped()
    items: Iterator = iter_items(data_path, max_samples=max_samples, skipped=skipped, video_frames=video_frames)
    if progress is not None:
        items = progress(items)
    with open(predictions_path, "w", encoding="utf-8") if predictions_path else contextlib.nullcontext() as log:
        def record(item: Item, prediction: str, blind_prediction: str | None, outcome: Scored) -> None:
            if log is not None:
                log.write(json.dumps({
                    "question_type": item.question_type, "question": item.question, "answers": list(item.answers),
                    "prediction": prediction, "correct": outcome.correct, "blind_prediction": blind_prediction,
                    "blind_correct": outcome.blind_correct,
                }, ensure_ascii=False) + "\n")

        scored = score_items(items, answer, batch_size, blind, record)
    if not scored:
        raise ValueError(f"{data_path}: no question could be read ({skipped.count} rows skipped)")
    majority = majority_answers((s.question_type, s.answers[0]) for s in scored)
    if train_path:
        train_pairs = ((i.question_type, i.answers[0]) for i in iter_items(train_path, with_images=False))
        majority = {**majority, **majority_answers(train_pairs)}
    result = summarize(scored, majority)
    result.update({
        "majority_source": "train" if train_path else "test", "skipped_rows": skipped.count,
        "skipped_reasons": dict(skipped.reasons.most_common(5)), "data_path": data_path, "train_path": train_path,
        "seconds": round(time.perf_counter() - start, 1), "video_frames": video_frames,
    })
    return result


# ---------------------------------------------------------------------------------------------- preferences


def preference_scores(model, tokenizer, path: str, batch_size: int = 16, max_samples: int | None = None) -> dict:
    """How strongly the model prefers each pair's chosen answer: the summed log-probability of the chosen
    conversation's answer tokens minus the rejected one's, averaged over pairs (`margin`), and the fraction of
    pairs where it is positive (`accuracy`). Rows the trainer would skip are skipped and counted by reason."""
    import itertools
    import random

    import pyarrow.parquet as pq

    from .data import pack
    from .objectives.base import frozen_logps, sum_per_document, supervised
    from .samples import BadSample, SampleBuilder

    vision = getattr(model, "vision_encoder", None) is not None
    block = model.config.image_token_len if vision else 0
    builder = SampleBuilder("pairs", tokenizer, max_seq_len=model.config.max_position_embeddings,
                            image_token_len=block, image_processor=model.image_processor if vision else None,
                            add_system_ratio=0.0, empty_think_ratio=1.0)
    device = next(model.parameters()).device
    margins, skipped = [], Counter()

    def score(documents: list) -> None:
        batch = pack(documents, builder.max_seq_len, packing=False, image_token_len=block,
                     rows_used=len(documents) // 2).to(device)
        _, _, owner = supervised(batch)
        logps = sum_per_document(frozen_logps(model, model, batch, packing=False, vision=vision), owner,
                                 len(documents))
        margins.extend((logps[0::2] - logps[1::2]).tolist())

    parquet = pq.ParquetFile(path)
    columns = [c for c in ("chosen", "rejected", "image_bytes") if c in parquet.schema_arrow.names]
    records = (record for rows in parquet.iter_batches(columns=columns, batch_size=256) for record in rows.to_pylist())
    rng, documents = random.Random(0), []  # with the ratios 0 and 1 above, its draws decide nothing
    for record in itertools.islice(records, max_samples):
        try:
            documents += builder.build_pair(record, rng)
        except BadSample as err:
            skipped[err.reason] += 1
        if len(documents) >= 2 * batch_size:
            score(documents)
            documents = []
    if documents:
        score(documents)
    if not margins:
        raise ValueError(f"{path}: no preference pair could be read ({dict(skipped)})")
    return {"n": len(margins), "margin": round(sum(margins) / len(margins), 4),
            "accuracy": round(sum(m > 0 for m in margins) / len(margins), 4), "skipped": dict(skipped)}


def scored_as(path: str) -> tuple[bool, bool]:
    """Whether a parquet file holds (preference pairs, questions)."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    return {"chosen", "rejected"} <= set(names), "question" in names or "conversations" in names


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .options import add_dtype_argument, add_model_arguments, add_vision_input_arguments

    parser.add_argument("--data_path", required=True,
                        help="test parquet (`minimind-v data synth` vlm_test.parquet or a generic VQA parquet)")
    parser.add_argument("--train_path", default=None,
                        help="training parquet whose answers give the majority baseline (default: test answers)")
    parser.add_argument("--blind", action="store_true",
                        help="also answer with every image replaced by one grey image")
    parser.add_argument("--out", default="eval.json", help="where to write the scores")
    parser.add_argument("--predictions", default=None, help="optional jsonl of every question and prediction")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=16,
                        help="tokens to generate per answer, think block included")
    parser.add_argument("--open_thinking", type=int, choices=[0, 1], default=0,
                        help="1: open a think block in the prompt (for models trained to reason before answering)")
    parser.add_argument("--max_samples", type=int, default=None, help="score only the first N questions")
    add_model_arguments(parser)
    add_dtype_argument(parser)
    add_vision_input_arguments(parser)


def main(args) -> None:
    from tqdm import tqdm

    from .chat import load_for_inference
    from .generate import Engine

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("eval: --batch_size and --max_new_tokens must be at least 1")
    if not os.path.isfile(args.data_path):
        raise SystemExit(f"eval: no such file: {args.data_path}")
    if args.train_path and not os.path.isfile(args.train_path):
        raise SystemExit(f"eval: no such file: {args.train_path}")
    model, tokenizer = load_for_inference(args)
    pairs, questions = scored_as(args.data_path)
    result = {}
    if questions:
        answer = engine_answerer(Engine(model, tokenizer), args.max_new_tokens, bool(args.open_thinking))
        result = evaluate(answer, args.data_path, args.train_path, args.blind, args.batch_size, args.max_samples,
                          args.predictions, progress=lambda items: tqdm(items, desc="eval", unit="q", disable=None),
                          video_frames=args.video_frames)
        result.update(max_new_tokens=args.max_new_tokens, open_thinking=bool(args.open_thinking))
        if result["skipped_rows"]:
            print(f"warning: skipped {result['skipped_rows']} unreadable rows: {result['skipped_reasons']}")
    if pairs:
        result["preference"] = preference_scores(model, tokenizer, args.data_path, args.batch_size, args.max_samples)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=2)
    if questions:
        print(format_table(result))
    if pairs:
        preference = result["preference"]
        print(f"preference pairs {preference['n']}: mean log-prob margin chosen - rejected {preference['margin']:.3f}, "
              f"chosen preferred {100 * preference['accuracy']:.1f}%")
    print(f"wrote {args.out}")


def format_table(result: dict) -> str:
    """A plain-text table of the per-type and overall scores."""
    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:5.1f}%"

    lines = [f"{'type':<12} {'n':>6} {'accuracy':>9} {'blind':>7} {'majority':>9}"]
    for name, row in result["per_type"].items():
        lines.append(f"{name:<12} {row['n']:>6} {pct(row['accuracy']):>9} {pct(row['blind_accuracy']):>7} "
                     f"{pct(row['majority_baseline']):>9}")
    lines.append(f"{'overall':<12} {result['n']:>6} {pct(result['accuracy']):>9} {pct(result['blind_accuracy']):>7} "
                 f"{pct(result['majority_baseline']):>9}")
    return "\n".join(lines)
