"""`minimind-v data preview FILE`: a PNG grid of the first rows of a training file, each image with its
conversation, so a dataset can be checked by eye before training. Unusable rows show why the trainer
would skip them."""

from __future__ import annotations

import io
import itertools
import os
import textwrap
import warnings

from PIL import Image

from .samples import BadSample, chat_images, conversation, decode_record
from .vision import load_image


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a parquet (conversations + image_bytes) or jsonl training file")
    parser.add_argument("--num", type=int, default=16, help="rows to show")
    parser.add_argument("--cols", type=int, default=4, help="grid columns")
    parser.add_argument("--out", help="PNG path (default: FILE with .preview.png)")


def first_rows(path: str, num: int) -> list:
    """The first `num` rows: parquet rows as dicts (streamed), jsonl lines raw."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        columns = [c for c in ("conversations", "image_bytes", "text") if c in parquet.schema_arrow.names]
        batch = next(parquet.iter_batches(batch_size=num, columns=columns), None)
        return batch.to_pylist() if batch is not None else []
    with open(path, "rb") as f:
        return list(itertools.islice((line for line in f if line.strip()), num))


def describe(raw) -> tuple[Image.Image | None, str]:
    """(first image or None, text to print under it) for one row."""
    try:
        record = decode_record(raw)
        if "conversations" not in record:
            return None, f"text: {record.get('text')!r}"
        messages, _ = conversation(record["conversations"])
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        images = chat_images(record, messages)
        if not images:
            return None, ("[text only: its image is not used]\n" if record.get("image_bytes") else "") + text
        try:
            decoded = [load_image(io.BytesIO(data)) for data in images]  # the trainer skips a row for any of them
        except ValueError as err:
            raise BadSample("bad_image") from err
        return decoded[0], f"[{len(images)} image(s)]\n{text}"
    except BadSample as err:
        return None, f"SKIPPED BY THE TRAINER: {err.reason}"


def preview(path: str, out: str, num: int = 16, cols: int = 4) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = first_rows(path, num)
    if not rows:
        raise SystemExit(f"preview: {path} has no rows")
    cols = min(cols, len(rows))
    lines = -(-len(rows) // cols)
    figure, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 4.2 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    warnings.filterwarnings("ignore", message="Glyph .* missing")  # CJK text without a CJK font
    for ax, raw in zip(axes.flat, rows):
        image, text = describe(raw)
        if image is not None:
            ax.imshow(image)
        else:
            ax.text(0.5, 0.5, "no image", ha="center", va="center", color="grey", transform=ax.transAxes)
        wrapped = "\n".join(textwrap.shorten(line, 160) for line in text.splitlines()[:6])
        ax.set_title("\n".join(textwrap.wrap(wrapped, 42, replace_whitespace=False)[:8]), fontsize=7, loc="left")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(args) -> None:
    if not os.path.isfile(args.file):
        raise SystemExit(f"preview: no such file: {args.file}")
    out = args.out or os.path.splitext(args.file)[0] + ".preview.png"
    print(f"wrote {preview(args.file, out, args.num, args.cols)}")
