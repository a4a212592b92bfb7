"""Resume state and trained vision towers, written atomically.

The resume file `{checkpoint_dir}/{save_weight}_{hidden}[_moe]_resume.pth` holds everything that changes
during training: the trainable parameters in float32 (frozen ones are rebuilt from --from_weight and the seed),
optimizer and scaler states, every RNG state of every process, the data position (epoch and rows consumed)
and the counters. The keys of the reference resume file keep their names (model, optimizer, epoch, step,
world_size, wandb_id, scaler).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from .weights import atomic_save, replace_folder, run_name, unwrap

FORMAT = "minimind-v-resume/1"


class ResumeError(RuntimeError):
    """The resume file cannot be used; the message says why and what to do."""


def resume_path(checkpoint_dir: str, save_weight: str, hidden_size: int, use_moe: bool) -> str:
    return os.path.join(checkpoint_dir, run_name(save_weight, hidden_size, use_moe) + "_resume.pth")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the parameters that require grad (tied parameters once)."""
    return {name: p.detach().to("cpu", torch.float32, copy=True)
            for name, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Copy saved trainable parameters into the model; names and shapes must match exactly."""
    params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    wrong = [n for n in params.keys() & state.keys() if params[n].shape != state[n].shape]
    if missing or unexpected or wrong:
        raise ResumeError(
            f"{path} was saved for a different model or freeze setting (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, wrong shape {wrong[:4]}). Use the same --hidden_size, --num_hidden_layers, "
            "--use_moe, --freeze_llm and --train_vision as the interrupted run, or start fresh with --from_resume 0."
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, as plain Python values (so they can be gathered
    across processes and loaded with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state().numpy().tobytes(),
        "cuda": [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    as_tensor = lambda raw: torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # noqa: E731
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(as_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(s) for s in state["cuda"]])


def save_resume(path: str, state: dict) -> None:
    atomic_save({"format": FORMAT, **state}, path)


def load_resume(path: str) -> dict:
    """Read a resume file, or raise ResumeError naming the problem (never a silent fresh start)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle error, a disk error: all mean the file is unusable
        raise ResumeError(
            f"the resume file {path} is corrupt or truncated ({type(err).__name__}: {err}). Restore a good copy, "
            "or delete it (or pass --from_resume 0) to start over."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a minimind-v resume file, so it cannot be continued exactly. "
                          "Pass --from_resume 0 to start over (e.g. from its weights with --from_weight).")
    return state


def save_vision_tower(model: nn.Module, folder: str) -> None:
    """Write the tower and its preprocessing config to `folder` (atomically, see `replace_folder`)."""
    model = unwrap(model)

    def write(staging: str) -> None:
        model.vision_encoder.save_pretrained(staging)
        model.image_processor.save_pretrained(staging)

    replace_folder(folder, write)
