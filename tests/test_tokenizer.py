"""Tokenizer loading, the chat template, image markers and tokenizer training."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minimind_v.tokenizer import (
    ADDED_TOKENS,
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    expand_image_markers,
    load_tokenizer,
    render_chat,
)

from conftest import CORPUS, reference_path

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                           "parameters": {"type": "object", "properties": {"city": {}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
     {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nans"},
     {"role": "system", "content": "late"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x", "reasoning_content": "\nR\n"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
         {"name": "second", "arguments": "{\"a\": 1}"}]},
     {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "windy"},
     {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "text", "tool_calls": [
        {"name": "f", "arguments": {}}]}, {"role": "tool", "content": "t"}],
    [{"role": "user", "content": ["not", "a string"]}, {"role": "assistant", "content": None}],
]


@pytest.fixture(scope="module")
def reference_tokenizer():
    return load_tokenizer(str(reference_path("upstream_tokenizer")))


def test_reference_tokenizer_encodings(reference_tokenizer):
    encode = lambda text: reference_tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert len(reference_tokenizer) == 6400
    assert encode("<|im_start|>assistant\n") == [1, 1388, 570, 811, 234]
    assert encode("<|im_end|>\n") == [2, 234]
    assert encode("<think>\n\n</think>\n\n") == [25, 234, 234, 26, 234, 234]
    assert encode(expand_image_markers("<image>", 3)) == [12, 12, 12]
    assert reference_tokenizer.decode([25, 26, 12, 1, 2], skip_special_tokens=True) == "<think></think>"


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_renders_like_the_reference(reference_tokenizer, conversation, tools):
    for add_generation_prompt in (False, True):
        for open_thinking in (False, True):
            kwargs = dict(tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                          open_thinking=open_thinking)
            expected = reference_tokenizer.apply_chat_template(conversation, **kwargs)
            assert reference_tokenizer.apply_chat_template(conversation, chat_template=CHAT_TEMPLATE,
                                                           **kwargs) == expected


def test_generation_prompt_thinking_switch(tiny_tokenizer):
    messages = [{"role": "user", "content": "Q"}]
    off = render_chat(tiny_tokenizer, messages, add_generation_prompt=True)
    on = render_chat(tiny_tokenizer, messages, add_generation_prompt=True, open_thinking=True)
    assert off == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_trained_tokenizer_has_the_fixed_special_ids(tiny_tokenizer):
    assert tiny_tokenizer.convert_ids_to_tokens(list(range(36))) == SPECIAL_TOKENS + ADDED_TOKENS
    assert tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == 12
    assert tiny_tokenizer.eos_token_id == 2 and tiny_tokenizer.bos_token_id == 1 and tiny_tokenizer.pad_token_id == 0
    ids = tiny_tokenizer("<think>x</think><|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == 25 and ids[-1] == 2
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"
    text = "图片里有一个绿色的三角形"
    assert tiny_tokenizer.decode(tiny_tokenizer(text).input_ids) == text


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_train_tokenizer_command(tmp_path, kind):
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n".join(CORPUS), encoding="utf-8")
    elif kind == "jsonl":
        lines = [json.dumps({"conversations": [{"role": "user", "content": t}, {"role": "assistant", "content": t}]},
                            ensure_ascii=False) for t in CORPUS]
        path.write_text("\n".join(lines), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": CORPUS}), path)
    out = tmp_path / "tok"
    subprocess.run([sys.executable, "-m", "minimind_v", "train-tokenizer", "--data_path", str(path),
                    "--out_dir", str(out), "--vocab_size", "500"], check=True, capture_output=True)
    tokenizer = load_tokenizer(str(out))
    assert 36 + 256 < len(tokenizer) <= 500  # merges stop early when the corpus runs out of pairs
    assert render_chat(tokenizer, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_train_tokenizer_reports_a_missing_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minimind_v", "train-tokenizer", "--data_path",
                             str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert result.returncode != 0 and "no such file" in result.stderr


def test_load_tokenizer_rejects_a_folder_without_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
