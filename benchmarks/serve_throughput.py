"""Serving throughput of `minimind-v serve` (continuous batching): for 1, 4 and 16 concurrent streaming clients,
one comparable line each with the aggregate completion tokens/s, its ratio to one client, and the time to first
token p50/p99.

    python benchmarks/serve_throughput.py --threads 2             # a random 768x8 model, built in a temporary folder
    python benchmarks/serve_throughput.py --load_from demo_out/hf --clients 1 16

Without `--load_from` the model is the 768x8 MiniMind-V with a random `siglip2-base-p32-256`-shaped tower, its
decoder matrices drawn wide (std 0.05) so that greedy decoding gives varied tokens rather than one token repeated,
and a byte-level BPE tokenizer trained on a few sentences (so the vocabulary, and lm_head, is smaller than 6400).
Every client sends `--requests` greedy streamed requests of `--max_tokens` tokens back to back (text only unless
`--images`: the figures are about decoding); the server runs with its defaults (`--dtype auto`, `--max_batch 16`).
A model that stops early gives fewer tokens, which the tokens/s figure counts as they are (from `usage`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from types import SimpleNamespace

import httpx
import torch

from load_test import PROMPTS, image_url, one, percentile, started_server
from minimind_v.config import preset_config
from minimind_v.loading import export_pretrained
from minimind_v.tokenizer import train_tokenizer
from minimind_v.vlm import MiniMindVLM

CORPUS = [
    "The red circle is on the left of the blue square.",
    "How many shapes are there? There are three shapes.",
    "图片里有一个绿色的三角形和一个黄色的圆。",
    "What colour is the triangle? It is green.",
    "Is there a star in the picture? No, there is no star.",
    "Describe the image. A small purple square sits at the top right.",
] * 50


def random_model_folder(folder: str) -> str:
    """A random 768x8 MiniMind-V with a small trained tokenizer, exported to `folder`."""
    tokenizer = train_tokenizer(CORPUS, os.path.join(folder, "tokenizer"), vocab_size=6400)
    torch.manual_seed(0)
    model = MiniMindVLM(preset_config("minimind-3v", vocab_size=len(tokenizer))).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and not name.startswith("vision_encoder."):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    export_pretrained(model, os.path.join(folder, "model"), tokenizer)
    return os.path.join(folder, "model")


def body(i: int, max_tokens: int, image: bool) -> dict:
    content = [{"type": "text", "text": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url(i)}})
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def clients(url: str, count: int, requests: int, max_tokens: int, images: bool) -> tuple[list[dict], float]:
    """`count` clients sending `requests` streamed requests each, back to back: (results, seconds in all)."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one(client, body(0, max_tokens, images))  # warm-up, not counted

        async def client_run(c: int) -> list[dict]:
            return [
                await one(client, body(c * requests + r, max_tokens, images and r % 2 == 1)) for r in range(requests)
            ]

        start = time.perf_counter()
        results = await asyncio.gather(*(client_run(c) for c in range(count)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load_from", default=None, help="model folder (default: a random 768x8 model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--images", action="store_true", help="every other request carries an image")
    parser.add_argument("--threads", type=int, default=None, help="the server's CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument(
        "--serve_args", nargs=argparse.REMAINDER, default=[], help="more flags for the server (put last)"
    )
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        load_from = args.load_from or random_model_folder(scratch)
        server = SimpleNamespace(
            load_from=load_from, device=args.device, max_batch=args.max_batch, serve_args=args.serve_args
        )
        with started_server(server) as (url, _):
            single = None
            for count in args.clients:
                results, seconds = asyncio.run(clients(url, count, args.requests, args.max_tokens, args.images))
                errors = [r["error"] for r in results if "error" in r]
                first = [r["first_token"] for r in results if r.get("first_token") is not None]
                speed = sum(r.get("tokens", 0) for r in results) / seconds
                single = single or speed
                print(
                    f"serve_throughput clients={count} requests={len(results)} max_tokens={args.max_tokens} "
                    f"images={int(args.images)} threads={args.threads or 'default'} | {speed:.1f} tok/s "
                    f"({speed / single:.2f}x {args.clients[0]} client(s)) | ttft p50 {percentile(first, 50):.3f}s p99 "
                    f"{percentile(first, 99):.3f}s | errors {len(errors)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
