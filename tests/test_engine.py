"""Continuous batching: requests that join a running batch at different steps (different prompt lengths, with and
without images) get exactly the tokens they get alone; KV memory follows each request's prompt and max_tokens and
is trimmed when rows leave; a request joins the server's batch while others decode; bf16 weights packed for the
CPU decode as plain bf16 ones; `--dtype` on every inference command."""

import asyncio

import pytest
import torch

from minimind_v import cli
from minimind_v.distributed import native_cpu_bf16
from minimind_v.generate import (
    ChatRequest,
    Decoder,
    Engine,
    GenerationConfig,
    PackedLinear,
    RunningBatch,
    pack_linear_weights,
)
from minimind_v.lora import add_lora

from conftest import GREEDY, photo


def user(text: str, images: int = 0) -> list[dict]:
    return [{"role": "user", "content": "<image>" * images + text}]


# (joins before step, request, max_new_tokens): short and long prompts, none / one / two images; the third joins
# with a prompt longer than the batch's history, the fourth shorter; the last joins after every other row ended.
ARRIVALS = [
    (0, ChatRequest(user("hi")), 6),
    (0, ChatRequest(user("Describe the image. A small purple square sits at the top.", 1), [photo(0)]), 12),
    (
        2,
        ChatRequest(
            user("Compare them. 图片里有一个绿色的三角形和一个黄色的圆。 What colour is the triangle?", 2),
            [photo(1), photo(2)],
        ),
        9,
    ),
    (4, ChatRequest(user("red?")), 5),
    (4, ChatRequest(user("Where is the red circle?", 1), [photo(3)]), 7),
    (20, ChatRequest(user("Is there a star in the picture?")), 4),
]


def run_arrivals(engine: Engine, arrivals) -> dict:
    """Drive a RunningBatch step by step, adding each request before its step: {key: (completion, streamed)}."""
    batch, results, streamed, step = RunningBatch(engine), {}, {}, 0
    while batch or step <= max(at for at, _, _ in arrivals):
        for key, (at, request, tokens) in enumerate(arrivals):
            if at == step:
                batch.add(key, request, GenerationConfig(max_new_tokens=tokens, **GREEDY))
        for event in batch.step() if batch else []:
            streamed[event.row] = streamed.get(event.row, "") + event.content
            if event.completion is not None:
                results[event.row] = (event.completion, streamed[event.row])
        step += 1
    return results


