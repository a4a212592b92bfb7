"""Command-line flags shared by several commands, each defined once, and their translation into the keyword
arguments of the library functions (which never see an argparse Namespace)."""

from __future__ import annotations

import argparse

from .distributed import default_device
from .generate import DTYPES, GenerationConfig
from .quantize import INSTALL_HINT, METHODS, backend_available
from .weights import DEFAULT_TOWER

MODEL_OPTIONS = ("load_from", "save_dir", "weight", "hidden_size", "num_hidden_layers", "use_moe", "vision_model",
                 "tokenizer", "lora", "device", "quantize")


def add_shape_arguments(group) -> None:
    """The decoder shape of native weights (reference flags)."""
    group.add_argument("--hidden_size", type=int, default=768)
    group.add_argument("--num_hidden_layers", type=int, default=8)
    group.add_argument("--use_moe", type=int, default=0, choices=[0, 1])


def add_model_arguments(parser: argparse.ArgumentParser, weight: str = "sft_vlm") -> None:
    """Flags that pick a trained model: native `.pth` weights (reference flags) or a transformers folder, and an
    optional LoRA adapter on top."""
    group = parser.add_argument_group("model")
    group.add_argument("--load_from", default=None,
                       help="a transformers folder (from `minimind-v export` or the demo); "
                            "when given, --save_dir/--weight/--hidden_size/--num_hidden_layers/--use_moe are ignored")
    group.add_argument("--save_dir", default="out", help="folder of native .pth weights")
    group.add_argument("--weight", default=weight, help="weight prefix: {save_dir}/{weight}_{hidden}[_moe].pth")
    add_shape_arguments(group)
    group.add_argument("--vision_model", default=None,
                       help=f"SigLIP tower folder or hub id, random:<shape>, or none (default: the tower stored in the "
                            f"--load_from folder, else the tower trained with the weights, "
                            f"{{save_dir}}/{{weight}}_{{hidden}}[_moe]_vision, else {DEFAULT_TOWER})")
    group.add_argument("--tokenizer", default="model",
                       help="tokenizer folder (a --load_from folder with its own tokenizer takes precedence)")
    group.add_argument("--lora", default=None,
                       help="apply a LoRA adapter without merging it: a folder written by training with "
                            "--lora_rank (PEFT format) or a reference {lora_name}_{hidden}.pth")
    group.add_argument("--device", default=default_device())
    group.add_argument("--quantize", default="none", choices=METHODS, type=quantize_method,
                       help="int8: weight-only int8 decoder layers (tower, projector, embeddings and lm_head stay "
                            "in full precision); a --lora adapter is merged first")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype` of the commands that run a model (chat, describe, serve, webui, eval); see `inference_dtype`."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights' dtype; auto: bfloat16 on CUDA GPUs with bf16 and on CPUs that multiply bf16 "
                             "natively (AVX512-BF16, AMX), else float32 (default: %(default)s)")


def add_vision_input_arguments(parser: argparse.ArgumentParser) -> None:
    """How images and videos become visual tokens: `--max_tiles` and `--video_frames`."""
    parser.add_argument("--max_tiles", type=positive_int, default=None,
                        help="largest grid of tiles an image is cut into, besides its thumbnail (1: one square, as "
                             "the reference; default: the model's setting, else 1)")
    parser.add_argument("--video_frames", type=positive_int, default=8,
                        help="frames sampled uniformly from each video, each one thumbnail-size image "
                             "(1: the middle frame; default: %(default)s)")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def quantize_method(value: str) -> str:
    """`--quantize`, refused before any model is loaded when its library is missing."""
    if value in METHODS[1:] and not backend_available():
        raise argparse.ArgumentTypeError(INSTALL_HINT)
    return value


def model_options(args: argparse.Namespace) -> dict:
    """The `loading.load_model` keyword arguments of `add_model_arguments` flags (and `--max_tiles` of
    `add_vision_input_arguments`, for the commands that have it)."""
    return {**{name: getattr(args, name) for name in MODEL_OPTIONS}, "max_tiles": getattr(args, "max_tiles", None)}


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.7, top_p: float = 0.85,
                           max_new_tokens: int = 512) -> None:
    """Sampling flags (reference `eval_vlm.py` defaults) and the prompt length limit."""
    group = parser.add_argument_group("generation")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=temperature, help="0 decodes greedily")
    group.add_argument("--top_p", type=float, default=top_p)
    group.add_argument("--top_k", type=int, default=50, help="0 disables top-k filtering")
    group.add_argument("--repetition_penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=None, help="fix the sampling for reproducible replies")
    group.add_argument("--open_thinking", type=int, default=0, choices=[0, 1], help="start with reasoning on")
    group.add_argument("--max_seq_len", type=int, default=8192, help="longest prompt, in tokens")
    group.add_argument("--show_speed", type=int, default=1, choices=[0, 1], help="print tokens/s after replies")


def sampling_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
