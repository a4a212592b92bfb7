"""`minimind-v train STAGE`: one training loop for every stage.

Stages (defaults as the reference trainers; the chain needs no extra flags):
    llm-pretrain  text jsonl/parquet        -> {out_dir}/pretrain_{hidden}.pth
    llm-sft       chat jsonl                -> {out_dir}/llm_{hidden}.pth          (from pretrain)
    vlm-pretrain  image-text parquet        -> {out_dir}/pretrain_vlm_{hidden}.pth (from llm)
    vlm-sft       image-text parquet        -> {out_dir}/sft_vlm_{hidden}.pth      (from pretrain_vlm)

A step is one optimizer step: `accumulation_steps` micro-batches of `batch_size` samples per process. The
loss of a step is the mean cross-entropy over all supervised tokens of the step (every process, every
micro-batch) plus the MoE auxiliary loss. Padding is only what packing leaves at the end of rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from . import data as data_module
from . import distributed
from .checkpoint import (
    ResumeError,
    load_resume,
    load_trainable,
    resume_path,
    rng_state,
    save_resume,
    save_vision_tower,
    set_rng_state,
    trainable_state,
)
from .config import MiniMindConfig
from .data import BAD_REASONS, DataConfig, TrainingData
from .tokenizer import load_tokenizer
from .tracking import LOGGERS, Progress, Tracker, format_summary, reference_line
from .weights import (
    DEFAULT_TOWER,
    build_model,
    load_native,
    resolve_vision,
    run_name,
    save_native,
    tower_for_weights,
    vision_folder,
    vlm_config_from_args,
    weight_path,
)

BAD_CHECK_ROWS = 256  # the bad-row fraction is enforced once this many rows were read (or at epoch end)


class TrainingError(RuntimeError):
    """A problem with the flags, files or data; reported without a stack trace."""


@dataclass(frozen=True)
class Stage:
    vision: bool
    chat: bool
    save_weight: str
    from_weight: str
    data_path: str
    epochs: int
    batch_size: int
    learning_rate: float
    max_seq_len: int
    accumulation_steps: int
    num_workers: int
    freeze_llm: int
    wandb_project: str


STAGES = {
    "llm-pretrain": Stage(False, False, "pretrain", "none", "dataset/pretrain_t2t_mini.jsonl", 1, 32, 5e-4, 340, 8, 8,
                          0, "MiniMind-Pretrain"),
    "llm-sft": Stage(False, True, "llm", "pretrain", "dataset/sft_t2t_mini.jsonl", 2, 16, 1e-5, 768, 1, 8, 0,
                     "MiniMind-Full-SFT"),
    "vlm-pretrain": Stage(True, True, "pretrain_vlm", "llm", "dataset/pretrain_i2t.parquet", 2, 16, 4e-4, 450, 1, 2,
                          2, "MiniMind-V-Pretrain"),
    "vlm-sft": Stage(True, True, "sft_vlm", "pretrain_vlm", "dataset/sft_i2t.parquet", 2, 4, 5e-6, 768, 1, 2, 1,
                     "MiniMind-V-SFT"),
}
PER_STAGE = [f for f in Stage.__dataclass_fields__ if f not in ("vision", "chat")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = "; ".join(f"{name}: bs {s.batch_size}, lr {s.learning_rate}, len {s.max_seq_len}"
                         for name, s in STAGES.items())
    parser.add_argument("stage", choices=list(STAGES), help=f"what to train (defaults per stage: {defaults})")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", nargs="+", help="parquet / jsonl files (default per stage, under dataset/)")
    data.add_argument("--max_seq_len", type=int, help="tokens per sample; longer samples are cut (450/768 VLM)")
    data.add_argument("--packing", type=int, default=1, choices=[0, 1],
                      help="1: pack several samples per row; 0: one sample per row, padded to the longest")
    data.add_argument("--add_system_ratio", type=float, default=0.2,
                      help="probability of prepending a random system prompt to a conversation")
    data.add_argument("--empty_think_ratio", type=float, default=0.2,
                      help="probability of keeping an empty <think></think> block (else it is removed)")
    data.add_argument("--max_bad_fraction", type=float, default=0.05,
                      help="stop when more than this fraction of the rows read were unusable")
    data.add_argument("--shuffle_window", type=int, default=8192, help="rows shuffled together (memory bound)")
    data.add_argument("--num_workers", type=int, help="DataLoader worker processes (2 VLM, 8 LLM)")
    model = parser.add_argument_group("model")
    model.add_argument("--hidden_size", type=int, default=768)
    model.add_argument("--num_hidden_layers", type=int, default=8)
    model.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    model.add_argument("--tokenizer", default="model", help="tokenizer folder; the vocabulary size comes from it")
    model.add_argument("--vision_model",
                       help=f"SigLIP tower folder or hub id, or random:<shape> (default: the tower saved with "
                            f"--from_weight if there is one, else {DEFAULT_TOWER})")
    model.add_argument("--from_weight", help="start from {out_dir}/{from_weight}_{hidden}[_moe].pth, or none")
    model.add_argument("--freeze_llm", type=int, choices=[0, 1, 2],
                       help="VLM: 0 train all, 1 projector + first/last block, 2 projector only (2 pretrain, 1 SFT)")
    model.add_argument("--initializer_range", type=float, default=0.02,
                       help="std of the random init of new decoder weights (the reference's 0.02 suits width 768; "
                            "tiny models train faster with about 0.02 * sqrt(768 / hidden_size))")
    model.add_argument("--train_vision", type=int, default=0, choices=[0, 1],
                       help="also train the vision tower (needed when it starts random)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch_size", type=int, help="samples per micro-batch per process")
    optim.add_argument("--learning_rate", type=float, help="peak learning rate (cosine to 10%% of it)")
    optim.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps")
    optim.add_argument("--accumulation_steps", type=int)
    optim.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    optim.add_argument("--max_steps", type=int, help="stop after this many optimizer steps in all")
    optim.add_argument("--max_nonfinite_steps", type=int, default=10,
                       help="stop after this many steps in a row with a NaN/inf loss or gradient")
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                       help="autocast dtype on CUDA (on CPU see --cpu_dtype)")
    optim.add_argument("--cpu_dtype", default="float32", choices=["float32", "bfloat16"],
                       help="CPU training precision; bfloat16 autocasts the matrix products (weights stay float32), "
                            "~1.5x faster on CPUs with native bf16 (AVX512-BF16, AMX), slower on others")
    optim.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    optim.add_argument("--use_compile", type=int, default=0, choices=[0, 1])
    optim.add_argument("--num_threads", type=int, default=0,
                       help="CPU threads for the model (0: this process's share of the cores)")
    out = parser.add_argument_group("output")
    out.add_argument("--out_dir", "--save_dir", dest="out_dir", default="out", help="weights folder")
    out.add_argument("--save_weight", help="weights file prefix (per stage)")
    out.add_argument("--checkpoint_dir", default="checkpoints", help="resume states")
    out.add_argument("--log_dir", default="runs", help="metrics of each run: {log_dir}/{save_weight}_{hidden}/")
    out.add_argument("--from_resume", type=int, default=0, choices=[0, 1],
                     help="1: continue exactly from the resume state in --checkpoint_dir")
    out.add_argument("--log_interval", type=int, default=100, help="steps between log lines")
    out.add_argument("--save_interval", type=int, default=1000, help="steps between saves")
    out.add_argument("--logger", default="none", choices=LOGGERS)
    out.add_argument("--use_wandb", action="store_true", help="the reference flag: same as --logger swanlab")
    out.add_argument("--wandb_project", help="project name for the logger")


def main(args: argparse.Namespace) -> None:
    stage = STAGES[args.stage]
    for name in PER_STAGE:
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(stage, name))
    if isinstance(args.data_path, str):
        args.data_path = [args.data_path]
    if args.use_wandb and args.logger == "none":
        args.logger = "swanlab"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()
    processes = distributed.setup(args.device)
    args.num_workers = min(args.num_workers, usable_cores())
    if processes.device.type == "cpu":
        torch.set_num_threads(args.num_threads or cpu_threads())
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Trainer(args, stage, processes, stop).train()
    except (TrainingError, ResumeError, FileNotFoundError) as err:
        raise SystemExit(f"train {args.stage}: {err}") from err
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        distributed.teardown(processes)
    if stop.signum is not None:
        raise SystemExit(128 + stop.signum)


class StopRequest:
    """Signal handler: the first SIGINT/SIGTERM asks for a save and a clean stop at the end of the step."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def learning_rate(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """The reference cosine from ~peak down to 0.1 * peak at step `total` (steps count from 1), with an
    optional linear warm-up over the first `warmup` steps."""
    lr = peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / total)))
    return lr * min(1.0, step / warmup) if warmup else lr


@dataclass
class RunState:
    """Where the run is and what it has seen; saved in the resume file."""

    epoch: int = 0
    rows_done: int = 0  # rows of this epoch consumed (all processes)
    step: int = 0  # optimizer steps done in this epoch
    global_step: int = 0
    samples: int = 0
    rows_read: int = 0
    real_tokens: int = 0
    processed_tokens: int = 0
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0
    bad: dict = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))


class Trainer:
    def __init__(self, args, stage: Stage, processes: distributed.Processes, stop: StopRequest):
        self.args, self.stage, self.processes, self.stop = args, stage, processes, stop
        self.device = processes.device
        self.cuda = self.device.type == "cuda"
        if not stage.vision and (args.freeze_llm or args.train_vision):
            raise TrainingError("--freeze_llm and --train_vision apply to the VLM stages only")
        self.tokenizer = load_tokenizer(args.tokenizer)
        self.model = self._build_model()
        self._freeze()
        self.data = self._load_data()
        names = (args.out_dir, args.save_weight, args.hidden_size, bool(args.use_moe))
        self.weights_file = weight_path(*names)
        self.vision_dir = vision_folder(*names)
        self.resume_file = resume_path(args.checkpoint_dir, *names[1:])
        self.run_dir = os.path.join(args.log_dir, run_name(*names[1:]))
        self.rows_per_batch = args.batch_size * processes.world_size
        micro_batches = ceil_div(self.data.total_rows, self.rows_per_batch)
        self.steps_per_epoch = ceil_div(micro_batches, args.accumulation_steps)
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.state = RunState()
        self.saved_rng: dict | None = None
        self.logger_id = None
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.fused = make_optimizer(self.params, args.learning_rate)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda and args.dtype == "float16")
        if args.from_resume:
            self._resume()
        self.wrapped = self._wrap()
        self.last_saved_step = self.state.global_step
        zeros = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.loss_sum, self.aux_sum, self.good_steps = zeros(), zeros(), zeros()
        self.streak, self.worst_streak, self.nonfinite = zeros(), zeros(), zeros()
        self.streak += self.state.nonfinite_streak
        self.last_loss = torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ setup

    def log(self, message: str) -> None:
        if self.processes.is_main:
            print(message, flush=True)

    def _build_model(self):
        args, stage = self.args, self.stage
        torch.manual_seed(args.seed)
        if stage.vision:
            vision = self._vision_source()
            try:
                config = vlm_config_from_args(vision, args, len(self.tokenizer),
                                              initializer_range=args.initializer_range)
                tower_path, _ = resolve_vision(vision)
            except ValueError as err:
                raise TrainingError(str(err)) from err
            model = build_model(config, vision_model=tower_path)
            self.random_tower = tower_path is None
            self.log(f"vision tower: {vision} ({'random init' if self.random_tower else 'loaded'})")
        else:
            config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                    use_moe=bool(args.use_moe), vocab_size=len(self.tokenizer),
                                    initializer_range=args.initializer_range)
            model = build_model(config)
        if args.from_weight != "none":
            path = weight_path(args.out_dir, args.from_weight, args.hidden_size, bool(args.use_moe))
            if not os.path.isfile(path):
                raise TrainingError(f"no weights at {path}: train the previous stage first, or pass --from_weight "
                                    "none to start from random weights")
            try:
                absent = load_native(model, path, optional_prefixes=("vision_proj.",) if stage.vision else ())
            except ValueError as err:
                raise TrainingError(str(err)) from err
            fresh = [k for k in absent if k.startswith("vision_proj.")]
            note = f"; {len(fresh)} vision_proj.* tensors are not in it and start from random init" if fresh else ""
            self.log(f"loaded {path}{note}")
        return model

    def _load_data(self) -> TrainingData:
        args, stage = self.args, self.stage
        config = DataConfig(
            paths=args.data_path, chat=stage.chat, max_seq_len=args.max_seq_len,
            image_token_len=self.model.config.image_token_len if stage.vision else 0,
            add_system_ratio=args.add_system_ratio, empty_think_ratio=args.empty_think_ratio, seed=args.seed,
            shuffle_window=args.shuffle_window, packing=bool(args.packing), pad_multiple=16 if args.use_compile else 1,
        )
        try:
            data = TrainingData(config, self.tokenizer, self.model.image_processor if stage.vision else None)
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(f"{err}. Pass --data_path (`minimind-v data synth` makes a synthetic set).") from err
        largest = max(chunk.rows for chunk in data.chunks)
        if largest > 4 * args.shuffle_window:
            self.log(f"warning: row groups of up to {largest} rows are each read whole, so memory grows with them; "
                     "rewrite the file with smaller row groups (pyarrow.parquet.write_table(..., row_group_size=1024))")
        return data

    def _vision_source(self) -> str:
        args = self.args
        if args.vision_model:
            return args.vision_model
        if args.from_weight != "none":
            tower = tower_for_weights(args.out_dir, args.from_weight, args.hidden_size, bool(args.use_moe))
            if tower != DEFAULT_TOWER:
                self.log(f"using the vision tower trained with --from_weight {args.from_weight}: {tower}")
                return tower
        if not os.path.isdir(DEFAULT_TOWER):  # never look the default up on the hub
            raise TrainingError(f"no vision tower at {DEFAULT_TOWER} (the default): download siglip2-base-p32-256-ve "
                                "there, pass --vision_model FOLDER, or --vision_model random:siglip2-base-p32-256 "
                                "--train_vision 1 to train one from zero")
        return DEFAULT_TOWER

    def _freeze(self) -> None:
        """Reference freeze policy for VLM stages (projector always trained), plus the optional tower."""
        model, args = self.model, self.args
        if self.stage.vision:
            model.requires_grad_(False)
            if args.freeze_llm == 0:
                for name, p in model.named_parameters():
                    p.requires_grad_(not name.startswith("vision_encoder."))
            elif args.freeze_llm == 1:
                model.model.layers[0].requires_grad_(True)
                model.model.layers[-1].requires_grad_(True)
            model.vision_proj.requires_grad_(True)
            if args.train_vision:
                model.vision_encoder.requires_grad_(True)
            elif self.random_tower:
                self.log("warning: the vision tower is random and frozen; pass --train_vision 1 to train it")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(f"Model Params: {total / 1e6:.3f}M, Trainable Params: {trainable / 1e6:.3f}M")

    def _wrap(self):
        model = self.model
        if self.processes.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.cuda else None, broadcast_buffers=False,
                find_unused_parameters=bool(self.args.train_vision),  # text-only batches skip the tower
            )
        return torch.compile(model) if self.args.use_compile else model

    # ------------------------------------------------------------------ resume

    def _resume(self) -> None:
        args, path = self.args, self.resume_file
        if not os.path.exists(path):
            self.log(f"warning: --from_resume 1 but there is no resume state at {path}; starting from the beginning")
            return
        saved = load_resume(path)
        expected = {"stage": args.stage, "model_shape": self._model_shape(), "seed": args.seed,
                    "total_rows": self.data.total_rows}
        for key, value in expected.items():
            if saved.get(key) != value:
                raise ResumeError(f"{path} belongs to a run with {key}={saved.get(key)!r}, this run has {value!r}; "
                                  "an exact resume needs the same stage, model, seed and data")
        load_trainable(self.model, saved["model"], path)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler.is_enabled() and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        self.state = RunState(**saved["counters"])
        self.logger_id = saved["wandb_id"]
        same_layout = (saved["world_size"], saved["batch_size"], saved["accumulation_steps"]) == (
            self.processes.world_size, args.batch_size, args.accumulation_steps)
        state = self.state
        if state.rows_done >= self.data.total_rows:
            state.epoch, state.rows_done, state.step = state.epoch + 1, 0, 0
        if same_layout:
            self.saved_rng = saved["rng"][self.processes.rank] if state.rows_done else None
        else:
            state.step = state.rows_done // (self.rows_per_batch * args.accumulation_steps)
            self.log(f"world size x batch x accumulation changed from {saved['world_size']} x {saved['batch_size']} "
                     f"x {saved['accumulation_steps']} to {self.processes.world_size} x {args.batch_size} x "
                     f"{args.accumulation_steps}: continuing at row {state.rows_done} of epoch {state.epoch + 1} "
                     f"(step {state.step}); the data position is exact, RNG streams restart")
        self.log(f"resumed from {path}: epoch {state.epoch + 1}, step {state.step}, global step {state.global_step}")

    def _model_shape(self) -> dict:
        args = self.args
        return {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers,
                "use_moe": bool(args.use_moe), "vocab_size": len(self.tokenizer)}

    def save(self) -> None:
        """Weights (reference format), the trained tower if any, and the resume state; rank 0 writes."""
        rngs = self.processes.gather(rng_state())
        self.state.nonfinite_streak = int(self.streak.item())
        if self.processes.is_main:
            save_native(self.model, self.weights_file)
            if self.stage.vision and self.model.vision_trainable:
                save_vision_tower(self.model, self.vision_dir)
            save_resume(self.resume_file, {
                "model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "epoch": self.state.epoch, "step": self.state.step, "world_size": self.processes.world_size,
                "wandb_id": self.logger_id, "batch_size": self.args.batch_size,
                "accumulation_steps": self.args.accumulation_steps, "stage": self.args.stage,
                "model_shape": self._model_shape(), "seed": self.args.seed, "total_rows": self.data.total_rows,
                "rng": rngs, "counters": asdict(self.state),
            })
        self.processes.barrier()
        self.last_saved_step = self.state.global_step

    # ------------------------------------------------------------------ loop

    def train(self) -> None:
        args, state = self.args, self.state
        self.log(f"{args.stage}: {self.data.total_rows} rows in {args.data_path}, {args.batch_size} samples x "
                 f"{self.processes.world_size} processes x {args.accumulation_steps} accumulation per step, "
                 f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps in all, device {self.device}")
        tracker = None
        if self.processes.is_main:
            tracker = Tracker(self.run_dir, args.logger, args.wandb_project,
                              f"{args.wandb_project}-Epoch-{args.epochs}-BatchSize-{args.batch_size}"
                              f"-LearningRate-{args.learning_rate}", vars(args),
                              resume_step=state.global_step if args.from_resume else None,
                              resume_id=self.logger_id)
            self.logger_id = tracker.run_id
        self.tracker = tracker
        self.progress = Progress(self.total_steps, state.global_step, self.processes.is_main)
        self.started = time.time()
        self.mark = (self.started, asdict(state))
        self.first = asdict(state)
        self.bar_loss = (self.started, float("nan"))
        self.final_loss = float("nan")
        try:
            while state.epoch < args.epochs and not self._finished():
                self._run_epoch()
        finally:
            self.progress.close()
        if self.stop.signum is None and state.global_step != self.last_saved_step:
            self.save()
        self._summary()
        if tracker:
            tracker.close()

    def _finished(self) -> bool:
        return self.stop.signum is not None or (bool(self.args.max_steps)
                                                and self.state.global_step >= self.args.max_steps)

    def _run_epoch(self) -> None:
        args, state = self.args, self.state
        if self.saved_rng is not None:
            set_rng_state(self.saved_rng)
            self.saved_rng = None
        else:
            seed_everything(args.seed + state.epoch + 10_000 * self.processes.rank)
        micro = self.data.epoch(state.epoch, state.rows_done, args.batch_size, self.processes.rank,
                                self.processes.world_size)
        batches = iter(data_module.loader(micro, args.num_workers, pin_memory=self.cuda))
        start_rows, consumed = state.rows_done, 0
        epoch_steps = state.step + ceil_div(len(micro), args.accumulation_steps)
        epoch_clock = (time.time(), state.step)
        try:
            while not self._finished():
                group = list(islice(batches, args.accumulation_steps))
                if not group:
                    break
                self._optimizer_step(group)
                consumed += len(group)
                state.rows_done = min(start_rows + consumed * self.rows_per_batch, self.data.total_rows)
                state.step += 1
                state.global_step += 1
                self._count(group)
                last = state.step == epoch_steps
                if state.global_step % args.log_interval == 0 or last or self._finished():
                    self._log_step(epoch_steps, epoch_clock)
                if self._finished() and self.stop.signum is not None:
                    self.save()
                    self.log(f"stopped by signal {self.stop.signum} at step {state.global_step}; weights and resume "
                             f"state saved. Continue with --from_resume 1.")
                elif state.global_step % args.save_interval == 0 or last:
                    self.save()
        finally:
            # Dropping the only reference shuts the workers down. Were a traceback to keep it, the workers
            # (which ignore SIGTERM) would outlive the error and the interpreter would wait for them at exit.
            del batches
        if state.rows_done >= self.data.total_rows:
            state.epoch, state.rows_done, state.step = state.epoch + 1, 0, 0

    def _inputs(self, batch: data_module.Batch) -> dict:
        # Without packing a row is one sample then right padding, so plain causal attention (the fast kernel,
        # no mask) is exact for every real token; packed rows need the positions to keep documents apart.
        inputs = {"input_ids": batch.input_ids}
        if self.args.packing:
            inputs["position_ids"] = batch.position_ids
        if self.stage.vision:
            inputs.update(pixel_values=batch.pixel_values, check_images=False)  # validated when packing
        return inputs

    def _optimizer_step(self, group: list[data_module.Batch]) -> None:
        """Forward/backward over the micro-batches, then one clipped AdamW step. NaN/inf steps are skipped
        inside the fused optimizer (found_inf), so there is no host synchronisation here."""
        group = [b.to(self.device) for b in group]
        targets = distributed.all_reduce_sum(sum(b.targets for b in group), self.processes)
        # DDP averages gradients over processes, hence the world-size factor: every token weighs the same.
        denominator = targets.clamp(min=1).float() / self.processes.world_size
        ce_total = aux_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            sync = i == len(group) - 1 or self.processes.world_size == 1
            with (nullcontext() if sync else self.wrapped.no_sync()), self._autocast():
                out = self.wrapped(**self._inputs(batch))
                # position t predicts labels[t + 1]; shifting the labels (not the logits) avoids copying logits
                shifted = F.pad(batch.labels[:, 1:], (0, 1), value=data_module.IGNORE)
                ce = F.cross_entropy(out.logits.flatten(0, 1).float(), shifted.flatten(),
                                     ignore_index=data_module.IGNORE, reduction="sum")
                loss = ce / denominator + out.aux_loss / len(group)
            self.scaler.scale(loss).backward()
            ce_total = ce_total + ce.detach()
            aux_total = aux_total + out.aux_loss.detach() / len(group)
        lr = learning_rate(self.state.global_step + 1, self.total_steps, self.args.learning_rate,
                           self.args.warmup_steps)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip if self.args.grad_clip > 0 else math.inf)
        bad = ~torch.isfinite(norm)  # gradients are all-reduced, so every process agrees
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
        elif not bad.item():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = ce_total / denominator + aux_total
        self.last_loss = step_loss
        bad_f = bad.float()
        self.loss_sum += torch.where(bad, 0.0, step_loss)
        self.aux_sum += torch.where(bad, 0.0, aux_total)
        self.good_steps += 1 - bad_f
        self.nonfinite += bad_f
        self.streak.copy_((self.streak + 1) * bad_f)
        self.worst_streak.copy_(torch.maximum(self.worst_streak, self.streak))
        self.lr = lr

    def _autocast(self):
        if not self.cuda:
            return torch.autocast("cpu", dtype=torch.bfloat16) if self.args.cpu_dtype == "bfloat16" else nullcontext()
        if self.args.dtype == "float32":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.args.dtype == "bfloat16" else torch.float16)

    def _count(self, group: list[data_module.Batch]) -> None:
        """Add this step's row, sample and token counts of every process; check the stop request and the
        bad-row fraction (the same decision on every process)."""
        local = [float(self.stop.signum or 0)]
        local += [sum(getattr(b, k) for b in group) for k in ("samples", "rows_read", "real_tokens")]
        local.append(sum(b.processed_tokens for b in group))
        local += [sum(b.bad[r] for b in group) for r in BAD_REASONS]
        total = self.processes.all_sum(local)
        if total[0] and self.stop.signum is None:  # another process was asked to stop
            self.stop.signum = signal.SIGTERM
        state = self.state
        state.samples += int(total[1])
        state.rows_read += int(total[2])
        state.real_tokens += int(total[3])
        state.processed_tokens += int(total[4])
        for reason, count in zip(BAD_REASONS, total[5:]):
            state.bad[reason] += int(count)
        self._check_bad_rows()
        now = time.time()
        if now - self.bar_loss[0] > 2:  # one host sync every few seconds for the bar
            self.bar_loss = (now, self.last_loss.item())
        elapsed = max(now - self.mark[0], 1e-9)
        self.progress.update({"loss": f"{self.bar_loss[1]:.4f}", "lr": f"{self.lr:.2e}",
                              "tok/s": f"{(state.real_tokens - self.mark[1]['real_tokens']) / elapsed:.0f}",
                              "samples/s": f"{(state.samples - self.mark[1]['samples']) / elapsed:.1f}"})

    def _check_bad_rows(self) -> None:
        state = self.state
        bad = sum(state.bad.values())
        epoch_done = state.rows_done >= self.data.total_rows
        if (state.rows_read >= BAD_CHECK_ROWS or epoch_done) and bad > self.args.max_bad_fraction * state.rows_read:
            counts = ", ".join(f"{r}: {c}" for r, c in state.bad.items() if c)
            raise TrainingError(
                f"{bad} of {state.rows_read} rows read ({bad / state.rows_read:.1%}) were unusable, more than "
                f"--max_bad_fraction {self.args.max_bad_fraction}: {counts}. Fix the data (`minimind-v data preview` "
                "shows rows), adjust --max_seq_len, or raise --max_bad_fraction."
            )

    def _log_step(self, epoch_steps: int, epoch_clock: tuple[float, int]) -> None:
        args, state = self.args, self.state
        sums = torch.stack([self.loss_sum, self.aux_sum])
        distributed.all_reduce_sum(sums, self.processes)
        loss_sum, aux_sum = (sums / self.processes.world_size).tolist()
        good = self.good_steps.item()
        worst, nonfinite = self.worst_streak.item(), self.nonfinite.item()
        for acc in (self.loss_sum, self.aux_sum, self.good_steps, self.worst_streak, self.nonfinite):
            acc.zero_()
        state.nonfinite_steps += int(nonfinite)
        if worst >= args.max_nonfinite_steps:
            raise TrainingError(
                f"{int(worst)} optimizer steps in a row had a NaN/inf loss or gradient (skipped, weights unchanged) "
                f"up to step {state.global_step}. Lower --learning_rate, add --warmup_steps, use --dtype bfloat16 or "
                "float32, or check the data."
            )
        loss = loss_sum / good if good else float("nan")
        aux = aux_sum / good if good else float("nan")
        self.final_loss = loss
        now = time.time()
        since, before = now - self.mark[0], self.mark[1]
        tokens = state.real_tokens - before["real_tokens"]
        processed = state.processed_tokens - before["processed_tokens"]
        samples = state.samples - before["samples"]
        self.mark = (now, asdict(state))
        done = state.step - epoch_clock[1]
        remaining = (now - epoch_clock[0]) / max(done, 1) * (epoch_steps - state.step) / 60
        line = reference_line(state.epoch, args.epochs, state.step, epoch_steps, loss, aux, self.lr, remaining)
        self.progress.write(f"{line} | {tokens / since:.0f} tokens/s, {samples / since:.1f} samples/s, "
                            f"pad_eff {tokens / max(processed, 1):.1%}"
                            + (f", {int(nonfinite)} non-finite steps skipped" if nonfinite else ""))
        if self.tracker:
            self.tracker.log({
                "step": state.global_step, "epoch": state.epoch + 1, "loss": loss, "logits_loss": loss - aux,
                "aux_loss": aux, "learning_rate": self.lr, "epoch_time": remaining, "tokens_per_s": tokens / since,
                "samples_per_s": samples / since, "padding_efficiency": tokens / max(processed, 1),
                "nonfinite_steps": state.nonfinite_steps, "bad_rows": sum(state.bad.values()),
                "samples": state.samples, "tokens": state.real_tokens, "time": now - self.started,
            })

    def _summary(self) -> None:
        state = self.state
        seconds = time.time() - self.started
        summary = {
            "stage": self.args.stage, "steps": state.global_step, "samples": state.samples,
            "rows_read": state.rows_read, "seconds": seconds,
            "samples_per_s": (state.samples - self.first["samples"]) / seconds,
            "tokens_per_s": (state.real_tokens - self.first["real_tokens"]) / seconds,
            "padding_efficiency": state.real_tokens / max(state.processed_tokens, 1),
            "final_loss": self.final_loss, "nonfinite_steps": state.nonfinite_steps, "bad_rows": state.bad,
            "bad_fraction": sum(state.bad.values()) / max(state.rows_read, 1), "weights": self.weights_file,
            "vision_tower": self.vision_dir if self.stage.vision and self.model.vision_trainable else None,
        }
        if self.processes.is_main:
            print(format_summary(summary), flush=True)
            with open(os.path.join(self.run_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> tuple[torch.optim.AdamW, bool]:
    """AdamW with the reference settings (weight decay 0.01), fused when the device supports it."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True), True
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01), False


def cpu_threads() -> int:
    """This process's share of the cores. DataLoader workers get no core of their own: they are mostly idle
    (on 2 cores, 2 threads + 1 worker trained 1.4x faster than 1 thread + 1 worker), and the passive OpenMP
    wait policy set in `minimind_v/__init__.py` keeps the threads cheap when a core is busy elsewhere."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), so `--cpu_dtype bfloat16` pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
