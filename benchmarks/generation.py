"""Generation speed of the 768x8 MiniMind-V (random weights): time to first token and decode tokens/s at
several batch sizes, with the KV-cache decoder next to the naive loop that recomputes everything each step.

    python benchmarks/generation.py                       # CPU: short run
    python benchmarks/generation.py --device cuda --new_tokens 128

The prompt is one image (64 visual tokens) plus text, like a `describe` request. Time to first token
includes encoding the image; decode tokens/s counts every row's tokens after the first.
"""

from __future__ import annotations

import argparse
import time

import torch

from minimind_v.config import preset_config
from minimind_v.generate import Decoder, GenerationConfig, inference_dtype
from minimind_v.vlm import MiniMindVLM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompt(model: MiniMindVLM, batch: int, text_tokens: int, device: torch.device):
    """input_ids [B, 1 + L + text] (bos, one image block, random text) and pixel_values [B, 3, S, S]."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(36, config.vocab_size, (batch, text_tokens), generator=generator)
    image = torch.full((batch, config.image_token_len), config.image_token_id)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], dim=1).to(device)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator).to(device)
    return ids, pixels


def measure(model, ids, pixels, new_tokens: int, use_cache: bool) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s over the remaining steps) for greedy decoding."""
    device = ids.device
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    sync(device)
    start = time.perf_counter()
    decoder = Decoder(model, ids, None, [config] * ids.shape[0], pixels, use_cache=use_cache, check_images=False)
    decoder.step()
    sync(device)
    first = time.perf_counter()
    while not decoder.done:
        decoder.step()
    sync(device)
    end = time.perf_counter()
    return first - start, (new_tokens - 1) * ids.shape[0] / max(end - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--text_tokens", type=int, default=32, help="prompt text after the image block")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = inference_dtype(device)
    torch.manual_seed(0)
    model = MiniMindVLM(preset_config("minimind-3v")).to(device=device, dtype=dtype).eval()
    print(f"device {device} ({dtype}), threads {torch.get_num_threads()}, prompt {1 + 64 + args.text_tokens} tokens, "
          f"{args.new_tokens} new tokens\n")
    print("| batch | decoder | time to first token (s) | decode tokens/s |")
    print("|---|---|---|---|")
    for batch in args.batch_sizes:
        ids, pixels = prompt(model, batch, args.text_tokens, device)
        measure(model, ids, pixels, 2, True)  # warm-up
        for use_cache, name in ((True, "KV cache"), (False, "naive (no cache)")):
            ttft, speed = measure(model, ids, pixels, args.new_tokens, use_cache)
            print(f"| {batch} | {name} | {ttft:.3f} | {speed:.1f} |", flush=True)


if __name__ == "__main__":
    main()
