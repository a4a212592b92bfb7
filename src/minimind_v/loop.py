"""The training loop, the same for every stage: epochs of optimizer steps over a `Trainer`'s micro-batches, each
step `accumulation_steps` micro-batches of the objective's loss, then one clipped AdamW step; counting, logging,
saving, and stopping on a signal, a time budget (`--max_minutes`), a loss criterion (`--stop_loss`), too many bad
rows or a run of non-finite steps.

The loss of a step is the objective's summed loss over every unit of the step (supervised tokens for the causal LM,
pairs for DPO), on every process and micro-batch, divided by the number of those units, plus the MoE auxiliary
loss: a long sample weighs the same whatever it is batched with. Nothing here waits for the device except the log
lines (every `--log_interval` steps) and the progress bar (every few seconds).

Each log line also reports the achieved model FLOP/s, the MFU (against the device's peak, see `flops`) and the data
stall: the fraction of the wall time since the previous line spent waiting for the DataLoader's next batch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from itertools import islice
from typing import NamedTuple

import torch
from torch import nn

from . import distributed
from .checkpoint import set_rng_state
from .data import Batch, loader
from .flops import StepFlops, batch_work, peak_flops
from .samples import BAD_REASONS
from .tracking import (
    Progress,
    Tracker,
    format_bad_rows,
    format_efficiency,
    format_flops,
    format_metrics,
    format_summary,
    reference_line,
)
from .train_config import TrainConfig
from .trainer import Trainer, TrainingError, ceil_div, seed_everything
from .weights import atomic_write

BAD_CHECK_ROWS = 256  # the bad-row fraction is enforced once this many rows were read (or at epoch end)


class StopRequest:
    """Signal handler: the first SIGINT/SIGTERM asks for a save and a clean stop at the end of the step."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def training_precision(config: TrainConfig, cuda: bool) -> tuple[torch.dtype | None, str]:
    """The autocast dtype of the matrix products (None: float32 throughout) and the log line that says why."""
    if cuda:
        dtype = None if config.dtype == "float32" else getattr(torch, config.dtype)
        what = "float32" if dtype is None else f"{config.dtype} autocast"
        scaler = " with a GradScaler" if config.dtype == "float16" else ""
        return dtype, f"precision: {what}{scaler} on CUDA (--dtype {config.dtype})"
    feature = distributed.cpu_bf16_feature()
    if config.cpu_dtype == "float32":
        why = f"--cpu_dtype float32, native bf16: {feature}" if feature else "no native bf16 (AVX512-BF16 or AMX) here"
        return None, f"precision: float32 on CPU ({why})"
    if feature:
        return torch.bfloat16, (f"precision: bfloat16 autocast on CPU (native bf16: {feature}); --cpu_dtype float32 "
                                "to keep fp32")
    return torch.bfloat16, ("precision: bfloat16 autocast on CPU (--cpu_dtype bfloat16 without native bf16: slower "
                            "than float32 here)")


def frozen_models(trainer: Trainer) -> list[nn.Module]:
    """The models the objective runs without gradients on each micro-batch besides the trained one: DPO's reference
    (the starting weights, or the policy with its adapters off: the same products) or distillation's teacher."""
    if trainer.stage.objective == "dpo":
        return [trainer.model]
    if trainer.stage.objective == "distill":
        return [trainer.objective.teacher]
    return []


class Mark(NamedTuple):
    """Where the run stood at the previous log line: wall time, counters, model FLOPs and data wait so far."""

    time: float
    state: dict
    flops: float
    waited: float


def learning_rate(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """The reference cosine from ~peak down to 0.1 * peak at step `total` (steps count from 1), with an
    optional linear warm-up over the first `warmup` steps."""
    lr = peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / total)))
    return lr * min(1.0, step / warmup) if warmup else lr


