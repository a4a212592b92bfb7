"""`minimind-v data synth`: a seeded generator of shape-scene images with captions and questions.

A scene is a 2x2 grid of cells; 1-4 cells hold one shape each, with distinct kinds and distinct colours, a
random size and a random offset inside its cell. Images get a light background (optionally textured) and
Gaussian noise. Every question is answered from the scene with one short canonical answer, and answers are
balanced per question type so that a model that ignores the image cannot beat the majority answer by much.

Held-out guarantee: a scene's *layout* is the set of (cell, kind, colour) of its shapes. A fixed hash of the
layout puts it in the test split or the training split, whatever the seed, so no test image shares its layout
(and hence its content) with any training image of any run.

Every row is drawn from its own random stream, seeded by (seed, file, row index): the first N rows of a file
do not depend on how many rows are written, and the output is byte-identical for the same arguments.

Besides training and test files it writes preference pairs (DPO) and prompts with verifiable answers (GRPO) on
request, and with `think` a reasoning block stating the caption before every SFT answer.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star", "cross")
COLOURS = {  # name -> RGB; every pair differs by 70+ in some channel, more than jitter, noise and JPEG move it
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell index = 2 * row + column
QUESTION_TYPES = ("colour", "shape", "count", "position", "presence", "relation")
MAX_SHAPES = len(POSITIONS)
HELD_OUT_FRACTION = 0.1  # share of all layouts reserved for the test split; fixed so every run agrees
SPLIT_SALT = b"minimind-v synth split v1"
SUPERSAMPLE = 2  # shapes are drawn at 2x and downscaled: anti-aliased edges
# Parquet rows written at a time. A row group is also the unit of the training order, so small groups let a short
# run over several files see all of them (a 300-step run over the demo's six files reads ~19, not ~5).
ROW_GROUP_SIZE = 512

ZH = {
    "circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形",
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
    "top left": "左上", "top right": "右上", "bottom left": "左下", "bottom right": "右下",
    "left": "左边", "right": "右边", "above": "上面", "below": "下面",
}
EN_NUMBERS = ("one", "two", "three", "four")
ZH_NUMBERS = ("一个", "两个", "三个", "四个")
YES_NO = {"en": ("yes", "no"), "zh": ("有", "没有")}
RELATIONS = (  # per axis (0: columns, 1: rows): the answer when B's index - A's is > 0 / < 0, the en and zh options
    ("left", "right", "to the left or to the right of", "左边还是右边"),
    ("above", "below", "above or below", "上面还是下面"),
)
CAPTION_PROMPTS = {
    "en": ("Describe the image.", "What is in the picture?", "Describe the shapes in this image."),
    "zh": ("描述这张图片。", "图片里有什么？", "请描述图中的形状。"),
}
# New files go at the end: a row's random stream is seeded by its file's index here.
FILES = ("llm_pretrain", "llm_sft", "vlm_pretrain", "vlm_sft", "vlm_test", "llm_dpo", "vlm_dpo", "vlm_dpo_test",
         "vlm_rl", "llm_rl")
DEFAULT_FILES = FILES[:5]  # the preference and RL prompt files are written on request (--files)
FILE_NAMES = {file: file + (".jsonl" if file.startswith("llm_") else ".parquet") for file in FILES}
HELD_OUT_FILES = ("vlm_test", "vlm_dpo_test")
PREFERENCE_PARQUETS = ("vlm_dpo", "vlm_dpo_test")
INFO_FILE = "synth_info.json"
# `--task`: shapes (the scenes above) or a task that needs one of the model's input features: small shapes in
# large images (tiles), two images per question (several images), a moving scene (video). Those write TASK_FILES.
TASKS = ("shapes", "details", "multi", "video")
TASK_FILES = ("vlm_pretrain", "vlm_sft", "vlm_test")
TASK_QUESTION_TYPES = {
    "shapes": QUESTION_TYPES,
    "details": ("shape", "count", "presence", "colour"),
    "multi": ("more", "colour", "both"),
    "video": ("motion", "turn", "appear"),
}
DETAIL_SCALE = (4, 3)  # default details canvas in multiples of image_size: 256x192 for the demo's 64
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CELL_STEPS = {direction: ux + 2 * uy for direction, (ux, uy) in MOTIONS.items()}  # a move's change of cell index
MOTION_ZH = {"left": "向左", "right": "向右", "up": "向上", "down": "向下"}
ORDINALS = {"en": ("first", "second"), "zh": ("第一张", "第二张")}
COUNT_WORDS = {"en": ("zero",) + EN_NUMBERS, "zh": ("零个",) + ZH_NUMBERS}


@dataclass(frozen=True)
class Shape:
    """One shape; x, y (centre) and radius are in output pixels."""

    kind: str
    colour: str
    cell: int
    x: float
    y: float
    radius: float

    @property
    def column(self) -> int:
        return self.cell % 2

    @property
    def row(self) -> int:
        return self.cell // 2


@dataclass
class SynthConfig:
    """What scenes hold and how images and texts look. `lang` is en, zh or both (a random language per row).
    Fewer kinds, colours or shapes make an easier task; each list needs more entries than `max_shapes` so that
    a presence question can always be answered "no". `think` gives every SFT answer a reasoning block that first
    states what is in the image (its caption), for a model that reasons before it answers."""

    image_size: int = 64
    lang: str = "both"
    turns: int = 3
    noise: float = 8.0
    texture: float = 0.5
    image_format: str = "jpeg"
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    colours: tuple[str, ...] = tuple(COLOURS)
    max_shapes: int = MAX_SHAPES
    asked_types: tuple[str, ...] = ()  # the question types the files ask; empty: all of the task's
    think: bool = False
    task: str = "shapes"  # one of TASKS
    width: int = 0  # details: the canvas; 0 = DETAIL_SCALE times image_size
    height: int = 0
    # details: a shape's radius in image_size units before its kind's EQUAL_AREA factor. At 0.045 read as one
    # image_size square (x/4, y/3) a shape spans ~2 pixels and its kind is near chance; in 2x2 tiles (x/2, y/2) it
    # is read (tests). 0.2 makes shapes ~13 pixels wide in 2x2 tiles and ~6 in one square.
    detail_radius: float = 0.045
    images_shown: str = "all"  # multi: all (both images) or first (the first image and its marker only)
    frames: int = 8  # video: frames per video

    def canvas(self) -> tuple[int, int]:
        """(width, height) of a details image."""
        return (self.width or DETAIL_SCALE[0] * self.image_size, self.height or DETAIL_SCALE[1] * self.image_size)

    def question_types(self, shapes: int | None = None) -> tuple[str, ...]:
        """The asked types that fit scenes of `shapes` shapes (default: of this config's scenes): relations
        need two."""
        many = (self.max_shapes if shapes is None else shapes) > 1
        return tuple(t for t in self.asked_types or TASK_QUESTION_TYPES[self.task] if many or t != "relation")


def read_config(folder: str) -> SynthConfig:
    """The SynthConfig that wrote the files of `folder` (from its synth_info.json)."""
    with open(os.path.join(folder, INFO_FILE), encoding="utf-8") as f:
        fields = json.load(f)["config"]
    return SynthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def layout_key(layout: Iterable[tuple[int, str, str]]) -> str:
    """The content of a scene, its (cell, kind, colour) triples, independent of sizes, offsets, background and
    noise."""
    return "|".join(sorted(f"{cell}:{kind}:{colour}" for cell, kind, colour in layout))


def is_held_out(key: str) -> bool:
    """Whether a layout belongs to the test split (a fixed hash, the same for every seed)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") < HELD_OUT_FRACTION * 2**64


def sample_shapes(rng: np.random.Generator, count: int, held_out: bool, config: SynthConfig) -> tuple[Shape, ...]:
    """`count` shapes with distinct cells, kinds and colours, from the requested split (only the layout is
    redrawn until it falls in the split, so both splits have the same distribution of counts)."""
    while True:
        cells = rng.permutation(MAX_SHAPES)[:count]
        kinds = rng.permutation(len(config.kinds))[:count]
        colours = rng.permutation(len(config.colours))[:count]
        layout = [(int(c), config.kinds[k], config.colours[o]) for c, k, o in zip(cells, kinds, colours)]
        if is_held_out(layout_key(layout)) == held_out:
            break
    half_cell = config.image_size / 4
    return tuple(Shape(kind, colour, cell, *_place_in_cell(rng, cell, half_cell))
                 for cell, kind, colour in sorted(layout))


def _place_in_cell(rng: np.random.Generator, cell: int, half_cell: float) -> tuple[float, float, float]:
    """(x, y, radius) of a shape at a random size and offset that never leaves its cell."""
    radius = half_cell * rng.uniform(0.7, 0.9)
    room = half_cell - radius - 1
    x = (2 * (cell % 2) + 1) * half_cell + rng.uniform(-room, room)
    y = (2 * (cell // 2) + 1) * half_cell + rng.uniform(-room, room)
    return float(x), float(y), float(radius)


def _outline(shape: Shape, scale: float) -> list[tuple[float, float]]:
    """Polygon of a non-circle shape in supersampled pixels."""
    x, y, r = shape.x * scale, shape.y * scale, shape.radius * scale
    if shape.kind == "square":
        s = 0.85 * r
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape.kind == "triangle":
        return [(x, y - r), (x + 0.95 * r, y + 0.8 * r), (x - 0.95 * r, y + 0.8 * r)]
    if shape.kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(x + q * np.cos(a), y + q * np.sin(a)) for q, a in zip(radii, angles)]
    w = 0.33 * r  # cross: arms of half-width w reaching r
    return [(x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w), (x + r, y + w), (x + w, y + w),
            (x + w, y + r), (x - w, y + r), (x - w, y + w), (x - r, y + w), (x - r, y - w), (x - w, y - w)]


def _background(rng: np.random.Generator, width: int, height: int, texture: float) -> np.ndarray:
    """A light background [height, width, 3] float32: tinted grey, sometimes stripes, a checker or a gradient."""
    base = rng.uniform(200, 240) + rng.uniform(-8, 8, size=3)
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if rng.random() >= texture:
        return image
    pattern = int(rng.integers(3))
    ys, xs = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    amplitude = rng.uniform(6, 16)
    if pattern == 0:
        period, phase = rng.uniform(4, 10), rng.uniform(0, 2 * np.pi)
        if rng.random() < 0.5:
            wave = np.sin(2 * np.pi * ys / period + phase)[:, None]
        else:
            wave = np.sin(2 * np.pi * xs / period + phase)[None, :]
    elif pattern == 1:
        cell = int(rng.integers(4, 12))
        wave = ((ys[:, None] // cell + xs[None, :] // cell) % 2) * 2 - 1
    else:
        wave = (ys[:, None] + xs[None, :]) / ((width + height) / 2) - 1
    return image + amplitude * np.broadcast_to(wave, (height, width))[..., None]


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed field of unit Gaussian noise [2 * size, 2 * size, 3]; each image takes a random crop of it,
    which is ~50x cheaper than drawing fresh noise per image."""
    return np.random.default_rng(0).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


def _jitter(rng: np.random.Generator, colour: str) -> tuple[int, ...]:
    """A colour's RGB moved by up to 15 per channel."""
    return tuple(np.clip(np.add(COLOURS[colour], rng.integers(-15, 16, size=3)), 0, 255).tolist())


def render(shapes: Iterable[Shape], rng: np.random.Generator, config: SynthConfig,
           size: tuple[int, int] | None = None) -> Image.Image:
    """Draw a scene on a width x height canvas (default: image_size square): background, anti-aliased shapes
    with jittered colours, then Gaussian noise."""
    width, height = size or (config.image_size, config.image_size)
    shapes = tuple(shapes)
    colours = [_jitter(rng, shape.colour) for shape in shapes]
    background = _background(rng, width, height, config.texture)
    sigma = rng.uniform(0, config.noise)
    offset = rng.integers(max(width, height) + 1, size=2) if sigma > 0 else (0, 0)
    return _compose(shapes, colours, background, sigma, offset)


def _compose(shapes: tuple[Shape, ...], colours: list[tuple[int, ...]], background: np.ndarray, sigma: float,
             offset) -> Image.Image:
    """Shapes in their RGB `colours` over `background` [H, W, 3], plus the noise bank's crop at `offset` (dx, dy)
    times `sigma`."""
    height, width = background.shape[:2]
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE))
    mask = Image.new("L", canvas.size)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    for shape, colour in zip(shapes, colours):
        if shape.kind == "circle":
            x, y, r = shape.x * SUPERSAMPLE, shape.y * SUPERSAMPLE, shape.radius * SUPERSAMPLE
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            draw_mask.ellipse((x - r, y - r, x + r, y + r), fill=255)
        else:
            outline = _outline(shape, SUPERSAMPLE)
            draw.polygon(outline, fill=colour)
            draw_mask.polygon(outline, fill=255)
    # Box-averaging the black canvas gives colour x coverage; the mask gives the coverage itself.
    shapes_rgb = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    coverage = np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32)[..., None] / 255
    pixels = shapes_rgb + (1 - coverage) * background
    if sigma > 0:
        dx, dy = offset
        pixels += sigma * _noise_bank(max(width, height))[dy:dy + height, dx:dx + width]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", optimize=False)
    else:  # 4:4:4 keeps the colour of small shapes sharp
        image.save(buffer, format="JPEG", quality=90, subsampling=0)
    return buffer.getvalue()


def say(word: str, lang: str) -> str:
    return ZH[word] if lang == "zh" else word


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def ask(rng: np.random.Generator, shapes: tuple[Shape, ...], question_type: str, lang: str,
        config: SynthConfig) -> tuple[str, str]:
    """(question, canonical answer) of one type about a scene. A question names a shape by its position or its
    colour, never by its kind: a kind takes several patches to recognise, so binding a kind to an attribute is
    far slower to learn from zero than the other pairings, and the demo's budget is minutes."""
    shape = _pick(rng, shapes)
    kind, colour, position = (say(w, lang) for w in (shape.kind, shape.colour, POSITIONS[shape.cell]))
    zh = lang == "zh"
    if question_type == "colour":
        return (f"{position}的形状是什么颜色？" if zh else f"What colour is the shape at the {position}?"), colour
    if question_type == "shape":
        if rng.random() < 0.5:
            return (f"{position}是什么形状？" if zh else f"What shape is at the {position}?"), kind
        return (f"{colour}的是什么形状？" if zh else f"Which shape is {colour}?"), kind
    if question_type == "count":
        answer = (ZH_NUMBERS if zh else EN_NUMBERS)[len(shapes) - 1]
        return ("图中有几个形状？" if zh else "How many shapes are there?"), answer
    if question_type == "position":
        return (f"{colour}的形状在哪里？" if zh else f"Where is the {colour} shape?"), position
    if question_type == "presence":
        return _ask_presence(rng, shapes, lang, config)
    if question_type == "relation":
        return _ask_relation(rng, shapes, lang)
    raise ValueError(f"unknown question type {question_type!r}; choose from {QUESTION_TYPES}")


def _ask_presence(rng: np.random.Generator, shapes: tuple[Shape, ...], lang: str, config: SynthConfig,
                  by_kind: bool | None = None) -> tuple[str, str]:
    """Asks "Is there a circle / a red shape?" (by kind or colour at random unless `by_kind` says). The answer is
    drawn first (50/50), then a word with that answer, so the question text carries no hint of the answer."""
    yes = bool(rng.random() < 0.5)
    by_kind = rng.random() < 0.5 if by_kind is None else by_kind
    present = {s.kind if by_kind else s.colour for s in shapes}
    word = say(_pick(rng, [w for w in (config.kinds if by_kind else config.colours) if (w in present) == yes]), lang)
    answer = YES_NO[lang][0 if yes else 1]
    if lang == "zh":
        return (f"图中有{word}吗？" if by_kind else f"图中有{word}的形状吗？"), answer
    return (f"Is there {_article(word)} {word}?" if by_kind else f"Is there {_article(word)} {word} shape?"), answer


def _ask_relation(rng: np.random.Generator, shapes: tuple[Shape, ...], lang: str) -> tuple[str, str]:
    """Asks "Is the red shape to the left or to the right of the blue shape?" (or "above or below") about two shapes
    in different columns (rows). A forced choice, as in GQA, rather than yes/no: a yes/no relation is the XOR of
    where A is and which relation word was asked, which a model trained from zero does not learn in minutes."""
    first, second = (shapes[i] for i in rng.permutation(len(shapes))[:2])
    deltas = (second.column - first.column, second.row - first.row)
    axis = _pick(rng, [a for a, delta in enumerate(deltas) if delta])
    before, after, en_options, zh_options = RELATIONS[axis]
    answer = say(before if deltas[axis] > 0 else after, lang)
    a, b = say(first.colour, lang), say(second.colour, lang)
    if lang == "zh":
        return f"{a}的形状在{b}的形状的{zh_options}？", answer
    return f"Is the {a} shape {en_options} the {b} shape?", answer


def caption(shapes: tuple[Shape, ...], lang: str) -> str:
    """The count, then every cell in reading order with its shape or nothing: the same four slots in every
    caption, so each slot always describes the same quarter of the image."""
    by_cell = {s.cell: s for s in shapes}
    if lang == "zh":
        slots = [f"{ZH[p]}：{ZH[by_cell[c].colour]}的{ZH[by_cell[c].kind]}" if c in by_cell else f"{ZH[p]}：无"
                 for c, p in enumerate(POSITIONS)]
        return f"{ZH_NUMBERS[len(shapes) - 1]}形状。" + "。".join(slots) + "。"
    slots = [f"{p.capitalize()}: {_article(by_cell[c].colour)} {by_cell[c].colour} {by_cell[c].kind}" if c in by_cell
             else f"{p.capitalize()}: nothing" for c, p in enumerate(POSITIONS)]
    count = EN_NUMBERS[len(shapes) - 1].capitalize()
    return f"{count} shape{'s' if len(shapes) > 1 else ''}. " + ". ".join(slots) + "."


def wrong_answer(rng: np.random.Generator, shapes: tuple[Shape, ...], question_type: str, answer: str, lang: str,
                 config: SynthConfig) -> str:
    """A plausible wrong answer, in the row's language, to a question about `shapes` whose right answer is `answer`:
    from the same answer set, preferring what the scene shows elsewhere (another shape's colour, kind or place),
    else any other value; the other yes / no and the other side of a relation; a count one off."""
    if question_type == "count":
        numbers = ZH_NUMBERS if lang == "zh" else EN_NUMBERS
        right = numbers.index(answer)
        return numbers[_pick(rng, [n for n in (right - 1, right + 1) if 0 <= n < len(numbers)])]
    if question_type == "presence":
        yes, no = YES_NO[lang]
        return no if answer == yes else yes
    if question_type == "relation":
        sides = {say(a, lang): say(b, lang) for a, b, *_ in RELATIONS}
        return {**sides, **{b: a for a, b in sides.items()}}[answer]
    values = {"colour": (config.colours, [s.colour for s in shapes]), "shape": (config.kinds, [s.kind for s in shapes]),
              "position": (POSITIONS, [POSITIONS[s.cell] for s in shapes])}
    if question_type not in values:
        raise ValueError(f"unknown question type {question_type!r}; choose from {QUESTION_TYPES}")
    every, shown = ([say(v, lang) for v in words] for words in values[question_type])
    in_scene = [v for v in shown if v != answer]
    return _pick(rng, in_scene or [v for v in every if v != answer])


def ask_several(rng: np.random.Generator, shapes: tuple[Shape, ...], lang: str, question_types: Iterable[str],
                config: SynthConfig) -> list[tuple[str, str, str]]:
    """[(question_type, question, answer)] about one scene, one question per type."""
    return [(t, *ask(rng, shapes, t, lang, config)) for t in question_types]


def draw_question_types(rng: np.random.Generator, config: SynthConfig, turns: int,
                        shapes: int | None = None) -> list[str]:
    """`turns` question types in random order from those `config.question_types(shapes)` allows: distinct
    while there are enough, otherwise drawn with repeats (the questions may then repeat too)."""
    allowed = config.question_types(shapes)
    if turns > len(allowed):
        return [allowed[i] for i in rng.integers(len(allowed), size=turns)]
    return [allowed[i] for i in rng.permutation(len(allowed))[:turns]]


def _row_rng(config: SynthConfig, file: str, index: int) -> np.random.Generator:
    """A row's own stream; the shapes task keeps the seeding it had before there were tasks."""
    key = [config.seed, FILES.index(file), index] + ([TASKS.index(config.task)] if config.task != "shapes" else [])
    return np.random.default_rng(key)


def _scene(rng: np.random.Generator, config: SynthConfig, held_out: bool,
           turns: int) -> tuple[str, tuple[Shape, ...], list[str]]:
    """(language, shapes, question types) of a row. The types come first (distinct when there are enough, so the
    questions are too) and the shape count is uniform over what they allow: relations need two shapes."""
    lang = config.lang if config.lang != "both" else ("en", "zh")[int(rng.integers(2))]
    question_types = draw_question_types(rng, config, turns)
    fewest = 2 if "relation" in question_types else 1
    count = int(rng.integers(fewest, config.max_shapes + 1))
    return lang, sample_shapes(rng, count, held_out, config), question_types


def _scene_json(shapes: tuple[Shape, ...]) -> str:
    return json.dumps([{"kind": s.kind, "colour": s.colour, "cell": s.cell, "x": round(s.x, 2), "y": round(s.y, 2),
                        "radius": round(s.radius, 2)} for s in shapes])


def _image_message(text: str) -> dict:
    return {"role": "user", "content": f"<image>\n{text}"}


def draw_row(config: SynthConfig, file: str, index: int) -> tuple[np.random.Generator, str, tuple[Shape, ...], list]:
    """Row `index` of a VLM file before rendering: (its random stream, language, shapes, asked) where asked is
    [(question_type, question, answer)]: a caption for vlm_pretrain, `turns` questions for vlm_sft, one for
    vlm_test, vlm_rl and the preference files (vlm_test and vlm_dpo_test draw held-out layouts)."""
    rng = _row_rng(config, file, index)
    turns = {"vlm_pretrain": 0, "vlm_sft": config.turns, "vlm_test": 1, "vlm_dpo": 1, "vlm_dpo_test": 1,
             "vlm_rl": 1}[file]
    lang, shapes, question_types = _scene(rng, config, file in HELD_OUT_FILES, turns)
    if file == "vlm_pretrain":
        asked = [("caption", _pick(rng, CAPTION_PROMPTS[lang]), caption(shapes, lang))]
    else:
        asked = ask_several(rng, shapes, lang, question_types, config)
    return rng, lang, shapes, asked


def _answer_message(answer: str, reasoning: str | None) -> dict:
    """An assistant message; with `reasoning`, the chat template renders `<think>\nreasoning\n</think>\n\n`
    before the answer."""
    message = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def _sft_reasoning(config: SynthConfig, file: str, shapes: tuple[Shape, ...], lang: str) -> str | None:
    """What a vlm_sft / llm_sft answer reasons with `think`: the scene's caption, so the model first says what is
    in the image and then reads the answer off it. None (no reasoning_content) otherwise."""
    return caption(shapes, lang) if config.think and file in ("vlm_sft", "llm_sft") else None


def vlm_row(config: SynthConfig, file: str, index: int) -> dict:
    """One parquet row: the reference columns plus question / answer / question_type (lists, one entry per
    turn, in vlm_sft), lang and the scene as JSON."""
    rng, lang, shapes, asked = draw_row(config, file, index)
    reasoning = _sft_reasoning(config, file, shapes, lang)
    messages = []
    for turn, (_, question, answer) in enumerate(asked):
        messages.append(_image_message(question) if turn == 0 else {"role": "user", "content": question})
        messages.append(_answer_message(answer, reasoning))
    image = encode_image(render(shapes, rng, config), config.image_format)
    types, questions, answers = (list(column) for column in zip(*asked))
    per_turn = file == "vlm_sft"
    return {
        "conversations": json.dumps(messages, ensure_ascii=False),
        "image_bytes": image,
        "question": questions if per_turn else questions[0],
        "answer": answers if per_turn else answers[0],
        "question_type": types if per_turn else types[0],
        "lang": lang,
        "scene": _scene_json(shapes),
    }


def preference_row(config: SynthConfig, file: str, index: int) -> dict:
    """One preference row about a scene: `chosen` and `rejected` conversations (JSON, reference DPO format) that
    ask the same question and answer it rightly and with a plausible wrong answer (`wrong_answer`); the image and
    the vlm_test columns too, so `minimind-v eval` scores the file both ways."""
    rng, lang, shapes, asked = draw_row(config, file, index)
    (question_type, question, answer), = asked
    wrong = wrong_answer(rng, shapes, question_type, answer, lang, config)
    image = encode_image(render(shapes, rng, config), config.image_format)
    prompt = [_image_message(question)]
    return {
        "chosen": json.dumps(prompt + [{"role": "assistant", "content": answer}], ensure_ascii=False),
        "rejected": json.dumps(prompt + [{"role": "assistant", "content": wrong}], ensure_ascii=False),
        "image_bytes": image, "question": question, "answer": answer, "rejected_answer": wrong,
        "question_type": question_type, "lang": lang, "scene": _scene_json(shapes),
    }


def text_record(config: SynthConfig, file: str, index: int) -> dict:
    """A text-only record about a described scene: `text` for llm_pretrain, `conversations` for llm_sft, `chosen`
    and `rejected` (one question, rightly and wrongly answered) for llm_dpo, and for llm_rl a prompt ending in an
    empty assistant message with its `answer` and `question_type` (reference `rlaif.jsonl`, verifiable answers)."""
    rng = _row_rng(config, file, index)
    lang, shapes, question_types = _scene(rng, config, False, 1 if file in ("llm_dpo", "llm_rl") else config.turns)
    description = caption(shapes, lang)
    asked = ask_several(rng, shapes, lang, question_types, config)
    if file == "llm_pretrain":
        return {"text": "\n".join([description] + [f"{q} {a}" for _, q, a in asked])}
    if file == "llm_rl":
        (question_type, question, answer), = asked
        return {"conversations": [{"role": "user", "content": f"{description}\n{question}"},
                                  {"role": "assistant", "content": ""}],
                "answer": answer, "question_type": question_type}
    if file == "llm_dpo":
        (question_type, question, answer), = asked
        wrong = wrong_answer(rng, shapes, question_type, answer, lang, config)
        prompt = [{"role": "user", "content": f"{description}\n{question}"}]
        return {"chosen": prompt + [{"role": "assistant", "content": answer}],
                "rejected": prompt + [{"role": "assistant", "content": wrong}]}
    reasoning = _sft_reasoning(config, file, shapes, lang)
    messages = []
    for turn, (_, question, answer) in enumerate(asked):
        content = f"{description}\n{question}" if turn == 0 else question
        messages += [{"role": "user", "content": content}, _answer_message(answer, reasoning)]
    return {"conversations": messages}


# ---------------------------------------------------------------------------------------------- tasks


def _area(kind: str) -> float:
    """Area of a shape of radius 1."""
    if kind == "circle":
        return float(np.pi)
    x, y = np.array(_outline(Shape(kind, "", 0, 0.0, 0.0, 1.0), 1)).T
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


EQUAL_AREA = {kind: float(np.sqrt(np.pi / _area(kind))) for kind in KINDS}  # radius factors: every kind covers a
# circle's area, so the size of a blurred blob does not tell its kind


def _plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("ss") else "s")


