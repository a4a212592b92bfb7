"""Training throughput of `minimind-v train vlm-sft`: samples/s, tokens/s and padding efficiency, with our
packed data path and with a baseline that mimics the reference data path (every sample padded to
--max_seq_len, one sample per row, plain causal attention), on the same synthetic data and model.

    python benchmarks/train_throughput.py --tokenizer model                    # 768x8, siglip2-base-shaped tower
    python benchmarks/train_throughput.py --tokenizer model --hidden_size 64 --num_hidden_layers 2 \\
        --vision_model random:tiny --batch_size 16 --max_seq_len 256 --steps 20   # a tiny from-zero config

The data imitates the reference SFT set: one 256x256 JPEG per sample and conversations whose token count
(64 image tokens included) is uniform in [--min_tokens, --max_tokens], about 250 on average by default.
Both modes run the real trainer; throughput is measured over the steps after --warmup. `--malloc default`
leaves glibc's malloc as it is (the trainer otherwise keeps freed blocks for reuse on a CPU): run it and the
default in turns for an A/B.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from minimind_v import data, train
from minimind_v.tokenizer import IMAGE_TOKEN, load_tokenizer, render_chat

WORDS = ["the", "a", "red", "green", "blue", "small", "large", "circle", "square", "triangle", "left", "right", "top",
         "bottom", "image", "shows", "there", "is", "one", "two", "three", "near", "far", "above", "below", "colour",
         "shape", "picture", "describes", "with", "and", "of", "in", "on"]


def random_jpeg(rng: random.Random, size: int) -> bytes:
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(size // 16, size // 4)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_dataset(path: str, tokenizer, rows: int, min_tokens: int, max_tokens: int, seed: int = 0) -> float:
    """A reference-schema parquet; returns the mean token count per sample."""
    rng = random.Random(seed)
    conversations, images, lengths = [], [], []
    base = [{"role": "user", "content": "<image>\nDescribe the picture."}, {"role": "assistant", "content": ""}]
    overhead = len(tokenizer(render_chat(tokenizer, base).replace("<image>", IMAGE_TOKEN * 64)).input_ids)
    for _ in range(rows):
        target = rng.randint(min_tokens, max_tokens)
        words = " ".join(rng.choice(WORDS) for _ in range(max(target - overhead, 1)))
        answer = tokenizer.decode(tokenizer(words).input_ids[: max(target - overhead, 1)])
        conversations.append(json.dumps([base[0], {"role": "assistant", "content": answer}]))
        images.append(random_jpeg(rng, 256))
        lengths.append(overhead + len(tokenizer(answer).input_ids))
    pq.write_table(pa.table({"conversations": conversations, "image_bytes": pa.array(images, pa.binary())}),
                   path, row_group_size=256)
    return float(np.mean(lengths))


PACK = data.pack


def pad_like_the_reference(samples, max_seq_len, packing=True, image_id=12, image_token_len=0, pad_multiple=1,
                           rows_read=0, bad=None, rows_used=None):
    """Replacement for `data.pack`: each sample alone in a row, right-padded to max_seq_len."""
    return PACK(samples, max_seq_len, False, image_id, image_token_len, max_seq_len, rows_read, bad, rows_used)


@contextlib.contextmanager
def reference_data_path():
    """Pad every sample to max_seq_len (with --packing 0, plain causal attention without position ids: the pad
    tokens then sit after the sample, as in the reference, and need no mask)."""
    data.pack = pad_like_the_reference
    try:
        yield
    finally:
        data.pack = PACK


def run(mode: str, args, dataset: str, folder: str) -> dict:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = os.path.join(folder, mode)
    flags = ["vlm-sft", "--data_path", dataset, "--tokenizer", args.tokenizer, "--vision_model", args.vision_model,
             "--from_weight", "none", "--hidden_size", str(args.hidden_size), "--num_hidden_layers",
             str(args.num_hidden_layers), "--batch_size", str(args.batch_size), "--max_seq_len",
             str(args.max_seq_len), "--max_steps", str(args.warmup + args.steps), "--log_interval", "1",
             "--save_interval", "100000", "--num_workers", str(args.num_workers), "--device", args.device,
             "--out_dir", out, "--checkpoint_dir", out, "--log_dir", out, "--add_system_ratio", "0",
             "--dtype", args.dtype, "--cpu_dtype", args.cpu_dtype, "--num_threads", str(args.num_threads)]
    if args.train_vision:
        flags += ["--train_vision", "1"]
    if mode == "padded":
        flags += ["--packing", "0"]
    baseline = reference_data_path() if mode == "padded" else contextlib.nullcontext()
    with baseline, contextlib.redirect_stdout(io.StringIO()):
        train.main(parser.parse_args(flags))
    with open(os.path.join(out, f"sft_vlm_{args.hidden_size}", "metrics.jsonl"), encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    first, last = entries[args.warmup - 1], entries[-1]
    seconds = last["time"] - first["time"]
    return {
        "mode": mode, "steps": len(entries) - args.warmup, "s/step": seconds / (len(entries) - args.warmup),
        "samples/s": (last["samples"] - first["samples"]) / seconds,
        "tokens/s": (last["tokens"] - first["tokens"]) / seconds,
        "padding efficiency": sum(e["padding_efficiency"] for e in entries[args.warmup:]) / args.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="model")
    parser.add_argument("--vision_model", default="random:siglip2-base-p32-256")
    parser.add_argument("--hidden_size", type=int, default=768)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=768)
    parser.add_argument("--min_tokens", type=int, default=100)
    parser.add_argument("--max_tokens", type=int, default=400)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    parser.add_argument("--modes", nargs="+", default=["packed", "padded"], choices=["packed", "padded"])
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--num_threads", type=int, default=0)
    parser.add_argument("--train_vision", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", help="CUDA precision")
    parser.add_argument("--cpu_dtype", default="auto", help="CPU precision (auto: bf16 where the CPU has it natively)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: the trainer's CPU setting (glibc keeps freed blocks for reuse); default: glibc's "
                             "own, for an A/B in separate processes")
    args = parser.parse_args()
    if args.malloc == "default":
        train.keep_freed_memory = lambda: False
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        dataset = os.path.join(folder, "sft.parquet")
        mean_tokens = write_dataset(dataset, tokenizer, args.rows, args.min_tokens, args.max_tokens)
        device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"CPU, {torch.get_num_threads()} threads"
        print(f"vlm-sft {args.hidden_size}x{args.num_hidden_layers}, tower {args.vision_model}, batch "
              f"{args.batch_size}, max_seq_len {args.max_seq_len}, {mean_tokens:.0f} tokens per sample on average, "
              f"{device}, malloc {args.malloc}, torch {torch.__version__}", flush=True)
        results = []
        for mode in args.modes:
            started = time.time()
            results.append(run(mode, args, dataset, folder))
            print(f"  {mode}: done in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    print("| data path | s/step | samples/s | tokens/s | padding efficiency |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['s/step']:.3f} | {r['samples/s']:.2f} | {r['tokens/s']:.0f} "
              f"| {r['padding efficiency']:.1%} |")
    by_mode = {r["mode"]: r for r in results}
    if len(by_mode) == 2:
        print(f"speed-up (samples/s): {by_mode['packed']['samples/s'] / by_mode['padded']['samples/s']:.2f}x")


if __name__ == "__main__":
    main()
