"""Small training files for the trainer tests: pretraining text and SFT conversations (jsonl) and an
image-text parquet in the reference schema with real PNG / JPEG bytes."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def image_bytes(colour: str, shape: str, fmt: str = "PNG", size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def text_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": f"The {rng.choice(list(COLOURS))} {rng.choice(SHAPES)} is next to the "
                     f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}."} for _ in range(n)]


def sft_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        records.append({"conversations": conversation(f"What colour is the {shape}?", f"The {shape} is {colour}.")})
    return records


def vlm_rows(n: int, seed: int = 0) -> list[dict]:
    """Caption rows with one image (alternating PNG / JPEG), plus a text-only row every 5th row carrying the
    reference's 8x8 black placeholder image."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if i % 5 == 4:
            placeholder = io.BytesIO()
            Image.new("RGB", (8, 8)).save(placeholder, format="JPEG")
            rows.append({"conversations": json.dumps(conversation("Say hello.", "Hello!")),
                         "image_bytes": placeholder.getvalue()})
        else:
            question = "<image>\nWhat is in the picture?" if i % 2 else "What is in the picture?\n<image>"
            rows.append({"conversations": json.dumps(conversation(question, f"A {colour} {shape}.")),
                         "image_bytes": image_bytes(colour, shape, "PNG" if i % 2 else "JPEG")})
    return rows


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 16) -> Path:
    table = pa.table({
        "conversations": pa.array([r["conversations"] for r in rows], pa.string()),
        "image_bytes": pa.array([r["image_bytes"] for r in rows], pa.binary()),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_all(folder: Path, rows: int = 48) -> dict[str, Path]:
    """pretrain.jsonl, sft.jsonl and vlm.parquet in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "pretrain": write_jsonl(folder / "pretrain.jsonl", text_records(rows)),
        "sft": write_jsonl(folder / "sft.jsonl", sft_records(rows)),
        "vlm": write_parquet(folder / "vlm.parquet", vlm_rows(rows)),
    }
