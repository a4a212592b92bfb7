"""Training throughput with and without `--vision_cache`: two epochs of `minimind-v train vlm-sft` with a frozen
random tower on the same synthetic data as `train_throughput.py` (one 256x256 JPEG per sample), once computing
every image (`plain`) and once with an empty cache, which the first epoch fills and the second reads (`cached`).
Reports s/step and samples/s per epoch, over the steps after the first of each epoch. The pair of runs is repeated
`--rounds` times in one process: the first round also pays the one-off set-up of the CPU kernels for each new
matrix shape, which favours whichever run comes second.

    python benchmarks/vision_cache.py --tokenizer tok    # siglip2-base-shaped tower, 128x4 decoder
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile

import torch

from minimind_v import train
from minimind_v.tokenizer import load_tokenizer
from train_throughput import write_dataset


def run(name: str, round_number: int, args, dataset: str, folder: str) -> list[dict]:
    """One two-epoch run in a fresh folder (and cache); throughput per epoch."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = tempfile.mkdtemp(dir=folder)
    settings = {
        "data_path": dataset,
        "tokenizer": args.tokenizer,
        "vision_model": args.vision_model,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "num_workers": args.num_workers,
        "num_threads": args.num_threads,
        "device": args.device,
        "dtype": args.dtype,
        "cpu_dtype": args.cpu_dtype,
        "out_dir": out,
        "checkpoint_dir": out,
        "log_dir": out,
    }
    flags = ["vlm-sft", *(item for key, value in settings.items() for item in (f"--{key}", str(value)))]
    flags += ["--from_weight", "none", "--epochs", "2", "--log_interval", "1", "--save_interval", "100000"]
    flags += ["--add_system_ratio", "0"]
    if name == "cached":
        flags += ["--vision_cache", os.path.join(out, "cache")]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(parser.parse_args(flags))
    with open(os.path.join(out, f"sft_vlm_{args.hidden_size}", "metrics.jsonl"), encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    epochs = []
    for epoch in (1, 2):
        steps = [e for e in entries if e["epoch"] == epoch]
        seconds = steps[-1]["time"] - steps[0]["time"]
        samples = steps[-1]["samples"] - steps[0]["samples"]
        timing = {"s/step": seconds / (len(steps) - 1), "samples/s": samples / seconds}
        epochs.append({"round": round_number, "run": name, "epoch": epoch, **timing})
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="model")
    parser.add_argument("--vision_model", default="random:siglip2-base-p32-256")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--min_tokens", type=int, default=80)
    parser.add_argument("--max_tokens", type=int, default=200)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--num_threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", help="CUDA autocast dtype")
    parser.add_argument("--cpu_dtype", default="auto")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        dataset = os.path.join(folder, "sft.parquet")
        mean_tokens = write_dataset(
            dataset, load_tokenizer(args.tokenizer), args.rows, args.min_tokens, args.max_tokens
        )
        print(
            f"vlm-sft {args.hidden_size}x{args.num_hidden_layers}, frozen tower {args.vision_model}, batch "
            f"{args.batch_size}, {args.rows} rows, {mean_tokens:.0f} tokens per sample on average, {args.device}, "
            f"torch {torch.__version__}",
            flush=True,
        )
        results = []
        for round_number in range(1, args.rounds + 1):
            for name in ("plain", "cached"):
                results += run(name, round_number, args, dataset, folder)
    print("| round | run | epoch | s/step | samples/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['round']} | {r['run']} | {r['epoch']} | {r['s/step']:.3f} | {r['samples/s']:.1f} |")


if __name__ == "__main__":
    main()
