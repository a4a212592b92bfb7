"""What a training run is told: the stages with their reference defaults, and `TrainConfig`, every setting of
a run as one typed object (the `minimind-v train` flags map onto its fields one to one)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .distributed import default_device, resolve_cpu_dtype


@dataclass(frozen=True)
class Stage:
    """A stage: its data kind (text, chat, pairs or prompts), whether it has a vision tower, its objective, and
    the reference defaults of the per-stage settings."""

    kind: str
    vision: bool
    objective: str
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
    add_system_ratio: float
    wandb_project: str
    beta: float = 0.0
    temperature: float = 1.0
    thinking_ratio: float = 0.0


STAGES = {
    "llm-pretrain": Stage("text", False, "causal_lm", "pretrain", "none", "dataset/pretrain_t2t_mini.jsonl", 1, 32,
                          5e-4, 340, 8, 8, 0, 0.0, "MiniMind-Pretrain"),
    "llm-sft": Stage("chat", False, "causal_lm", "llm", "pretrain", "dataset/sft_t2t_mini.jsonl", 2, 16, 1e-5, 768,
                     1, 8, 0, 0.2, "MiniMind-Full-SFT"),
    "llm-dpo": Stage("pairs", False, "dpo", "dpo", "llm", "dataset/dpo.jsonl", 1, 4, 4e-8, 1024, 1, 8, 0, 0.0,
                     "MiniMind-DPO", beta=0.15),
    "llm-grpo": Stage("prompts", False, "grpo", "grpo", "llm", "dataset/rlaif.jsonl", 1, 2, 3e-7, 768, 1, 8, 0, 0.0,
                      "MiniMind-GRPO", beta=0.1, temperature=0.8, thinking_ratio=0.9),
    "llm-distill": Stage("chat", False, "distill", "full_dist", "llm", "dataset/sft_t2t_mini.jsonl", 6, 32, 5e-6,
                         340, 1, 8, 0, 0.0, "MiniMind-Distillation", temperature=1.5),
    "vlm-pretrain": Stage("chat", True, "causal_lm", "pretrain_vlm", "llm", "dataset/pretrain_i2t.parquet", 2, 16,
                          4e-4, 450, 1, 2, 2, 0.2, "MiniMind-V-Pretrain"),
    "vlm-sft": Stage("chat", True, "causal_lm", "sft_vlm", "pretrain_vlm", "dataset/sft_i2t.parquet", 2, 4, 5e-6,
                     768, 1, 2, 1, 0.2, "MiniMind-V-SFT"),
    "vlm-dpo": Stage("pairs", True, "dpo", "dpo_vlm", "sft_vlm", "dataset/dpo_i2t.parquet", 1, 4, 4e-8, 1024, 1, 2,
                     0, 0.0, "MiniMind-V-DPO", beta=0.15),
    "vlm-grpo": Stage("prompts", True, "grpo", "grpo_vlm", "sft_vlm", "dataset/rlaif_i2t.parquet", 1, 2, 3e-7, 768, 1,
                      2, 0, 0.0, "MiniMind-V-GRPO", beta=0.1, temperature=0.8),
    "vlm-distill": Stage("chat", True, "distill", "dist_vlm", "sft_vlm", "dataset/sft_i2t.parquet", 2, 4, 5e-6, 768,
                         1, 2, 0, 0.2, "MiniMind-V-Distillation", temperature=1.5),
}
PER_STAGE = tuple(f.name for f in fields(Stage) if f.name not in ("kind", "vision", "objective"))


@dataclass
class TrainConfig:
    """Every setting of a run. Fields left None take the stage's default (`resolved`). Paths are relative to the
    working directory; `--help` of `minimind-v train` explains each one."""

    stage: str
    # data
    data_path: list[str] | None = None
    max_seq_len: int | None = None
    packing: int = 1
    add_system_ratio: float | None = None
    empty_think_ratio: float = 0.2
    max_bad_fraction: float = 0.05
    shuffle_window: int = 8192
    num_workers: int | None = None
    vision_cache: str | None = None
    vision_cache_gb: float = 50.0
    video_frames: int = 8
    # model
    hidden_size: int = 768
    num_hidden_layers: int = 8
    use_moe: int = 0
    tokenizer: str = "model"
    vision_model: str | None = None
    from_weight: str | None = None
    freeze_llm: int | None = None
    initializer_range: float = 0.02
    train_vision: int = 0
    max_tiles: int | None = None
    # LoRA (rank 0: off)
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    lora_name: str | None = None
    # objective
    beta: float | None = None
    rpo_alpha: float = 0.0
    temperature: float | None = None
    # GRPO
    num_generations: int = 6
    max_gen_len: int = 1024
    top_p: float = 0.85
    top_k: int = 50
    thinking_ratio: float | None = None
    loss_type: str = "cispo"
    epsilon: float = 0.2
    epsilon_high: float = 5.0
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    reward_model_path: str | None = None
    # distillation
    teacher: str | None = None
    teacher_hidden_size: int | None = None
    teacher_num_hidden_layers: int | None = None
    teacher_use_moe: int | None = None
    alpha: float = 0.5
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    warmup_steps: int = 0
    accumulation_steps: int | None = None
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None
    stop_loss: float | None = None
    max_nonfinite_steps: int = 10
    seed: int = 42
    dtype: str = "bfloat16"
    cpu_dtype: str = "auto"  # bfloat16 where the CPU has native bf16, else float32
    device: str = field(default_factory=default_device)
    use_compile: int = 0
    num_threads: int = 0
    # output
    out_dir: str = "out"
    save_weight: str | None = None
    checkpoint_dir: str = "checkpoints"
    log_dir: str = "runs"
    from_resume: int = 0
    log_interval: int = 100
    save_interval: int = 1000
    logger: str = "none"
    use_wandb: bool = False
    wandb_project: str | None = None

    @property
    def stage_spec(self) -> Stage:
        return STAGES[self.stage]

    def resolved(self) -> TrainConfig:
        """A copy with every None per-stage setting filled from the stage; `use_wandb` means swanlab, as in the
        reference; a single data path becomes a list; `cpu_dtype` auto becomes this CPU's precision."""
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        stage = self.stage_spec
        filled = {name: getattr(stage, name) for name in PER_STAGE if getattr(self, name) is None}
        config = replace(self, **filled)
        if isinstance(config.data_path, str):
            config.data_path = [config.data_path]
        if config.use_wandb and config.logger == "none":
            config.logger = "swanlab"
        if config.lora_rank and config.lora_name is None:
            config.lora_name = f"lora_{config.save_weight}"
        config.cpu_dtype = resolve_cpu_dtype(config.cpu_dtype)
        return config

    @property
    def run_prefix(self) -> str:
        """What this run's files are named after: the adapter name of a LoRA run, else `save_weight`."""
        return self.lora_name if self.lora_rank else self.save_weight


def defaults() -> dict:
    """Field name -> default value, for the command-line flags."""
    return {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(TrainConfig)
            if f.name != "stage"}
