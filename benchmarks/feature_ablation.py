"""What tiles, several images and video buy: train the same small VLM from zero on a synthetic task that needs the
feature, with and without it, at the same budget (steps, batch, learning rate, seed), and score both on the
task's held-out split with a blind control.

    python benchmarks/feature_ablation.py --task details --detail_radius 0.2 --out_dir ablation  # --max_tiles 4 vs 1
    python benchmarks/feature_ablation.py --task multi --out_dir ablation     # both images vs the first alone
    python benchmarks/feature_ablation.py --task video --video_frames 4 --out_dir ablation  # 4 frames vs the middle one

Every step is an ordinary `minimind-v` command, printed before it runs: `data synth --task T`, `train-tokenizer`,
then the tower both variants start from (`--tower_steps` of `train vlm-pretrain` on the shapes task's captions,
as a real tower has seen photographs before it meets a task; 0: a random `random:small` tower), then for each
variant `train vlm-pretrain` (captions) and `train vlm-sft` (questions) from a random decoder with that tower,
which keeps training, and `eval --blind`. The last line is one comparable row.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

from minimind_v.cli import main as cli_main
from minimind_v.demo import init_std
from minimind_v.synth import SynthConfig


def variants(args) -> list[tuple[str, list[str], list[str]]]:
    """(name, extra `data synth` flags, extra train/eval flags) of the variant with the feature, then without it."""
    return {
        "details": [("tiles", [], ["--max_tiles", "4"]), ("one square", [], ["--max_tiles", "1"])],
        "multi": [("both images", [], []), ("first image", ["--images_shown", "first"], [])],
        "video": [(f"{args.video_frames} frames", [], ["--video_frames", str(args.video_frames)]),
                  ("middle frame", [], ["--video_frames", "1"])],
    }[args.task]


def run(argv: list[str]) -> float:
    """Run one `minimind-v` command line; its seconds."""
    print("\n$ minimind-v " + shlex.join(argv), flush=True)
    started = time.perf_counter()
    cli_main(argv)
    return time.perf_counter() - started


def variant_data(args, name: str, synth_flags: list[str]) -> str:
    """The variant's synthetic data folder, written once; variants without their own synth flags share one."""
    folder = os.path.join(args.out_dir, args.task, "data_" + name.replace(" ", "_") if synth_flags else "data")
    if args.task == "details":
        synth_flags = [*synth_flags, "--detail_radius", str(args.detail_radius)]
        folder += f"_radius{args.detail_radius}"
    if not os.path.isfile(os.path.join(folder, "vlm_test.parquet")):
        run(["data", "synth", "--task", args.task, "--out_dir", folder, "--train_rows", str(args.train_rows),
             "--test_rows", str(args.test_rows), "--lang", "en", "--seed", str(args.seed), *synth_flags])
    return folder


def model_flags(args, tokenizer: str) -> list[str]:
    """The flags that build the model, for training and for eval."""
    return ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
            "--tokenizer", tokenizer, "--device", args.device]


def common_flags(args, work: str, tokenizer: str) -> list[str]:
    """The model, data and optimiser flags of every training run in `work` (the same budget for both variants)."""
    return model_flags(args, tokenizer) + [
        "--batch_size", str(args.batch_size), "--cpu_dtype", args.cpu_dtype, "--num_threads", str(args.num_threads),
        "--out_dir", os.path.join(work, "model"),
        "--checkpoint_dir", os.path.join(work, "checkpoints"), "--log_dir", os.path.join(work, "runs"),
        "--initializer_range", str(init_std(args.hidden_size)), "--seed", str(args.seed), "--epochs", "100",
        "--log_interval", "50", "--save_interval", "100000", "--add_system_ratio", "0", "--empty_think_ratio", "1",
        "--train_vision", "1", "--freeze_llm", "0", "--max_seq_len", str(args.max_seq_len), "--num_workers", "1",
        "--learning_rate", str(args.learning_rate), "--warmup_steps", "50",
    ]


