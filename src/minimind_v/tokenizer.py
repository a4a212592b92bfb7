"""Tokenizer and chat format: loading reference-format tokenizer folders, the MiniMind chat template and its
delimiters, rendering conversations, expanding `<image>` markers, and training a new byte-level BPE tokenizer.

Ids 0-35 are fixed special tokens in every tokenizer (id 12 is `<|image_pad|>`, the image placeholder). Every
delimiter of the chat format is spelled here once; `chat_encoder` turns conversations into ids with them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from transformers import PreTrainedTokenizerFast

from .config import IMAGE_MARKER, IMAGE_TOKEN, IMAGE_TOKEN_ID

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = IM_START + "assistant\n"  # the reference label rule supervises from after this ...
TURN_END = IM_END + "\n"  # ... through this
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
OPEN_THINK = THINK_OPEN + "\n"  # a generation prompt with thinking on ends here
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"  # ... with thinking off, here

# Ids 0-20 are special (skipped when decoding with skip_special_tokens); 21-35 are ordinary added tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    IMAGE_TOKEN, "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<tts_pad>",
    "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
]
ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", THINK_OPEN, THINK_CLOSE,
    *(f"<|buffer{i}|>" for i in range(1, 10)),
]

# The MiniMind chat template (same output as the reference one): every assistant turn carries a think block,
# empty when there is no reasoning; `open_thinking` opens one in the generation prompt.
CHAT_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}{{- '\n' ~ (tool | tojson) }}{%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if message.reasoning_content is not string and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if content or not loop.first %}{{- '\n' }}{%- endif %}
            {%- set call = tool_call.function if tool_call.function else tool_call %}
            {%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson %}
            {{- '<tool_call>\n{"name": "' ~ call.name ~ '", "arguments": ' ~ arguments ~ '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {{- '<think>\n' if open_thinking is defined and open_thinking is true else '<think>\n\n</think>\n\n' }}
{%- endif %}
""".strip()


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder (reference format: tokenizer.json + tokenizer_config.json)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"no tokenizer.json in {path!r}: pass --tokenizer with a folder made by `minimind-v train-tokenizer` "
            "or the reference model/ folder"
        )
    # Not AutoTokenizer: in an exported model folder it would read config.json and ask to trust remote code.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID:
        raise ValueError(f"{path!r} does not map {IMAGE_TOKEN} to id {IMAGE_TOKEN_ID}; it is not a MiniMind tokenizer")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render_chat(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False,
                open_thinking: bool = False) -> str:
    """Conversation -> prompt text with the tokenizer's chat template."""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
        open_thinking=open_thinking,
    )


def expand_image_markers(text: str, image_token_len: int, marker: str = IMAGE_MARKER) -> str:
    """Replace each `<image>` marker by `image_token_len` consecutive `<|image_pad|>` tokens."""
    return text.replace(marker, IMAGE_TOKEN * image_token_len)


def texts_for_tokenizer(path: str, max_samples: int | None = None) -> Iterator[str]:
    """Training text from a .txt (one sample per line), .jsonl or .parquet file. Records may hold a `text`
    field or `conversations` (a list, or a JSON string, of messages whose contents are joined by newlines)."""
    count = 0
    for record in _records(path):
        text = _record_text(record)
        if text:
            yield text
            count += 1
            if max_samples and count >= max_samples:
                return


def _records(path: str) -> Iterator[dict | str]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        columns = [c for c in ("text", "conversations") if c in parquet.schema_arrow.names]
        if not columns:
            raise ValueError(f"{path}: needs a `text` or `conversations` column, found {parquet.schema_arrow.names}")
        for batch in parquet.iter_batches(columns=columns, batch_size=1024):
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if path.endswith(".jsonl"):
                if line.strip():
                    yield json.loads(line)
            else:
                yield line.rstrip("\n")


def _record_text(record: dict | str) -> str:
    if isinstance(record, str):
        return record
    if record.get("text"):
        return record["text"]
    conversations = record.get("conversations") or []
    if isinstance(conversations, str):
        conversations = json.loads(conversations)
    return "\n".join(m["content"] for m in conversations if isinstance(m.get("content"), str) and m["content"])


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 6400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with the MiniMind special tokens at ids 0-35 and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    all_added = SPECIAL_TOKENS + ADDED_TOKENS
    if vocab_size < len(all_added) + 256:
        raise ValueError(f"vocab_size must be at least {len(all_added) + 256} (special tokens plus 256 bytes)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=all_added, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    for token in all_added:
        if bpe.token_to_id(token) != all_added.index(token):
            raise RuntimeError(f"special token {token} did not get id {all_added.index(token)}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=IM_START, eos_token=IM_END, pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False, model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    _mark_ordinary(os.path.join(out_dir, "tokenizer.json"))
    return load_tokenizer(out_dir)


def _mark_ordinary(tokenizer_json: str) -> None:
    """Tool, think and buffer tokens stay whole but are not `special`, so decoding keeps `<think>`."""
    with open(tokenizer_json, encoding="utf-8") as f:
        data = json.load(f)
    for token in data["added_tokens"]:
        token["special"] = token["content"] in SPECIAL_TOKENS
    with open(tokenizer_json, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def add_arguments(parser) -> None:
    parser.add_argument("--data_path", nargs="+", required=True,
                        help="text (.txt, one sample per line), .jsonl or .parquet files")
    parser.add_argument("--out_dir", default="model", help="where tokenizer.json and tokenizer_config.json go")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--max_samples", type=int, default=None, help="read at most this many samples per file")


def main(args) -> None:
    def texts() -> Iterator[str]:
        for path in args.data_path:
            if not os.path.isfile(path):
                raise SystemExit(f"train-tokenizer: no such file: {path}")
            yield from texts_for_tokenizer(path, args.max_samples)

    tokenizer = train_tokenizer(texts(), args.out_dir, args.vocab_size)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out_dir}")
