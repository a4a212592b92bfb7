"""Weight files: reference-format `.pth` state dicts (strict load, fp16 save), their naming, and atomic writes of
files and folders. Building models from them lives in `loading`."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from torch import nn

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


def replace_folder(folder: str, write: Callable[[str], None]) -> None:
    """Fill a temporary folder with `write(staging)`, then rename it over `folder`, so an interrupted save never
    leaves a half-written folder under that name."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(glob.escape(folder) + ".tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(folder) + ".tmp-")
    try:
        write(staging)
        old = folder + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_name(prefix: str, hidden_size: int, use_moe: bool) -> str:
    """`{prefix}_{hidden}[_moe]`, the reference naming of weights, and of everything else that belongs to them."""
    return f"{prefix}_{hidden_size}{'_moe' if use_moe else ''}"


def weight_path(out_dir: str, prefix: str, hidden_size: int, use_moe: bool) -> str:
    """`{out_dir}/{prefix}_{hidden}[_moe].pth`."""
    return os.path.join(out_dir, run_name(prefix, hidden_size, use_moe) + ".pth")


def vision_folder(out_dir: str, prefix: str, hidden_size: int, use_moe: bool) -> str:
    """Where a trained tower goes, next to the weights: `{out_dir}/{prefix}_{hidden}[_moe]_vision`."""
    return os.path.join(out_dir, run_name(prefix, hidden_size, use_moe) + "_vision")


DEFAULT_TOWER = "model/siglip2-base-p32-256-ve"


def tower_for_weights(out_dir: str, prefix: str, hidden_size: int, use_moe: bool) -> str:
    """The default tower of a native weight file: the one trained with it, else the reference tower folder."""
    trained = vision_folder(out_dir, prefix, hidden_size, use_moe)
    return trained if os.path.isdir(trained) else DEFAULT_TOWER


def needs_tower_folder(source: str, changed: bool) -> bool:
    """Whether weights must have their tower written beside them (`vision_folder`), so that `tower_for_weights`
    finds it: when it changed (trained, adapted) or came from anywhere but the default folder (another folder, a
    random init)."""
    return changed or source != DEFAULT_TOWER


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
    """Reference weight-file content: every key but the vision tower's and LoRA adapters' (those have files of
    their own), as separate `dtype` CPU copies (both tied keys included)."""
    return {
        k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
        for k, v in unwrap(model).state_dict().items()
        if not k.startswith(TOWER_PREFIX) and ".lora." not in k
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
    expected = {k: v for k, v in model.state_dict().items() if ".lora." not in k}
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