def shapes_tower(args, tokenizer: str) -> str:
    """The tower both variants start from: `random:small`, or (--tower_steps) that tower after vlm-pretrain on
    the captions of the shapes task (64x64 scenes of the demo), whose decoder is dropped. Trained once."""
    if not args.tower_steps:
        return "random:small"
    work = os.path.join(args.out_dir, args.task, f"tower_{args.tower_steps}")
    tower = os.path.join(work, "model", f"tower_{args.hidden_size}_vision")
    if os.path.isdir(tower):
        return tower
    data = os.path.join(args.out_dir, "shapes_data")
    if not os.path.isfile(os.path.join(data, "vlm_pretrain.parquet")):
        run(["data", "synth", "--out_dir", data, "--files", "vlm_pretrain", "--train_rows", str(args.train_rows),
             "--lang", "en", "--seed", str(args.seed)])
    run(["train", "vlm-pretrain", "--data_path", os.path.join(data, "vlm_pretrain.parquet"), "--from_weight", "none",
         "--vision_model", "random:small", "--save_weight", "tower", "--max_steps", str(args.tower_steps)]
        + common_flags(args, work, tokenizer))
    return tower


def train_and_eval(args, name: str, data: str, tokenizer: str, tower: str, flags: list[str]) -> dict:
    """vlm-pretrain then vlm-sft from a random decoder and `tower`, then the held-out eval; the eval summary and
    seconds."""
    work = os.path.join(args.out_dir, args.task, name.replace(" ", "_"))
    common = common_flags(args, work, tokenizer) + flags
    seconds = run(["train", "vlm-pretrain", "--data_path", os.path.join(data, "vlm_pretrain.parquet"),
                   "--from_weight", "none", "--vision_model", tower,
                   "--max_steps", str(args.pretrain_steps)] + common)
    seconds += run(["train", "vlm-sft", "--data_path", os.path.join(data, "vlm_sft.parquet"),
                    os.path.join(data, "vlm_pretrain.parquet"), "--from_weight", "pretrain_vlm",
                    "--max_steps", str(args.sft_steps)] + common)
    out = os.path.join(work, "eval.json")
    run(["eval", "--data_path", os.path.join(data, "vlm_test.parquet"), "--train_path",
         os.path.join(data, "vlm_sft.parquet"), "--blind", "--out", out, "--save_dir", os.path.join(work, "model"),
         "--weight", "sft_vlm", *model_flags(args, tokenizer), *flags])
    with open(out, encoding="utf-8") as f:
        return {**json.load(f), "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["details", "multi", "video"], required=True)
    parser.add_argument("--out_dir", default="ablation")
    parser.add_argument("--train_rows", type=int, default=20000)
    parser.add_argument("--test_rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--sft_steps", type=int, default=900)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu_dtype", default="auto")
    parser.add_argument("--num_threads", type=int, default=0, help="CPU threads of each training run (0: every core)")
    parser.add_argument("--detail_radius", type=float, default=SynthConfig.detail_radius,
                        help="details: the shapes' radius in --image_size units (data synth --detail_radius)")
    parser.add_argument("--video_frames", type=int, default=8, help="video: frames sampled from the 8 of each video")
    parser.add_argument("--tower_steps", type=int, default=600,
                        help="steps of vlm-pretrain on the shapes task's captions that train the tower both variants "
                             "start from (0: a random tower; from zero it did not learn the details and video images)")
    args = parser.parse_args()
    compared = variants(args)
    folders = [variant_data(args, name, synth) for name, synth, _ in compared]
    tokenizer = os.path.join(args.out_dir, args.task, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
        run(["train-tokenizer", "--data_path", os.path.join(folders[0], "vlm_pretrain.parquet"),
             os.path.join(folders[0], "vlm_sft.parquet"), "--out_dir", tokenizer, "--vocab_size", "1000"])
    tower = shapes_tower(args, tokenizer)
    results = [(name, train_and_eval(args, name, folder, tokenizer, tower, flags))
               for (name, _, flags), folder in zip(compared, folders)]
    print(f"\n{args.task}: tower {tower}, {args.pretrain_steps} + {args.sft_steps} steps of batch {args.batch_size}, "
          f"{args.hidden_size}x{args.num_hidden_layers}, seed {args.seed}", file=sys.stderr)
    types = sorted(results[0][1].get("per_type", {}))
    print("| variant | held-out accuracy | blind | majority | " + " | ".join(types) + " | training minutes |")
    print("|---|---|---|---|" + "---|" * len(types) + "---|")
    for name, r in results:
        per_type = " | ".join(f"{r['per_type'][t]['accuracy']:.1%}" for t in types)
        print(f"| {name} | {r['accuracy']:.1%} | {r.get('blind_accuracy', float('nan')):.1%} | "
              f"{r.get('majority_baseline', float('nan')):.1%} | {per_type} | {r['train_seconds'] / 60:.1f} |")


if __name__ == "__main__":
    main()
