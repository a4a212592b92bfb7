"""The generation engine: parity of greedy ids, cache == no cache, batching == alone, sampling seeds, limits,
stop strings, UTF-8-safe streaming, reasoning split, cancellation, images encoded once, `model.generate`."""

import random
from types import SimpleNamespace

import pytest
import torch

from minimind_v.config import MiniMindConfig, preset_config
from minimind_v.generate import (
    ChatRequest,
    Decoder,
    Engine,
    GenerationConfig,
    PromptTooLong,
    ThinkingSplitter,
    split_thinking,
)
from minimind_v.llm import MiniMindForCausalLM

from conftest import GREEDY, photo, reference_path


def decode_all(decoder: Decoder) -> torch.Tensor:
    """Every new token of a Decoder: [B, steps]."""
    steps = []
    while not decoder.done:
        steps.append(decoder.step())
    return torch.stack(steps, dim=1)


@pytest.fixture(scope="module", params=["dense", "moe"])
def parity_case(request):
    io = torch.load(reference_path("parity", f"{request.param}_io.pt"), weights_only=True)
    model = MiniMindForCausalLM(MiniMindConfig(**io["config"]))
    model.load_state_dict(torch.load(reference_path("parity", f"{request.param}_state_dict.pth"), weights_only=True))
    return model.eval(), io


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_decoding_reproduces_reference_ids(parity_case, use_cache):
    model, io = parity_case
    prompt, expected = io["input_ids"], io["greedy_generate_ids"]
    config = GenerationConfig(max_new_tokens=expected.shape[1] - prompt.shape[1], **GREEDY)
    new = decode_all(Decoder(model, prompt, None, [config] * prompt.shape[0], use_cache=use_cache))
    assert torch.equal(torch.cat([prompt, new], dim=1), expected)


def requests_of_different_lengths() -> list[ChatRequest]:
    return [
        ChatRequest([{"role": "user", "content": "hi"}]),
        ChatRequest([{"role": "user", "content": "Describe the image. A small purple square sits at the top."}],
                    [photo(0)]),
        ChatRequest([{"role": "user", "content": "<image> and <image>: 图片里有一个绿色的三角形"}],
                    [photo(1), photo(2)]),
    ]


def test_cached_decoding_equals_recomputing_everything(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    requests = requests_of_different_lengths()
    prepared = [engine.prepare(r) for r in requests]
    ids, mask = engine._batch([p.ids for p in prepared])
    pixels = engine._pixels([p.images for p in prepared])
    configs = [GenerationConfig(max_new_tokens=12, **GREEDY)] * len(requests)
    cached = decode_all(Decoder(lively_vlm, ids, mask, configs, pixels))
    recomputed = decode_all(Decoder(lively_vlm, ids, mask, configs, pixels, use_cache=False))
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0].tolist())) > 3  # the model really produces varied tokens


