"""Training documents from data rows: pretraining text, chat conversations and preference pairs, rendered and
labelled as the reference does (chats and pairs through the one `ChatEncoder`), with bad rows refused by reason.

Row formats (reference schemas):
    text   `text`
    chat   `conversations` (JSON string or list of messages), `image_bytes` (binary, list of binary or
           {"bytes": ...}) for VLM rows with `<image>` markers, and `video_bytes` for rows with `<video>` markers
           (one item per marker: an encoded video file, or a list of encoded frame images)
    pairs  `chosen` and `rejected` (each a conversation ending with the assistant's answer), `image_bytes`
    prompts  `conversations` ending with the user turn to answer (a final assistant message, such as the empty one
           of the reference `rlaif.jsonl`, is dropped), `image_bytes`, and `answer` (a string or a list of accepted
           answers; default: the dropped assistant message, when it is not empty)
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .chat_encoder import IGNORE, ChatEncoder, Encoded, EncodingError, count_markers
from .evaluate import normalize_answer
from .tokenizer import IMAGE_MARKER
from .video import VIDEO_MARKER, VideoError, load_video, splice_videos
from .vision import Grid, load_image
from .vision_cache import CachedImages, FeatureReader

# Larger images are refused before decoding: a small file can declare a huge image (a decompression bomb).
MAX_IMAGE_PIXELS = 8192 * 8192
# Reasons a row is skipped; reported in the log and the run summary.
BAD_REASONS = {
    "missing_field": "the text / conversations / chosen / rejected field is missing or null",
    "invalid_json": "the row is not valid JSON",
    "bad_conversation": "conversations is not a list of {role, content} messages",
    "no_assistant_turn": "the conversation has no assistant turn",
    "empty_text": "the pretraining text is empty",
    "image_mismatch": "the number of <image> markers differs from the number of images",
    "bad_image": "an image could not be decoded (not image bytes, corrupt, truncated, or over 8192x8192 pixels)",
    "image_truncated": "--max_seq_len would cut an image's placeholder tokens",
    "video_mismatch": "the number of <video> markers differs from the number of videos",
    "bad_video": "a video could not be decoded (not a video, corrupt, or a frame list with a bad frame)",
    "no_frames": "a video holds no frame",
    "video_too_long": "a video is longer than the limit",
    "video_too_large": "a video frame is over 8192x8192 pixels",
    "video_support_missing": "a video file needs PyAV to be decoded: pip install \"minimind-v[video]\"",
    "answer_truncated": "--max_seq_len leaves no supervised token",
    "prompt_mismatch": "a preference pair's chosen and rejected conversations differ before their last answer",
    "no_user_turn": "a prompt does not end with a user message",
    "no_answer": "the exact_match reward needs an answer and the row has none",
    "prompt_too_long": "a prompt is longer than --max_seq_len",
    "invalid_text": "a string holds a lone surrogate (an unpaired \\ud800-\\udfff JSON escape), which no tokenizer "
                    "can encode",
    "truncated_file": "the file ends inside the row: a jsonl file whose last line is cut short, or a file shortened "
                      "after it was indexed",
    "unreadable_row_group": "the row's parquet row group cannot be read (corrupt pages, or the file changed after it "
                            "was indexed)",
}
# Identity prompts occasionally prepended to SFT conversations (the reference does the same with its own list).
SYSTEM_PROMPTS = [
    "You are a helpful AI assistant.",
    "You are minimind, a small but useful language model.",
    "You are a knowledgeable assistant. Answer clearly and concisely.",
    "You are an AI that answers questions about text and images.",
    "You are a friendly assistant who explains things step by step.",
    "你是一个乐于助人的AI助手。",
    "你是minimind，一个小巧但实用的语言模型。",
    "你是一个知识渊博的助手，请清晰简洁地回答。",
    "你是一个能看懂图片并回答问题的AI。",
    "你是一个友好的助手，会一步一步地解释问题。",
]
KINDS = ("text", "chat", "pairs", "prompts")


class BadSample(Exception):
    """A row that cannot be trained on; `reason` is a key of BAD_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Sample:
    """One training document. ids / labels [L] int64 (labels unshifted, -100 = not supervised, the first
    token always -100); pixels [N, 3, S, S] float32 for its N images, or None. With a vision cache, `cached` says
    what it holds of the N images and pixels are those of the others."""

    ids: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray | None = None
    cached: CachedImages | None = None


@dataclass
class Prompt:
    """A prompt to sample answers for. ids [L] int64: the generation prompt; pixels [N, 3, S, S] float32 or None;
    messages: the conversation it was rendered from; answers: normalised accepted answers (empty: none given);
    seed: the row's own sampling seed (from the run seed, epoch and data position)."""

    ids: np.ndarray
    pixels: np.ndarray | None
    messages: list[dict]
    open_thinking: bool
    answers: tuple[str, ...]
    seed: int