def test_requests_joining_at_different_steps_get_their_tokens_alone(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    results = run_arrivals(engine, ARRIVALS)
    assert sorted(results) == list(range(len(ARRIVALS)))
    for key, (_, request, tokens) in enumerate(ARRIVALS):
        alone = engine.generate([request], GenerationConfig(max_new_tokens=tokens, **GREEDY))[0]
        together, streamed = results[key]
        assert together.token_ids == alone.token_ids, key
        assert together.text == alone.text == streamed
        assert together.finish_reason == "length" and together.completion_tokens == tokens
    assert len({tuple(c.token_ids[:4]) for c, _ in results.values()}) > 3  # the rows really differ


def test_joined_rows_keep_their_own_sampling(lively_vlm, tiny_tokenizer):
    """Seeded sampling and the repetition penalty give the same tokens whether a row runs alone or joins later."""
    engine = Engine(lively_vlm, tiny_tokenizer)
    configs = [
        GenerationConfig(max_new_tokens=10, temperature=1.3, top_p=0.9, top_k=20, seed=5, eos_token_id=None),
        GenerationConfig(max_new_tokens=8, repetition_penalty=1.3, **GREEDY),
        GenerationConfig(max_new_tokens=6, **GREEDY),
    ]
    requests = [
        ChatRequest(user("How many shapes are there?")),
        ChatRequest(user("red circle", 1), [photo(4)]),
        ChatRequest(user("hi")),
    ]
    decoder = Decoder(lively_vlm, check_images=False)
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    rows = []
    for step in range(12):
        if step in (0, 3, 5):
            row = (0, 3, 5).index(step)
            prepared = engine.prepare(requests[row])
            ids, mask = engine._batch([prepared.ids])
            decoder.join(ids, mask, [configs[row]], engine._pixels([prepared.images]))
            rows.append(row)
        for row, token in zip(rows, decoder.step().tolist()):
            tokens[row].append(token)
    for row, request in enumerate(requests):
        alone = engine.generate([request], configs[row])[0].token_ids
        assert tokens[row][: configs[row].max_new_tokens] == alone, row


def test_images_of_joining_rows_are_encoded_once_at_their_prefill(lively_vlm, tiny_tokenizer, monkeypatch):
    calls = []
    original = lively_vlm.encode_images
    monkeypatch.setattr(lively_vlm, "encode_images", lambda pixels: calls.append(pixels.shape[0]) or original(pixels))
    run_arrivals(Engine(lively_vlm, tiny_tokenizer), ARRIVALS)
    assert calls == [1, 2, 1]  # one tower call per joining group that has images, none while decoding


def test_kv_memory_follows_prompt_and_max_tokens(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    long_prompt, short_prompt = (engine.prepare(ChatRequest(user(text))).ids for text in ("hello " * 40, "hi"))
    short = GenerationConfig(max_new_tokens=3, **GREEDY)
    decoder = Decoder(lively_vlm, *engine._batch([short_prompt]), [short])
    for _ in range(3):
        decoder.step()
        assert decoder.cache.capacity <= len(short_prompt) + 3  # never the 8192 of a fixed-size cache

    huge = GenerationConfig(max_new_tokens=8192, **GREEDY)
    decoder = Decoder(lively_vlm, *engine._batch([long_prompt, short_prompt]), [huge, short])
    for _ in range(3):
        decoder.step()
    assert decoder.cache.capacity <= 2 * (len(long_prompt) + 3)  # grows with the tokens, not with max_tokens
    decoder.keep([1])  # the long prompt leaves: its leading columns go with it
    assert decoder.cache.length == len(short_prompt) + 2 and decoder.cache.capacity == len(short_prompt) + 3
    assert decoder.cache.attention_mask(new=1) is None  # nothing padded is left


def test_padding_columns_are_masked_and_zero(lively_vlm, tiny_tokenizer):
    engine = Engine(lively_vlm, tiny_tokenizer)
    prompts = [engine.prepare(ChatRequest(user(text))).ids for text in ("How many shapes are there?", "hi")]
    config = GenerationConfig(max_new_tokens=4, **GREEDY)
    decoder = Decoder(lively_vlm, *engine._batch(prompts[1:]), [config])
    decoder.step()
    decoder.join(*engine._batch(prompts[:1]), [config])  # longer than the running row: it moves right
    decoder.step()
    cache, padding = decoder.cache, len(prompts[0]) - len(prompts[1]) - 1  # the first row holds its prompt + 1
    assert cache.length == len(prompts[0]) and padding > 0
    assert cache.mask[:, : cache.length].sum(dim=1).tolist() == [len(prompts[1]) + 1, len(prompts[0])]
    assert not cache.mask[0, :padding].any() and not cache.keys[0][0, :, :padding].any()
    assert cache.mask[0, padding:].all() and cache.mask[1].all()


def test_a_request_joins_the_server_batch_while_another_decodes(lively_vlm, tiny_tokenizer):
    serve = pytest.importorskip("minimind_v.serve")
    engine = Engine(lively_vlm, tiny_tokenizer)

    async def run() -> tuple[list[str], int]:
        worker = serve.Worker(engine, max_batch=4)
        loop, order = asyncio.get_running_loop(), []

        def submit(text: str, tokens: int) -> serve.Job:
            request = ChatRequest(user(text))
            parsed = serve.Parsed(request, GenerationConfig(max_new_tokens=tokens, **GREEDY), False, False)
            job = serve.Job(parsed, engine.prepare(request), loop)
            worker.submit(job)
            return job

        async def finish(job: serve.Job, name: str) -> None:
            await job.completion()
            order.append(name)

        long = submit("tell me a long story", 300)
        await long.next()  # decoding has started
        short = submit("hi", 3)
        await asyncio.gather(finish(long, "long"), finish(short, "short"))
        return order, worker.largest_batch

    order, largest = asyncio.run(run())
    assert order == ["short", "long"] and largest == 2


def test_a_failed_step_answers_its_requests_with_a_500_and_the_worker_goes_on(lively_vlm, tiny_tokenizer, monkeypatch):
    serve = pytest.importorskip("minimind_v.serve")
    engine = Engine(lively_vlm, tiny_tokenizer)
    step, calls = RunningBatch.step, []

    def failing_once(self, cancelled=None):
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return step(self, cancelled)

    monkeypatch.setattr(RunningBatch, "step", failing_once)

    async def run() -> tuple[str, str]:
        worker = serve.Worker(engine, max_batch=4)
        loop = asyncio.get_running_loop()

        def submit() -> serve.Job:
            request = ChatRequest(user("hi"))
            parsed = serve.Parsed(request, GenerationConfig(max_new_tokens=3, **GREEDY), False, False)
            job = serve.Job(parsed, engine.prepare(request), loop)
            worker.submit(job)
            return job

        with pytest.raises(serve.ApiError) as failed:
            await submit().completion()
        return failed.value.status, (await submit().completion()).finish_reason

    assert asyncio.run(run()) == (500, "length")


@pytest.mark.skipif(not native_cpu_bf16(), reason="this CPU has no native bf16")
def test_packed_bf16_linears_decode_like_plain_ones(lively_vlm, tiny_tokenizer):
    linear = torch.nn.Linear(64, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(linear)(x), linear(x))

    plain = lively_vlm.to(torch.bfloat16)
    requests = [ChatRequest(user("Describe the image.", 1), [photo(5)]), ChatRequest(user("hi"))]
    config = GenerationConfig(max_new_tokens=8, **GREEDY)
    expected = [c.token_ids for c in Engine(plain, tiny_tokenizer).generate(requests, config)]
    adapted = plain.model.layers[0].self_attn.q_proj
    add_lora(plain, ["model.layers.0.self_attn.q_proj"], rank=2)
    assert pack_linear_weights(plain) == 7 * len(plain.model.layers)  # 7 linears a block, less the adapted, + lm_head
    assert plain.model.layers[0].self_attn.q_proj is adapted and isinstance(plain.lm_head, PackedLinear)
    assert [c.token_ids for c in Engine(plain, tiny_tokenizer).generate(requests, config)] == expected


@pytest.mark.parametrize("command", ["chat", "describe", "serve", "webui", "eval"])
def test_every_inference_command_takes_dtype(command):
    if command in ("serve", "webui"):
        pytest.importorskip({"serve": "fastapi", "webui": "gradio"}[command])
    extra = ["--data_path", "x.parquet"] if command == "eval" else []
    parser = cli.build_parser([command])
    assert parser.parse_args([command, *extra]).dtype == "auto"
    assert parser.parse_args([command, "--dtype", "float32", *extra]).dtype == "float32"


def test_the_chosen_dtype_and_its_reason_are_printed(tiny_model_dir, capsys):
    from minimind_v.chat import load_engine
    from minimind_v.generate import inference_dtype

    args = cli.build_parser(["chat"]).parse_args(["chat", "--load_from", str(tiny_model_dir), "--device", "cpu"])
    engine = load_engine(args)
    dtype, reason = inference_dtype("cpu")
    assert next(engine.model.parameters()).dtype == dtype
    assert f"[weights in {str(dtype).removeprefix('torch.')}: {reason}]" in capsys.readouterr().err
