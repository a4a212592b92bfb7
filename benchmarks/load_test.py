"""Load test of `minimind-v serve` on this machine: N concurrent clients send M chat completions in all (a share
of them streamed, every other one with an image) and one comparable line reports request latency p50/p99, time
to first token of the streams, completion tokens/s over the run, errors (must be 0) and the server's peak RSS.

    python benchmarks/load_test.py --load_from demo/hf                # starts a server on a free 127.0.0.1 port
    python benchmarks/load_test.py --url http://127.0.0.1:8998 --api_key KEY   # a server already running here

Greedy decoding of `--max_tokens` tokens per request; a model that stops early gives fewer tokens, which the
tokens/s figure counts as they are (from `usage`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
from PIL import Image

PROMPTS = ["Describe the image.", "How many shapes are there?", "What colour is the triangle?", "图片里有什么？",
           "Is there a star in the picture?", "Where is the red circle?"]


def image_url(seed: int) -> str:
    pixels = np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(i: int, max_tokens: int, stream: bool) -> dict:
    content = [{"type": "text", "text": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}]
    if i % 2:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url(i)}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
    return body | ({"stream": True, "stream_options": {"include_usage": True}} if stream else {})


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    """Send one request: {"seconds", "first_token" (streams), "tokens"}, or {"error"}."""
    start = time.perf_counter()
    if not body.get("stream"):
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            return {"error": f"{response.status_code} {response.text[:200]}"}
        return {"seconds": time.perf_counter() - start, "tokens": response.json()["usage"]["completion_tokens"]}
    first, tokens, done = None, 0, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code} {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if first is None and any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                                         for c in chunk["choices"]):
                    first = time.perf_counter() - start
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    if not done:
        return {"error": "the stream ended without [DONE]"}
    return {"seconds": time.perf_counter() - start, "first_token": first, "tokens": tokens}


async def load(url: str, api_key: str | None, clients: int, requests: int, max_tokens: int,
               stream_share: float) -> tuple[list[dict], float]:
    """Every result, and the seconds the whole run took."""
    bodies = [request_body(i, max_tokens, i % 100 < stream_share * 100) for i in range(requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        await one(client, request_body(0, max_tokens, False))  # warm-up, not counted
        pending = iter(bodies)
        results = []

        async def worker() -> None:
            for body in pending:  # the clients share one iterator: each takes the next request when free
                try:
                    results.append(await one(client, body))
                except httpx.HTTPError as err:
                    results.append({"error": repr(err)})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - start


class PeakRss:
    """The largest resident set size of a process (with its children), sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            try:
                processes = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in processes))
            except psutil.Error:  # a process that just ended
                pass

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:port, when the system lets us see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    return next((c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port), None)


@contextmanager
def started_server(args):
    """`minimind-v serve` on a free 127.0.0.1 port, log in a temporary file: (url, pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "minimind_v", "serve", "--load_from", args.load_from, "--host", "127.0.0.1",
               "--port", str(port), "--device", args.device, "--max_batch", str(args.max_batch), *args.serve_args]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if process.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server did not start:\n{log.read()}")
                time.sleep(0.3)
            yield url, process.pid
        finally:
            process.terminate()
            process.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(args, results: list[dict], seconds: float, peak_rss: int | None) -> str:
    ok = [r for r in results if "error" not in r]
    latency = [r["seconds"] for r in ok]
    first = [r["first_token"] for r in ok if r.get("first_token") is not None]
    tokens = sum(r["tokens"] for r in ok)
    rss = f"{peak_rss / 2**20:.0f} MiB" if peak_rss else "n/a"
    return (f"load_test clients={args.clients} requests={args.requests} stream={args.stream_share:g} "
            f"max_tokens={args.max_tokens} | latency p50 {percentile(latency, 50):.3f}s p99 "
            f"{percentile(latency, 99):.3f}s | ttft p50 {percentile(first, 50):.3f}s p99 {percentile(first, 99):.3f}s "
            f"| {tokens / seconds:.0f} tok/s ({tokens} tokens in {seconds:.1f}s) | errors {len(results) - len(ok)} "
            f"| server peak rss {rss}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--load_from", help="model folder: start `minimind-v serve` with it on a free port")
    target.add_argument("--url", help="a server already running on this machine (127.0.0.1 or localhost)")
    parser.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"))
    parser.add_argument("--pid", type=int, default=None, help="the --url server's process (default: found by port)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=128, help="requests in all")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--stream_share", type=float, default=0.5, help="share of the requests that stream")
    parser.add_argument("--device", default="cpu", help="for a started server")
    parser.add_argument("--max_batch", type=int, default=16, help="for a started server")
    parser.add_argument("--serve_args", nargs=argparse.REMAINDER, default=[],
                        help="more flags for a started server (put last)")
    args = parser.parse_args()

    if args.url:
        parts = urlsplit(args.url)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit("--url must be a server on this machine (127.0.0.1 or localhost)")
        server = nullcontext((args.url, args.pid or listening_pid(parts.port or 80)))
    else:
        server = started_server(args)
    with server as (url, pid), PeakRss(pid) if pid else nullcontext() as rss:
        results, seconds = asyncio.run(load(url, args.api_key, args.clients, args.requests, args.max_tokens,
                                            args.stream_share))
    for error in sorted({r["error"] for r in results if "error" in r})[:5]:
        print(f"error: {error}", file=sys.stderr)
    print(report(args, results, seconds, rss.peak if rss else None))
    if any("error" in r for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
