"""`minimind-v chat`: a multi-turn conversation with images and videos in the terminal.

Type a message and press Enter; the reply streams back. Commands: `/image PATH` attaches an image to your
next message (repeat it for several), `/video PATH` a video (`--video_frames` frames sampled uniformly), `/reset`
forgets the conversation, `/think on|off` switches the reasoning block, `/quit` (or end of input) leaves.
Attachments go where the message writes `<image>` / `<video>`, else in attach order before its text. Input may
also be piped in, one line per message. Also holds the model loading and reply printing shared by `describe`,
`serve` and `webui`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TextIO

from PIL import Image

from .generate import (
    ChatRequest,
    Completion,
    Engine,
    GenerationConfig,
    PreparedPrompt,
    inference_dtype,
    pack_linear_weights,
)
from .loading import load_model
from .options import (
    add_dtype_argument,
    add_model_arguments,
    add_sampling_arguments,
    add_vision_input_arguments,
    model_options,
    sampling_config,
)
from .tokenizer import IMAGE_MARKER
from .video import VIDEO_MARKER, Video, load_video
from .vision import load_image

HELP = ("commands: /image PATH, /video PATH (attach an image or a video to the next message; repeat for several), "
        "/reset, /think on|off, /quit")


def load_for_inference(args):
    """(model, tokenizer) of the `add_model_arguments` and `add_vision_input_arguments` flags, its weights in the
    `--dtype` that `inference_dtype` picks; the choice and its reason go to stderr."""
    dtype, reason = inference_dtype(args.device, args.dtype)
    print(f"[weights in {str(dtype).removeprefix('torch.')}: {reason}]", file=sys.stderr)
    return load_model(**model_options(args), dtype=dtype)


def load_engine(args) -> Engine:
    """The model of the `add_model_arguments` and `--dtype` flags, ready to chat (bf16 linear layers of a CPU
    model packed for fast decoding, see `pack_linear_weights`)."""
    model, tokenizer = load_for_inference(args)
    pack_linear_weights(model)
    return Engine(model, tokenizer, max_prompt_tokens=args.max_seq_len)


def load_engine_or_exit(args) -> Engine:
    """`load_engine` for commands: a missing or unfitting model ends the program with the reason."""
    try:
        return load_engine(args)
    except (OSError, ValueError) as err:
        raise SystemExit(f"could not load the model: {err}") from err


def print_reply(
    engine: Engine, request: ChatRequest, config: GenerationConfig, out: TextIO, show_speed: bool,
    prepared: PreparedPrompt | None = None,
) -> Completion:
    """Stream one reply to `out` (reasoning, when there is any, under its own heading) and return it."""
    section = None
    for event in engine.stream(request, config, prepared):
        if event.completion is not None:
            completion = event.completion
        if event.reasoning:
            if section != "reasoning":
                out.write("[thinking]\n")
            section = "reasoning"
            out.write(event.reasoning)
        if event.content:
            if section == "reasoning":
                out.write("\n[answer]\n")
            section = "answer"
            out.write(event.content)
        out.flush()
    out.write("\n")
    if completion.finish_reason == "length":
        out.write(f"[cut at --max_new_tokens {config.max_new_tokens}]\n")
    if show_speed:
        speed = completion.completion_tokens / max(completion.seconds, 1e-9)
        out.write(f"[Speed]: {speed:.2f} tokens/s\n")
    return completion


class ChatSession:
    """The conversation so far: messages with `<image>` and `<video>` markers, and the images and videos they refer
    to, in order. `pending` holds what is attached to the next message, in attach order."""

    def __init__(self, engine: Engine, config: GenerationConfig, open_thinking: bool = False, show_speed: bool = True,
                 video_frames: int = 8):
        self.engine, self.config = engine, config
        self.open_thinking, self.show_speed, self.video_frames = open_thinking, show_speed, video_frames
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.images: list[Image.Image] = []
        self.videos: list[Video] = []
        self.pending: list[Image.Image | Video] = []

    def handle(self, line: str, out: TextIO) -> bool:
        """Act on one input line; False once the user wants to leave."""
        line = line.strip()
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return False
        if command == "/reset":
            self.reset()
            out.write("[conversation cleared]\n")
        elif command == "/think" and rest.strip() in ("on", "off"):
            self.open_thinking = rest.strip() == "on"
            out.write(f"[thinking {rest.strip()}]\n")
        elif command in ("/image", "/video") and rest.strip():
            self.attach(command[1:], rest.strip(), out)
        elif line.startswith("/"):
            out.write(f"[unknown command {line!r}] {HELP}\n")
        elif line:
            self.say(line, out)
        return True

    def attach(self, kind: str, path: str, out: TextIO) -> None:
        """Attach the image or video (`kind`) at `path` to the next message; a file that cannot be read is
        reported."""
        try:
            self.pending.append(load_image(path) if kind == "image" else load_video(path, self.video_frames))
        except ValueError as err:
            out.write(f"[{err}]\n")
            return
        count = sum(isinstance(item, Video) == (kind == "video") for item in self.pending)
        out.write(f"[{kind} {count} attached to your next message: {path}]\n")

    def say(self, text: str, out: TextIO) -> None:
        """One user turn: the reply streams to `out` and both join the history (not when the turn fails)."""
        if self.pending and IMAGE_MARKER not in text and VIDEO_MARKER not in text:
            markers = "".join(VIDEO_MARKER if isinstance(item, Video) else IMAGE_MARKER for item in self.pending)
            text = markers + "\n" + text
        images = [item for item in self.pending if not isinstance(item, Video)]
        videos = [item for item in self.pending if isinstance(item, Video)]
        user = {"role": "user", "content": text}
        request = ChatRequest(self.messages + [user], self.images + images, self.open_thinking,
                              videos=self.videos + videos)
        try:
            completion = print_reply(self.engine, request, self.config, out, self.show_speed)
        except ValueError as err:
            out.write(f"[{err}; /reset starts a new conversation]\n")
            return
        reply = {"role": "assistant", "content": completion.text}
        if completion.reasoning is not None:
            reply["reasoning_content"] = completion.reasoning
        self.messages += [user, reply]
        self.images += images
        self.videos += videos
        self.pending = []


def input_lines(interactive: bool) -> Iterable[str]:
    """User input, prompted when a person is typing."""
    while True:
        try:
            yield input("> " if interactive else "")
        except EOFError:
            return


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    add_dtype_argument(parser)
    add_sampling_arguments(parser)
    add_vision_input_arguments(parser)


def main(args) -> None:
    engine = load_engine_or_exit(args)
    session = ChatSession(engine, sampling_config(args), bool(args.open_thinking), bool(args.show_speed),
                          args.video_frames)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP)
    for line in input_lines(interactive):
        if not session.handle(line, sys.stdout):
            break