class StepMetrics:
    """Sums kept on the device between log lines (no host sync per step): the step losses and aux losses of
    good steps, the objective's units and metric sums, and the non-finite step counters."""

    def __init__(self, names: tuple[str, ...], device: torch.device, streak: int):
        zeros = lambda: torch.zeros((), device=device)  # noqa: E731
        self.names = names
        self.loss, self.aux, self.good_steps, self.units = zeros(), zeros(), zeros(), zeros()
        self.metrics = {name: zeros() for name in names}
        self.streak, self.worst_streak, self.nonfinite = zeros() + streak, zeros(), zeros()

    def add(self, bad: torch.Tensor, loss: torch.Tensor, aux: torch.Tensor, units: torch.Tensor,
            metrics: dict[str, torch.Tensor]) -> None:
        good = ~bad
        self.loss += torch.where(good, loss, 0.0)
        self.aux += torch.where(good, aux, 0.0)
        self.good_steps += good.float()
        self.units += torch.where(good, units.float(), 0.0)
        for name in self.names:
            self.metrics[name] += torch.where(good, metrics[name], 0.0)
        self.nonfinite += bad.float()
        self.streak.copy_((self.streak + 1) * bad.float())
        self.worst_streak.copy_(torch.maximum(self.worst_streak, self.streak))

    def flush(self, processes: distributed.Processes) -> dict:
        """The means since the last flush, summed over processes; the counters restart."""
        sums = distributed.all_reduce_sum(torch.stack(self._summed()), processes)
        loss, aux, units, *metric_sums = sums.tolist()
        world = processes.world_size
        good, worst, nonfinite = self.good_steps.item(), self.worst_streak.item(), self.nonfinite.item()
        per_step = world * good
        means = {"loss": loss / per_step if good else math.nan, "aux_loss": aux / per_step if good else math.nan,
                 "worst_streak": worst, "nonfinite": nonfinite}
        means.update({name: total / units if units else math.nan for name, total in zip(self.names, metric_sums)})
        for acc in (self.loss, self.aux, self.good_steps, self.units, self.worst_streak, self.nonfinite,
                    *self.metrics.values()):
            acc.zero_()
        return means

    def snapshot(self, processes: distributed.Processes) -> dict:
        """The sums since the last flush for the resume state: those `flush` adds over processes, already added;
        the step counters, which every process counts alike."""
        summed = distributed.all_reduce_sum(torch.stack(self._summed()), processes).tolist()
        return {"summed": summed, "good_steps": self.good_steps.item(), "nonfinite": self.nonfinite.item(),
                "worst_streak": self.worst_streak.item()}

    def restore(self, saved: dict, is_main: bool) -> None:
        """Continue the sums of a snapshot (the main process holds the added ones), so the first log line after a
        resume, and a --stop_loss decided on it, are those of the uninterrupted run."""
        if not saved:
            return
        for acc, value in zip(self._summed(), saved["summed"]):
            acc.fill_(value if is_main else 0.0)
        for name in ("good_steps", "nonfinite", "worst_streak"):
            getattr(self, name).fill_(saved[name])

    def _summed(self) -> list[torch.Tensor]:
        return [self.loss, self.aux, self.units, *self.metrics.values()]


