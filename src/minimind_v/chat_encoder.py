"""The one chat encoder: messages with `<image>` markers -> token ids, labels and image slots. Training samples,
preference pairs, RL prompts and the generation engine all encode through it.

The text comes from the tokenizer's chat template, with each `<image>` of a non-system message expanded to its
placeholder text: a block of `image_token_len` placeholder tokens, or one block per square and a row separator per
row of tiles for an image cut into tiles (`vision.image_placeholder`). It is tokenised in pieces cut after every
assistant header and after the think block that opens the turn: a generation prompt ends at exactly such a cut,
so the prompt of a conversation is token-identical whether it is encoded for training (followed by its answer)
or for inference (followed by nothing), whatever merges the tokenizer has learned across that boundary.

Labels follow the reference rule: supervised from after each `<|im_start|>assistant\\n` through the end of the
next `<|im_end|>\\n` (or the end of the text); everything else, and the first token, is IGNORE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from jinja2 import TemplateError

from .tokenizer import (
    ASSISTANT_HEADER,
    EMPTY_THINK,
    IMAGE_MARKER,
    IMAGE_TOKEN,
    OPEN_THINK,
    TURN_END,
    render_chat,
)
from .vision import Grid, expand_image_markers, grid_tiles, image_placeholder

IGNORE = -100


class EncodingError(ValueError):
    """A conversation that cannot be encoded; `reason` names the kind of problem (a training bad-row reason)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Encoded:
    """ids / labels [L] int64 (labels unshifted, IGNORE = not supervised; all IGNORE for a generation prompt),
    the number of images the ids hold placeholders for and the number of squares (blocks) they fill."""

    ids: np.ndarray
    labels: np.ndarray
    images: int
    squares: int


