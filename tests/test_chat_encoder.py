"""The one chat encoder: a prompt is token-identical in training and in inference, whatever the tokenizer merges."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from minimind_v.chat_encoder import IGNORE, ChatEncoder, EncodingError, turn_pieces
from minimind_v.data import DataConfig, sample_builder
from minimind_v.generate import ChatRequest, Engine
from minimind_v.tokenizer import render_chat, train_tokenizer

TOOLS = [{"type": "function", "function": {"name": "count", "parameters": {"type": "object"}}}]
CONVERSATIONS = [  # (messages, images, tools, open_thinking): the last message is the answer to predict
    ([{"role": "user", "content": "<image>\nWhat colour is the circle?"},
      {"role": "assistant", "content": "red"}], 1, None, False),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What is it?\n<image>"}, {"role": "assistant", "content": "A red circle."},
      {"role": "user", "content": "And this one? <image>"}, {"role": "assistant", "content": "  A blue square."}],
     2, None, False),
    ([{"role": "user", "content": "图片里有几个形状？<image>"},
      {"role": "assistant", "content": "三个", "reasoning_content": "I count them: one, two, three."}], 1, None, True),
    ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "How many?"},
      {"role": "assistant", "content": "",
       "tool_calls": [{"name": "count", "arguments": {}}]},
      {"role": "tool", "content": "3"}, {"role": "assistant", "content": "\n\nThree."}], 0, TOOLS, False),
]


@pytest.fixture(scope="module")
def merging_tokenizer(tmp_path_factory):
    """A tokenizer that learned "\\n\\n" as one token: text tokenised whole splits the blank line before an
    answer differently from a prompt that ends with it."""
    texts = ["The answer is yes.\n\n", "Q: what?\n\n", "hello world\n\n  indented"] * 200
    tokenizer = train_tokenizer(texts, str(tmp_path_factory.mktemp("merging")), vocab_size=400)
    assert len(tokenizer("\n\n", add_special_tokens=False).input_ids) == 1
    return tokenizer


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("which", ["tiny", "merging"])
def test_a_prompt_is_token_identical_in_training_and_in_inference(case, which, tiny_vlm, tiny_tokenizer,
                                                                   merging_tokenizer):
    tokenizer = tiny_tokenizer if which == "tiny" else merging_tokenizer
    messages, images, tools, thinking = CONVERSATIONS[case]
    config = DataConfig(paths=[], kind="chat", max_seq_len=4096, image_token_len=64, add_system_ratio=0,
                        empty_think_ratio=1.0)
    conversations = [{**messages[0], "tools": json.dumps(tools)}, *messages[1:]] if tools else messages  # data form
    record = {"conversations": json.dumps(conversations, ensure_ascii=False), "image_bytes": [png()] * images}
    trained = sample_builder(config, tokenizer, tiny_vlm.image_processor).build(record, random.Random(0))
    request = ChatRequest(messages[:-1], [Image.new("RGB", (64, 64))] * images, thinking, tools)
    prompt = Engine(tiny_vlm, tokenizer).prepare(request).ids
    assert trained.ids[:len(prompt)].tolist() == prompt
    answer = tokenizer.decode(trained.ids[len(prompt):])
    assert answer.endswith("<|im_end|>\n") and tokenizer.decode(trained.ids[trained.labels != IGNORE]).endswith(answer)
    if which == "merging" and not thinking:  # what tokenising the whole text would have given
        text = render_chat(tokenizer, messages, tools=tools)
        whole = tokenizer(text.replace("<image>", "<|image_pad|>" * 64), add_special_tokens=False).input_ids
        assert whole[:len(prompt)] != prompt


def test_pieces_cut_where_a_generation_prompt_ends():
    text = ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nwhy\n</think>\n\nB<|im_end|>\n")
    assert turn_pieces(text) == [
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\n",
        "A<|im_end|>\n<|im_start|>assistant\n", "<think>\n", "why\n</think>\n\nB<|im_end|>\n"]
    assert "".join(turn_pieces(text)) == text


def test_labels_supervise_the_assistant_turns_only(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, image_token_len=4)
    messages = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]
    encoded = encoder.encode(messages, images=1)
    assert np.count_nonzero(encoded.ids == 12) == 4 and encoded.images == 1
    supervised = tiny_tokenizer.decode(encoded.ids[encoded.labels != IGNORE])
    assert supervised == "<think>\n\n</think>\n\nhello<|im_end|>\n<think>\n\n</think>\n\nok<|im_end|>\n"
    prompt = encoder.encode(messages[:1], images=1, generation_prompt=True)
    assert np.all(prompt.labels == IGNORE)
    with pytest.raises(EncodingError, match="1 <image> marker"):
        encoder.encode(messages, images=2)
    with pytest.raises(EncodingError, match="no vision tower"):
        ChatEncoder(tiny_tokenizer).encode(messages, images=1)
