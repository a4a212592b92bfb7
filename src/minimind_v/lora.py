"""LoRA adapters: a low-rank update y = W x + (alpha / r) * B (A x) on chosen linear layers, the base frozen.

As in the reference `model_lora.py`, each adapted `nn.Linear` gets a child `lora` holding `A` (r x in, drawn from
N(0, 0.02)) and `B` (out x r, zeros), so the adapter keys are `{module}.lora.A.weight` and `{module}.lora.B.weight`
and every base key stays as it was. The update is added by a forward hook: the model's own code is untouched.

Files. The reference format loads: a `.pth` of those keys (fp16), rank from the shapes, no scaling (alpha = r).
We save PEFT's format: a folder with `adapter_config.json` (r, lora_alpha, the exact target modules) and
`adapter_model.safetensors` (`base_model.model.{module}.lora_A.weight` / `lora_B.weight`), because it records the
scale and the targets (a reference file can record neither), holds no pickle, and `peft.PeftModel.from_pretrained`
applies it to our exported transformers folder. The adapters themselves are ours, not peft's: peft would move
every adapted weight to `{module}.base_layer.weight`, which the reference weight files, strict loading and the
resume files all name otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .weights import strip_wrapper_prefixes, unwrap

# --lora_targets groups (or any regular expression matched against whole module names).
TARGET_GROUPS = {
    "attention": r"model\.layers\.\d+\.self_attn\.[qkvo]_proj",
    "mlp": r"model\.layers\.\d+\.mlp\.(experts\.\d+\.)?(gate|up|down)_proj",
    "projector": r"vision_proj\.mlp\.\d+",
    "vision": r"vision_encoder\..+",
}
DEFAULT_TARGETS = ("attention", "mlp")
PEFT_CONFIG, PEFT_WEIGHTS, PEFT_PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


class LoRA(nn.Module):
    """The update of one linear layer: x [..., in] -> scale * B(A(x)) [..., out]; `enabled=False` switches it off."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.A.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.B.weight)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.B(self.A(x))
        return update if self.scale == 1 else update * self.scale


