"""`minimind-v describe`: describe every image of a folder, one streamed answer (and its speed) per image.

Images are taken in sorted name order; files that cannot be read are reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys

from .chat import load_engine_or_exit, print_reply
from .generate import ChatRequest
from .options import add_dtype_argument, add_model_arguments, add_sampling_arguments, sampling_config
from .tokenizer import IMAGE_MARKER
from .vision import load_image

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".tga",
    ".ico",
)
DEFAULT_PROMPT = "请描述这张图片中的主要物体和场景。"  # "Describe the main objects and the scene in this picture."


def image_files(folder: str) -> list[str]:
    """Image files (by extension, any case) directly in `folder`, sorted by name."""
    if not os.path.isdir(folder):
        raise SystemExit(f"--image_dir {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not names:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}")
    return [os.path.join(folder, n) for n in names]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    add_dtype_argument(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--image_dir", default=os.path.join("dataset", "eval_images"))
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked about every image")


def main(args) -> None:
    paths = image_files(args.image_dir)
    engine = load_engine_or_exit(args)
    config = sampling_config(args)
    described, skipped = 0, []
    for path in paths:
        try:
            image = load_image(path)
        except ValueError as err:
            print(f"[skipped] {err}", file=sys.stderr)
            skipped.append(os.path.basename(path))
            continue
        messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n{args.prompt}"}]
        print(f"[Image]: {os.path.basename(path)}\n[Q]: {args.prompt}\n[A]: ", end="", flush=True)
        print_reply(
            engine, ChatRequest(messages, [image], bool(args.open_thinking)), config, sys.stdout, bool(args.show_speed)
        )
        print()
        described += 1
    print(f"described {described} image(s)" + (f", skipped {len(skipped)}: {', '.join(skipped)}" if skipped else ""))
