"""`minimind-v plot RUN [RUN ...]`: loss and learning-rate curves of training runs as a PNG.

RUN is a run folder (`{log_dir}/{save_weight}_{hidden}`, holding metrics.jsonl) or a metrics.jsonl file.
"""

from __future__ import annotations

import json
import os


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders or metrics.jsonl files")
    parser.add_argument("--out", help="PNG path (default: loss.png inside the first run folder)")


def metrics_file(run: str) -> str:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"plot: no metrics at {path} (pass a run folder written by `minimind-v train`)")
    return path


def read_metrics(path: str) -> list[dict]:
    """The logged steps of a run, in order, the last entry winning when a step appears twice."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                by_step[entry["step"]] = entry
    return [by_step[s] for s in sorted(by_step)]


def plot(runs: list[str], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    for run in runs:
        entries = read_metrics(metrics_file(run))
        if not entries:
            raise SystemExit(f"plot: {run} has no logged steps yet")
        name = os.path.basename(os.path.normpath(run if os.path.isdir(run) else os.path.dirname(run)))
        steps = [e["step"] for e in entries]
        loss_ax.plot(steps, [e["loss"] for e in entries], label=name)
        lr_ax.plot(steps, [e["learning_rate"] for e in entries], label=name)
    loss_ax.set_ylabel("loss (CE + aux)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main(args) -> None:
    first = args.runs[0]
    out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".", "loss.png")
    print(f"wrote {plot(args.runs, out)}")
