"""`minimind-v train STAGE`: one training loop for every stage.

Stages (defaults as the reference trainers; the chain needs no extra flags):
    llm-pretrain  text jsonl/parquet        -> {out_dir}/pretrain_{hidden}.pth
    llm-sft       chat jsonl                -> {out_dir}/llm_{hidden}.pth          (from pretrain)
    llm-dpo       preference jsonl          -> {out_dir}/dpo_{hidden}.pth          (from llm)
    llm-grpo      prompt jsonl (rlaif)      -> {out_dir}/grpo_{hidden}.pth         (from llm)
    llm-distill   chat jsonl + --teacher    -> {out_dir}/full_dist_{hidden}.pth    (from llm)
    vlm-pretrain  image-text parquet        -> {out_dir}/pretrain_vlm_{hidden}.pth (from llm)
    vlm-sft       image-text parquet        -> {out_dir}/sft_vlm_{hidden}.pth      (from pretrain_vlm)
    vlm-dpo       preference parquet        -> {out_dir}/dpo_vlm_{hidden}.pth      (from sft_vlm)
    vlm-grpo      prompt parquet            -> {out_dir}/grpo_vlm_{hidden}.pth     (from sft_vlm)
    vlm-distill   image-text parquet        -> {out_dir}/dist_vlm_{hidden}.pth     (from sft_vlm)

Any stage trains LoRA adapters instead with `--lora_rank R`: the base stays frozen and the adapters go to
{out_dir}/{lora_name}_{hidden}/ (PEFT format). `train(stage=..., **settings)` is the same from Python.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal

import torch
from transformers.utils import logging as hf_logging

from . import distributed
from .checkpoint import ResumeError
from .loop import Loop, StopRequest
from .lora import TARGET_GROUPS
from .options import add_shape_arguments, add_vision_input_arguments
from .tracking import LOGGERS
from .train_config import STAGES, TrainConfig, defaults
from .trainer import Trainer, TrainingError
from .weights import DEFAULT_TOWER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = defaults()
    per_stage = "; ".join(f"{name}: bs {s.batch_size}, lr {s.learning_rate}, len {s.max_seq_len}"
                          for name, s in STAGES.items())
    parser.add_argument("stage", choices=list(STAGES), help=f"what to train (defaults per stage: {per_stage})")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", nargs="+", help="parquet / jsonl files (default per stage, under dataset/)")
    data.add_argument("--max_seq_len", type=int, help="tokens per sample; longer samples are cut (450/768 VLM, "
                                                      "1024 for each side of a DPO pair)")
    data.add_argument("--packing", type=int, default=d["packing"], choices=[0, 1],
                      help="1: pack several samples per row; 0: one sample per row, padded to the longest")
    data.add_argument("--add_system_ratio", type=float,
                      help="probability of prepending a random system prompt to a conversation (0.2; 0 for DPO)")
    data.add_argument("--empty_think_ratio", type=float, default=d["empty_think_ratio"],
                      help="probability of keeping an empty <think></think> block (else it is removed)")
    data.add_argument("--max_bad_fraction", type=float, default=d["max_bad_fraction"],
                      help="stop when more than this fraction of the rows read were unusable")
    data.add_argument("--shuffle_window", type=int, default=d["shuffle_window"],
                      help="rows shuffled together (memory bound)")
    data.add_argument("--num_workers", type=int, help="DataLoader worker processes (2 VLM, 8 LLM)")
    data.add_argument("--vision_cache", default=d["vision_cache"],
                      help="folder caching a frozen tower's features of each image, reused across epochs and stages "
                           "(default: none)")
    data.add_argument("--vision_cache_gb", type=float, default=d["vision_cache_gb"],
                      help="size bound of the --vision_cache folder; once reached, nothing more is added")
    add_vision_input_arguments(data)
    model = parser.add_argument_group("model")
    add_shape_arguments(model)
    model.add_argument("--tokenizer", default=d["tokenizer"], help="tokenizer folder; the vocabulary size comes "
                                                                   "from it")
    model.add_argument("--vision_model",
                       help=f"SigLIP tower folder or hub id, or random:<shape> (default: the tower saved with "
                            f"--from_weight if there is one, else {DEFAULT_TOWER})")
    model.add_argument("--from_weight", help="start from {out_dir}/{from_weight}_{hidden}[_moe].pth, or none")
    model.add_argument("--freeze_llm", type=int, choices=[0, 1, 2],
                       help="VLM: 0 train all, 1 projector + first/last block, 2 projector only (2 pretrain, 1 SFT, "
                            "0 DPO)")
    model.add_argument("--initializer_range", type=float, default=d["initializer_range"],
                       help="std of the random init of new decoder weights (the reference's 0.02 suits width 768; "
                            "tiny models train faster with about 0.02 * sqrt(768 / hidden_size))")
    model.add_argument("--train_vision", type=int, default=d["train_vision"], choices=[0, 1],
                       help="also train the vision tower (needed when it starts random)")
    lora = parser.add_argument_group("LoRA (any stage)")
    lora.add_argument("--lora_rank", type=int, default=d["lora_rank"],
                      help="train rank-R LoRA adapters on a frozen base instead of the weights (0: off)")
    lora.add_argument("--lora_alpha", type=float, default=d["lora_alpha"],
                      help="adapter scale alpha / rank (default: alpha = rank, the reference's scale of 1)")
    lora.add_argument("--lora_targets", nargs="+", default=d["lora_targets"],
                      help=f"layers to adapt: groups ({', '.join(TARGET_GROUPS)}) or regular expressions over module "
                           "names, e.g. 'model\\.layers\\.\\d+\\.self_attn\\.[qo]_proj' (the reference's square "
                           "layers)")
    lora.add_argument("--lora_name", help="adapter name: {out_dir}/{lora_name}_{hidden}[_moe]/ (default: "
                                          "lora_{save_weight})")
    objective = parser.add_argument_group("objective")
    objective.add_argument("--beta", type=float, default=d["beta"],
                           help="DPO: strength of the preference against the reference model (0.15); GRPO: weight "
                                "of the KL to the reference model (0.1; 0 skips the reference model)")
    objective.add_argument("--rpo_alpha", type=float, default=d["rpo_alpha"],
                           help="DPO: weight of the chosen answer's per-token NLL added to the loss (RPO; 0: the "
                                "reference's plain DPO)")
    objective.add_argument("--temperature", type=float, default=d["temperature"],
                           help="GRPO: sampling temperature of the answers (0.8); distillation: softmax temperature "
                                "of both models (1.5)")
    grpo = parser.add_argument_group("GRPO (llm-grpo, vlm-grpo)")
    grpo.add_argument("--num_generations", type=int, default=d["num_generations"],
                      help="answers sampled per prompt; advantages compare the answers of one prompt")
    grpo.add_argument("--max_gen_len", type=int, default=d["max_gen_len"], help="longest answer, in tokens")
    grpo.add_argument("--top_p", type=float, default=d["top_p"], help="sampling nucleus of the answers")
    grpo.add_argument("--top_k", type=int, default=d["top_k"], help="sampling top-k of the answers (0: off)")
    grpo.add_argument("--thinking_ratio", type=float,
                      help="probability of opening a think block in a prompt (0.9 llm-grpo, 0 vlm-grpo)")
    grpo.add_argument("--loss_type", default=d["loss_type"], choices=["grpo", "cispo"],
                      help="grpo: PPO-clipped ratio; cispo: clipped, detached ratio times log-prob")
    grpo.add_argument("--epsilon", type=float, default=d["epsilon"], help="grpo loss: clip range of the ratio")
    grpo.add_argument("--epsilon_high", type=float, default=d["epsilon_high"],
                      help="cispo loss: upper bound of the ratio")
    grpo.add_argument("--rewards", nargs="+", default=d["rewards"],
                      help="reward kinds with optional weights, summed: exact_match (the row's `answer`, scored as "
                           "`eval` does), format (the reference's length / think-block / repetition rules), "
                           "reward_model (--reward_model_path); e.g. exact_match format:0.25")
    grpo.add_argument("--reward_model_path",
                      help="a transformers reward model (sequence classification, one output) scoring (prompt, "
                           "answer); adds the reward_model reward")
    distill = parser.add_argument_group("distillation (llm-distill, vlm-distill)")
    distill.add_argument("--teacher", "--from_teacher_weight", dest="teacher",
                         help="the teacher: a weight prefix in --out_dir ({out_dir}/{teacher}_{hidden}[_moe].pth, "
                              "with the shape flags below) or a transformers folder; same tokenizer as the student")
    distill.add_argument("--teacher_hidden_size", type=int, help="teacher width (default: the student's)")
    distill.add_argument("--teacher_num_hidden_layers", "--teacher_num_layers", dest="teacher_num_hidden_layers",
                         type=int, help="teacher depth (default: the student's)")
    distill.add_argument("--teacher_use_moe", type=int, choices=[0, 1], help="teacher MoE (default: the student's)")
    distill.add_argument("--alpha", type=float, default=d["alpha"],
                         help="weight of the cross-entropy on the labels; 1 - alpha weighs the KL to the teacher")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch_size", type=int, help="samples (DPO: pairs, GRPO: prompts) per micro-batch per "
                                                       "process")
    optim.add_argument("--learning_rate", type=float, help="peak learning rate (cosine to 10%% of it)")
    optim.add_argument("--warmup_steps", type=int, default=d["warmup_steps"], help="linear warm-up steps")
    optim.add_argument("--accumulation_steps", type=int)
    optim.add_argument("--grad_clip", type=float, default=d["grad_clip"],
                       help="max global gradient norm (0: no clipping)")
    optim.add_argument("--max_steps", type=int, help="stop after this many optimizer steps in all")
    optim.add_argument("--max_minutes", type=float,
                       help="stop after the step that passes this many minutes of training; the weights are saved "
                            "as at the end (a time budget)")
    optim.add_argument("--stop_loss", type=float,
                       help="stop at the first log line (every --log_interval steps) whose mean loss since the "
                            "previous one is below this; the weights are saved as at the end")
    optim.add_argument("--max_nonfinite_steps", type=int, default=d["max_nonfinite_steps"],
                       help="stop after this many steps in a row with a NaN/inf loss or gradient")
    optim.add_argument("--seed", type=int, default=d["seed"])
    optim.add_argument("--dtype", default=d["dtype"], choices=["bfloat16", "float16", "float32"],
                       help="autocast dtype on CUDA (on CPU see --cpu_dtype)")
    optim.add_argument("--cpu_dtype", default=d["cpu_dtype"], choices=list(distributed.CPU_DTYPES),
                       help="CPU training precision; bfloat16 autocasts the matrix products (weights stay float32), "
                            "~1.5x faster on CPUs with native bf16 (AVX512-BF16, AMX), slower on others; auto: "
                            "bfloat16 on such a CPU, else float32")
    optim.add_argument("--device", default=d["device"])
    optim.add_argument("--use_compile", type=int, default=d["use_compile"], choices=[0, 1])
    optim.add_argument("--num_threads", type=int, default=d["num_threads"],
                       help="CPU threads for the model (0: this process's share of the cores)")
    out = parser.add_argument_group("output")
    out.add_argument("--out_dir", "--save_dir", dest="out_dir", default=d["out_dir"], help="weights folder")
    out.add_argument("--save_weight", help="weights file prefix (per stage)")
    out.add_argument("--checkpoint_dir", default=d["checkpoint_dir"], help="resume states")
    out.add_argument("--log_dir", default=d["log_dir"],
                     help="metrics of each run: {log_dir}/{save_weight or lora_name}_{hidden}/")
    out.add_argument("--from_resume", type=int, default=d["from_resume"], choices=[0, 1],
                     help="1: continue exactly from the resume state in --checkpoint_dir")
    out.add_argument("--log_interval", type=int, default=d["log_interval"], help="steps between log lines")
    out.add_argument("--save_interval", type=int, default=d["save_interval"], help="steps between saves")
    out.add_argument("--logger", default=d["logger"], choices=LOGGERS)
    out.add_argument("--use_wandb", action="store_true", help="the reference flag: same as --logger swanlab")
    out.add_argument("--wandb_project", help="project name for the logger")


def train(stage: str, **settings) -> None:
    """Train one stage; `settings` are `TrainConfig` fields (the flags without their dashes). Raises
    SystemExit with the reason on bad flags, files or data, and 128 + signal number after a stop signal."""
    config = TrainConfig(stage=stage, **settings).resolved()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()
    processes = distributed.setup(config.device)
    config.num_workers = min(config.num_workers, cpu_cores())
    if processes.device.type == "cpu":
        torch.set_num_threads(config.num_threads or cpu_threads())
        keep_freed_memory()
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Loop(Trainer(config, processes), stop).run()
    except (TrainingError, ResumeError, FileNotFoundError) as err:
        raise SystemExit(f"train {stage}: {err}") from err
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        distributed.teardown(processes)
    if stop.signum is not None:
        raise SystemExit(128 + stop.signum)


def main(args: argparse.Namespace) -> None:
    settings = {name: getattr(args, name) for name in defaults()}
    train(args.stage, **settings)


def cpu_threads() -> int:
    """This process's share of the cores. DataLoader workers get no core of their own: they are mostly idle
    (on 2 cores, 2 threads + 1 worker trained 1.4x faster than 1 thread + 1 worker), and the passive OpenMP
    wait policy set in `minimind_v/__init__.py` keeps the threads cheap when a core is busy elsewhere."""
    return max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the
    system. A CPU training step frees its activations at the end of the backward pass and allocates them again
    in the next forward; by default the freed top of the heap is trimmed and large blocks are fresh mappings, so
    every step page-faults its activations in again. Returns whether it applied (glibc only)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the symbols already loaded, libc's among them; no library search
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def cpu_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
