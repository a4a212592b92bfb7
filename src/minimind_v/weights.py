"""Weight files: reference-format `.pth` state dicts (strict load, fp16 save), their naming, and atomic writes of
files and folders. Building models from them lives in `loading`."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO

import torch
from torch import nn

TOWER_PREFIX = "vision_encoder."
# Non-persistent RoPE tables that some older exports carry; this code always recomputes them.
IGNORED_KEYS = ("model.freqs_cos", "model.freqs_sin")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` as `write(file)` fills a temporary file of the same folder, then fsync it, rename it over `path`
    and fsync the folder: whenever the process dies, `path` holds its old content or the whole new one. A failed
    write (a full disk) raises OSError naming `path` and leaves `path` as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):  # left by a killed write
        os.remove(stale)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0o666: the umask applies, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror or str(err), path) from err
        raise
    fsync_path(folder)


def atomic_save(obj, path: str) -> None:
    """torch.save through `atomic_write`."""

    def write(f: BinaryIO) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            # torch.save reports the file's OSError (ENOSPC, EFBIG) as a RuntimeError raised while handling it
            if isinstance(err.__context__, OSError):
                raise err.__context__ from err
            raise

    atomic_write(path, write)


def fsync_path(path: str) -> None:
    """fsync a file, or a folder (which makes the renames and new names inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every file and folder under `folder`."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def recover_folder(folder: str) -> None:
    """Undo what a `replace_folder` killed between its two renames left: the previous folder at `{folder}.old` and
    none at `folder` is put back; an `.old` next to a complete `folder` is removed."""
    old = folder + ".old"
    if not os.path.isdir(old):
        return
    if os.path.isdir(folder):
        shutil.rmtree(old)
    else:
        os.replace(old, folder)


def replace_folder(folder: str, write: Callable[[str], None]) -> None:
    """Fill a temporary folder with `write(staging)`, fsync it, then rename it over `folder`, so an interrupted save
    never leaves a half-written folder under that name (a kill between the two renames leaves the previous folder
    at `{folder}.old`, which `recover_folder` puts back and `tower_for_weights` reads meanwhile)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    recover_folder(folder)
    for stale in glob.glob(glob.escape(folder) + ".tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(folder) + ".tmp-")
    try:
        write(staging)
        fsync_tree(staging)
        old = folder + ".old"
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(staging, folder)
        fsync_path(parent)
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
    for folder in (trained, trained + ".old"):  # .old: a save was killed while swapping the folders
        if os.path.isdir(folder):
            return folder
    return DEFAULT_TOWER


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


