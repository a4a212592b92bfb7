"""The API server against hostile clients and faults: bodies over the limit (chunked too), image bombs and
animations, per-request limits, CORS, the --help of every limit; clients that vanish mid-stream (their rows and
memory are freed, the others get exactly their own text) or stop reading (dropped after --send_timeout); a request
past its deadline; the engine dropping ended rows from the batch."""

import argparse
import asyncio
import base64
import contextlib
import io
import json
import random
import socket
import struct
import time
import zlib

import anyio
import httpx
import numpy as np
import pytest
from PIL import Image

from minimind_v.generate import ChatRequest, Decoder, Engine, GenerationConfig
from test_serve import running_server, user

serve = pytest.importorskip("minimind_v.serve")
psutil = pytest.importorskip("psutil")

BODY_LIMIT = 300_000
ALLOWED_ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """A server with small limits, a 1 s send timeout and one allowed CORS origin: (base_url, process)."""
    flags = [
        "--max_batch",
        "32",
        "--max_tokens_limit",
        "40000",
        "--max_messages",
        "4",
        "--max_images",
        "2",
        "--max_image_pixels",
        str(1000 * 1000),
        "--max_body_bytes",
        str(BODY_LIMIT),
        "--send_timeout",
        "1",
        "--cors_origins",
        ALLOWED_ORIGIN,
    ]
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("faults"), *flags) as running:
        yield running


def chat(server, **body) -> httpx.Response:
    return httpx.post(f"{server[0]}/v1/chat/completions", json={"temperature": 0, **body}, timeout=60)


def answer(server, messages, max_tokens: int = 8) -> str:
    response = chat(server, messages=messages, max_tokens=max_tokens)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def error_code(response: httpx.Response) -> str | None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error["code"]


def wait_until_idle(server, seconds: float) -> float:
    """Seconds until /health shows no row decoding and nothing queued; fails after `seconds`."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        health = httpx.get(f"{server[0]}/health").json()
        if health["active"] == 0 and health["queued"] == 0:
            return time.perf_counter() - start
        time.sleep(0.05)
    pytest.fail(f"the server still decodes after {seconds} s: {health}")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def data_url(payload: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(payload).decode()}"


def picture(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_help_lists_every_limit_with_its_default():
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for flag, default in [
        ("--max_batch", "16"),
        ("--max_seq_len", "8192"),
        ("--max_tokens_limit", "8192"),
        ("--max_messages", "256"),
        ("--max_images", "8"),
        ("--max_image_bytes", "10485760"),
        ("--max_image_pixels", "16777216"),
        ("--max_queue", "256"),
        ("--max_connections", "512"),
        ("--request_timeout", "600.0"),
        ("--send_timeout", "30.0"),
        ("--max_videos", "2"),
        ("--max_video_bytes", "16777216"),
        ("--max_video_seconds", "120.0"),
        ("--max_visual_tokens", "4096"),
        ("--host", "127.0.0.1"),
    ]:
        assert f"{flag} " in text and f"(default: {default}" in text.split(f"{flag} ", 1)[1], flag
    assert "--max_body_bytes" in text and "--cors_origins" in text and "--video_frames" in text
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and args.cors_origins == []
    assert serve.Limits(max_images=2, max_image_bytes=3000).max_body_bytes == 2 * (4000 + 1024) + 2**20


def test_a_body_over_the_limit_is_refused_with_or_without_content_length(server):
    body = json.dumps({"messages": user("x" * BODY_LIMIT)}).encode()
    sized = httpx.post(f"{server[0]}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert sized.status_code == 413 and error_code(sized) == "request_too_large"

    # Chunked, and never ending: the 413 comes once the limit is passed, not when the body ends.
    with socket.create_connection(("127.0.0.1", int(server[0].rsplit(":", 1)[1])), timeout=30) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"[" * 2**16
        for _ in range(3 * BODY_LIMIT // len(piece)):
            raw.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        reply = b""
        while not reply.endswith(b"}}") and (data := raw.recv(65536)):
            reply += data
    assert reply.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in reply
    assert answer(server, user("still there?"))


def test_image_bombs_are_refused_from_their_header(server):
    def ask(payload: bytes):
        return chat(server, messages=user("?", data_url(payload)), max_tokens=2)

    huge = ask(png_header_only(30_000, 30_000))  # 900 million pixels
    assert huge.status_code == 400 and error_code(huge) == "image_too_large"
    bomb = encoded(Image.new("L", (4000, 4000)), "PNG")  # 16 million pixels in a few KB
    assert len(bomb) < 100_000
    refused = ask(bomb)
    assert refused.status_code == 400 and error_code(refused) == "image_too_large"
    for fmt in ["TIFF", "BMP"]:  # only PNG, JPEG, WEBP and GIF are decoded
        other = ask(encoded(picture(1), fmt))
        assert other.status_code == 400 and error_code(other) == "invalid_image"


@pytest.mark.parametrize("fmt, options", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_an_animated_image_is_read_as_its_first_frame(server, fmt, options):
    frames = [picture(seed) for seed in (3, 4, 5)]
    animated = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    with Image.open(io.BytesIO(animated)) as image:
        assert image.n_frames == 3
        first = image.convert("RGB")
    assert answer(server, user("?", data_url(animated))) == answer(server, user("?", data_url(encoded(first, "PNG"))))


def test_too_many_messages_is_refused(server):
    response = chat(server, messages=user("hi") * 5)
    assert response.status_code == 400 and error_code(response) == "too_many_messages"


def test_cors_headers_only_for_allowed_origins(server):
    health = f"{server[0]}/health"
    assert (
        httpx.get(health, headers={"Origin": ALLOWED_ORIGIN}).headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    )
    assert "access-control-allow-origin" not in httpx.get(health, headers={"Origin": "http://evil.example"}).headers
    preflight = {
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    assert httpx.options(f"{server[0]}/v1/chat/completions", headers=preflight).status_code == 200


async def leave_at_random(url: str, clients: int, seed: int) -> None:
    """`clients` requests for long answers (3/4 streamed), each abandoned at a random point: a stream closed after a
    random number of events, or a request cancelled after a random delay."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(25)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"messages": user(f"story {i}"), "max_tokens": 3000, "temperature": 0, "stream": rng.random() < 0.75}
        events, delay = rng.randint(0, 30), rng.uniform(0.01, 1.0)
        async with gate:
            if body["stream"] and rng.random() < 0.5:
                async with client.stream("POST", url, json=body) as response:
                    async for line in response.aiter_lines():
                        events -= bool(line)
                        if events < 0:
                            break
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client.post(url, json=body), delay)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(one(client, i) for i in range(clients)))


