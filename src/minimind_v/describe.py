"""`minimind-v describe`: describe every image and video of a folder, one streamed answer (and its speed) each.

Files are taken in sorted name order; files that cannot be read are reported and skipped. Videos
(`video.VIDEO_EXTENSIONS` and animated GIFs; a still GIF is an image) become `--video_frames` frames sampled
uniformly. A subfolder is one question about all of its images together (`--group_prompt`), "Image 1:",
"Image 2:", ... in name order.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from .chat import load_engine_or_exit, print_reply
from .generate import ChatRequest
from .options import (
    add_dtype_argument,
    add_model_arguments,
    add_sampling_arguments,
    add_vision_input_arguments,
    sampling_config,
)
from .tokenizer import IMAGE_MARKER
from .video import VIDEO_EXTENSIONS, VIDEO_MARKER, is_video_file, load_video
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
DEFAULT_VIDEO_PROMPT = "请描述这段视频中发生了什么。"  # "Describe what happens in this video."
DEFAULT_GROUP_PROMPT = "请描述并比较这些图片。"  # "Describe and compare these pictures."


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def image_files(folder: str) -> list[str]:
    """Image and video files (by extension, any case) directly in `folder`, and its subfolders holding images,
    sorted by name."""
    if not os.path.isdir(folder):
        raise SystemExit(f"--image_dir {folder!r} is not a folder")
    extensions = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS

    def wanted(name: str) -> bool:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            return not name.startswith(".") and any(map(_is_image, os.listdir(path)))
        return name.lower().endswith(extensions) and not name.startswith(".")

    names = sorted(filter(wanted, os.listdir(folder)))
    if not names:
        raise SystemExit(f"no images or videos ({', '.join(extensions)}), nor subfolders of images, in {folder!r}")
    return [os.path.join(folder, n) for n in names]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    add_dtype_argument(parser)
    add_sampling_arguments(parser)
    add_vision_input_arguments(parser)
    parser.add_argument("--image_dir", default=os.path.join("dataset", "eval_images"),
                        help="folder of the images and videos to describe")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked about every image")
    parser.add_argument("--video_prompt", default=DEFAULT_VIDEO_PROMPT, help="question asked about every video")
    parser.add_argument("--group_prompt", default=DEFAULT_GROUP_PROMPT,
                        help="question asked about the images of each subfolder, together")


def request_for(path: str, args) -> tuple[ChatRequest, str, str]:
    """(the request that asks about the file at `path`, its kind, the question); ValueError when it cannot be read."""
    thinking = bool(args.open_thinking)
    if os.path.isdir(path):
        names = sorted(filter(_is_image, os.listdir(path)))
        markers = "".join(f"Image {k + 1}: {IMAGE_MARKER}\n" for k in range(len(names)))
        messages = [{"role": "user", "content": markers + args.group_prompt}]
        images = [load_image(os.path.join(path, n)) for n in names]
        return ChatRequest(messages, images, thinking), f"Images ({len(names)})", args.group_prompt
    if is_video_file(path):
        video = load_video(path, args.video_frames)
        messages = [{"role": "user", "content": f"{VIDEO_MARKER}\n{args.video_prompt}"}]
        return ChatRequest(messages, [], thinking, videos=[video]), "Video", args.video_prompt
    messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n{args.prompt}"}]
    return ChatRequest(messages, [load_image(path)], thinking), "Image", args.prompt


def main(args) -> None:
    paths = image_files(args.image_dir)
    engine = load_engine_or_exit(args)
    config = sampling_config(args)
    described, skipped = Counter(), []
    for path in paths:
        try:
            request, kind, prompt = request_for(path, args)
            prepared = engine.prepare(request)  # a prompt over --max_seq_len is skipped with its reason
        except ValueError as err:
            print(f"[skipped] {os.path.basename(path)}: {err}" if os.path.isdir(path) else f"[skipped] {err}",
                  file=sys.stderr)
            skipped.append(os.path.basename(path))
            continue
        print(f"[{kind}]: {os.path.basename(path)}\n[Q]: {prompt}\n[A]: ", end="", flush=True)
        print_reply(engine, request, config, sys.stdout, bool(args.show_speed), prepared)
        print()
        described[kind.split()[0]] += 1
    extra = [f"{described[k]} {noun}" for k, noun in (("Video", "video(s)"), ("Images", "group(s) of images"))
             if described[k]]
    print(f"described {described['Image']} image(s)" + "".join(f" and {e}" for e in extra)
          + (f", skipped {len(skipped)}: {', '.join(skipped)}" if skipped else ""))