def record_fields(kind: str, images: bool) -> tuple[str, ...]:
    """The columns a row of this kind is read from; the first one is required."""
    fields = {"text": ("text",), "chat": ("conversations",), "pairs": ("chosen", "rejected"),
              "prompts": ("conversations", "answer")}[kind]
    return fields + ("image_bytes", "video_bytes") if images and kind != "text" else fields


def decode_record(raw) -> dict:
    """A parquet row (already a dict) or a jsonl line -> dict, or BadSample('invalid_json')."""
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as err:  # also bad UTF-8, nesting too deep, integers over 4300 digits
        raise BadSample("invalid_json") from err
    if not isinstance(record, dict):
        raise BadSample("invalid_json")
    return record


def image_list(value) -> list[bytes]:
    """The `image_bytes` cell as a list of encoded images (binary, list of binary, or {"bytes": ...}); an item of
    another shape stays as it is and is refused as a bad image when decoded."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [item.get("bytes") if isinstance(item, dict) else item for item in items]


def chat_images(record: dict, messages: list[dict]) -> list[bytes]:
    """The encoded images of a chat row, one per `<image>` marker. Rows without markers are text-only; any image
    they carry (the reference's 8x8 placeholder) is unused. BadSample when markers and images disagree."""
    markers = count_markers(messages)
    if not markers:
        return []
    if "image_bytes" not in record:
        raise BadSample("missing_field")
    images = image_list(record["image_bytes"])
    if markers != len(images):
        raise BadSample("image_mismatch")
    return images


def chat_videos(record: dict, messages: list[dict]) -> list:
    """The `video_bytes` items of a chat row, one per `<video>` marker. With one marker the cell is the video (an
    encoded video, or a list of encoded frames); with several, a list of one such item per marker. BadSample
    when markers and videos disagree."""
    markers = count_markers(messages, VIDEO_MARKER)
    if not markers:
        return []
    value = record.get("video_bytes")
    if value is None:
        raise BadSample("missing_field")
    if markers == 1:
        return [value]
    if not isinstance(value, list) or len(value) != markers:
        raise BadSample("video_mismatch")
    return value


def conversation(value, needs_assistant: bool = True) -> tuple[list[dict], list | None]:
    """A `conversations` cell (JSON string or list) -> (messages for the chat template, tools or None).

    Messages keep role, content, reasoning_content (text) and tool_calls (a JSON string is parsed); tools come
    from a first system message's `tools` (LLM data) or `functions` (VLM data) key."""
    if value is None:
        raise BadSample("missing_field")
    if isinstance(value, str):
        value = _maybe_json(value)
    if not isinstance(value, list) or not value:
        raise BadSample("bad_conversation")
    messages = []
    for raw in value:
        if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
            raise BadSample("bad_conversation")
        message = {"role": raw["role"], "content": raw.get("content")}
        if raw.get("reasoning_content"):
            message["reasoning_content"] = raw["reasoning_content"]
        if raw.get("tool_calls"):
            message["tool_calls"] = _maybe_json(raw["tool_calls"])
        messages.append(message)
    first = value[0]
    tools = _maybe_json(first.get("tools") or first.get("functions")) if messages[0]["role"] == "system" else None
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadSample("no_assistant_turn")
    return messages, tools or None


def _maybe_json(value):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as err:
        raise BadSample("invalid_json") from err


def check_text(value) -> None:
    """BadSample('invalid_text') when a string anywhere in `value` (nested lists and dicts, walked without recursion)
    cannot be encoded as UTF-8: only a lone surrogate from a JSON escape such as "\\ud800" can't."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise BadSample("invalid_text") from err
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item


def accepted_answers(value) -> tuple[str, ...]:
    """An `answer` cell (a string, a number or a list of them) -> its normalised forms (as `eval` scores)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(normalize_answer(str(v)) for v in values
                 if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip())


class SampleBuilder:
    """Record -> training documents, or BadSample. Randomness (system prompt, empty-think removal) comes from
    the `rng` passed in, seeded per row, so it does not depend on workers or processes.

    kind "text" and "chat" give one document per row; "pairs" gives two, the chosen then the rejected
    conversation, with the same system prompt and think-block choice so that their prompts stay identical."""

    def __init__(self, kind: str, tokenizer, max_seq_len: int, image_token_len: int = 0, image_processor=None,
                 add_system_ratio: float = 0.2, empty_think_ratio: float = 0.2, thinking_ratio: float = 0.0,
                 needs_answer: bool = False, vision_cache: FeatureReader | None = None, video_frames: int = 8):
        if kind not in KINDS:
            raise ValueError(f"unknown sample kind {kind!r}; choose one of {KINDS}")
        self.kind, self.tokenizer, self.max_seq_len = kind, tokenizer, max_seq_len
        self.image_processor = image_processor
        self.add_system_ratio, self.empty_think_ratio = add_system_ratio, empty_think_ratio
        self.thinking_ratio, self.needs_answer = thinking_ratio, needs_answer
        self.vision_cache = vision_cache
        self.video_frames = video_frames
        self.encoder = ChatEncoder(tokenizer, image_token_len)

    def documents(self, record: dict, rng: random.Random) -> list[Sample] | list[Prompt]:
        if self.kind == "pairs":
            return list(self.build_pair(record, rng))
        if self.kind == "prompts":
            return [self.build_prompt(record, rng)]
        return [self.build(record, rng)]

    def build(self, record: dict, rng: random.Random) -> Sample:
        """One document of a text or chat row."""
        if self.kind == "text":
            return self._text(record)
        messages, tools = conversation(record.get("conversations"))
        messages, images = self._visuals(record, messages)
        system, drop_think = self._augmentations(messages, tools, rng)
        images, grids = self._grids(images)
        ids, labels = self._encode(system + messages, tools, grids, drop_think)
        return Sample(ids, labels, *self._images(images))

    def build_pair(self, record: dict, rng: random.Random) -> tuple[Sample, Sample]:
        """(chosen, rejected) documents of a preference row."""
        chosen, tools = conversation(record.get("chosen"))
        rejected, rejected_tools = conversation(record.get("rejected"))
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadSample("no_assistant_turn")
        if chosen[:-1] != rejected[:-1] or tools != rejected_tools:
            raise BadSample("prompt_mismatch")
        if any(count_markers(answer, marker) for answer in (chosen[-1:], rejected[-1:])
               for marker in (IMAGE_MARKER, VIDEO_MARKER)):
            raise BadSample("image_mismatch")  # an answer cannot show an image
        prompt, images = self._visuals(record, chosen[:-1])
        chosen, rejected = prompt + chosen[-1:], prompt + rejected[-1:]
        system, drop_think = self._augmentations(chosen, tools, rng)
        images, grids = self._grids(images)
        encoded = [self._encode(system + messages, tools, grids, drop_think) for messages in (chosen, rejected)]
        pixels, cached = self._images(images)
        return tuple(Sample(ids, labels, pixels, cached) for ids, labels in encoded)

    def build_prompt(self, record: dict, rng: random.Random) -> Prompt:
        """The generation prompt of a prompt row; thinking is opened with probability `thinking_ratio` (as the
        reference's RLAIF data does)."""
        messages, tools = conversation(record.get("conversations"), needs_assistant=False)
        final = messages[-1]
        if final["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise BadSample("no_user_turn")
        answer = record.get("answer")
        if answer is None and final["role"] == "assistant":
            answer = final["content"]
        answers = accepted_answers(answer)
        if self.needs_answer and not answers:
            raise BadSample("no_answer")
        messages, images = self._visuals(record, messages)
        system, _ = self._augmentations(messages, tools, rng)
        open_thinking = rng.random() < self.thinking_ratio
        seed = rng.getrandbits(63)
        images, grids = self._grids(images)
        encoded = self._checked_encode(system + messages, grids, tools, generation_prompt=True,
                                       open_thinking=open_thinking)
        if len(encoded.ids) > self.max_seq_len:
            raise BadSample("prompt_too_long")
        return Prompt(encoded.ids, self._pixels(images), system + messages, open_thinking, answers, seed)

    def _augmentations(self, messages: list[dict], tools, rng: random.Random) -> tuple[list[dict], bool]:
        """The reference's random system prompt (none with tools or an own system message) and empty-think
        removal; both draws are made for every row, so the stream of a row does not depend on its content."""
        add_system = rng.random() < self.add_system_ratio
        prompt = rng.choice(SYSTEM_PROMPTS)
        drop_think = rng.random() > self.empty_think_ratio
        system = [{"role": "system", "content": prompt}] if add_system and not tools and \
            messages[0]["role"] != "system" else []
        return system, drop_think

    def _text(self, record: dict) -> Sample:
        text = record.get("text")
        if not isinstance(text, str):
            raise BadSample("missing_field")
        if not text.strip():
            raise BadSample("empty_text")
        check_text(text)
        tokens = self.tokenizer(text, max_length=self.max_seq_len - 2, truncation=True).input_ids
        tok = self.tokenizer
        ids = np.array([tok.bos_token_id, *tokens, tok.eos_token_id], dtype=np.int64)
        labels = np.where(ids == tok.pad_token_id, IGNORE, ids)  # the reference also masks id 0 in the text
        labels[0] = IGNORE
        return Sample(ids, labels)

    def _visuals(self, record: dict, messages: list[dict]) -> tuple[list[dict], list]:
        """(messages, images) of a VLM row with its videos spliced in: each `<video>` becomes its frames' text
        and `<image>` markers, and its frames (PIL images, one square each) join the encoded images in order."""
        if not self.encoder.image_token_len:
            return messages, []
        images, videos = chat_images(record, messages), chat_videos(record, messages)
        if not videos:
            return messages, images
        try:
            loaded = [load_video(video, self.video_frames, max_pixels=MAX_IMAGE_PIXELS) for video in videos]
            return splice_videos(messages, images, loaded, frame_size=self.image_processor.size)
        except VideoError as err:
            raise BadSample(err.reason if err.reason in BAD_REASONS else "bad_video") from err

    def _grids(self, images: list) -> tuple[list, int | list[Grid]]:
        """(images, their tile grids). Without tiles every image is one square: the count stands for the grids
        and images stay encoded (the vision cache keys them by their bytes). With tiles they are decoded here
        once, as their size decides the grid."""
        if not images or self.image_processor.max_tiles == 1:
            return images, len(images)
        decoded = [self._decode(image) for image in images]
        return decoded, [self.image_processor.grid(image) for image in decoded]

    def _encode(self, messages: list[dict], tools, images: int | list[Grid],
                drop_think: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) cut to max_seq_len; BadSample when the cut splits an image or leaves nothing to learn."""
        encoded = self._checked_encode(messages, images, tools, drop_empty_think=drop_think)
        ids, labels = encoded.ids[: self.max_seq_len], encoded.labels[: self.max_seq_len]
        block = self.encoder.image_token_len
        if block and np.count_nonzero(ids == self.encoder.image_id) != encoded.squares * block:
            raise BadSample("image_truncated")
        if not np.any(labels != IGNORE):
            raise BadSample("answer_truncated")
        return ids, labels

    def _checked_encode(self, messages: list[dict], images: int | list[Grid], tools, **options) -> Encoded:
        try:
            return self.encoder.encode(messages, images, tools, **options)
        except EncodingError as err:
            raise BadSample(err.reason) from err

    def _images(self, images: list) -> tuple[np.ndarray | None, CachedImages | None]:
        """(pixels of the squares the vision cache lacks, what it holds of every square); without a cache, (all
        pixels, None). An image whose squares it all holds is not decoded again (without tiles: not at all)."""
        if self.vision_cache is None or not images:
            return self._pixels(images), None
        keys = [self._square_keys(image) for image in images]
        cached = self.vision_cache.lookup([key for image_keys in keys for key in image_keys])
        hits = np.split(cached.hit, np.cumsum([len(image_keys) for image_keys in keys])[:-1])
        lacking = [(image, ~hit) for image, hit in zip(images, hits) if not hit.all()]
        if not lacking:
            return None, cached
        pixels = [self.image_processor.tiles(self._decode(image))[miss] for image, miss in lacking]
        return np.concatenate(pixels), cached

    def _square_keys(self, image) -> list[bytes]:
        """What the vision cache hashes for each square of an image: the image's own key for its thumbnail, then
        that key with the tile's place in its grid."""
        key = cache_key(image)
        grid = self.image_processor.grid(image) if self.image_processor.max_tiles > 1 else (1, 1)
        tiles = grid[0] * grid[1] if grid != (1, 1) else 0
        return [key] + [key + f"\ntile {k} of {grid[0]}x{grid[1]}".encode() for k in range(tiles)]

    def _pixels(self, images: list) -> np.ndarray | None:
        """Encoded or decoded images -> their squares [N, 3, size, size] (None without images)."""
        if not images:
            return None
        return np.concatenate([self.image_processor.tiles(self._decode(image)) for image in images])

    @staticmethod
    def _decode(image) -> Image.Image:
        """An encoded image (bytes) as RGB, or a decoded video frame as it is; BadSample when it cannot be
        decoded (as `load_image` decides)."""
        if isinstance(image, Image.Image):
            return image
        if not isinstance(image, bytes):
            raise BadSample("bad_image")
        try:
            return load_image(io.BytesIO(image), MAX_IMAGE_PIXELS)
        except ValueError as err:
            raise BadSample("bad_image") from err


def cache_key(image) -> bytes:
    """What the vision cache hashes for an image: its encoded bytes, or a decoded frame's size and pixels."""
    if isinstance(image, Image.Image):
        return f"frame {image.mode} {image.width}x{image.height}\n".encode() + image.tobytes()
    if not isinstance(image, bytes):
        raise BadSample("bad_image")
    return image