@pytest.mark.slow
def test_clients_that_vanish_free_their_rows_and_memory(server):
    url, process = f"{server[0]}/v1/chat/completions", psutil.Process(server[1].pid)
    before = answer(server, user("How many shapes are there?"), max_tokens=16)
    asyncio.run(leave_at_random(url, 25, seed=0))  # warm-up: the first batches allocate for good
    wait_until_idle(server, 15)
    baseline = process.memory_info().rss
    asyncio.run(leave_at_random(url, 100, seed=1))
    # Each abandoned row would decode 3000 tokens (>= 5 s for a batch); it stops at the next step instead.
    assert wait_until_idle(server, 5) < 5
    grown = process.memory_info().rss - baseline
    assert grown < 64 * 2**20, f"the server's RSS grew by {grown / 2**20:.0f} MiB"
    assert answer(server, user("How many shapes are there?"), max_tokens=16) == before


async def stream_text(client: httpx.AsyncClient, url: str, messages: list[dict]) -> str:
    pieces = []
    async with client.stream(
        "POST", url, json={"messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
    return "".join(pieces)


@pytest.mark.slow
def test_32_concurrent_streams_each_get_their_own_text(server):
    prompts = [user(f"{word} {i}?") for i, word in enumerate(["red", "blue", "图片", "square"] * 8)]
    alone = [answer(server, messages, max_tokens=16) for messages in prompts]
    assert len(set(alone)) > 16  # different prompts, different answers

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(stream_text(client, f"{server[0]}/v1/chat/completions", m) for m in prompts))

    assert asyncio.run(together()) == alone
    assert httpx.get(f"{server[0]}/health").json()["largest_batch"] > 1


def test_a_stream_whose_client_stops_reading_is_cancelled():
    """uvicorn's send blocks once the socket buffers are full (how long that takes depends on the kernel's buffer
    sizes: 4 to 40 s for the tiny model's stream on loopback), so a blocked send stands for the client here."""
    job = serve.Job(parsed=None, prompt=[], loop=None)
    sent = []

    async def endless():
        while True:
            yield "data: {}\n\n"

    async def stuck_client(message):  # takes the headers, then never reads again
        sent.append(message)
        if len(sent) > 2:
            await anyio.sleep_forever()

    async def run():
        with anyio.fail_after(5):
            await serve.EventStream(job, endless(), send_timeout=0.2).stream_response(stuck_client)

    anyio.run(run)
    assert job.cancelled and len(sent) == 3


def test_a_request_past_its_deadline_gets_a_504():
    async def slow_body(scope, receive, send):  # reads a body that trickles in, then answers
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    async def trickle():
        for _ in range(100):
            yield b"{"
            await asyncio.sleep(0.05)

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(serve.Deadline(slow_body, seconds=0.3))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/", content=trickle())

    response = asyncio.run(run())
    assert response.status_code == 504 and error_code(response) == "timeout"


def test_the_engine_drops_ended_and_cancelled_rows_at_the_next_step(lively_vlm, tiny_tokenizer, monkeypatch):
    rows = []
    step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self: rows.append(len(tokens := step(self))) or tokens)
    engine = Engine(lively_vlm, tiny_tokenizer)
    requests = [ChatRequest([{"role": "user", "content": text}]) for text in ["hi", "How many shapes?", "red"]]
    configs = [GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None) for n in (2, 6, 6)]
    completions = {
        e.row: e.completion
        for e in engine.run(requests, configs, cancelled=lambda row: row == 2)
        if e.completion is not None
    }
    assert rows == [3, 2, 1, 1, 1, 1]  # row 2 cancelled after its first token, row 0 done after two
    assert [completions[r].finish_reason for r in range(3)] == ["length", "length", "cancelled"]
    assert completions[1].token_ids == engine.generate([requests[1]], configs[1])[0].token_ids