def test_left_padded_batch_equals_each_row_alone(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    requests = requests_of_different_lengths()
    config = GenerationConfig(max_new_tokens=16, **GREEDY)
    batched = engine.generate(requests, config)
    for request, together in zip(requests, batched):
        alone = engine.generate([request], config)[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text


def test_rows_keep_their_own_sampling_settings(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    request = requests_of_different_lengths()[1]
    greedy = GenerationConfig(max_new_tokens=10, **GREEDY)
    sampled = GenerationConfig(max_new_tokens=10, temperature=1.5, top_p=1.0, top_k=0, seed=3, eos_token_id=None)
    mixed = engine.generate([request, request], [sampled, greedy])
    assert mixed[1].token_ids == engine.generate([request], greedy)[0].token_ids
    assert mixed[0].token_ids == engine.generate([request], sampled)[0].token_ids
    assert mixed[0].token_ids != mixed[1].token_ids


def test_seed_makes_sampling_reproducible(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    request = requests_of_different_lengths()[0]
    config = lambda seed: GenerationConfig(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=seed,
                                           eos_token_id=None)
    first, again, other = (engine.generate([request], config(s))[0].token_ids for s in (7, 7, 8))
    assert first == again
    assert first != other


def test_max_new_tokens_is_honoured(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    completions = engine.generate(requests_of_different_lengths(),
                                  [GenerationConfig(max_new_tokens=n, **GREEDY) for n in (1, 5, 9)])
    assert [c.completion_tokens for c in completions] == [1, 5, 9]
    assert [len(c.token_ids) for c in completions] == [1, 5, 9]
    assert {c.finish_reason for c in completions} == {"length"}


def test_prompt_limit_and_image_count_are_checked(lively_vlm, tiny_tokenizer):
    request = requests_of_different_lengths()[1]
    with pytest.raises(PromptTooLong, match="more than the limit of 50"):
        Engine(lively_vlm, tiny_tokenizer, max_prompt_tokens=50).prepare(request)
    with pytest.raises(ValueError, match="2 <image> marker"):
        Engine(lively_vlm, tiny_tokenizer).prepare(ChatRequest(requests_of_different_lengths()[2].messages,
                                                                  [photo(0)]))
    with pytest.raises(ValueError, match="placeholder tokens"):
        Engine(lively_vlm, tiny_tokenizer).prepare(ChatRequest([{"role": "user", "content": "<|image_pad|>hi"}]))


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: whatever the input, step k's logits pick `script[k]` (then eos)."""

    def __init__(self, vocab_size: int, script: list[int], eos: int = 2):
        super().__init__()
        self.config = preset_config("tiny", vocab_size=vocab_size)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script = script + [eos]
        self.calls = 0

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


def stream_reply(tokenizer, text: str, config: GenerationConfig, open_thinking: bool = False):
    """Force the tokens of `text` through the engine: (events, completion)."""
    model = ScriptedModel(len(tokenizer), tokenizer.encode(text, add_special_tokens=False))
    request = ChatRequest([{"role": "user", "content": "?"}], open_thinking=open_thinking)
    events = list(Engine(model, tokenizer).stream(request, config))
    return events[:-1], events[-1].completion


def test_chinese_streams_without_broken_characters(tiny_tokenizer):
    text = "图片里有一个绿色的三角形，鬱鬱蔥蔥的森林 and 🌲 trees."
    assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) > len(text)  # characters span tokens
    events, completion = stream_reply(tiny_tokenizer, text, GenerationConfig(**GREEDY | {"eos_token_id": 2}))
    deltas = [e.content for e in events]
    assert len(deltas) > 10
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == completion.text == text
    assert completion.finish_reason == "stop"


@pytest.mark.parametrize("stop", ["World", "orl", "ld!"])
def test_stop_strings_end_the_reply_and_are_never_streamed(tiny_tokenizer, stop):
    text = "Hello World! This goes on."
    events, completion = stream_reply(tiny_tokenizer, text, GenerationConfig(do_sample=False, stop=[stop, "zzz"]))
    streamed = "".join(e.content for e in events)
    assert streamed == completion.text == text[: text.index(stop)]
    assert completion.finish_reason == "stop"


def test_reasoning_and_answer_stream_separately(tiny_tokenizer):
    text = "The picture is\n green.\n</think>\n\nIt is a green triangle."
    events, completion = stream_reply(tiny_tokenizer, text, GenerationConfig(do_sample=False), open_thinking=True)
    assert "".join(e.reasoning for e in events) == completion.reasoning == "The picture is\n green."
    assert "".join(e.content for e in events) == completion.text == "It is a green triangle."


@pytest.mark.parametrize("open_thinking, text, expected", [
    (True, "a\n</think>\n\nb", ("a", "b")),
    (True, "<think>\nstill thinking\n", ("still thinking", "")),
    (False, "plain answer </think> here", (None, "plain answer </think> here")),
    (False, "\n<think>\nhmm\n</think>\nanswer", ("hmm", "answer")),
    (False, "<thin", (None, "<thin")),
    (False, "", (None, "")),
])
def test_split_thinking(open_thinking, text, expected):
    assert split_thinking(text, open_thinking) == expected


@pytest.mark.parametrize("open_thinking", [True, False])
def test_thinking_splitter_agrees_with_split_thinking_for_any_chunking(open_thinking):
    texts = ["a\n</think>\n\nb", "<think>\nx<th<think>y\n\n</think>\n\n\nz\n", "\n\n<think>r</think>a", "<thin",
             "</thinx> and </think", "no tags at all\n\n", "\n<", "<think>\n\n</think>\n\n"]
    rng = random.Random(0)
    for text in texts:
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 5))))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            splitter = ThinkingSplitter(open_thinking)
            parts = [splitter.push(p) for p in pieces] + [splitter.push("", final=True)]
            reasoning, answer = split_thinking(text, open_thinking)
            assert "".join(r for r, _ in parts) == (reasoning or "")
            assert "".join(a for _, a in parts) == answer


