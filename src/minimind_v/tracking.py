"""What a training run reports: reference-style log lines, a progress bar, a metrics JSONL per run, optional
wandb / swanlab / tensorboard logging, and the end-of-run summary."""

from __future__ import annotations

import json
import os
import sys

from tqdm import tqdm

from .samples import BAD_REASONS
from .weights import atomic_write

LOGGERS = ("none", "wandb", "swanlab", "tensorboard")


def reference_line(epoch: int, epochs: int, step: int, iters: int, loss: float, aux_loss: float, lr: float,
                   remaining_min: float) -> str:
    """The reference trainer's log line (loss is CE + aux)."""
    return (f"Epoch:[{epoch + 1}/{epochs}]({step}/{iters}), loss: {loss:.4f}, logits_loss: {loss - aux_loss:.4f}, "
            f"aux_loss: {aux_loss:.4f}, lr: {lr:.8f}, epoch_time: {remaining_min:.1f}min")


def format_metrics(metrics: dict[str, float]) -> str:
    """An objective's own metrics for the log line (empty when it has none)."""
    return "".join(f", {name}: {value:.4f}" for name, value in metrics.items())


def format_flops(flops_per_s: float) -> str:
    """FLOP/s with an SI prefix: 1.234e12 -> '1.23 TFLOP/s'."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.2f} {prefix}FLOP/s"
    return f"{flops_per_s / 1e6:.2f} MFLOP/s"


def format_efficiency(flops_per_s: float | None, mfu: float | None, stall: float) -> str:
    """Model FLOP/s per process and MFU (when counted) and the data stall, for the log line."""
    counted = "" if flops_per_s is None else f", {format_flops(flops_per_s)}"
    return counted + ("" if mfu is None else f", MFU {mfu:.1%}") + f", data stall {stall:.1%}"


def format_bad_rows(bad: dict[str, int]) -> str:
    """The bad rows so far by reason for the log line (empty when there are none)."""
    if not bad:
        return ""
    return f", bad rows {sum(bad.values())} (" + ", ".join(f"{reason} {count}" for reason, count in bad.items()) + ")"


class Progress:
    """A tqdm bar over optimizer steps (only on a terminal); log lines are printed above it."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))
        self.enabled = enabled

    def update(self, postfix: dict | None = None) -> None:
        self.bar.update(1)
        if postfix is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


class Tracker:
    """Rank-0 metrics sink: `{run_dir}/metrics.jsonl` (one JSON object per log step) plus an optional logger.

    On resume the JSONL keeps only the lines up to the resumed step, so replayed steps are not duplicated (and a line
    torn by a kill is dropped).
    """

    def __init__(self, run_dir: str, logger: str, project: str, run_name: str, config: dict,
                 resume_step: int | None = None, resume_id: str | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = _lines_up_to(self.path, resume_step) if resume_step is not None else []
        atomic_write(self.path, lambda f: f.write("".join(kept).encode("utf-8")))
        self.logger = logger
        self.run_id = resume_id
        self.backend = self._start(logger, project, run_name, config, run_dir, resume_id)

    def _start(self, logger, project, run_name, config, run_dir, resume_id):
        if logger == "none":
            return None
        if logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise SystemExit("--logger tensorboard needs `pip install tensorboard`") from err
            return SummaryWriter(os.path.join(run_dir, "tensorboard"))
        try:
            backend = __import__(logger)
        except ImportError as err:
            raise SystemExit(f"--logger {logger} needs `pip install {logger}`") from err
        # wandb and swanlab share this call (the reference imports swanlab as wandb)
        run = backend.init(project=project, name=run_name, config=config, id=resume_id, resume="allow")
        self.run_id = getattr(run, "id", None)
        return backend

    def log(self, metrics: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        flat = {f"{k}/{sub}": v for k, d in metrics.items() if isinstance(d, dict) for sub, v in d.items()}
        scalars = {k: v for k, v in {**metrics, **flat}.items() if isinstance(v, (int, float)) and k != "step"}
        if self.logger == "tensorboard":
            for key, value in scalars.items():
                self.backend.add_scalar(key, value, metrics["step"])
        elif self.backend is not None:
            self.backend.log(scalars, step=metrics["step"])

    def sync(self) -> None:
        """fsync the JSONL, so that every line up to a resume file's step survives a power loss as that file does."""
        with open(self.path, "a", encoding="utf-8") as f:
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.logger == "tensorboard":
            self.backend.close()
        elif self.backend is not None:
            self.backend.finish()


def _lines_up_to(path: str, step: int) -> list[str]:
    if not os.path.isfile(path):
        return []
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # the last line, torn by a kill or a power loss
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def format_summary(summary: dict) -> str:
    """The end-of-run report, one fact per line."""
    bad = summary["bad_rows"]
    lines = [
        f"run summary ({summary['stage']})",
        f"  steps {summary['steps']}, samples {summary['samples']}, rows read {summary['rows_read']}, "
        f"time {summary['seconds'] / 60:.1f} min",
        f"  throughput {summary['samples_per_s']:.2f} samples/s, {summary['tokens_per_s']:.0f} tokens/s",
        f"  padding efficiency {summary['padding_efficiency']:.1%} (real tokens / processed tokens)",
        f"  final loss {summary['final_loss']:.4f}, non-finite steps skipped {summary['nonfinite_steps']}",
        f"  bad rows {sum(bad.values())} ({summary['bad_fraction']:.2%})"
        + "".join(f"\n    {reason}: {count} ({BAD_REASONS[reason]})" for reason, count in bad.items() if count),
        f"  weights {summary['weights']}",
    ]
    if summary.get("vision_tower"):
        lines.append(f"  vision tower {summary['vision_tower']} (load it with --vision_model)")
    return "\n".join(lines)
