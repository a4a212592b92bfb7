"""MiniMind-V: train, run and serve a tiny vision-language model from scratch."""

import os

# Idle OpenMP threads sleep instead of spinning (read when torch starts its thread pool, so before importing it):
# spinning threads that share cores with other busy processes made CPU training up to 27x slower, sleeping
# costs ~4% on an idle machine. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import PRESETS, MiniMindConfig, VLMConfig, preset_config
from .llm import KVCache, MiniMindForCausalLM
from .loading import export_pretrained, load_model, load_pretrained_folder
from .tokenizer import expand_image_markers, load_tokenizer, render_chat
from .vision import ImagePreprocessor
from .vlm import MiniMindVLM
from .weights import load_native, save_native

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ImagePreprocessor", "KVCache", "MiniMindConfig", "MiniMindForCausalLM", "MiniMindVLM", "VLMConfig",
    "expand_image_markers", "export_pretrained", "load_model", "load_native", "load_pretrained_folder",
    "load_tokenizer",
    "preset_config", "render_chat", "save_native",
]
