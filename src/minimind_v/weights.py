"""Weight files: reference-format `.pth` state dicts (strict load, fp16 save), atomic writes, building a
model from native weights or a transformers folder, and self-contained transformers exports."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from torch import nn

from .config import VISION_PRESETS, MiniMindConfig, VLMConfig, vision_dims
from .llm import MiniMindForCausalLM
from .vlm import MiniMindVLM

TOWER_PREFIX = "vision_encoder."
# Non-persistent RoPE tables that some older exports carry; this code always recomputes them.
IGNORED_KEYS = ("model.freqs_cos", "model.freqs_sin")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def run_name(prefix: str, hidden_size: int, use_moe: bool) -> str:
    """`{prefix}_{hidden}[_moe]`, the reference naming of weights, and of everything else that belongs to them."""
    return f"{prefix}_{hidden_size}{'_moe' if use_moe else ''}"


def weight_path(out_dir: str, prefix: str, hidden_size: int, use_moe: bool) -> str:
    """`{out_dir}/{prefix}_{hidden}[_moe].pth`."""
    return os.path.join(out_dir, run_name(prefix, hidden_size, use_moe) + ".pth")


def vision_folder(out_dir: str, prefix: str, hidden_size: int, use_moe: bool) -> str:
    """Where a trained tower goes, next to the weights: `{out_dir}/{prefix}_{hidden}[_moe]_vision`."""
    return os.path.join(out_dir, run_name(prefix, hidden_size, use_moe) + "_vision")


def tower_for_weights(out_dir: str, prefix: str, hidden_size: int, use_moe: bool) -> str:
    """The default tower of a native weight file: the one trained with it, else the reference tower folder."""
    trained = vision_folder(out_dir, prefix, hidden_size, use_moe)
    return trained if os.path.isdir(trained) else DEFAULT_TOWER


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def native_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Reference weight-file content: every key but the vision tower's, as separate `dtype` CPU copies
    (both tied keys included)."""
    return {
        k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
        for k, v in unwrap(model).state_dict().items()
        if not k.startswith(TOWER_PREFIX)
    }


def save_native(model: nn.Module, path: str) -> None:
    """Write reference-format weights (fp16, no vision tower) atomically."""
    atomic_save(native_state_dict(model), path)


