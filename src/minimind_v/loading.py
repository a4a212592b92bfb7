"""Building and loading models: from a config, native reference weights (`{save_dir}/{weight}_{hidden}[_moe].pth`)
or a transformers folder; vision towers (a folder, a hub id, or `random:<shape>`); LoRA adapters applied on top;
and self-contained transformers exports."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .config import VISION_PRESETS, MiniMindConfig, VLMConfig, vision_dims
from .llm import MiniMindForCausalLM
from .lora import adapters, load_adapter
from .vision import ImagePreprocessor
from .vlm import MiniMindVLM
from .weights import DEFAULT_TOWER, load_native, tower_for_weights, unwrap, weight_path


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
    tower stored in the folder (or supplies one when the folder has none, as in reference exports); `none`
    drops it."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{folder!r} is not a transformers model folder (no config.json)")
    with open(config_file, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    cls = MiniMindVLM if model_type == VLMConfig.model_type else MiniMindForCausalLM
    model = cls.from_pretrained(folder, dtype=dtype)
    if vision_model == "none" and isinstance(model, MiniMindVLM):
        model.vision_encoder = None  # text only, as with native weights
    elif vision_model and isinstance(model, MiniMindVLM):
        tower_model = MiniMindVLM(model.config, vision_model_path=vision_model)
        model.vision_encoder = tower_model.vision_encoder
        model.image_processor = tower_model.image_processor
    return model


def export_pretrained(model: nn.Module, out_dir: str, tokenizer=None) -> None:
    """Write a self-contained transformers folder: config, safetensors weights (with the vision tower),
    the model code for `trust_remote_code`, the image preprocessor config and the tokenizer; for a VLM with a
    tokenizer also the `AutoProcessor` (processor.py, processor_config.json, a chat template that renders image
    parts). LoRA adapters must be merged first (`lora.merge_lora`): the folder holds plain weights."""
    from .processor import MiniMindVProcessor

    model = unwrap(model)
    if adapters(model):
        raise ValueError("the model carries LoRA adapters: merge them first (minimind-v lora merge)")
    model.save_pretrained(out_dir)
    if isinstance(model, MiniMindVLM) and model.vision_encoder is not None:
        model.image_processor.save_pretrained(out_dir)
    if isinstance(model, MiniMindVLM) and tokenizer is not None:
        MiniMindVProcessor.from_config(model.config, tokenizer).save_pretrained(out_dir)  # writes the tokenizer too
    elif tokenizer is not None:
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


def vlm_config(vision_model: str | None, hidden_size: int, num_hidden_layers: int, use_moe: bool, vocab_size: int,
               **overrides) -> VLMConfig:
    """The VLMConfig that native weights need: decoder shape from the reference flags, vocabulary from the
    tokenizer, image dims from the tower."""
    tower_path, tower_config = resolve_vision(vision_model)
    dims = vision_dims(tower_config) if tower_config else {}
    return VLMConfig(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=bool(use_moe), vocab_size=vocab_size,
        vision_config=None if tower_path else tower_config, **dims, **overrides,
    )


def load_model(load_from: str | None = None, save_dir: str = "out", weight: str = "sft_vlm", hidden_size: int = 768,
               num_hidden_layers: int = 8, use_moe: bool = False, vision_model: str | None = None,
               tokenizer: str = "model", lora: str | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32, quantize: str = "none", max_tiles: int | None = None):
    """(model in eval mode on `device`, tokenizer): a transformers folder (`load_from`, with its own tokenizer
    when it has one) or native weights `{save_dir}/{weight}_{hidden}[_moe].pth` with a tower (`vision_model`,
    default: the tower trained with the weights, else DEFAULT_TOWER; `none`: text only, which also takes
    LLM-only weights). `lora` applies an adapter (PEFT folder or reference .pth) without merging it, unless
    `quantize` (`quantize.METHODS`) makes the decoder layers int8: then the adapter is merged first. `max_tiles`
    replaces the folder's setting (native weights: default 1)."""
    from .lora import merge_lora
    from .quantize import quantize_decoder
    from .tokenizer import load_tokenizer

    if load_from:
        own_tokenizer = os.path.isfile(os.path.join(load_from, "tokenizer.json"))
        loaded_tokenizer = load_tokenizer(load_from if own_tokenizer else tokenizer)
        vision = vision_model
        if vision is None and not _has_tower(load_from) and os.path.isdir(DEFAULT_TOWER):
            vision = DEFAULT_TOWER
        model = load_pretrained_folder(load_from, vision_model=vision)
        if max_tiles is not None and isinstance(model, MiniMindVLM):
            model.config.max_tiles = max_tiles
            model.image_processor = ImagePreprocessor.from_config(model.config)
    else:
        loaded_tokenizer = load_tokenizer(tokenizer)
        names = (save_dir, weight, hidden_size, bool(use_moe))
        vision = vision_model or tower_for_weights(*names)
        config = vlm_config(vision, hidden_size, num_hidden_layers, use_moe, len(loaded_tokenizer),
                            max_tiles=max_tiles or 1)
        tower_path, _ = resolve_vision(vision)
        model = build_model(config, weight_path(*names), vision_model=tower_path,
                            optional_prefixes=("vision_proj.",) if vision == "none" else ())
    if lora:
        load_adapter(model, lora)
        if quantize != "none":
            merge_lora(model)
    model = model.to(device=device, dtype=dtype).eval()
    return quantize_decoder(model, quantize), loaded_tokenizer


def _has_tower(folder: str) -> bool:
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as f:
        return bool(json.load(f).get("vision_config"))
