"""Decode speed of the 768x8 MiniMind-V (random weights) at several batch sizes: the reference algorithm
(`model.generate`, float32 weights) next to what `chat` / `serve` run (the `--dtype auto` weights, bf16 linear
layers packed on a CPU with native bf16), one comparable line each.

    python benchmarks/generation.py --threads 2                  # CPU: batch 1 and 16
    python benchmarks/generation.py --device cuda --new_tokens 128

The prompt is bos, one image (64 visual tokens) and random text, like a `describe` request. Time to first token
includes encoding the image; decode tokens/s counts every row's tokens after the first. The machine may be shared,
so each setting runs `--repeats` times, interleaved, and the best run counts. `--naive` adds the loop that recomputes
the whole sequence (and re-encodes the image, as the reference does without its cache) every step.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from minimind_v.config import preset_config
from minimind_v.generate import Decoder, GenerationConfig, inference_dtype, pack_linear_weights
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


class Clock:
    """A `model.generate` streamer that notes when the prompt and each step's tokens arrive."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, ids: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def reference_speed(model, ids, pixels, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) of greedy `model.generate` (the reference signature
    and algorithm)."""
    clock = Clock(ids.device)
    model.generate(
        ids, pixel_values=pixels, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, streamer=clock
    )
    return speeds(clock.times, ids.shape[0])


def measure(model, ids, pixels, new_tokens: int, use_cache: bool = True) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) of greedy decoding with the engine's `Decoder`."""
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    sync(ids.device)
    times = [time.perf_counter()]
    decoder = Decoder(model, ids, None, [config] * ids.shape[0], pixels, use_cache=use_cache, check_images=False)
    while not decoder.done:
        decoder.step()
        sync(ids.device)
        times.append(time.perf_counter())
    return speeds(times, ids.shape[0])


def speeds(times: list[float], batch: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) from the start and step times."""
    return times[1] - times[0], (len(times) - 2) * batch / max(times[-1] - times[1], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--text_tokens", type=int, default=32, help="prompt text after the image block")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the best counts")
    parser.add_argument("--naive", action="store_true", help="also time the loop without a KV cache")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = MiniMindVLM(preset_config("minimind-3v")).to(device).eval()
    dtype, reason = inference_dtype(device)
    ours = copy.deepcopy(reference).to(dtype)
    packed = pack_linear_weights(ours)
    name = f"{str(dtype).removeprefix('torch.')}{' packed' if packed else ''}"
    runs: dict[str, tuple[torch.nn.Module, Callable]] = {
        "reference (model.generate, float32)": (reference, reference_speed),
        f"engine ({name}; {reason})": (ours, measure),
    }
    if args.naive:
        runs["naive (no cache, float32)"] = (reference, lambda *a: measure(*a, use_cache=False))
    for batch in args.batch_sizes:
        ids, pixels = prompt(reference, batch, args.text_tokens, device)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for label, (model, run) in runs.items():
                ttft, speed = run(model, ids, pixels, args.new_tokens)
                if label not in best or speed > best[label][1]:
                    best[label] = ttft, speed
        baseline = best["reference (model.generate, float32)"][1]
        for label, (ttft, speed) in best.items():
            print(
                f"generation {device.type} threads={torch.get_num_threads()} batch={batch} "
                f"prompt={ids.shape[1]} new={args.new_tokens} | {label} | first token {ttft:.3f}s | "
                f"decode {speed:.1f} tok/s ({speed / baseline:.2f}x the reference)",
                flush=True,
            )


if __name__ == "__main__":
    main()