class Loop:
    """Runs a `Trainer` until its steps are done or a stop is requested."""

    def __init__(self, trainer: Trainer, stop: StopRequest):
        self.trainer, self.stop = trainer, stop
        self.config, self.state = trainer.config, trainer.state
        self.sums = StepMetrics(tuple(trainer.objective.metrics), trainer.device, self.state.nonfinite_streak)
        self.last_loss = torch.zeros((), device=trainer.device)
        self.last_saved_step = self.state.global_step
        self.lr = 0.0
        self.autocast_dtype, self.precision = training_precision(self.config, trainer.cuda)
        grpo = trainer.stage.objective == "grpo"  # its steps sample answers the batch does not hold: no FLOP count
        self.step_flops = None if grpo else StepFlops(trainer.model, frozen_models(trainer))
        self.peak: float | None = None
        self.flops_done = self.waited = self.step_wait = 0.0
        self.sums.restore(self.state.interval, trainer.processes.is_main)
        self.out_of_time = False  # --max_minutes passed (decided on the counts of every process)
        self.loss_reached = False  # --stop_loss reached (decided on the loss of every process)

    def run(self) -> None:
        trainer, config, state = self.trainer, self.config, self.state
        trainer.log(f"{config.stage}: {trainer.data.total_rows} rows in {config.data_path}, {config.batch_size} "
                    f"samples x {trainer.processes.world_size} processes x {config.accumulation_steps} accumulation "
                    f"per step, {trainer.steps_per_epoch} steps per epoch, {trainer.total_steps} steps in all, "
                    f"device {trainer.device}")
        trainer.log(self.precision)
        if self.step_flops and trainer.processes.is_main:
            self.peak, source = peak_flops(trainer.device, self.autocast_dtype or torch.float32)
            trainer.log(f"MFU against a peak of {format_flops(self.peak)} per process ({source})")
        self.tracker = None
        if trainer.processes.is_main:
            self.tracker = Tracker(trainer.run_dir, config.logger, config.wandb_project,
                                   f"{config.wandb_project}-Epoch-{config.epochs}-BatchSize-{config.batch_size}"
                                   f"-LearningRate-{config.learning_rate}", asdict(config),
                                   resume_step=state.global_step if config.from_resume else None,
                                   resume_id=trainer.logger_id)
            trainer.logger_id = self.tracker.run_id
        self.progress = Progress(trainer.total_steps, state.global_step, trainer.processes.is_main)
        self.started = time.time()
        self.mark = Mark(self.started, asdict(state), 0.0, 0.0)
        self.first = asdict(state)
        self.bar_loss = (self.started, float("nan"))
        self.final_loss = float("nan")
        try:
            while state.epoch < config.epochs and not self._finished():
                self._run_epoch()
        finally:
            self.progress.close()
        if self.out_of_time:
            trainer.log(f"--max_minutes {config.max_minutes:g} passed: training ends at step {state.global_step} of "
                        f"{trainer.total_steps}")
        if self.loss_reached:
            trainer.log(f"--stop_loss {config.stop_loss:g} reached (mean loss {self.final_loss:.4f} since the previous "
                        f"log line): training ends at step {state.global_step} of {trainer.total_steps}")
        if self.stop.signum is None and state.global_step != self.last_saved_step:
            self._save()
        self._summary()
        if self.tracker:
            self.tracker.close()

    def _finished(self) -> bool:
        return self.stop.signum is not None or self.out_of_time or self.loss_reached or (
            bool(self.config.max_steps) and self.state.global_step >= self.config.max_steps)

    def _save(self) -> None:
        if self.tracker:
            self.tracker.sync()
        self.state.interval = self.sums.snapshot(self.trainer.processes)
        self.trainer.save(int(self.sums.streak.item()))
        self.last_saved_step = self.state.global_step

    def _run_epoch(self) -> None:
        trainer, config, state = self.trainer, self.config, self.state
        if trainer.saved_rng is not None:
            set_rng_state(trainer.saved_rng)
            trainer.saved_rng = None
        else:
            seed_everything(config.seed + state.epoch + 10_000 * trainer.processes.rank)
        micro = trainer.data.epoch(state.epoch, state.rows_done, config.batch_size, trainer.processes.rank,
                                   trainer.processes.world_size)
        batches = iter(loader(micro, config.num_workers, pin_memory=trainer.cuda))
        start_rows, consumed = state.rows_done, 0
        epoch_steps = state.step + ceil_div(len(micro), config.accumulation_steps)
        epoch_clock = (time.time(), state.step)
        try:
            while not self._finished():
                waiting = time.perf_counter()
                group = list(islice(batches, config.accumulation_steps))
                self.step_wait = time.perf_counter() - waiting
                if not group:
                    break
                self._optimizer_step(group)
                consumed += len(group)
                state.rows_done = min(start_rows + consumed * trainer.rows_per_batch, trainer.data.total_rows)
                state.step += 1
                state.global_step += 1
                self._count(group)
                last = state.step == epoch_steps
                if state.global_step % config.log_interval == 0 or last or self._finished() and not self.stop.signum:
                    self._log_step(epoch_steps, epoch_clock)
                if self._finished() and self.stop.signum is not None:
                    self._save()
                    trainer.log(f"stopped by signal {self.stop.signum} at step {state.global_step}; weights and "
                                "resume state saved. Continue with --from_resume 1.")
                elif state.global_step % config.save_interval == 0 or last:
                    self._save()
        finally:
            # Dropping the only reference shuts the workers down. Were a traceback to keep it, the workers
            # (which ignore SIGTERM) would outlive the error and the interpreter would wait for them at exit.
            del batches
        if state.rows_done >= trainer.data.total_rows:
            state.epoch, state.rows_done, state.step = state.epoch + 1, 0, 0

    def _optimizer_step(self, group: list[Batch]) -> None:
        """Forward/backward over the micro-batches, then one clipped AdamW step. NaN/inf steps are skipped
        inside the fused optimizer (found_inf), so there is no host synchronisation here."""
        trainer, objective = self.trainer, self.trainer.objective
        processes = trainer.processes
        group = [b.to(trainer.device) for b in group]
        local_units = sum(objective.count(b) for b in group)
        units = distributed.all_reduce_sum(local_units.clone(), processes)
        # DDP averages gradients over processes, hence the world-size factor: every unit weighs the same.
        denominator = units.clamp(min=1).float() / processes.world_size
        loss_total = aux_total = torch.zeros((), device=trainer.device)
        metric_totals = dict.fromkeys(objective.metrics, loss_total)
        for i, batch in enumerate(group):
            sync = i == len(group) - 1 or processes.world_size == 1
            with (nullcontext() if sync else trainer.wrapped.no_sync()), self._autocast():
                out = objective(trainer.wrapped, batch)
                loss = out.loss / denominator + out.aux_loss / len(group)
            trainer.scaler.scale(loss).backward()
            loss_total = loss_total + out.loss.detach()
            aux_total = aux_total + out.aux_loss.detach() / len(group)
            metric_totals = {k: v + out.metrics[k] for k, v in metric_totals.items()}
        self.lr = learning_rate(self.state.global_step + 1, trainer.total_steps, self.config.learning_rate,
                                self.config.warmup_steps)
        for param_group in trainer.optimizer.param_groups:
            param_group["lr"] = self.lr
        trainer.scaler.unscale_(trainer.optimizer)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(trainer.params, clip)
        bad = ~torch.isfinite(norm)  # gradients are all-reduced, so every process agrees
        if trainer.scaler.is_enabled():
            trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()
        elif trainer.fused:
            trainer.optimizer.found_inf = bad.float()
            trainer.optimizer.step()
        elif not bad.item():
            trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss_total / denominator + aux_total
        self.sums.add(bad, self.last_loss, aux_total, local_units, metric_totals)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.trainer.device.type, dtype=self.autocast_dtype)

    def _count(self, group: list[Batch]) -> None:
        """Add this step's row, sample and token counts, model FLOPs and data wait of every process; check the stop
        request and the bad-row fraction (the same decision on every process)."""
        trainer, state = self.trainer, self.state
        flops = sum(self.step_flops(batch_work(b)) for b in group) if self.step_flops else 0.0
        local = [float(self.stop.signum or 0), flops, self.step_wait]
        local += [sum(getattr(b, k) for b in group) for k in ("samples", "rows_read", "real_tokens")]
        local.append(sum(b.processed_tokens for b in group))
        local += [sum(b.bad[r] for b in group) for r in BAD_REASONS]
        minutes = self.config.max_minutes
        local.append(float(bool(minutes) and time.time() - self.started > 60 * minutes))
        total = trainer.processes.all_sum(local)
        self.out_of_time = bool(total[-1])
        if total[0] and self.stop.signum is None:  # another process was asked to stop
            self.stop.signum = signal.SIGTERM
        self.flops_done += total[1]
        self.waited += total[2]
        state.samples += int(total[3])
        state.rows_read += int(total[4])
        state.real_tokens += int(total[5])
        state.processed_tokens += int(total[6])
        for reason, count in zip(BAD_REASONS, total[7:-1]):
            state.bad[reason] += int(count)
        self._check_bad_rows()
        now = time.time()
        if now - self.bar_loss[0] > 2:  # one host sync every few seconds for the bar
            self.bar_loss = (now, self.last_loss.item())
        elapsed = max(now - self.mark.time, 1e-9)
        _, mfu, stall = self._efficiency(now)
        self.progress.update({"loss": f"{self.bar_loss[1]:.4f}", "lr": f"{self.lr:.2e}",
                              "tok/s": f"{(state.real_tokens - self.mark.state['real_tokens']) / elapsed:.0f}",
                              "samples/s": f"{(state.samples - self.mark.state['samples']) / elapsed:.1f}",
                              **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}), "stall": f"{stall:.0%}"})

    def _efficiency(self, now: float) -> tuple[float | None, float | None, float]:
        """Since the previous log line: model FLOP/s per process (None when not counted), MFU (None without a
        peak) and the fraction of the time spent waiting for data (mean over processes)."""
        seconds = max(now - self.mark.time, 1e-9)
        world = self.trainer.processes.world_size
        stall = (self.waited - self.mark.waited) / world / seconds
        if self.step_flops is None:
            return None, None, stall
        flops_per_s = (self.flops_done - self.mark.flops) / world / seconds
        return flops_per_s, flops_per_s / self.peak if self.peak else None, stall

    def _check_bad_rows(self) -> None:
        state = self.state
        bad = sum(state.bad.values())
        epoch_done = state.rows_done >= self.trainer.data.total_rows
        if (state.rows_read >= BAD_CHECK_ROWS or epoch_done) and bad > self.config.max_bad_fraction * state.rows_read:
            counts = ", ".join(f"{r}: {c}" for r, c in state.bad.items() if c)
            raise TrainingError(
                f"{bad} of {state.rows_read} rows read ({bad / state.rows_read:.1%}) were unusable, more than "
                f"--max_bad_fraction {self.config.max_bad_fraction}: {counts}. Fix the data (`minimind-v data "
                "preview` shows rows), adjust --max_seq_len, or raise --max_bad_fraction."
            )

    def _log_step(self, epoch_steps: int, epoch_clock: tuple[float, int]) -> None:
        config, state = self.config, self.state
        means = self.sums.flush(self.trainer.processes)
        state.nonfinite_steps += int(means["nonfinite"])
        if means["worst_streak"] >= config.max_nonfinite_steps:
            raise TrainingError(
                f"{int(means['worst_streak'])} optimizer steps in a row had a NaN/inf loss or gradient (skipped, "
                f"weights unchanged) up to step {state.global_step}. Lower --learning_rate, add --warmup_steps, use "
                "--dtype bfloat16 or float32, or check the data."
            )
        loss, aux = means["loss"], means["aux_loss"]
        self.loss_reached = config.stop_loss is not None and loss < config.stop_loss
        objective_metrics = {name: means[name] for name in self.sums.names}
        self.final_loss = loss
        now = time.time()
        since, before = now - self.mark.time, self.mark.state
        flops_per_s, mfu, stall = self._efficiency(now)
        tokens = state.real_tokens - before["real_tokens"]
        processed = state.processed_tokens - before["processed_tokens"]
        samples = state.samples - before["samples"]
        step_seconds = since / max(state.global_step - before["global_step"], 1)
        self.mark = Mark(now, asdict(state), self.flops_done, self.waited)
        done = state.step - epoch_clock[1]
        remaining = (now - epoch_clock[0]) / max(done, 1) * (epoch_steps - state.step) / 60
        bad = {reason: count for reason, count in state.bad.items() if count}  # counted on the host by `_count`
        line = reference_line(state.epoch, config.epochs, state.step, epoch_steps, loss, aux, self.lr, remaining)
        self.progress.write(f"{line}{format_metrics(objective_metrics)} | {tokens / since:.0f} tokens/s, "
                            f"{samples / since:.1f} samples/s, {step_seconds:.2f} s/step, "
                            f"pad_eff {tokens / max(processed, 1):.1%}" + format_efficiency(flops_per_s, mfu, stall)
                            + (f", {int(means['nonfinite'])} non-finite steps skipped" if means["nonfinite"] else "")
                            + format_bad_rows(bad))
        if self.tracker:
            self.tracker.log({
                "step": state.global_step, "epoch": state.epoch + 1, "loss": loss, "logits_loss": loss - aux,
                "aux_loss": aux, **objective_metrics, "learning_rate": self.lr, "epoch_time": remaining,
                "tokens_per_s": tokens / since, "samples_per_s": samples / since, "step_seconds": step_seconds,
                "padding_efficiency": tokens / max(processed, 1), "flops_per_s": flops_per_s, "mfu": mfu,
                "data_stall": stall, "nonfinite_steps": state.nonfinite_steps,
                "bad_rows": sum(bad.values()), "bad_rows_by_reason": bad, "samples": state.samples,
                "tokens": state.real_tokens, "time": now - self.started,
            })

    def _summary(self) -> None:
        trainer, state = self.trainer, self.state
        seconds = time.time() - self.started
        summary = {
            "stage": self.config.stage, "steps": state.global_step, "samples": state.samples,
            "rows_read": state.rows_read, "seconds": seconds,
            "samples_per_s": (state.samples - self.first["samples"]) / seconds,
            "tokens_per_s": (state.real_tokens - self.first["real_tokens"]) / seconds,
            "padding_efficiency": state.real_tokens / max(state.processed_tokens, 1),
            "final_loss": self.final_loss, "nonfinite_steps": state.nonfinite_steps, "bad_rows": state.bad,
            "bad_fraction": sum(state.bad.values()) / max(state.rows_read, 1), "weights": trainer.weights_path,
            "vision_tower": trainer.vision_dir if trainer.writes_tower else None,
        }
        if trainer.processes.is_main:
            print(format_summary(summary), flush=True)
            atomic_write(os.path.join(trainer.run_dir, "summary.json"),
                         lambda f: f.write(json.dumps(summary, indent=2).encode("utf-8")))