def _held_out_layout(rng: np.random.Generator, held_out: bool, draw: Callable, layout: Callable = lambda x: x):
    """`draw(rng)`, redrawn until its layout (`layout` of it: (cell or role, kind, colour) triples) falls in the
    split."""
    while True:
        drawn = draw(rng)
        if is_held_out(layout_key(layout(drawn))) == held_out:
            return drawn


def detail_shapes(rng: np.random.Generator, held_out: bool, config: SynthConfig) -> tuple[Shape, ...]:
    """1..max_shapes small shapes, one per quadrant of the details canvas, anywhere in it. `repeated` of them
    (uniform from 1) share a kind, the others have distinct other kinds, so "how many triangles" has answers from
    zero to max_shapes; colours are distinct. Every kind covers the same area (EQUAL_AREA)."""
    def draw(rng: np.random.Generator) -> list:
        repeated = int(rng.integers(1, config.max_shapes + 1))
        count = int(rng.integers(repeated, config.max_shapes + 1))
        kinds = rng.permutation(len(config.kinds))
        chosen = [kinds[0]] * repeated + list(kinds[1:1 + count - repeated])
        cells, colours = rng.permutation(MAX_SHAPES)[:count], rng.permutation(len(config.colours))[:count]
        return [(int(c), config.kinds[k], config.colours[o]) for c, k, o in zip(cells, chosen, colours)]

    width, height = config.canvas()
    shapes = []
    for cell, kind, colour in sorted(_held_out_layout(rng, held_out, draw)):
        radius = config.detail_radius * config.image_size * rng.uniform(0.85, 1.0) * EQUAL_AREA[kind]
        left, top = (cell % 2) * width / 2, (cell // 2) * height / 2
        x = rng.uniform(left + radius + 1, left + width / 2 - radius - 1)
        y = rng.uniform(top + radius + 1, top + height / 2 - radius - 1)
        shapes.append(Shape(kind, colour, cell, float(x), float(y), float(radius)))
    return tuple(shapes)


def ask_detail(rng: np.random.Generator, shapes: tuple[Shape, ...], question_type: str, lang: str,
               config: SynthConfig) -> tuple[str, str]:
    """Questions whose answer is a kind ("What shape is at the top left?", "How many triangles are there?", "Is
    there a star?"), and colour by position, which the whole image read as one square still shows. A count asks
    about an absent kind one time in max_shapes + 1, else about the most frequent kind: answers are uniform."""
    if question_type == "presence":
        return _ask_presence(rng, shapes, lang, config, by_kind=True)
    if question_type != "count":
        return ask(rng, shapes, question_type, lang, config)
    counts = Counter(s.kind for s in shapes)
    if rng.random() < 1 / (config.max_shapes + 1):
        kind, count = _pick(rng, [k for k in config.kinds if k not in counts]), 0
    else:
        most = max(counts.values())
        kind, count = _pick(rng, sorted(k for k, n in counts.items() if n == most)), most
    if lang == "zh":
        return f"图中有几个{ZH[kind]}？", COUNT_WORDS["zh"][count]
    return f"How many {_plural(kind)} are there?", COUNT_WORDS["en"][count]


@dataclass(frozen=True)
class Pair:
    """The two scenes of a multi row and the kind its "both" question asks about (None when not asked)."""

    scenes: tuple[tuple[Shape, ...], tuple[Shape, ...]]
    kind: str | None


def _shapes_with(rng: np.random.Generator, count: int | None, held_out: bool, config: SynthConfig, kind: str | None,
                 has: bool | None) -> tuple[Shape, ...]:
    """`sample_shapes`, redrawn until `kind` is in the scene (has) or not (not has); None: anything. A count of
    None is redrawn with the scene (uniform from 1 to max_shapes before the condition): a fixed small count may
    have no held-out layout with the kind."""
    while True:
        shapes = sample_shapes(rng, count or int(rng.integers(1, config.max_shapes + 1)), held_out, config)
        if has is None or any(s.kind == kind for s in shapes) == has:
            return shapes


def multi_pair(rng: np.random.Generator, held_out: bool, config: SynthConfig, question_types: list[str]) -> Pair:
    """Two shapes scenes, each of a held-out (test) or training layout. With a "more" question the first has
    2..max_shapes-1 shapes and the second one more or one fewer (50/50): the first image alone leaves the answer
    at chance. With a "both" question: both have the kind (1/2), only the first (3/8), only the second (1/8), so
    the first image alone answers at most 5/8 of them."""
    counts: tuple[int | None, int | None] = (None, None)
    if "more" in question_types:
        first = int(rng.integers(2, config.max_shapes))
        counts = (first, first + (1 if rng.random() < 0.5 else -1))
    kind, has = None, (None, None)
    if "both" in question_types:
        kind, draw = _pick(rng, config.kinds), rng.random()
        has = (True, True) if draw < 0.5 else (True, False) if draw < 0.875 else (False, True)
    return Pair(tuple(_shapes_with(rng, c, held_out, config, kind, h) for c, h in zip(counts, has)), kind)


def ask_multi(rng: np.random.Generator, pair: Pair, question_type: str, lang: str,
              config: SynthConfig) -> tuple[str, str]:
    """"Which image has more shapes?" (first / second), "What colour is the shape at the top left of the second
    image?" (either image, 50/50), "Do both images have a circle?" (yes / no)."""
    zh, ordinals = lang == "zh", ORDINALS[lang]
    if question_type == "more":
        first, second = (len(s) for s in pair.scenes)
        return ("哪张图片里的形状更多？" if zh else "Which image has more shapes?"), ordinals[int(second > first)]
    if question_type == "colour":
        image = int(rng.integers(2))
        shape = _pick(rng, pair.scenes[image])
        position, colour = say(POSITIONS[shape.cell], lang), say(shape.colour, lang)
        if zh:
            return f"{ordinals[image]}图片{position}的形状是什么颜色？", colour
        return f"What colour is the shape at the {position} of the {ordinals[image]} image?", colour
    if question_type == "both":
        both = all(any(s.kind == pair.kind for s in scene) for scene in pair.scenes)
        word = say(pair.kind, lang)
        question = f"两张图片里都有{word}吗？" if zh else f"Do both images have {_article(word)} {word}?"
        return question, YES_NO[lang][0 if both else 1]
    raise ValueError(f"unknown multi question type {question_type!r}; choose from {TASK_QUESTION_TYPES['multi']}")


def multi_markers(lang: str, config: SynthConfig) -> str:
    """The text before a multi row's first question: one marker per shown image, each after its name."""
    shown = 1 if config.images_shown == "first" else 2
    return "".join(f"图片{k + 1}：<image>\n" if lang == "zh" else f"Image {k + 1}: <image>\n" for k in range(shown))


def multi_caption(pair: Pair, lang: str, config: SynthConfig) -> str:
    shown = pair.scenes[:1] if config.images_shown == "first" else pair.scenes
    name = "图片{}：" if lang == "zh" else "Image {}: "
    return "\n".join(name.format(k + 1) + caption(scene, lang) for k, scene in enumerate(shown))


@dataclass(frozen=True)
class Track:
    """One shape of a video, starting in `cell` at (x, y). `role`: move (by (dx, dy), into the next cell, at a
    constant speed over the frames), turn (`new_colour` from frame `frame` on) or appear (visible from frame
    `frame` on)."""

    role: str
    kind: str
    colour: str
    cell: int
    x: float
    y: float
    radius: float
    dx: float = 0.0
    dy: float = 0.0
    frame: int = 0
    new_colour: str = ""

    @property
    def direction(self) -> str:
        return next(d for d, (ux, uy) in MOTIONS.items() if (np.sign(self.dx), np.sign(self.dy)) == (ux, uy))

    def layout(self) -> tuple[str, str, str]:
        """(role with its cell and change, kind, colour): what the held-out split hashes, sizes and times aside."""
        change = self.direction if self.role == "move" else self.new_colour
        return f"{self.role} {self.cell} {change}", self.kind, self.colour

    def at(self, frame: int, frames: int) -> Shape | None:
        """The shape in frame `frame` of `frames`, None while not yet there. A mover covers the first half of its
        way by the (first) middle frame and stays there until the second: the middle frames show it on the line
        between its cells, as far from either as its offset inside them, whichever way it goes."""
        if self.role == "appear" and frame < self.frame:
            return None
        middle = middle_frames(frames)
        first, second = middle[0], middle[-1]
        share = 0.5 * frame / first if frame <= first else 0.5 + 0.5 * (frame - second) / (frames - 1 - second)
        colour = self.new_colour if self.role == "turn" and frame >= self.frame else self.colour
        cell = self.cell + (CELL_STEPS[self.direction] if self.role == "move" and share > 0.5 else 0)
        return Shape(self.kind, colour, cell, self.x + share * self.dx, self.y + share * self.dy, self.radius)


def middle_frames(frames: int) -> tuple[int, ...]:
    """The frame indices a one-frame sample of a `frames`-frame video may pick: the middle one or two."""
    return tuple(sorted({(frames - 1) // 2, frames // 2}))


def _draw_tracks(rng: np.random.Generator, config: SynthConfig) -> tuple[Track, ...]:
    """A mover, a turner and an appearing shape in the 2x2 cells, distinct kinds and colours (the new colour
    too); the turn and the appearance happen after the middle frame."""
    half_cell, frames = config.image_size / 4, config.frames
    kinds = [config.kinds[i] for i in rng.permutation(len(config.kinds))[:3]]
    colours = [config.colours[i] for i in rng.permutation(len(config.colours))[:4]]
    start = int(rng.integers(MAX_SHAPES))
    direction = _pick(rng, [d for d, (ux, uy) in MOTIONS.items()
                            if 0 <= start % 2 + ux <= 1 and 0 <= start // 2 + uy <= 1])
    ux, uy = MOTIONS[direction]
    free = [c for c in range(MAX_SHAPES) if c not in (start, start + CELL_STEPS[direction])]
    others = [int(c) for c in rng.permutation(free)]
    tracks = []
    for role, cell, kind, colour in zip(("move", "turn", "appear"), [start, *others], kinds, colours):
        x, y, radius = _place_in_cell(rng, cell, half_cell)
        later = int(rng.integers(frames // 2 + 1, frames))
        travel = 2 * half_cell if role == "move" else 0.0  # one cell
        tracks.append(Track(role, kind, colour, cell, x, y, radius, travel * ux, travel * uy,
                            0 if role == "move" else later, colours[3] if role == "turn" else ""))
    return tuple(tracks)


def video_tracks(rng: np.random.Generator, held_out: bool, config: SynthConfig) -> tuple[Track, ...]:
    """A video's shapes, as large as the shapes task's, in the cells of a 2x2 grid: one moves into the empty cell
    next to it (left, right, up or down), one turns a new colour and one appears in the last cell, both after the
    middle frame. The layout is their roles, cells, kinds and colours. The middle frame shows the mover halfway, on
    the line between its two cells (its axis, not its direction), the old colour and not the shape that appears."""
    return _held_out_layout(rng, held_out, lambda rng: _draw_tracks(rng, config),
                            lambda tracks: [t.layout() for t in tracks])


def ask_video(rng: np.random.Generator, tracks: tuple[Track, ...], question_type: str, lang: str,
              config: SynthConfig) -> tuple[str, str]:
    """"Which way does the red shape move?" (left / right / up / down), "What colour does the shape at the top
    left turn?", "What shape appears at the bottom right?" (a kind)."""
    track = {t.role: t for t in tracks}[{"motion": "move", "turn": "turn", "appear": "appear"}[question_type]]
    position, zh = say(POSITIONS[track.cell], lang), lang == "zh"
    if question_type == "motion":
        colour, direction = say(track.colour, lang), track.direction
        return (f"{colour}的形状往哪个方向移动？" if zh else f"Which way does the {colour} shape move?",
                MOTION_ZH[direction] if zh else direction)
    if question_type == "turn":
        return (f"{position}的形状变成了什么颜色？" if zh else f"What colour does the shape at the {position} turn?",
                say(track.new_colour, lang))
    return (f"{position}出现了什么形状？" if zh else f"What shape appears at the {position}?"), say(track.kind, lang)


def _video_sentence(track: Track, lang: str) -> str:
    position = say(POSITIONS[track.cell], lang)
    if lang == "zh":
        name = f"{ZH[track.colour]}的{ZH[track.kind]}"
        if track.role == "move":
            return f"{name}从{position}{MOTION_ZH[track.direction]}移动。"
        if track.role == "turn":
            return f"{position}的{name}变成{ZH[track.new_colour]}。"
        return f"{position}出现了{name}。"
    name = f"{track.colour} {track.kind}"
    if track.role == "move":
        return f"The {name} moves {track.direction} from the {position}."
    if track.role == "turn":
        return f"The {name} at the {position} turns {track.new_colour}."
    return f"{_article(name).capitalize()} {name} appears at the {position}."


def video_caption(tracks: tuple[Track, ...], lang: str, config: SynthConfig) -> str:
    """One sentence per shape: "The red circle moves right from the top left. The blue square at the bottom left
    turns green. A yellow star appears at the bottom right." """
    return ("" if lang == "zh" else " ").join(_video_sentence(t, lang) for t in tracks)


def render_video(tracks: tuple[Track, ...], rng: np.random.Generator, config: SynthConfig) -> list[Image.Image]:
    """`config.frames` frames on one background; each shape keeps its jittered colours, the noise moves."""
    size = config.image_size
    colours = {t: (_jitter(rng, t.colour), _jitter(rng, t.new_colour or t.colour)) for t in tracks}
    background = _background(rng, size, size, config.texture)
    sigma = rng.uniform(0, config.noise)
    frames = []
    for frame in range(config.frames):
        shown = [(shape, colours[t][int(shape.colour != t.colour)]) for t in tracks
                 if (shape := t.at(frame, config.frames)) is not None]
        offset = rng.integers(size + 1, size=2)
        frames.append(_compose(tuple(s for s, _ in shown), [c for _, c in shown], background, sigma, offset))
    return frames


def _multi_media(pair: Pair, rng: np.random.Generator, config: SynthConfig) -> dict:
    """Both images are drawn whatever `images_shown`, so a first-only file shows the very first images."""
    images = [encode_image(render(scene, rng, config), config.image_format) for scene in pair.scenes]
    return {"image_bytes": images[:1] if config.images_shown == "first" else images}


def _track_json(tracks: tuple[Track, ...]) -> str:
    return json.dumps([{k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(t).items()} for t in tracks])


def _shapes_json(scenes) -> str:
    return "[" + ", ".join(_scene_json(s) for s in scenes) + "]"


@dataclass(frozen=True)
class Task:
    """How a task draws, asks about, describes and shows a scene. `draw(rng, held_out, config, question_types)`,
    `ask(rng, scene, question_type, lang, config)`, `caption(scene, lang, config)`, `media(scene, rng, config)`
    -> {column: value}, `markers(lang, config)`: the text before the first question; `scene_json(scene)`."""

    draw: Callable
    ask: Callable
    caption: Callable
    media: Callable
    markers: Callable
    scene_json: Callable
    prompts: dict[str, tuple[str, ...]]
    media_type: pa.DataType


TASK_SPECS = {
    "details": Task(
        draw=lambda rng, held_out, config, types: detail_shapes(rng, held_out, config),
        ask=ask_detail,
        caption=lambda shapes, lang, config: caption(shapes, lang),
        media=lambda shapes, rng, config: {
            "image_bytes": encode_image(render(shapes, rng, config, config.canvas()), config.image_format)},
        markers=lambda lang, config: "<image>\n",
        scene_json=_scene_json, prompts=CAPTION_PROMPTS, media_type=pa.binary(),
    ),
    "multi": Task(
        draw=lambda rng, held_out, config, types: multi_pair(rng, held_out, config, types),
        ask=ask_multi, caption=multi_caption,
        media=_multi_media, markers=multi_markers, scene_json=lambda pair: _shapes_json(pair.scenes),
        prompts={"en": ("Describe the images.", "What is in the pictures?"),
                 "zh": ("描述这些图片。", "图片里有什么？")},
        media_type=pa.list_(pa.binary()),
    ),
    "video": Task(
        draw=lambda rng, held_out, config, types: video_tracks(rng, held_out, config),
        ask=ask_video, caption=video_caption,
        media=lambda tracks, rng, config: {
            "video_bytes": [encode_image(frame, config.image_format) for frame in render_video(tracks, rng, config)]},
        markers=lambda lang, config: "<video>\n", scene_json=_track_json,
        prompts={"en": ("Describe the video.", "What happens in the video?"),
                 "zh": ("描述这段视频。", "视频里发生了什么？")},
        media_type=pa.list_(pa.binary()),
    ),
}


def draw_task_row(config: SynthConfig, file: str, index: int) -> tuple[np.random.Generator, str, object, list]:
    """`draw_row` of the details, multi and video tasks: (random stream, language, scene, asked), the scene being
    shapes, a `Pair` or `Track`s."""
    spec = TASK_SPECS[config.task]
    rng = _row_rng(config, file, index)
    lang = config.lang if config.lang != "both" else ("en", "zh")[int(rng.integers(2))]
    turns = {"vlm_pretrain": 0, "vlm_sft": config.turns, "vlm_test": 1}[file]
    question_types = draw_question_types(rng, config, turns)
    scene = spec.draw(rng, file in HELD_OUT_FILES, config, question_types)
    if file == "vlm_pretrain":
        return rng, lang, scene, [("caption", _pick(rng, spec.prompts[lang]), spec.caption(scene, lang, config))]
    return rng, lang, scene, [(t, *spec.ask(rng, scene, t, lang, config)) for t in question_types]


def task_row(config: SynthConfig, file: str, index: int) -> dict:
    """One row of a details, multi or video file (`vlm_row` for shapes): `conversations`, the media column
    (`image_bytes`: one image or a list; `video_bytes`: a list of frames), then question / answer / question_type
    (lists in vlm_sft) where each question is its user message as sent (the first one with the markers), lang
    and the scene as JSON."""
    spec = TASK_SPECS[config.task]
    rng, lang, scene, asked = draw_task_row(config, file, index)
    media = spec.media(scene, rng, config)
    types, questions, answers = (list(column) for column in zip(*asked))
    questions[0] = spec.markers(lang, config) + questions[0]
    messages = [m for q, a in zip(questions, answers) for m in ({"role": "user", "content": q},
                                                                {"role": "assistant", "content": a})]
    per_turn = file == "vlm_sft"
    return {
        "conversations": json.dumps(messages, ensure_ascii=False), **media,
        "question": questions if per_turn else questions[0], "answer": answers if per_turn else answers[0],
        "question_type": types if per_turn else types[0], "lang": lang, "scene": spec.scene_json(scene),
    }


def parquet_schema(file: str, task: str = "shapes") -> pa.Schema:
    """The reference columns (`conversations`, `image_bytes`; `chosen`, `rejected`, `image_bytes` for preference
    files; a task's media column: `image_bytes` one image or a list, `video_bytes` a list of frames) first, then
    evaluation metadata."""
    if file in PREFERENCE_PARQUETS:
        return pa.schema([
            ("chosen", pa.string()), ("rejected", pa.string()), ("image_bytes", pa.binary()), ("question", pa.string()),
            ("answer", pa.string()), ("rejected_answer", pa.string()), ("question_type", pa.string()),
            ("lang", pa.string()), ("scene", pa.string()),
        ])
    text = pa.list_(pa.string()) if file == "vlm_sft" else pa.string()
    media = ("image_bytes", pa.binary())
    if task != "shapes":
        media = ("video_bytes" if task == "video" else "image_bytes", TASK_SPECS[task].media_type)
    return pa.schema([
        ("conversations", pa.string()), media, ("question", text), ("answer", text),
        ("question_type", text), ("lang", pa.string()), ("scene", pa.string()),
    ])


def write_parquet(rows: Iterable[dict], path: str, schema: pa.Schema, row_group_size: int) -> int:
    """Stream rows to a parquet file, one row group at a time (memory holds at most one group), through a
    temporary file renamed at the end. Returns the number of rows."""
    def groups() -> Iterator[list[dict]]:
        group: list[dict] = []
        for row in rows:
            group.append(row)
            if len(group) == row_group_size:
                yield group
                group = []
        if group:
            yield group

    def write(tmp: str) -> int:
        count = 0
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for group in groups():
                writer.write_table(pa.Table.from_pylist(group, schema=schema), row_group_size=row_group_size)
                count += len(group)
        return count

    return _atomically(path, write)


def write_jsonl(records: Iterable[dict], path: str) -> int:
    def write(tmp: str) -> int:
        count = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        return count

    return _atomically(path, write)


def _atomically(path: str, write: Callable[[str], int]) -> int:
    """Run `write(tmp)` and rename tmp over `path`; a failed write leaves no partial file."""
    tmp = path + ".tmp"
    try:
        count = write(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return count


def generate(config: SynthConfig, out_dir: str, rows: dict[str, int], row_group_size: int = ROW_GROUP_SIZE,
             progress: Callable[[Iterator, str, int], Iterator] | None = None) -> dict[str, str]:
    """Write each file of `rows` (file -> row count) under `out_dir`; returns file -> path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for file, count in rows.items():
        path = os.path.join(out_dir, FILE_NAMES[file])
        text = file.startswith("llm_")
        make = text_record if text else preference_row if file in PREFERENCE_PARQUETS else vlm_row
        if config.task != "shapes":
            if file not in TASK_FILES:
                raise ValueError(f"the {config.task} task writes only {TASK_FILES}, not {file}")
            make = task_row
        records: Iterator = (make(config, file, i) for i in range(count))
        if progress is not None:
            records = progress(records, file, count)
        if text:
            write_jsonl(records, path)
        else:
            write_parquet(records, path, parquet_schema(file, config.task), row_group_size)
        paths[file] = path
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out_dir", default="dataset/synth", help="folder for the generated files")
    parser.add_argument("--train_rows", type=int, default=20000, help="rows of vlm_sft.parquet")
    parser.add_argument("--test_rows", type=int, default=1000, help="rows of vlm_test.parquet (held-out layouts)")
    parser.add_argument("--pretrain_rows", type=int, default=None,
                        help="rows of vlm_pretrain.parquet (captions); default: --train_rows")
    parser.add_argument("--text_rows", type=int, default=None,
                        help="lines of llm_pretrain.jsonl and of llm_sft.jsonl; default: --train_rows")
    parser.add_argument("--dpo_rows", type=int, default=None,
                        help="rows of the preference files llm_dpo.jsonl and vlm_dpo.parquet (default: --train_rows); "
                             "vlm_dpo_test.parquet (held-out layouts) has --test_rows")
    parser.add_argument("--rl_rows", type=int, default=None,
                        help="rows of the RL prompt files vlm_rl.parquet and llm_rl.jsonl (one question each, with "
                             "its answer; default: --train_rows)")
    parser.add_argument("--files", nargs="+", choices=FILES, default=None,
                        help="which files to write (default: all but the preference files llm_dpo, vlm_dpo, "
                             "vlm_dpo_test and the RL prompt files vlm_rl, llm_rl; the other tasks write only "
                             "vlm_pretrain, vlm_sft and vlm_test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lang", choices=["en", "zh", "both"], default="both",
                        help="language of questions and answers; both = a random language per row")
    parser.add_argument("--turns", type=int, default=3,
                        help="questions per vlm_sft / llm_sft conversation (vlm_test always has one)")
    parser.add_argument("--think", type=int, choices=[0, 1], default=0,
                        help="1: every vlm_sft / llm_sft answer carries reasoning_content, the image's caption, "
                             "rendered as a think block before the answer")
    parser.add_argument("--image_size", type=int, default=64, help="side of the square images in pixels")
    parser.add_argument("--image_format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--noise", type=float, default=8.0,
                        help="largest std of the Gaussian pixel noise (each image draws one in [0, noise])")
    parser.add_argument("--texture", type=float, default=0.5, help="probability of a textured background")
    parser.add_argument("--row_group_size", type=int, default=ROW_GROUP_SIZE,
                        help="parquet rows written at a time, also the unit of the training order: small groups let "
                             "a short run over several files see all of them")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="shape kinds to draw")
    parser.add_argument("--colours", nargs="+", choices=list(COLOURS), default=list(COLOURS), help="colours to use")
    parser.add_argument("--max_shapes", type=int, default=MAX_SHAPES, choices=range(1, MAX_SHAPES + 1),
                        help="most shapes in one image (the count is uniform from 1 to this)")
    every_type = list(dict.fromkeys(t for types in TASK_QUESTION_TYPES.values() for t in types))
    parser.add_argument("--question_types", nargs="+", choices=every_type, default=None,
                        help="the question types to ask (e.g. only position, to train one skill on its own; "
                             "default: all of the task's)")
    parser.add_argument("--task", choices=TASKS, default="shapes",
                        help="shapes: the scenes of the demo; details: small shapes in large images (tiles); multi: "
                             "questions comparing two images; video: a moving, recolouring, appearing scene")
    parser.add_argument("--width", type=int, default=0,
                        help=f"details: image width (default {DETAIL_SCALE[0]} x --image_size)")
    parser.add_argument("--height", type=int, default=0,
                        help=f"details: image height (default {DETAIL_SCALE[1]} x --image_size)")
    parser.add_argument("--detail_radius", type=float, default=SynthConfig.detail_radius,
                        help="details: a shape's radius in --image_size units (default %(default)s: ~3 pixels wide "
                             "in 2x2 tiles of 64-pixel squares, ~2 in one square; 0.2: ~13 and ~6)")
    parser.add_argument("--images_shown", choices=["all", "first"], default="all",
                        help="multi: first keeps only each row's first image and its marker, questions unchanged "
                             "(the control for what the second image adds)")
    parser.add_argument("--frames", type=int, default=8, help="video: frames per video")


def _check(args, config: SynthConfig) -> None:
    if args.image_size < 32:
        raise SystemExit(f"data synth: --image_size must be at least 32 (got {args.image_size})")
    unknown = [t for t in config.asked_types if t not in TASK_QUESTION_TYPES[config.task]]
    if unknown:
        raise SystemExit(f"data synth: the {config.task} task asks {list(TASK_QUESTION_TYPES[config.task])}, "
                         f"not {unknown}")
    types = len(SynthConfig(max_shapes=args.max_shapes, task=config.task).question_types())
    if not 1 <= args.turns <= types:
        raise SystemExit(f"data synth: --turns must be between 1 and {types}, one question per type "
                         f"(got {args.turns})")
    if not config.question_types():
        raise SystemExit("data synth: relation questions need --max_shapes 2 or more")
    for name in ("kinds", "colours"):
        chosen = getattr(args, name)
        if len(set(chosen)) != len(chosen) or len(chosen) <= args.max_shapes:
            raise SystemExit(f"data synth: --{name} needs more distinct entries than --max_shapes ({args.max_shapes}) "
                             f"so that every image lacks one; got {chosen}")
    if not 0 <= args.texture <= 1:
        raise SystemExit(f"data synth: --texture is a probability in [0, 1] (got {args.texture})")
    if args.noise < 0 or args.row_group_size < 1:
        raise SystemExit("data synth: --noise must be >= 0 and --row_group_size >= 1")
    counts = (args.train_rows, args.test_rows, args.pretrain_rows or 0, args.text_rows or 0, args.dpo_rows or 0,
              args.rl_rows or 0)
    if min(counts) < 0:
        raise SystemExit("data synth: row counts must not be negative")
    _check_task(args, config)


def _check_task(args, config: SynthConfig) -> None:
    """What the details, multi and video tasks need besides the common checks."""
    task = config.task
    if task != "shapes" and not set(args.files or TASK_FILES) <= set(TASK_FILES):
        raise SystemExit(f"data synth: --task {task} writes only {' '.join(TASK_FILES)} (got --files "
                         f"{' '.join(args.files)})")
    if task != "shapes" and args.think:
        raise SystemExit("data synth: --think is for --task shapes")
    if args.detail_radius != SynthConfig.detail_radius and task != "details":
        raise SystemExit("data synth: --detail_radius is for --task details")
    if args.images_shown != "all" and task != "multi":
        raise SystemExit("data synth: --images_shown is for --task multi")
    if task == "details":
        width, height = config.canvas()
        largest = config.detail_radius * config.image_size * max(EQUAL_AREA.values())
        if min(width, height) < config.image_size:
            raise SystemExit(f"data synth: --width and --height must be at least --image_size ({config.image_size}); "
                             f"got {width}x{height}")
        if config.detail_radius <= 0:
            raise SystemExit(f"data synth: --detail_radius must be positive (got {config.detail_radius})")
        if min(width, height) / 2 < 2 * largest + 4:
            raise SystemExit(f"data synth: --detail_radius {config.detail_radius} does not fit a quarter of the "
                             f"{width}x{height} canvas (a shape's diameter, {2 * largest:.0f} pixels, plus 4 must fit "
                             "half the shorter side)")
    if task == "multi" and "more" in config.question_types() and args.max_shapes < 3:
        raise SystemExit("data synth: multi's \"more\" questions need --max_shapes 3 or more")
    if task == "video":
        if args.frames < 4:
            raise SystemExit(f"data synth: --frames must be at least 4 (got {args.frames})")
        if len(args.kinds) < 4 or len(args.colours) < 5:
            raise SystemExit("data synth: --task video needs at least 4 --kinds and 5 --colours")


def main(args) -> None:
    from tqdm import tqdm

    asked = args.question_types or TASK_QUESTION_TYPES[args.task]
    config = SynthConfig(image_size=args.image_size, lang=args.lang, turns=args.turns, noise=args.noise,
                         texture=args.texture, image_format=args.image_format, seed=args.seed,
                         kinds=tuple(args.kinds), colours=tuple(args.colours), max_shapes=args.max_shapes,
                         asked_types=tuple(dict.fromkeys(asked)), think=bool(args.think), task=args.task,
                         width=args.width, height=args.height, detail_radius=args.detail_radius,
                         images_shown=args.images_shown, frames=args.frames)
    _check(args, config)
    files = args.files or (DEFAULT_FILES if args.task == "shapes" else TASK_FILES)
    pretrain = args.train_rows if args.pretrain_rows is None else args.pretrain_rows
    text = args.train_rows if args.text_rows is None else args.text_rows
    dpo = args.train_rows if args.dpo_rows is None else args.dpo_rows
    rl = args.train_rows if args.rl_rows is None else args.rl_rows
    counts = {"llm_pretrain": text, "llm_sft": text, "vlm_pretrain": pretrain, "vlm_sft": args.train_rows,
              "vlm_test": args.test_rows, "llm_dpo": dpo, "vlm_dpo": dpo, "vlm_dpo_test": args.test_rows,
              "vlm_rl": rl, "llm_rl": rl}
    rows = {file: counts[file] for file in FILES if file in files}
    start = time.perf_counter()
    bar = lambda records, file, count: tqdm(records, total=count, desc=file, unit="row", leave=False, disable=None)
    paths = generate(config, args.out_dir, rows, args.row_group_size, progress=bar)
    info = {"config": asdict(config), "rows": rows, "files": {f: os.path.basename(p) for f, p in paths.items()},
            "held_out_fraction": HELD_OUT_FRACTION, "question_types": list(config.question_types()),
            "positions": list(POSITIONS)}
    with open(os.path.join(args.out_dir, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, ensure_ascii=False, indent=2)
    for file, path in paths.items():
        print(f"{path}: {rows[file]} rows, {os.path.getsize(path) / 1e6:.1f} MB")
    print(f"generated in {time.perf_counter() - start:.1f}s")
