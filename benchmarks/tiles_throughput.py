"""What `--max_tiles` costs in training: samples/s, tokens/s, squares (thumbnail + tiles) per image and peak
memory of `minimind-v train vlm-sft` on the same images for each --max_tiles, each run in a fresh process.

    python benchmarks/tiles_throughput.py --tokenizer model                       # 768x8, siglip2-base-shaped tower
    python benchmarks/tiles_throughput.py --tokenizer demo_out/tokenizer --hidden_size 128 --num_hidden_layers 4 \\
        --vision_model random:small --batch_size 16 --max_tiles 1 2 4 6             # the demo's shape

Images are --image_width x --image_height JPEGs (1024x768 by default) with one short question and answer each.
Peak memory is the process's peak resident set on CPU and `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from minimind_v import train
from minimind_v.loading import resolve_vision
from minimind_v.vision import ImagePreprocessor


def random_jpeg(rng: random.Random, width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 12)):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randint(4, max(height // 8, 5))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_dataset(path: str, rows: int, width: int, height: int) -> None:
    rng = random.Random(0)
    messages = [{"role": "user", "content": "<image>\nHow many circles are there?"},
                {"role": "assistant", "content": "There are several circles of many colours."}]
    pq.write_table(pa.table({"conversations": [json.dumps(messages)] * rows,
                             "image_bytes": pa.array([random_jpeg(rng, width, height) for _ in range(rows)],
                                                     pa.binary())}), path, row_group_size=64)


def train_once(args, max_tiles: int, dataset: str, folder: str) -> dict:
    """One training run in this process; its measured figures."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = os.path.join(folder, f"tiles{max_tiles}")
    flags = ["vlm-sft", "--data_path", dataset, "--tokenizer", args.tokenizer, "--vision_model", args.vision_model,
             "--from_weight", "none", "--hidden_size", str(args.hidden_size), "--num_hidden_layers",
             str(args.num_hidden_layers), "--batch_size", str(args.batch_size), "--max_seq_len",
             str(args.max_seq_len), "--max_steps", str(args.warmup + args.steps), "--log_interval", "1",
             "--save_interval", "100000", "--num_workers", str(args.num_workers), "--device", args.device,
             "--out_dir", out, "--checkpoint_dir", out, "--log_dir", out, "--add_system_ratio", "0",
             "--cpu_dtype", args.cpu_dtype, "--max_tiles", str(max_tiles)]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(parser.parse_args(flags))
    with open(os.path.join(out, f"sft_vlm_{args.hidden_size}", "metrics.jsonl"), encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    first, last = entries[args.warmup - 1], entries[-1]
    seconds = last["time"] - first["time"]
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(args.device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    side = resolve_vision(args.vision_model)[1]["image_size"]
    image = Image.new("RGB", (args.image_width, args.image_height))
    squares = ImagePreprocessor(side, max_tiles=max_tiles).num_tiles(image)
    return {"max_tiles": max_tiles, "squares": squares, "samples/s": (last["samples"] - first["samples"]) / seconds,
            "tokens/s": (last["tokens"] - first["tokens"]) / seconds, "peak GiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="model")
    parser.add_argument("--vision_model", default="random:siglip2-base-p32-256")
    parser.add_argument("--hidden_size", type=int, default=768)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=2048)
    parser.add_argument("--image_width", type=int, default=1024)
    parser.add_argument("--image_height", type=int, default=768)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    parser.add_argument("--max_tiles", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--cpu_dtype", default="auto", help="CPU precision (auto: bf16 where the CPU has it natively)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child run: this --max_tiles
    parser.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(train_once(args, args.one, args.dataset, folder)))
        return
    with tempfile.TemporaryDirectory() as folder:
        dataset = os.path.join(folder, "sft.parquet")
        write_dataset(dataset, args.rows, args.image_width, args.image_height)
        device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"CPU, {torch.get_num_threads()} threads"
        print(f"vlm-sft {args.hidden_size}x{args.num_hidden_layers}, tower {args.vision_model}, batch "
              f"{args.batch_size}, {args.image_width}x{args.image_height} images, {device}, torch {torch.__version__}",
              flush=True)
        results = []
        for max_tiles in args.max_tiles:
            child = subprocess.run([sys.executable, *sys.argv, "--one", str(max_tiles), "--dataset", dataset],
                                   capture_output=True, text=True, check=True,
                                   env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ})  # read when torch loads
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print("| --max_tiles | squares per image | samples/s | tokens/s | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['max_tiles']} | {r['squares']} | {r['samples/s']:.2f} | {r['tokens/s']:.0f} "
              f"| {r['peak GiB']:.2f} |")


if __name__ == "__main__":
    main()