def _add_update(linear: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    return output + linear.lora(inputs[0]) if linear.lora.enabled else None


def adapters(model: nn.Module) -> dict[str, LoRA]:
    """Adapted module name -> its LoRA, in model order."""
    return {name: module.lora for name, module in unwrap(model).named_modules() if isinstance(module, nn.Linear)
            and isinstance(getattr(module, "lora", None), LoRA)}


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The linear layers named by `targets` (groups of TARGET_GROUPS or regular expressions over whole module
    names); ValueError when a target names none."""
    linears = [name for name, module in unwrap(model).named_modules()
               if isinstance(module, nn.Linear) and ".lora." not in f".{name}."]
    chosen = []
    for target in targets:
        pattern = re.compile(TARGET_GROUPS.get(target, target))
        found = [name for name in linears if pattern.fullmatch(name)]
        if not found:
            raise ValueError(f"--lora_targets {target!r} matches no linear layer of this model (groups: "
                             f"{', '.join(TARGET_GROUPS)}; or a regular expression such as "
                             r"'model\.layers\.\d+\.self_attn\.q_proj')")
        chosen += [name for name in found if name not in chosen]
    return [name for name in linears if name in chosen]


def add_lora(model: nn.Module, names: Sequence[str], rank: int, alpha: float | None = None) -> None:
    """Attach a rank-`rank` adapter (scale alpha / rank; alpha defaults to rank, the reference's scale of 1) to
    each named linear layer, on its device and in its dtype."""
    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1 (got {rank})")
    modules = dict(unwrap(model).named_modules())
    for name in names:
        linear = modules[name]
        lora = LoRA(linear.in_features, linear.out_features, rank, float(alpha or rank))
        linear.lora = lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        lora.handle = linear.register_forward_hook(_add_update)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under the reference keys `{module}.lora.A.weight` / `.lora.B.weight`."""
    return {f"{name}.lora.{part}.weight": getattr(lora, part).weight for name, lora in adapters(model).items()
            for part in ("A", "B")}


def save_adapter(model: nn.Module, folder: str, base_model: str = "") -> None:
    """Write the adapters in PEFT's format (fp32 safetensors + adapter_config.json), through a temporary folder
    and a rename."""
    from .weights import replace_folder

    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(found.values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": first.rank, "lora_alpha": first.alpha, "target_modules": list(found), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    tensors = {f"{PEFT_PREFIX}{name}.lora_{part}.weight": getattr(lora, part).weight.detach().float().cpu()
               .contiguous() for name, lora in found.items() for part in ("A", "B")}

    def write(staging: str) -> None:
        save_file(tensors, os.path.join(staging, PEFT_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(staging, PEFT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    replace_folder(folder, write)


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], float | None]:
    """An adapter file -> (state dict under the reference keys, alpha or None for the reference's scale 1).

    `path` is a PEFT folder (or its adapter_model.safetensors) or a reference `.pth`."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        config_file = os.path.join(folder, PEFT_CONFIG)
        weights_file = os.path.join(folder, PEFT_WEIGHTS) if os.path.isdir(path) else path
        if not os.path.isfile(config_file) or not os.path.isfile(weights_file):
            raise FileNotFoundError(f"{path!r} is not a LoRA adapter: a PEFT adapter folder holds {PEFT_CONFIG} and "
                                    f"{PEFT_WEIGHTS}; a reference adapter is one .pth file")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
            raise ValueError(f"{path!r} is a {config.get('peft_type')} adapter with options this loader does not "
                             "apply (only plain LoRA: no rsLoRA, no DoRA)")
        state = {}
        for key, value in load_file(weights_file).items():
            name, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            state[f"{name}.lora.{part.replace('.default', '')}"] = value
        return state, float(config["lora_alpha"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA adapter at {path!r} (a PEFT adapter folder or a reference .pth file)")
    return strip_wrapper_prefixes(torch.load(path, map_location="cpu", weights_only=True)), None


def load_adapter(model: nn.Module, path: str) -> list[str]:
    """Attach the adapter in `path` (see `read_adapter`) to `model` and return the adapted module names; a
    ValueError names every key that does not fit (unknown module, not a linear layer, wrong shape)."""
    state, alpha = read_adapter(path)
    modules = dict(unwrap(model).named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, value in state.items():
        match = re.fullmatch(r"(.+)\.lora\.([AB])\.weight", key)
        if match is None:
            problems.append(f"{key}: not a LoRA key")
            continue
        pairs.setdefault(match[1], {})[match[2]] = value
    for name, pair in pairs.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            problems.append(f"{name}: {'not a linear layer' if name in modules else 'no such module'} in this model")
        elif set(pair) != {"A", "B"}:
            problems.append(f"{name}: needs both lora.A.weight and lora.B.weight")
        elif pair["A"].shape[1] != linear.in_features or pair["B"].shape[0] != linear.out_features or \
                pair["A"].shape[0] != pair["B"].shape[1]:
            problems.append(f"{name}.lora: A {tuple(pair['A'].shape)} and B {tuple(pair['B'].shape)} do not fit a "
                            f"layer of {linear.in_features} -> {linear.out_features} features")
    if problems or not pairs:
        shown = "; ".join(problems[:8]) + (f" ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"the LoRA adapter {path!r} does not fit this model: {shown or 'it holds no adapter'}. "
                         "Check that it was trained on a model of this shape (--hidden_size, --num_hidden_layers, "
                         "--use_moe, the vision tower).")
    with torch.no_grad():
        for name, pair in pairs.items():
            add_lora(model, [name], rank=pair["A"].shape[0], alpha=alpha)
            lora = modules[name].lora
            lora.A.weight.copy_(pair["A"])
            lora.B.weight.copy_(pair["B"])
    return list(pairs)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer (W += scale * B A, computed in float32) and remove it; returns how many
    were merged. The merged model has the base's keys and no hooks."""
    found = adapters(model)
    modules = dict(unwrap(model).named_modules())
    with torch.no_grad():
        for name, lora in found.items():
            linear = modules[name]
            delta = lora.scale * (lora.B.weight.float() @ lora.A.weight.float())
            linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
            lora.handle.remove()
            del linear.lora
    return len(found)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model for the duration of the block (e.g. DPO's reference model with no second copy)."""
    found = list(adapters(model).values())
    for lora in found:
        lora.enabled = False
    try:
        yield
    finally:
        for lora in found:
            lora.enabled = True