def find_all(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start indices of every occurrence of `pattern` in `ids` (vectorised, no Python scan)."""
    k = len(pattern)
    if len(ids) < k:
        return np.empty(0, dtype=np.int64)
    candidates = np.flatnonzero(ids[: len(ids) - k + 1] == pattern[0])
    if k > 1 and len(candidates):
        hits = (ids[candidates[:, None] + np.arange(1, k)] == pattern[1:]).all(axis=1)
        candidates = candidates[hits]
    return candidates


def assistant_labels(ids: np.ndarray, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The reference label rule on ids [L]: supervise from just after each `begin` (assistant header) through
    the end of the first following `end` (`<|im_end|>\\n`) inclusive, or to the end of the sequence."""
    starts = find_all(ids, begin) + len(begin)
    end_starts = find_all(ids, end)
    following = np.searchsorted(end_starts, starts)  # the first `end` that starts at or after each start
    stops = np.append(end_starts + len(end), len(ids))[following]
    depth = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(depth, starts, 1)
    np.add.at(depth, stops, -1)
    return np.where(np.cumsum(depth[:-1]) > 0, ids, IGNORE)


def turn_pieces(text: str) -> list[str]:
    """`text` cut after every assistant header and after the think block opening that turn (the empty block, or
    `<think>\\n` before reasoning): the places where a generation prompt can end."""
    cuts, start = [], 0
    while (at := text.find(ASSISTANT_HEADER, start)) != -1:
        start = at + len(ASSISTANT_HEADER)
        cuts.append(start)
        opening = next((p for p in (EMPTY_THINK, OPEN_THINK) if text.startswith(p, start)), None)
        if opening:
            cuts.append(start + len(opening))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def count_markers(messages: list[dict], marker: str = IMAGE_MARKER) -> int:
    """`<image>` (or other) markers in the messages that can hold images (every role but system)."""
    return sum(m["content"].count(marker) for m in messages
               if m.get("role") != "system" and isinstance(m.get("content"), str))


def image_grids(images: int | Sequence[Grid]) -> list[Grid]:
    """`images` as one tile grid per image: a count means that many one-square images."""
    return [(1, 1)] * images if isinstance(images, int) else [tuple(grid) for grid in images]


def expand_markers(messages: list[dict], grids: list[Grid], image_token_len: int) -> list[dict]:
    """Each `<image>` of a non-system string content replaced, in order, by the placeholder of its grid."""
    placeholders = iter([image_placeholder(grid, image_token_len) for grid in grids])
    expanded = []
    for message in messages:
        content = message.get("content")
        if message.get("role") == "system" or not isinstance(content, str) or IMAGE_MARKER not in content:
            expanded.append(message)
            continue
        expanded.append({**message, "content": expand_image_markers(content, placeholders)})
    return expanded


class ChatEncoder:
    """Conversations -> `Encoded`, for a tokenizer and `image_token_len` placeholders per image (0: a text
    model, for which `<image>` is ordinary text and images are refused)."""

    def __init__(self, tokenizer, image_token_len: int = 0):
        self.tokenizer = tokenizer
        self.image_token_len = image_token_len
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.begin = np.array(self._tokenize([ASSISTANT_HEADER]), dtype=np.int64)
        self.end = np.array(self._tokenize([TURN_END]), dtype=np.int64)

    def _tokenize(self, pieces: list[str]) -> list[int]:
        return list(chain.from_iterable(self.tokenizer(pieces, add_special_tokens=False).input_ids))

    def render(self, messages: list[dict], images: int | Sequence[Grid] = 0, tools: list | None = None,
               generation_prompt: bool = False, open_thinking: bool = False) -> str:
        """The template text, `<image>` markers expanded (`images`: a count of one-square images, or each
        image's tile grid); EncodingError when markers and images disagree, the template cannot render the
        messages, or the text cannot be encoded."""
        grids = image_grids(images)
        if self.image_token_len:
            markers = count_markers(messages)
            if markers != len(grids):
                raise EncodingError("image_mismatch", f"the messages have {markers} {IMAGE_MARKER} marker(s) but "
                                                      f"{len(grids)} image(s) were given")
            messages = expand_markers(messages, grids, self.image_token_len)
        elif grids:
            raise EncodingError("image_mismatch", "this model has no vision tower, so it cannot read images")
        try:
            text = render_chat(self.tokenizer, messages, tools=tools, add_generation_prompt=generation_prompt,
                               open_thinking=open_thinking)
        except (TemplateError, TypeError, ValueError, RecursionError) as err:
            # tool calls of an unexpected shape; contents or tools nested past the recursion limit
            raise EncodingError("bad_conversation", f"the chat template cannot render the messages: {err}") from err
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise EncodingError("invalid_text", "the text holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                                    "escape), which no tokenizer can encode") from err
        return text

    def encode(self, messages: list[dict], images: int | Sequence[Grid] = 0, tools: list | None = None,
               generation_prompt: bool = False, open_thinking: bool = False,
               drop_empty_think: bool = False) -> Encoded:
        """Encode a conversation (for training) or a prompt (`generation_prompt`, optionally thinking first).
        `drop_empty_think` removes every empty think block (the reference's training augmentation)."""
        grids = image_grids(images)
        squares = sum(grid_tiles(grid) for grid in grids)
        text = self.render(messages, grids, tools, generation_prompt, open_thinking)
        if drop_empty_think:
            text = text.replace(EMPTY_THINK, "")
        ids = np.array(self._tokenize(turn_pieces(text)), dtype=np.int64)
        if self.image_token_len and np.count_nonzero(ids == self.image_id) != squares * self.image_token_len:
            raise EncodingError("image_mismatch", f"the text itself contains image placeholder tokens "
                                                  f"({IMAGE_TOKEN}); use {IMAGE_MARKER} markers with images instead")
        if generation_prompt:
            labels = np.full_like(ids, IGNORE)
        else:
            labels = assistant_labels(ids, self.begin, self.end)
            labels[:1] = IGNORE
        return Encoded(ids, labels, len(grids), squares)
