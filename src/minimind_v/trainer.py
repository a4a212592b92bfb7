"""Setting up a training run from a `TrainConfig`: tokenizer, model and vision tower, freezing or LoRA adapters,
data, objective, optimizer, and the state to start from (fresh, or resumed exactly); and saving that state.
`loop.Loop` then runs it.

What a run writes, named after `save_weight` (or `lora_name` for a LoRA run), `{hidden}` and `[_moe]`:
    {out_dir}/{save_weight}_{hidden}.pth        weights, reference format (not for LoRA runs: the base is unchanged)
    {out_dir}/{save_weight}_{hidden}_vision/    the tower, when it trains
    {out_dir}/{lora_name}_{hidden}/             the adapters, PEFT format (LoRA runs)
    {checkpoint_dir}/..._resume.pth             everything `--from_resume 1` needs (see `checkpoint`)
    {log_dir}/{name}_{hidden}/                  metrics.jsonl and summary.json
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError

from . import distributed
from .checkpoint import (
    ResumeError,
    load_resume,
    load_trainable,
    resume_path,
    rng_state,
    save_resume,
    save_vision_tower,
    trainable_state,
)
from .config import MiniMindConfig
from .data import DataConfig, TrainingData
from .generate import GenerationConfig
from .loading import build_model, load_model, resolve_vision, vlm_config
from .lora import add_lora, save_adapter, target_names
from .objectives import make_objective
from .rewards import Rewards, parse_rewards
from .samples import BAD_REASONS
from .tokenizer import load_tokenizer
from .train_config import TrainConfig
from .vision_cache import VisionCache, open_cache, unusable_reason
from .weights import (
    DEFAULT_TOWER,
    load_native,
    needs_tower_folder,
    run_name,
    save_native,
    tower_for_weights,
    vision_folder,
    weight_path,
)


class TrainingError(RuntimeError):
    """A problem with the flags, files or data; reported without a stack trace."""


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
    interval: dict = field(default_factory=dict)  # the loop's sums since its last log line (`StepMetrics.snapshot`)
    bad: dict = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> tuple[torch.optim.AdamW, bool]:
    """AdamW with the reference settings (weight decay 0.01), fused when the device supports it."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True), True
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01), False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each decoder block in place, with dynamic shapes. The blocks hold almost all the compute;
    compiling them, not the whole model, keeps the image splicing (a list of images per row) out of the graph,
    and dynamic shapes let one graph serve every row count and width of packed batches instead of one
    compilation per new shape. In place, so the state_dict keys stay those of the plain model."""
    for block in model.model.layers:
        block.compile(dynamic=True)


class Trainer:
    """A run ready to train: `model` (on its device; `--use_compile` compiles its blocks in place), `wrapped`
    (DDP, else the model), `data`, `objective`, `optimizer`, `scaler`, `state`, and the paths it writes."""

    def __init__(self, config: TrainConfig, processes: distributed.Processes):
        self.config, self.stage, self.processes = config, config.stage_spec, processes
        self.device = processes.device
        self.cuda = self.device.type == "cuda"
        self._check_flags()
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.random_tower = False
        self.tower_source: str | None = None  # --vision_model as resolved, for VLM stages
        self.tower_written = False
        self.model = self._build_model()
        self.adapted = self._freeze_or_adapt()
        self.vision_cache = self._open_vision_cache()
        self.data = self._load_data()
        names = (config.out_dir, config.run_prefix, config.hidden_size, bool(config.use_moe))
        self.weights_path = os.path.join(config.out_dir, run_name(*names[1:])) if config.lora_rank else \
            weight_path(*names)
        self.vision_dir = vision_folder(*names)
        self.resume_file = resume_path(config.checkpoint_dir, *names[1:])
        self.run_dir = os.path.join(config.log_dir, run_name(*names[1:]))
        self.rows_per_batch = config.batch_size * processes.world_size
        micro_batches = ceil_div(self.data.total_rows, self.rows_per_batch)
        self.steps_per_epoch = ceil_div(micro_batches, config.accumulation_steps)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.model.to(self.device)
        self.objective = self._make_objective()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.fused = make_optimizer(self.params, config.learning_rate)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda and config.dtype == "float16")
        self.state = RunState()
        self.saved_rng: dict | None = None
        self.logger_id = None
        if config.from_resume:
            self._resume()
        self.wrapped = self._wrap()

    def log(self, message: str) -> None:
        if self.processes.is_main:
            print(message, flush=True)

    def _check_flags(self) -> None:
        config, stage = self.config, self.stage
        if not stage.vision and (config.freeze_llm or config.train_vision):
            raise TrainingError("--freeze_llm and --train_vision apply to the VLM stages only")
        if config.lora_rank < 0:
            raise TrainingError(f"--lora_rank must be 0 (off) or more (got {config.lora_rank})")
        if config.lora_rank and config.train_vision:
            raise TrainingError("a LoRA run keeps every base weight frozen: add `vision` to --lora_targets instead of "
                                "--train_vision 1")
        self.reward_weights = self._check_objective_flags()

    def _check_objective_flags(self) -> dict[str, float]:
        """Refuse GRPO and distillation settings that cannot work; returns GRPO's reward weights ({} otherwise)."""
        config, stage = self.config, self.stage
        if stage.objective in ("grpo", "distill") and config.temperature <= 0:
            raise TrainingError(f"--temperature must be above 0 (got {config.temperature}): GRPO samples its answers "
                                "and distillation softens both distributions with it")
        if stage.objective == "distill" and not 0 <= config.alpha <= 1:
            raise TrainingError(f"--alpha weighs the cross-entropy against the KL and must be in [0, 1] (got "
                                f"{config.alpha})")
        if stage.objective == "grpo":
            if config.num_generations < 2:
                raise TrainingError(f"--num_generations must be at least 2: advantages compare the answers of a group "
                                    f"(got {config.num_generations})")
            if config.max_gen_len < 1:
                raise TrainingError(f"--max_gen_len must be at least 1 (got {config.max_gen_len})")
            try:
                return parse_rewards(config.rewards, config.reward_model_path)
            except ValueError as err:
                raise TrainingError(str(err)) from err
        return {}

    # ------------------------------------------------------------------ model

    def _build_model(self):
        config, stage = self.config, self.stage
        torch.manual_seed(config.seed)
        if stage.vision:
            vision = self.tower_source = self._vision_source()
            try:
                model_config = vlm_config(vision, config.hidden_size, config.num_hidden_layers, config.use_moe,
                                          len(self.tokenizer), initializer_range=config.initializer_range,
                                          max_tiles=config.max_tiles or 1)
                tower_path, _ = resolve_vision(vision)
            except ValueError as err:
                raise TrainingError(str(err)) from err
            model = build_model(model_config, vision_model=tower_path)
            self.random_tower = tower_path is None
            self.log(f"vision tower: {vision} ({'random init' if self.random_tower else 'loaded'})")
        else:
            model_config = MiniMindConfig(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                                          use_moe=bool(config.use_moe), vocab_size=len(self.tokenizer),
                                          initializer_range=config.initializer_range)
            model = build_model(model_config)
        if config.from_weight != "none":
            path = self._native_weights("weights", config.from_weight, config.hidden_size, bool(config.use_moe),
                                        "train the previous stage first, or pass --from_weight none to start from "
                                        "random weights")
            try:
                absent = load_native(model, path, optional_prefixes=("vision_proj.",) if stage.vision else ())
            except ValueError as err:
                raise TrainingError(str(err)) from err
            fresh = [k for k in absent if k.startswith("vision_proj.")]
            note = f"; {len(fresh)} vision_proj.* tensors are not in it and start from random init" if fresh else ""
            self.log(f"loaded {path}{note}")
        return model

    def _native_weights(self, what: str, prefix: str, hidden_size: int, use_moe: bool, hint: str) -> str:
        """The path of native weights in --out_dir, or TrainingError naming it with `hint` when it is missing."""
        path = weight_path(self.config.out_dir, prefix, hidden_size, use_moe)
        if not os.path.isfile(path):
            raise TrainingError(f"no {what} at {path}: {hint}")
        return path

    def _vision_source(self) -> str:
        config = self.config
        if config.vision_model:
            return config.vision_model
        if config.from_weight != "none":
            tower = tower_for_weights(config.out_dir, config.from_weight, config.hidden_size, bool(config.use_moe))
            if tower != DEFAULT_TOWER:
                self.log(f"using the vision tower trained with --from_weight {config.from_weight}: {tower}")
                return tower
        if not os.path.isdir(DEFAULT_TOWER):  # never look the default up on the hub
            raise TrainingError(f"no vision tower at {DEFAULT_TOWER} (the default): download siglip2-base-p32-256-ve "
                                "there, pass --vision_model FOLDER, or --vision_model random:siglip2-base-p32-256 "
                                "--train_vision 1 to train one from zero")
        return DEFAULT_TOWER

    def _freeze_or_adapt(self) -> bool:
        """A LoRA run freezes every base weight and trains adapters only; otherwise the reference freeze
        policy for VLM stages (projector always trained), plus the optional tower. Returns whether adapted."""
        model, config = self.model, self.config
        if config.lora_rank:
            model.requires_grad_(False)
            try:
                names = target_names(model, config.lora_targets)
            except ValueError as err:
                raise TrainingError(str(err)) from err
            torch.manual_seed(config.seed)
            add_lora(model, names, config.lora_rank, config.lora_alpha)
            self.log(f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha or config.lora_rank} on {len(names)} "
                     f"layers ({', '.join(config.lora_targets)}); every base weight frozen")
        elif self.stage.vision:
            model.requires_grad_(False)
            if config.freeze_llm == 0:
                for name, p in model.named_parameters():
                    p.requires_grad_(not name.startswith("vision_encoder."))
            elif config.freeze_llm == 1:
                model.model.layers[0].requires_grad_(True)
                model.model.layers[-1].requires_grad_(True)
            model.vision_proj.requires_grad_(True)
            if config.train_vision:
                model.vision_encoder.requires_grad_(True)
            elif self.random_tower:
                self.log("warning: the vision tower is random and frozen; pass --train_vision 1 to train it")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(f"Model Params: {total / 1e6:.3f}M, Trainable Params: {trainable / 1e6:.3f}M")
        return bool(config.lora_rank)

    def _make_objective(self):
        objective, config = self.stage.objective, self.config
        options = {}
        if objective == "dpo":
            options = {"beta": config.beta, "rpo_alpha": config.rpo_alpha, "reference": self._reference_model()}
        elif objective == "grpo":
            options = self._grpo_options()
        elif objective == "distill":
            options = {"teacher": self._load_teacher(), "alpha": config.alpha, "temperature": config.temperature}
        try:
            made = make_objective(objective, packing=bool(config.packing), vision=self.stage.vision, **options)
        except ValueError as err:
            raise TrainingError(str(err)) from err
        return self.vision_cache.wrap(made) if self.vision_cache else made

    def _reference_model(self):
        """A frozen copy of the starting weights (a frozen tower is shared, not copied), or None for a LoRA run,
        whose reference is the policy with its adapters off."""
        if self.adapted:
            return None
        tower = getattr(self.model, "vision_encoder", None)
        shared = {id(tower): tower} if tower is not None and not self.config.train_vision else {}
        return copy.deepcopy(self.model, memo=shared).requires_grad_(False).eval()

    def _grpo_options(self) -> dict:
        config = self.config
        weights = self.reward_weights
        try:
            rewards = Rewards(weights, config.reward_model_path, self.device,
                              torch.bfloat16 if self.cuda else torch.float32)
        except (OSError, ValueError) as err:
            path = config.reward_model_path
            where = "" if os.path.isdir(path) else " (no such folder here, and as a hub id it could not be fetched)"
            raise TrainingError(f"cannot load the reward model {path}{where}: {err}") from err
        self.log(f"rewards: {', '.join(f'{kind} x {weight:g}' for kind, weight in weights.items())}")
        generation = GenerationConfig(max_new_tokens=config.max_gen_len, temperature=config.temperature,
                                      top_p=config.top_p, top_k=config.top_k, eos_token_id=self.tokenizer.eos_token_id)
        return {"tokenizer": self.tokenizer, "rewards": rewards, "generation": generation,
                "num_generations": config.num_generations, "beta": config.beta, "loss_type": config.loss_type,
                "epsilon": config.epsilon, "epsilon_high": config.epsilon_high,
                "image_token_len": self.model.config.image_token_len if self.stage.vision else 0,
                "reference": self._reference_model() if config.beta else None}

    def _load_teacher(self):
        """The teacher of a distillation run, frozen on the device: a transformers folder or native weights
        `{out_dir}/{teacher}_{teacher_hidden_size}[_moe].pth` (shape flags default to the student's)."""
        config = self.config
        if not config.teacher:
            raise TrainingError("distillation needs --teacher: a weight prefix in --out_dir (with "
                                "--teacher_hidden_size/--teacher_num_hidden_layers/--teacher_use_moe) or a "
                                "transformers folder")
        shape = {"hidden_size": config.teacher_hidden_size or config.hidden_size,
                 "num_hidden_layers": config.teacher_num_hidden_layers or config.num_hidden_layers,
                 "use_moe": bool(config.use_moe if config.teacher_use_moe is None else config.teacher_use_moe)}
        folder = os.path.isdir(config.teacher)
        source = config.teacher if folder else self._native_weights(
            "teacher weights", config.teacher, shape["hidden_size"], shape["use_moe"],
            "pass --teacher PREFIX with the teacher's --teacher_hidden_size/--teacher_num_hidden_layers/"
            "--teacher_use_moe, or a folder")
        try:
            teacher, tokenizer = load_model(load_from=source if folder else None, save_dir=config.out_dir,
                                            weight=config.teacher, vision_model=None if self.stage.vision else "none",
                                            tokenizer=config.tokenizer, device=self.device, **shape)
        except (OSError, ValueError, RuntimeError) as err:
            raise TrainingError(f"cannot load the teacher {source}: {err}. Teacher and student must share the "
                                "tokenizer (--tokenizer) and, for a VLM, the image size and tokens per image") from err
        self._check_teacher(teacher, tokenizer, source)
        params = sum(p.numel() for p in teacher.parameters())
        self.log(f"teacher: {source} ({params / 1e6:.3f}M params, frozen)")
        return teacher.requires_grad_(False)

    def _check_teacher(self, teacher, tokenizer, source: str) -> None:
        if tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise TrainingError(f"the teacher {source} has another tokenizer than the student ({len(tokenizer)} vs "
                                f"{len(self.tokenizer)} tokens): distillation compares their next-token "
                                "distributions, so both must use the same one (--tokenizer)")
        if self.stage.vision:
            ours, theirs = self.model, teacher
            if getattr(theirs, "vision_encoder", None) is None:
                raise TrainingError(f"the teacher {source} has no vision tower: a VLM student needs a VLM teacher")
            if (theirs.config.image_token_len, theirs.image_processor.size) != (
                    ours.config.image_token_len, ours.image_processor.size):
                raise TrainingError(
                    f"the teacher {source} reads {theirs.image_processor.size}px images as "
                    f"{theirs.config.image_token_len} tokens, the student {ours.image_processor.size}px as "
                    f"{ours.config.image_token_len}: both must see the same pixels and placeholders")

    def _wrap(self):
        model = self.model
        if self.processes.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.cuda else None, broadcast_buffers=False,
                # text-only batches skip the tower: its trainable weights (or adapters) get no gradient then
                find_unused_parameters=self.stage.vision and self.model.vision_trainable,
            )
        if self.config.use_compile:
            compile_blocks(self.model)
        return model

    # ------------------------------------------------------------------ data

    def _open_vision_cache(self) -> VisionCache | None:
        """The frozen tower's feature cache of --vision_cache, or None (not asked for, or unusable: logged)."""
        config = self.config
        if not config.vision_cache:
            return None
        reason = unusable_reason(vision=self.stage.vision, objective=self.stage.objective,
                                 tower_trains=self.stage.vision and self.model.vision_trainable)
        if reason:
            self.log(f"--vision_cache is off: {reason}")
            return None
        cache = open_cache(root=config.vision_cache, tower=self.model.vision_encoder,
                           preprocessor=self.model.image_processor, device_type=self.device.type,
                           autocast=config.dtype if self.cuda else config.cpu_dtype,
                           limit_bytes=int(config.vision_cache_gb * 1e9), log=self.log)
        self.log(f"vision cache: {cache.folder} holds {len(cache.reader)} images of this tower")
        return cache

    def _load_data(self) -> TrainingData:
        config, stage = self.config, self.stage
        data_config = DataConfig(
            paths=config.data_path, kind=stage.kind, max_seq_len=config.max_seq_len,
            image_token_len=self.model.config.image_token_len if stage.vision else 0,
            video_frames=config.video_frames, add_system_ratio=config.add_system_ratio,
            empty_think_ratio=config.empty_think_ratio, seed=config.seed,
            shuffle_window=config.shuffle_window, packing=bool(config.packing),
            pad_multiple=16 if config.use_compile else 1, thinking_ratio=config.thinking_ratio,
            needs_answer="exact_match" in self.reward_weights,
        )
        try:
            data = TrainingData(data_config, self.tokenizer, self.model.image_processor if stage.vision else None,
                                self.vision_cache.reader if self.vision_cache else None)
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(f"{err}. Pass --data_path (`minimind-v data synth` makes a synthetic set).") from err
        largest = max(chunk.rows for chunk in data.chunks)
        if largest > 4 * config.shuffle_window:
            self.log(f"warning: row groups of up to {largest} rows are each read whole, so memory grows with them; "
                     "rewrite the file with smaller row groups (pyarrow.parquet.write_table(..., row_group_size=1024))")
        return data

    # ------------------------------------------------------------------ saving and resuming

    @property
    def writes_tower(self) -> bool:
        """Whether the weights need a tower folder next to them (a frozen one is written once per process)."""
        return self.stage.vision and not self.adapted and needs_tower_folder(self.tower_source,
                                                                             self.model.vision_trainable)

    def _model_shape(self) -> dict:
        config = self.config
        return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                "use_moe": bool(config.use_moe), "vocab_size": len(self.tokenizer)}

    def save(self, nonfinite_streak: int) -> None:
        """Weights (reference format) or adapters (PEFT format), the trained tower if any, and the resume state;
        rank 0 writes. A failed write (a full disk) stops every process with TrainingError; each file keeps its
        previous version or the whole new one (see `weights.atomic_write`)."""
        rngs = self.processes.gather(rng_state())
        self.state.nonfinite_streak = nonfinite_streak
        failure = None
        if self.processes.is_main:
            try:
                self._write_checkpoint(rngs)
            except (OSError, SafetensorError) as err:  # safetensors (tower, adapters) reports I/O errors its own way
                failure = err
        if self.processes.all_sum([float(failure is not None)])[0]:  # also the barrier that ends the save
            where = f"{failure}" if failure else "rank 0 could not write the checkpoint (see its log)"
            raise TrainingError(
                f"saving at step {self.state.global_step} failed: {where}. Nothing is half-written: each file holds "
                "its previous or its new complete version, and `--from_resume 1` continues from the last resume "
                "state saved (redoing the steps since). Free some space on that disk, then resume."
            )

    def _write_checkpoint(self, rngs: list[dict]) -> None:
        config = self.config
        if self.adapted:
            base = weight_path(config.out_dir, config.from_weight, config.hidden_size, bool(config.use_moe))
            save_adapter(self.model, self.weights_path, base_model=base)
        else:
            save_native(self.model, self.weights_path)
        if self.writes_tower and (self.model.vision_trainable or not self.tower_written):
            save_vision_tower(self.model, self.vision_dir)
            self.tower_written = True
        save_resume(self.resume_file, {
            "model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": self.state.epoch, "step": self.state.step, "world_size": self.processes.world_size,
            "wandb_id": self.logger_id, "batch_size": config.batch_size,
            "accumulation_steps": config.accumulation_steps, "stage": config.stage,
            "model_shape": self._model_shape(), "seed": config.seed, "total_rows": self.data.total_rows,
            "rng": rngs, "counters": asdict(self.state),
        })

    def _resume(self) -> None:
        config, path = self.config, self.resume_file
        if not os.path.exists(path):
            self.log(f"warning: --from_resume 1 but there is no resume state at {path}; starting from the beginning")
            return
        saved = load_resume(path)
        expected = {"stage": config.stage, "model_shape": self._model_shape(), "seed": config.seed,
                    "total_rows": self.data.total_rows}
        for key, value in expected.items():
            if saved.get(key) != value:
                raise ResumeError(f"{path} belongs to a run with {key}={saved.get(key)!r}, this run has {value!r}; "
                                  "an exact resume needs the same stage, model, seed and data")
        load_trainable(self.model, saved["model"], path)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scaler.is_enabled() and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        counters = saved["counters"]
        self.state = RunState(**{**counters, "bad": {**dict.fromkeys(BAD_REASONS, 0), **counters["bad"]}})
        self.logger_id = saved["wandb_id"]
        same_layout = (saved["world_size"], saved["batch_size"], saved["accumulation_steps"]) == (
            self.processes.world_size, config.batch_size, config.accumulation_steps)
        state = self.state
        if state.rows_done >= self.data.total_rows:
            state.epoch, state.rows_done, state.step = state.epoch + 1, 0, 0
        if same_layout:
            self.saved_rng = saved["rng"][self.processes.rank] if state.rows_done else None
        else:
            state.step = state.rows_done // (self.rows_per_batch * config.accumulation_steps)
            self.log(f"world size x batch x accumulation changed from {saved['world_size']} x {saved['batch_size']} "
                     f"x {saved['accumulation_steps']} to {self.processes.world_size} x {config.batch_size} x "
                     f"{config.accumulation_steps}: continuing at row {state.rows_done} of epoch {state.epoch + 1} "
                     f"(step {state.step}); the data position is exact, RNG streams restart")
        self.log(f"resumed from {path}: epoch {state.epoch + 1}, step {state.step}, global step {state.global_step}")
