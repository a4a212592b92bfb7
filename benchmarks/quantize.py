"""Int8 weight-only inference (`--quantize int8`) next to float32 and bfloat16: weight memory of the 768x8 decoder
and of the whole 768x8 VLM (random weights and siglip2-base-shaped tower), decode speed of the decoder, and
held-out accuracy of a trained model when one is given. One table row per setting.

    python benchmarks/quantize.py                                  # memory and speed only
    python benchmarks/quantize.py --load_from demo_out/hf --data_path demo_out/data/vlm_test.parquet

Weight memory counts parameters and buffers as stored (int8 data plus per-channel scales for quantized layers;
the tied embedding / lm_head matrix once). Decode speed is greedy, batch 1, --new_tokens after
a --prompt_tokens text prompt, the median of --repeats runs, time to the first token excluded.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from generation import measure  # benchmarks/generation.py: the same timing as the decode benchmark
from minimind_v.config import MiniMindConfig, preset_config
from minimind_v.evaluate import engine_answerer, evaluate
from minimind_v.generate import Engine
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.loading import load_model
from minimind_v.quantize import quantize_decoder
from minimind_v.vlm import MiniMindVLM

# name -> (compute dtype, quantization)
SETTINGS = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "int8": (torch.float32, "int8"),
            "int8 + bf16": (torch.bfloat16, "int8")}


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights appear twice
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_speed(model, prompt_tokens: int, new_tokens: int, repeats: int, device: torch.device) -> float:
    """Median decode tokens/s of greedy batch-1 generation (the first token, i.e. prefill, not counted), after a
    warm-up run."""
    ids = torch.randint(36, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    speeds = [measure(model, ids.to(device), None, new_tokens, use_cache=True)[1] for _ in range(repeats + 1)]
    return statistics.median(speeds[1:])


def reference_model(vlm: bool, dtype: torch.dtype, quantize: str, device: torch.device) -> MiniMindForCausalLM:
    """The 768x8 decoder, or the whole VLM (siglip2-base-shaped tower), with random weights."""
    torch.manual_seed(0)
    config = preset_config("minimind-3v") if vlm else MiniMindConfig(hidden_size=768, num_hidden_layers=8)
    model = MiniMindVLM(config) if vlm else MiniMindForCausalLM(config)
    return quantize_decoder(model.to(device=device, dtype=dtype).eval(), quantize)


def held_out(args, dtype: torch.dtype, quantize: str) -> tuple[float, list[str]]:
    """(accuracy, every answer) of the --load_from model on --data_path."""
    model, tokenizer = load_model(load_from=args.load_from, device=args.device, dtype=dtype, quantize=quantize)
    answer = engine_answerer(Engine(model, tokenizer), args.max_new_tokens)
    answers: list[str] = []

    def recorded(items, blind):
        replies = answer(items, blind)
        answers.extend(replies)
        return replies

    result = evaluate(recorded, args.data_path, batch_size=args.batch_size, max_samples=args.max_samples)
    return result["accuracy"], answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--load_from", default=None, help="trained transformers folder for the accuracy column")
    parser.add_argument("--data_path", default=None, help="held-out parquet for the accuracy column")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=16, help="tokens per answer (as `minimind-v eval`)")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    if bool(args.load_from) != bool(args.data_path):
        parser.error("--load_from and --data_path go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}; 768x8 decoder: {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| setting | decoder weight MB | VLM weight MB | decode tokens/s | held-out accuracy | same answer as fp32 |")
    print("|---|---|---|---|---|---|")
    baseline = None
    for name in [n for n in SETTINGS if n in args.settings]:
        dtype, quantize = SETTINGS[name]
        vlm_size = weight_bytes(reference_model(True, dtype, quantize, device)) / 2**20
        model = reference_model(False, dtype, quantize, device)
        size, speed = weight_bytes(model) / 2**20, decode_speed(model, args.prompt_tokens, args.new_tokens,
                                                               args.repeats, device)
        del model
        accuracy = agreement = "-"
        if args.load_from:
            score, answers = held_out(args, dtype, quantize)
            baseline = answers if name == "fp32" else baseline
            accuracy = f"{100 * score:.1f}%"
            if baseline is not None:
                agreement = f"{100 * sum(a == b for a, b in zip(answers, baseline)) / len(answers):.1f}%"
        print(f"| {name} | {size:.1f} | {vlm_size:.1f} | {speed:.1f} | {accuracy} | {agreement} |", flush=True)


if __name__ == "__main__":
    main()