def test_cancelled_row_stops_and_others_continue(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    requests = requests_of_different_lengths()[:2]
    config = GenerationConfig(max_new_tokens=8, **GREEDY)
    completions = {}
    for event in engine.run(requests, config, cancelled=lambda row: row == 0):
        if event.completion is not None:
            completions[event.row] = event.completion
    assert completions[0].finish_reason == "cancelled" and completions[0].completion_tokens == 1
    assert completions[1].token_ids == engine.generate([requests[1]], config)[0].token_ids


def count_image_encodings(model, monkeypatch) -> list[int]:
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: calls.append(pixels.shape[0]) or original(pixels))
    return calls


def test_images_are_encoded_once_at_prefill(lively_vlm, tiny_tokenizer, monkeypatch):
    calls = count_image_encodings(lively_vlm, monkeypatch)
    Engine(lively_vlm, tiny_tokenizer).generate(requests_of_different_lengths(),
                                                GenerationConfig(max_new_tokens=6, **GREEDY))
    assert calls == [3]  # one tower call for the three images of the batch, none while decoding


def test_model_generate_reference_arguments(lively_vlm, tiny_tokenizer, monkeypatch):
    engine = Engine(lively_vlm, tiny_tokenizer)
    request = requests_of_different_lengths()[1]
    input_ids = torch.tensor([engine.prepare(request).ids])
    pixel_values = {"pixel_values": lively_vlm.image_processor(request.images)}

    class Streamer:
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, ids):
            self.puts.append(ids)

        def end(self):
            self.ended += 1

    streamer = Streamer()
    calls = count_image_encodings(lively_vlm, monkeypatch)
    out = lively_vlm.generate(input_ids, max_new_tokens=50, max_length=input_ids.shape[1] + 7, do_sample=False,
                              eos_token_id=None, streamer=streamer, pixel_values=pixel_values,
                              attention_mask=torch.ones_like(input_ids))
    assert out.shape == (1, input_ids.shape[1] + 7)
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids)
    assert calls == [1]
    assert torch.equal(streamer.puts[0], input_ids) and streamer.ended == 1
    assert torch.equal(torch.stack(streamer.puts[1:], dim=1), out[:, input_ids.shape[1]:])

    repeated = lively_vlm.generate(input_ids=input_ids, num_return_sequences=3, max_new_tokens=5, top_k=0,
                                   temperature=1.5, top_p=1.0, eos_token_id=None, pixel_values=pixel_values)
    assert repeated.shape == (3, input_ids.shape[1] + 5)
    greedy = lively_vlm.generate(input_ids, num_return_sequences=2, max_new_tokens=5, do_sample=False,
                                 pixel_values=pixel_values, eos_token_id=None)
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[:1], out[:, : input_ids.shape[1] + 5])
