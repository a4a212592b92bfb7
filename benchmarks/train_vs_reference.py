"""Training speed of `minimind-v train vlm-sft` against the reference trainer (`trainer/train_sft_vlm.py` of
jingyaogong/minimind-v, unmodified), side by side on the same machine, data and weights, alternating rounds.

    python benchmarks/train_vs_reference.py --reference_src PATH/TO/minimind-v --reference_python PATH/TO/python

The set-up of the reference's own SFT benchmark: the 768x8 decoder (`llm_768.pth`, random) with a frozen random
tower of the siglip2-base-p32-256 shape, batch 4, `--max_seq_len 768`, `--freeze_llm 1`, 2 data workers, rows of
one 256x256 JPEG and a conversation of 101-400 tokens (64 image tokens included). `--reference_python` is a Python
with the reference's requirements (torch, transformers 4.57, datasets); the reference reads its tokenizer from
`model/` of its checkout, and so do we here. The reference tree is copied into --work_dir to run, so the
checkout is never written to.

Each trainer logs one line per optimizer step (`--log_interval 1`); every line is timestamped as it arrives,
and s/step is the mean over the --steps steps after --warmup. Ours runs with its defaults (packing, and bf16
autocast where the CPU has native bf16; `--ours` adds flags). One line per trainer and round, then the medians:

    reference  round 1: 0.412 samples/s  103 tokens/s  9.71 s/step
    ours       round 1: ...
    ours/reference: 4.8x samples/s (medians over 2 rounds)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

from minimind_v.config import SIGLIP2_BASE_P32_256, MiniMindConfig
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.tokenizer import load_tokenizer
from minimind_v.vision import build_vision_tower
from minimind_v.weights import save_native
from train_throughput import write_dataset  # benchmarks/train_throughput.py: the same synthetic rows

STEP_LINE = re.compile(r"Epoch:\[\d+/\d+\]\(\d+/\d+\), loss: ")
TOWER = "siglip2-base-p32-256-ve"
PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 256,
                "width": 256}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


def make_assets(folder: str, tokenizer_dir: str, rows: int, hidden_size: int, layers: int) -> tuple[str, float]:
    """A random tower folder, random `llm_{hidden}.pth` and a reference-schema parquet, written once into `folder`.
    Returns the parquet path and its mean tokens per sample."""
    import json

    os.makedirs(folder, exist_ok=True)
    tower_dir = os.path.join(folder, TOWER)
    if not os.path.isdir(tower_dir):
        torch.manual_seed(0)
        build_vision_tower(SIGLIP2_BASE_P32_256).save_pretrained(tower_dir + ".tmp")
        with open(os.path.join(tower_dir + ".tmp", "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(PREPROCESSOR, f)
        os.replace(tower_dir + ".tmp", tower_dir)
    weights = os.path.join(folder, f"llm_{hidden_size}.pth")
    tokenizer = load_tokenizer(tokenizer_dir)
    if not os.path.exists(weights):
        torch.manual_seed(0)
        config = MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=layers, vocab_size=len(tokenizer))
        save_native(MiniMindForCausalLM(config), weights)
    dataset = os.path.join(folder, "sft_i2t.parquet")
    mean_path = dataset + ".mean_tokens"
    if not os.path.exists(mean_path):
        mean = write_dataset(dataset, tokenizer, rows, 101, 400)
        with open(mean_path, "w", encoding="utf-8") as f:
            f.write(str(mean))
    with open(mean_path, encoding="utf-8") as f:
        return dataset, float(f.read())


def timed_steps(argv: list[str], cwd: str, steps: int, warmup: int, env: dict) -> list[float]:
    """Run a trainer, stamp each step line as it arrives, stop it after warmup + steps lines; the step times."""
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    stamps, tail = [], []
    try:
        for line in process.stdout:
            tail = (tail + [line])[-20:]
            if STEP_LINE.search(line):
                stamps.append(time.perf_counter())
                if len(stamps) == warmup + steps + 1:
                    break
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait()
    if len(stamps) < warmup + steps + 1:
        raise SystemExit(f"{argv[0]} ended after {len(stamps)} steps:\n{''.join(tail)}")
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def reference_run(args, assets: str, dataset: str) -> list[float]:
    tree = os.path.join(args.work_dir, "reference")
    if not os.path.isdir(tree):
        shutil.copytree(args.reference_src, tree, ignore=shutil.ignore_patterns(".git"), symlinks=True)
        os.makedirs(os.path.join(tree, "out"), exist_ok=True)
        for name, source in ((os.path.join("model", TOWER), os.path.join(assets, TOWER)),
                             (os.path.join("out", f"llm_{args.hidden_size}.pth"),
                              os.path.join(assets, f"llm_{args.hidden_size}.pth"))):
            target = os.path.join(tree, name)
            if os.path.lexists(target):
                os.remove(target) if os.path.islink(target) or os.path.isfile(target) else shutil.rmtree(target)
            os.symlink(source, target)
    argv = [args.reference_python, "-u", "train_sft_vlm.py", "--from_weight", "llm", "--epochs", "1",
            "--log_interval", "1", "--save_interval", "1000000", "--data_path", dataset, "--hidden_size",
            str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers), "--max_seq_len", "768",
            "--batch_size", "4", "--freeze_llm", "1", "--num_workers", str(args.num_workers), "--device", "cpu"]
    return timed_steps(argv, os.path.join(tree, "trainer"), args.steps, args.warmup, os.environ.copy())


def our_run(args, assets: str, dataset: str) -> list[float]:
    out = os.path.join(args.work_dir, "ours")
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, f"llm_{args.hidden_size}.pth")
    if not os.path.exists(weights):
        os.symlink(os.path.join(assets, f"llm_{args.hidden_size}.pth"), weights)
    argv = [sys.executable, "-u", "-m", "minimind_v", "train", "vlm-sft", "--data_path", dataset, "--tokenizer",
            args.tokenizer, "--vision_model", os.path.join(assets, TOWER), "--from_weight", "llm", "--out_dir", out,
            "--checkpoint_dir", out, "--log_dir", out, "--hidden_size", str(args.hidden_size),
            "--num_hidden_layers", str(args.num_hidden_layers), "--max_seq_len", "768", "--batch_size", "4",
            "--freeze_llm", "1", "--num_workers", str(args.num_workers), "--log_interval", "1", "--save_interval",
            "1000000", "--max_steps", str(args.warmup + args.steps + 1), "--device", "cpu", *args.ours]
    return timed_steps(argv, out, args.steps, args.warmup, os.environ.copy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_src", help="a checkout of jingyaogong/minimind-v (omit to time ours alone)")
    parser.add_argument("--reference_python", default=sys.executable,
                        help="a Python with the reference's requirements installed")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: model/ of --reference_src)")
    parser.add_argument("--work_dir", default="bench_vs_reference", help="assets and runs (kept for reruns)")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--hidden_size", type=int, default=768)
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    parser.add_argument("--rounds", type=int, default=2, help="reference and ours alternate this many times")
    parser.add_argument("--ours", nargs=argparse.REMAINDER, default=[], help="extra flags for our trainer")
    args = parser.parse_args()
    if args.tokenizer is None:
        if not args.reference_src:
            raise SystemExit("pass --tokenizer, or --reference_src to use the reference's tokenizer")
        args.tokenizer = os.path.join(args.reference_src, "model")
    assets = os.path.join(args.work_dir, "assets")
    dataset, mean_tokens = make_assets(assets, args.tokenizer, args.rows, args.hidden_size, args.num_hidden_layers)
    runs = [("ours", our_run)] + ([("reference", reference_run)] if args.reference_src else [])
    rates = {name: [] for name, _ in runs}
    for round_index in range(1, args.rounds + 1):
        for name, run in runs[::-1] if round_index % 2 else runs:
            seconds = statistics.mean(run(args, os.path.abspath(assets), os.path.abspath(dataset)))
            rates[name].append(4 / seconds)
            print(f"{name:10s} round {round_index}: {4 / seconds:.3f} samples/s  {4 / seconds * mean_tokens:.0f} "
                  f"tokens/s  {seconds:.2f} s/step", flush=True)
    if args.reference_src:
        ratio = statistics.median(rates["ours"]) / statistics.median(rates["reference"])
        print(f"ours/reference: {ratio:.1f}x samples/s (medians over {args.rounds} rounds, {mean_tokens:.0f} "
              f"tokens per sample)")


if __name__ == "__main__":
    main()