def load_native(model: nn.Module, source: str | dict, optional_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load a reference-format state dict strictly; return the non-tower keys left at their current values.

    Only `vision_encoder.*` may be missing (weight files never carry the tower), plus keys under
    `optional_prefixes` (e.g. "vision_proj." when a VLM starts from LLM weights), and a tied `lm_head.weight`
    may be absent. Any other missing, unexpected or mis-shaped key raises a ValueError naming the keys.
    """
    state = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, str) else source
    state = {k: v for k, v in strip_wrapper_prefixes(state).items() if k not in IGNORED_KEYS}
    model = unwrap(model)
    expected = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    tied_head = tied and "model.embed_tokens.weight" in state
    absent = [k for k in expected if k not in state and not (tied_head and k == "lm_head.weight")]
    missing = [k for k in absent if not k.startswith((TOWER_PREFIX, *optional_prefixes))]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        name = source if isinstance(source, str) else "state dict"
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
                problems.append(f"{label}: {shown}")
        raise ValueError(
            f"{name} does not fit this model ({'; '.join(problems)}). Check --hidden_size, "
            "--num_hidden_layers and --use_moe against the file."
        )
    model.load_state_dict(state, strict=False)
    return [k for k in absent if not k.startswith(TOWER_PREFIX)]


def build_model(config: MiniMindConfig, weights: str | None = None, vision_model: str | None = None,
                vision_dtype: torch.dtype = torch.float32,
                optional_prefixes: tuple[str, ...] = ()) -> MiniMindForCausalLM:
    """A MiniMind-V model (or a plain LLM for a MiniMindConfig), optionally loading native weights (see
    `load_native` for `optional_prefixes`)."""
    if isinstance(config, VLMConfig):
        model = MiniMindVLM(config, vision_model_path=vision_model, vision_dtype=vision_dtype)
    else:
        model = MiniMindForCausalLM(config)
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no weight file at {weights!r}")
        load_native(model, weights, optional_prefixes)
    return model


def load_pretrained_folder(folder: str, vision_model: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a folder written by `save_pretrained` (or `minimind-v export`). A `vision_model` replaces the
    tower stored in the folder (or supplies one when the folder has none, as in reference exports)."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{folder!r} is not a transformers model folder (no config.json)")
    with open(config_file, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    cls = MiniMindVLM if model_type == VLMConfig.model_type else MiniMindForCausalLM
    model = cls.from_pretrained(folder, dtype=dtype)
    if vision_model and isinstance(model, MiniMindVLM):
        tower_model = MiniMindVLM(model.config, vision_model_path=vision_model)
        model.vision_encoder = tower_model.vision_encoder
        model.image_processor = tower_model.image_processor
    return model


def export_pretrained(model: nn.Module, out_dir: str, tokenizer=None) -> None:
    """Write a self-contained transformers folder: config, safetensors weights (with the vision tower),
    the model code for `trust_remote_code`, the image preprocessor config and the tokenizer."""
    model = unwrap(model)
    model.save_pretrained(out_dir)
    if isinstance(model, MiniMindVLM) and model.vision_encoder is not None:
        model.image_processor.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)



def resolve_vision(vision_model: str | None) -> tuple[str | None, dict | None]:
    """`--vision_model` -> (tower folder or hub id to load, or None; tower config for a random tower, or None).

    `random:<name>` builds a random tower of a VISION_PRESETS shape (for from-zero training); `none` means
    a text-only model."""
    if not vision_model or vision_model == "none":
        return None, None
    if vision_model.startswith("random:"):
        name = vision_model.split(":", 1)[1]
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown random tower {name!r}; choose one of {sorted(VISION_PRESETS)}")
        return None, dict(VISION_PRESETS[name])
    from transformers import SiglipVisionConfig

    try:
        tower_config = SiglipVisionConfig.from_pretrained(vision_model)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no SigLIP vision tower at {vision_model!r} ({err}). Download siglip2-base-p32-256-ve into that "
            "folder, point --vision_model at it, or use random:<shape> to train one from zero."
        ) from err
    return vision_model, tower_config.to_dict()


def vlm_config_from_args(vision_model: str | None, args, vocab_size: int, **overrides) -> VLMConfig:
    """The VLMConfig that native weights need: decoder shape from the reference flags (`hidden_size`,
    `num_hidden_layers`, `use_moe`), vocabulary from the tokenizer, image dims from the tower."""
    tower_path, tower_config = resolve_vision(vision_model)
    dims = vision_dims(tower_config) if tower_config else {}
    return VLMConfig(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=bool(args.use_moe),
        vocab_size=vocab_size, vision_config=None if tower_path else tower_config, **dims, **overrides,
    )


DEFAULT_TOWER = "model/siglip2-base-p32-256-ve"


def add_model_arguments(parser: argparse.ArgumentParser, weight: str = "sft_vlm") -> None:
    """Flags that pick a trained model: native `.pth` weights (reference flags) or a transformers folder."""
    group = parser.add_argument_group("model")
    group.add_argument("--load_from", default=None,
                       help="a transformers folder (from `minimind-v export` or the demo); "
                            "when given, --save_dir/--weight/--hidden_size/--num_hidden_layers/--use_moe are ignored")
    group.add_argument("--save_dir", default="out", help="folder of native .pth weights")
    group.add_argument("--weight", default=weight, help="weight prefix: {save_dir}/{weight}_{hidden}[_moe].pth")
    group.add_argument("--hidden_size", type=int, default=768)
    group.add_argument("--num_hidden_layers", type=int, default=8)
    group.add_argument("--use_moe", type=int, default=0, choices=[0, 1])
    group.add_argument("--vision_model", default=None,
                       help=f"SigLIP tower folder or hub id, random:<shape>, or none (default: the tower stored in the "
                            f"--load_from folder, else the tower trained with the weights, "
                            f"{{save_dir}}/{{weight}}_{{hidden}}[_moe]_vision, else {DEFAULT_TOWER})")
    group.add_argument("--tokenizer", default="model",
                       help="tokenizer folder (a --load_from folder with its own tokenizer takes precedence)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_model_from_args(args, dtype: torch.dtype = torch.float32):
    """(model in eval mode on args.device, tokenizer) from `add_model_arguments` flags."""
    from .tokenizer import load_tokenizer

    if args.load_from:
        own_tokenizer = os.path.isfile(os.path.join(args.load_from, "tokenizer.json"))
        tokenizer = load_tokenizer(args.load_from if own_tokenizer else args.tokenizer)
        vision = args.vision_model
        if vision is None and not _has_tower(args.load_from) and os.path.isdir(DEFAULT_TOWER):
            vision = DEFAULT_TOWER
        model = load_pretrained_folder(args.load_from, vision_model=vision)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        names = (args.save_dir, args.weight, args.hidden_size, bool(args.use_moe))
        vision = args.vision_model or tower_for_weights(*names)
        config = vlm_config_from_args(vision, args, len(tokenizer))
        tower_path, _ = resolve_vision(vision)
        # Without a tower, text-only LLM weights (pretrain_*.pth, llm_*.pth: no projector) load as well.
        model = build_model(config, weight_path(*names), vision_model=tower_path,
                            optional_prefixes=("vision_proj.",) if vision == "none" else ())
    return model.to(device=args.device, dtype=dtype).eval(), tokenizer


def _has_tower(folder: str) -> bool:
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return bool(json.load(f).get("vision_config"))
