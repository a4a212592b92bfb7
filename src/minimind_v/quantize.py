"""Weight-only int8 inference with optimum-quanto: every Linear layer of the decoder blocks (attention, MLP,
experts) keeps int8 weights with one scale per output channel and computes in the model's dtype. The vision
tower, the projector, the embeddings, lm_head and the MoE router stay in full precision (the router because a
small error there flips which experts a token goes to).

Quantized layers are frozen: quantize after choosing the device and dtype, and merge LoRA adapters first.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from .lora import adapters

METHODS = ("none", "int8")
# transformers `modules_to_not_convert` for a QuantoConfig on an exported folder: the same layers stay in
# full precision as with `--quantize int8` (patterns match a module name's start or end).
KEEP_FULL_PRECISION = ["vision_encoder", "vision_proj", "model.embed_tokens", "lm_head", "mlp.gate"]
INSTALL_HINT = "int8 quantization needs optimum-quanto: pip install 'minimind-v[quantize]'"


def backend_available() -> bool:
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def quantize_decoder(model: nn.Module, method: str = "int8") -> nn.Module:
    """Quantize the decoder blocks of a MiniMind(-V) model in place (`method` none: unchanged); returns it."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return model
    if adapters(model):
        raise ValueError("the model carries LoRA adapters: merge them before quantizing (lora.merge_lora)")
    try:
        from optimum.quanto import freeze, qint8, quantize
    except ImportError as missing:
        raise ImportError(f"{INSTALL_HINT} ({missing})") from missing
    layers = model.model.layers
    quantize(layers, weights=qint8, exclude="*.mlp.gate")
    freeze(layers)
    return model


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the layers that hold int8 weights."""
    return [name for name, module in model.named_modules() if getattr(module, "weight_qtype", None) is not None]
