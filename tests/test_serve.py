"""`minimind-v serve`: a real server process driven with the official `openai` client. Answers equal the
engine's, streaming ends with [DONE], usage is reported, sampling fields are honoured, concurrent clients get
the answers they would get alone, and every bad input gets a 400 (401 for a wrong key) with an OpenAI body."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from minimind_v.generate import ChatRequest, Engine, GenerationConfig
from minimind_v.loading import load_pretrained_folder

openai = pytest.importorskip("openai")
serve = pytest.importorskip("minimind_v.serve")

pytestmark = pytest.mark.slow  # starts a server process (several seconds)

KEY = "sk-test-key"
LIMITS = dict(max_tokens_limit=64, max_images=2, max_image_bytes=60_000, max_seq_len=400, max_videos=1,
              max_video_bytes=100_000, max_video_seconds=5, video_frames=3, max_visual_tokens=4 * 64)  # tiny: 64 a tile


def picture(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def gif_video(count: int, frame_ms: int = 100, size: int = 32) -> bytes:
    """An animated GIF of `count` frames of distinct colours, `frame_ms` each: a video any PyAV reads."""
    frames = [Image.new("RGB", (size, size), (i * 20 % 256, 80, 255 - i * 20 % 256)) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return buffer.getvalue()


def video_url(data: bytes, kind: str = "gif") -> str:
    return f"data:video/{kind};base64,{base64.b64encode(data).decode()}"


def user_with_video(text: str, *video_urls: str, image_urls=()) -> list[dict]:
    parts = [{"type": "video_url", "video_url": {"url": u}} for u in video_urls]
    return [{"role": "user", "content": parts + user(text, *image_urls)[0]["content"]}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_dir, log_dir: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`minimind-v serve` on a free port of 127.0.0.1 (CPU, float32 like the tests' engines), its log in
    `log_dir` (a pipe nobody reads would fill up and block the server): (base_url, process)."""
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "minimind_v",
                "serve",
                "--load_from",
                str(model_dir),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--dtype",
                "float32",
                *flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the server did not start:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield base_url, process
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A server process on a free port (with an API key and small limits): (base_url, local image folder)."""
    local = tmp_path_factory.mktemp("local_images")
    picture(5).save(local / "cat.png")
    flags = [f"--{k}={v}" for k, v in LIMITS.items()]
    with running_server(
        tiny_model_dir, local, "--api_key", KEY, "--local_image_root", str(local), "--max_batch", "8", *flags
    ) as (base_url, _):
        yield base_url, local


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_tokenizer):
    return Engine(load_pretrained_folder(str(tiny_model_dir)).eval(), tiny_tokenizer)


def expected(engine, text: str, images=(), open_thinking=False, **config):
    request = ChatRequest([{"role": "user", "content": "<image>" * len(images) + text}], list(images), open_thinking)
    return engine.generate([request], GenerationConfig(**{"do_sample": False, **config}))[0], request


def test_health_models_api_key_and_no_cors(server, client):
    health = httpx.get(f"{server[0]}/health", headers={"Origin": "http://elsewhere.example"})
    assert health.json()["status"] == "ok" and "access-control-allow-origin" not in health.headers
    assert [m.id for m in client.models.list()] == ["tiny-vlm"]
    stranger = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.chat.completions.create(model="tiny-vlm", messages=user("hi"))
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server[0]}/v1/models").status_code == 401


def test_completion_with_image_matches_engine(client, engine):
    image = picture(1)
    reply = client.chat.completions.create(
        model="tiny-vlm", messages=user("What is this?", data_url(image)), temperature=0, max_tokens=20
    )
    want, request = expected(engine, "What is this?", [image], max_new_tokens=20)
    assert reply.object == "chat.completion" and reply.model == "tiny-vlm"
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == want.finish_reason
    assert reply.usage.prompt_tokens == len(engine.prepare(request).ids) == want.prompt_tokens
    assert reply.usage.completion_tokens == want.completion_tokens
    assert reply.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_streaming_with_image_ends_with_done(server, client, engine):
    image = picture(2)
    messages = user("Describe it.", data_url(image, "JPEG"))
    chunks = list(
        client.chat.completions.create(
            model="tiny-vlm",
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    want, _ = expected(
        engine,
        "Describe it.",
        [
            Image.open(
                io.BytesIO(base64.b64decode(messages[0]["content"][0]["image_url"]["url"].split(",")[1]))
            ).convert("RGB")
        ],
        max_new_tokens=24,
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens and not chunks[-1].choices

    raw = httpx.post(
        f"{server[0]}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"messages": messages, "max_tokens": 3, "stream": True},
    )
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


@pytest.mark.parametrize(
    "thinking",
    [
        {"chat_template_kwargs": {"open_thinking": True}},
        {"chat_template_kwargs": {"enable_thinking": True}},
        {"open_thinking": True},
    ],
)
def test_reasoning_is_split_when_thinking_is_on(client, engine, thinking):
    reply = client.chat.completions.create(
        model="m", messages=user("Why?"), temperature=0, max_tokens=16, extra_body=thinking
    )
    want, _ = expected(engine, "Why?", open_thinking=True, max_new_tokens=16)
    assert reply.choices[0].message.reasoning_content == want.reasoning
    assert reply.choices[0].message.content == want.text
    chunks = list(
        client.chat.completions.create(
            model="m", messages=user("Why?"), temperature=0, max_tokens=16, extra_body=thinking, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.reasoning
    assert "".join(d.content or "" for d in deltas) == want.text


def test_max_tokens_stop_and_seed_are_honoured(client, engine):
    full, _ = expected(engine, "Count.", max_new_tokens=30, eos_token_id=None)
    short = client.chat.completions.create(model="m", messages=user("Count."), temperature=0, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"

    stop = next(full.text[i : i + 2] for i in range(2, len(full.text) - 1) if "\ufffd" not in full.text[i : i + 2])
    stopped = client.chat.completions.create(
        model="m", messages=user("Count."), temperature=0, max_tokens=30, stop=[stop]
    )
    assert stopped.choices[0].message.content == full.text[: full.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    sample = lambda seed: (
        client.chat.completions.create(
            model="m",
            messages=user("Count."),
            temperature=1.5,
            top_p=1.0,
            max_tokens=16,
            seed=seed,
            extra_body={"top_k": 0},
        )
        .choices[0]
        .message.content
    )
    assert sample(11) == sample(11) != sample(12)


def test_concurrent_clients_get_the_answers_they_get_alone(server, client):
    requests = [
        user("hi"),
        user("What colour is the triangle?", data_url(picture(3))),
        user("图片里有什么？", data_url(picture(4)), data_url(picture(5))),
        user("Is there a star?"),
    ] * 2
    ask = lambda messages: (
        client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24)
        .choices[0]
        .message.content
    )
    alone = [ask(m) for m in requests[:4]]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone * 2
    assert httpx.get(f"{server[0]}/health").json()["largest_batch"] > 1  # they were decoded together


def test_a_client_leaving_mid_stream_does_not_disturb_the_server(server, client):
    with httpx.stream(
        "POST",
        f"{server[0]}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"messages": user("go on"), "max_tokens": 64, "stream": True},
    ) as response:
        assert next(response.iter_lines()).startswith("data: {")
    reply = client.chat.completions.create(model="m", messages=user("hi"), temperature=0, max_tokens=4)
    assert reply.usage.completion_tokens <= 4 and reply.choices[0].message.content is not None


def test_local_images_only_under_the_allowed_folder(server, client, engine, tmp_path):
    local = server[1]
    reply = client.chat.completions.create(
        model="m", messages=user("?", str(local / "cat.png")), temperature=0, max_tokens=8
    )
    assert reply.choices[0].message.content == expected(engine, "?", [picture(5)], max_new_tokens=8)[0].text
    picture(6).save(tmp_path / "outside.png")
    for url in [str(tmp_path / "outside.png"), "file://" + str(tmp_path / "outside.png"), "../outside.png"]:
        with pytest.raises(openai.BadRequestError, match="outside --local_image_root"):
            client.chat.completions.create(model="m", messages=user("?", url))


def test_video_completion_matches_engine_from_data_urls_and_local_files(server, client, engine):
    from minimind_v.video import load_video

    pytest.importorskip("av")
    data = gif_video(12)
    (server[1] / "clip.gif").write_bytes(data)
    request = ChatRequest([{"role": "user", "content": "<video>What happens?"}], [], videos=[load_video(data, 3)])
    want = engine.generate([request], GenerationConfig(max_new_tokens=12, do_sample=False))[0]
    assert [len(v.frames) for v in request.videos] == [3]
    for url in (video_url(data), str(server[1] / "clip.gif"), "clip.gif"):
        reply = client.chat.completions.create(
            model="m", messages=user_with_video("What happens?", url), temperature=0, max_tokens=12
        )
        assert reply.choices[0].message.content == want.text
        assert reply.usage.prompt_tokens == want.prompt_tokens == len(engine.prepare(request).ids)


def big_noise_png() -> str:
    return data_url(Image.fromarray(np.random.RandomState(0).randint(0, 256, (200, 200, 3), dtype=np.uint8)))


BAD_REQUESTS = {
    "remote URL": (dict(messages=user("?", "https://example.com/cat.jpg")), "unsupported_image_url"),
    "invalid base64": (dict(messages=user("?", "data:image/png;base64,not*base64!")), "invalid_image_url"),
    "not an image": (
        dict(messages=user("?", "data:image/png;base64," + base64.b64encode(b"plain text").decode())),
        "invalid_image",
    ),
    "not base64 encoded": (dict(messages=user("?", "data:image/png,rawbytes")), "invalid_image_url"),
    "too many images": (dict(messages=user("?", *[data_url(picture(i)) for i in range(3)])), "too_many_images"),
    "image too large": (dict(messages=user("?", big_noise_png())), "image_too_large"),
    "prompt too long": (dict(messages=user("red circle blue square " * 200)), "context_length_exceeded"),
    "max_tokens over the limit": (dict(messages=user("?"), max_tokens=65), "invalid_value"),
    "image marker in text": (dict(messages=user("look: <image>")), None),
    "video marker in text": (dict(messages=user("look: <video>")), None),
    "not a video": (dict(messages=user_with_video("?", video_url(b"plain text", "mp4"))), "invalid_video"),
    "video invalid base64": (dict(messages=user_with_video("?", "data:video/mp4;base64,not*base64!")),
                             "invalid_video_url"),
    "remote video": (dict(messages=user_with_video("?", "https://example.com/cat.mp4")), "unsupported_video_url"),
    "video too long": (dict(messages=user_with_video("?", video_url(gif_video(60)))), "video_too_long"),
    "video too large": (dict(messages=user_with_video("?", video_url(bytes(150_000), "mp4"))), "video_too_large"),
    "too many videos": (dict(messages=user_with_video("?", *[video_url(gif_video(4))] * 2)), "too_many_videos"),
    "too many visual tokens": (
        dict(messages=user_with_video("?", video_url(gif_video(4)), image_urls=[data_url(picture(i)) for i in (1, 2)])),
        "too_many_visual_tokens",
    ),
    "no messages": (dict(messages=[]), None),
    "user content null": (dict(messages=[{"role": "user", "content": None}]), None),
    "max_tokens as a string": (dict(messages=user("?"), max_tokens="5"), None),
    "seed not an integer": (dict(messages=user("?"), seed=1.5), None),
    "tool call of the wrong shape": (
        dict(messages=[*user("?"), {"role": "assistant", "tool_calls": [{"function": "f"}]}]),
        None,
    ),
    "tool parameters nested 600 deep": (
        dict(
            messages=user("?"),
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": json.loads('{"a": ' * 600 + "{}" + "}" * 600)},
                }
            ],
        ),
        None,
    ),
    "unknown role": (dict(messages=[{"role": "robot", "content": "hi"}]), None),
    "image in assistant turn": (
        dict(
            messages=[
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                }
            ]
        ),
        None,
    ),
    "temperature out of range": (dict(messages=user("?"), temperature=5), None),
    "n > 1": (dict(messages=user("?"), n=2), None),
    "five stop strings": (dict(messages=user("?"), stop=list("abcde")), None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_400_with_an_openai_error(client, name):
    fields, code = BAD_REQUESTS[name]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", **fields)
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == code


def test_malformed_json_and_streaming_errors_are_400(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{server[0]}/v1/chat/completions", headers=headers, content=b"{not json")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    streamed = httpx.post(
        f"{server[0]}/v1/chat/completions",
        headers=headers,
        content=json.dumps({"messages": user("x " * 500), "stream": True}),
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["code"] == "context_length_exceeded"
    for content in ('"hi \\ud800"', '[{"type": "text", "text": "\\udfff"}]'):  # lone surrogates: no tokenizer
        lone = httpx.post(
            f"{server[0]}/v1/chat/completions",
            headers=headers,
            content=b'{"messages": [{"role": "user", "content": ' + content.encode() + b"}]}",
        )
        assert lone.status_code == 400 and "lone surrogate" in lone.json()["error"]["message"]


def test_tool_calls_are_parsed_from_the_answer():
    text = 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n</tool_call>'
    content, calls = serve.split_tool_calls(text)
    assert content == "Let me check."
    assert calls[0]["function"] == {"name": "weather", "arguments": '{"city": "北京"}'}
    assert serve.split_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
