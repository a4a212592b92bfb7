"""`MiniMindVProcessor`: the `AutoProcessor` of exported MiniMind-V folders (tokenizer + image preprocessing + a
chat template that understands `{"type": "image"}` content parts).

`processor.apply_chat_template(messages, add_generation_prompt=True)` renders each image part as an `<image>`
marker; `processor(images=..., text=...)` expands every marker into its image's placeholder (`image_token_len`
`<|image_pad|>` tokens per square: one square, or with `max_tiles` > 1 a thumbnail and a grid of tiles) and
returns input_ids, attention_mask and pixel_values, which `model.generate(**inputs)` accepts as they are.

This module is copied into exported folders for `trust_remote_code`, so it imports only sibling model modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin, SiglipImageProcessorPil

from .config import IMAGE_MARKER, VLMConfig
from .vision import ImagePreprocessor, expand_image_markers, image_placeholder

# Put in front of a chat template: messages whose content is a list of parts are rewritten with a string content,
# text parts as they are and each image part as `{image}`, so any template written for string contents renders
# them. Other messages pass unchanged. The comments delimit the block, which is replaced when present.
FLATTEN_BEGIN, FLATTEN_END = "{#- minimind-v: content parts -> text #}", "{#- minimind-v: end -#}"
FLATTEN_BLOCK = FLATTEN_BEGIN + """
{%- set flat = namespace(messages=[]) %}
{%- for message in messages %}
    {%- if message.content is string or message.content is not defined or message.content is none %}
        {%- set flat.messages = flat.messages + [message] %}
    {%- else %}
        {%- set parts = namespace(text='') %}
        {%- for part in message.content %}
            {%- if part.type == 'text' %}{%- set parts.text = parts.text + part.text %}
            {%- elif part.type in ('image', 'image_url') %}{%- set parts.text = parts.text + '{image}' %}{%- endif %}
        {%- endfor %}
        {%- set flat.messages = flat.messages + [{'role': message.role, 'content': parts.text,
            'reasoning_content': message.reasoning_content, 'tool_calls': message.tool_calls}] %}
    {%- endif %}
{%- endfor %}
{%- set messages = flat.messages %}
""" + FLATTEN_END


def multimodal_chat_template(template: str, image_text: str = IMAGE_MARKER) -> str:
    """`template` with list contents rendered part by part, each image part as `image_text`. String contents
    render exactly as before."""
    if FLATTEN_BEGIN in template:
        template = template[template.index(FLATTEN_END) + len(FLATTEN_END):]
    return FLATTEN_BLOCK.replace("{image}", image_text) + template


class MiniMindVProcessor(ProcessorMixin):
    """Tokenizer + image preprocessing for MiniMind-V.

    Pixel values come from `vision.ImagePreprocessor` (the engine's own preprocessing) with the image processor's
    size, mean, std and resample, so they are bit-identical to the engine's whichever backend transformers picks
    for `image_processor`.
    """

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, image_token_len: int = 64,
                 max_tiles: int = 1):
        self.image_token_len = image_token_len
        self.max_tiles = max_tiles
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        size = image_processor.size
        self.preprocess = ImagePreprocessor(size["height"], image_processor.image_mean, image_processor.image_std,
                                            int(image_processor.resample), max_tiles)

    @classmethod
    def from_config(cls, config: VLMConfig, tokenizer) -> MiniMindVProcessor:
        """The processor of a model with this config, around `tokenizer` (its chat template made multimodal)."""
        image_processor = SiglipImageProcessorPil(
            size={"height": config.image_size, "width": config.image_size}, resample=config.image_resample,
            image_mean=config.image_mean, image_std=config.image_std,
        )
        template = multimodal_chat_template(tokenizer.chat_template) if tokenizer.chat_template else None
        return cls(image_processor, tokenizer, chat_template=template, image_token_len=config.image_token_len,
                   max_tiles=config.max_tiles)

    def __call__(self, images=None, text: str | Sequence[str] | None = None, **kwargs) -> BatchFeature:
        """text: one prompt or a batch, with one `<image>` marker per image; images: one image, a flat list (in
        marker order across the batch) or one list per prompt (PIL images, paths or URLs). Other keyword
        arguments go to the tokenizer (padding is on the left, for generation).

        Returns input_ids and attention_mask [B, T] and, when there are images, pixel_values [B, N, 3, S, S]
        (N squares in every prompt), or a list of B tensors [N_b, 3, S, S] when the prompts hold different counts.
        """
        if text is None:
            raise ValueError(f"text is required: the prompt, with one {IMAGE_MARKER} marker per image")
        texts = [text] if isinstance(text, str) else list(text)
        rows = self._image_rows(images, [t.count(IMAGE_MARKER) for t in texts])
        return_tensors = kwargs.pop("return_tensors", None)
        kwargs.setdefault("add_special_tokens", False)
        kwargs.setdefault("padding_side", "left")
        expanded = [self._expand(t, row) for t, row in zip(texts, rows)]
        data = dict(self.tokenizer(expanded, **kwargs))
        if any(rows):
            pixels = [self.preprocess(row) for row in rows]
            same = len({p.shape[0] for p in pixels}) == 1
            data["pixel_values"] = torch.stack(pixels) if same else pixels
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["pixel_values"])

    def _expand(self, text: str, images: list[Image.Image]) -> str:
        """Each marker of `text` replaced by the placeholder of its image, in order."""
        return expand_image_markers(
            text, (image_placeholder(self.preprocess.grid(image), self.image_token_len) for image in images))

    def _image_rows(self, images, counts: list[int]) -> list[list[Image.Image]]:
        """Images grouped by prompt, checked against the markers of each prompt."""
        if images is None:
            images = []
        if not isinstance(images, (list, tuple)):
            images = [images]
        images = self.image_processor.fetch_images(list(images))
        nested = len(images) == len(counts) and all(isinstance(row, (list, tuple)) for row in images)
        if nested:
            rows = [list(row) for row in images]
        else:
            if len(images) != sum(counts):
                raise ValueError(f"the text has {sum(counts)} {IMAGE_MARKER} marker(s) but {len(images)} image(s) "
                                 "were given")
            starts = np.cumsum([0, *counts])
            rows = [list(images[a:b]) for a, b in zip(starts, starts[1:])]
        for b, (row, count) in enumerate(zip(rows, counts)):
            if len(row) != count:
                raise ValueError(f"prompt {b} has {count} {IMAGE_MARKER} marker(s) but {len(row)} image(s)")
        return [[image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)) for image in row]
                for row in rows]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


MiniMindVProcessor.register_for_auto_class()
