"""MiniMind decoder -> a plain transformers Qwen3 folder (`Qwen3ForCausalLM`, or `Qwen3MoeForCausalLM` for MoE).

Our decoder is a Qwen3: per-head q/k RMSNorm, rotate-half RoPE (optionally YaRN), SwiGLU, GQA, tied embeddings by
default; the MoE layer is a softmax router -> top-k -> optional renormalisation with no shared expert. Every weight
keeps its name except the experts, which transformers stores fused: `experts.gate_up_proj` [E, 2I, H] (gate rows
first) and `experts.down_proj` [E, H, I]. The folder loads with `AutoModelForCausalLM.from_pretrained(dir)`,
without `trust_remote_code`.

A VLM exports its decoder only: the vision tower and projector have no place in a Qwen3 causal LM.
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch
from torch import nn

from ..lora import adapters
from ..quantize import quantized_modules
from ..tokenizer import CHAT_TEMPLATE
from ..weights import replace_folder, unwrap

DECODER_PREFIXES = ("model.", "lm_head.")


def check_exportable(model: nn.Module) -> None:
    """ValueError when the decoder cannot be written as a Qwen3 model: LoRA adapters still attached, int8 layers,
    or a RoPE setting Qwen3 cannot express."""
    if adapters(model):
        raise ValueError("the model carries LoRA adapters: merge them first (lora.merge_lora, or "
                         "`minimind-v lora merge`); Qwen3 folders hold plain weights")
    if quantized_modules(model):
        raise ValueError("the model holds int8-quantized layers: export the full-precision model (load it without "
                         "--quantize)")
    rope_parameters(model.config)


def rope_parameters(config) -> dict:
    """Our RoPE as a transformers `rope_parameters` dict: "default", or "yarn" when `inference_rope_scaling` is on.

    Our YaRN is active only when max_position_embeddings exceeds the original length, and clamps the upper
    correction dimension at hd/2 - 1 where transformers clamps at hd - 1: the two agree when the unclamped bound
    is already below hd/2 - 1 (true of every shipped shape); otherwise ValueError.
    """
    theta, yarn = float(config.rope_theta), config.yarn_scaling
    if yarn is None:
        return {"rope_type": "default", "rope_theta": theta}
    original = yarn["original_max_position_embeddings"]
    if config.max_position_embeddings <= original:
        if yarn["attention_factor"] != 1.0:
            raise ValueError("YaRN with max_position_embeddings <= original length still scales attention "
                             f"by {yarn['attention_factor']}: no Qwen3 RoPE type does that")
        return {"rope_type": "default", "rope_theta": theta}
    head_dim = config.head_dim
    high = math.ceil(head_dim * math.log(original / (yarn["beta_slow"] * 2 * math.pi)) / (2 * math.log(theta)))
    if high > head_dim // 2 - 1:
        raise ValueError(f"YaRN correction range ends at dimension {high}, beyond head_dim/2 - 1 = "
                         f"{head_dim // 2 - 1}: our clamp there differs from transformers' and llama.cpp's")
    return {
        "rope_type": "yarn", "rope_theta": theta, "factor": float(yarn["factor"]),
        "original_max_position_embeddings": original, "beta_fast": float(yarn["beta_fast"]),
        "beta_slow": float(yarn["beta_slow"]), "attention_factor": float(yarn["attention_factor"]), "truncate": True,
    }


def decoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's weights under our names (vision tower and projector left out), detached, on the CPU."""
    return {name: tensor.detach().cpu() for name, tensor in unwrap(model).state_dict().items()
            if name.startswith(DECODER_PREFIXES)}


def qwen3_config(config, pad_token_id: int | None = None):
    """Our `MiniMindConfig` -> `Qwen3Config`, or `Qwen3MoeConfig` when `use_moe`."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=rope_parameters(config),
        attention_bias=False, use_sliding_window=False, initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=pad_token_id,
    )
    if not config.use_moe:
        return Qwen3Config(**common)
    return Qwen3MoeConfig(
        **common, num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=config.router_aux_loss_coef,
    )


def fuse_experts(state: dict[str, torch.Tensor], num_layers: int, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` -> transformers' fused tensors per layer:
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `mlp.experts.down_proj` [E, H, I]."""
    state = dict(state)
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        part = {name: [state.pop(f"{prefix}.{e}.{name}.weight") for e in range(num_experts)]
                for name in ("gate_proj", "up_proj", "down_proj")}
        state[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u], dim=0) for g, u in zip(part["gate_proj"], part["up_proj"])])
        state[f"{prefix}.down_proj"] = torch.stack(part["down_proj"])
    return state


def to_qwen3(model: nn.Module, dtype: torch.dtype = torch.float32, pad_token_id: int | None = None) -> nn.Module:
    """Our decoder as a transformers Qwen3 model (eval mode, `dtype`), loaded strictly: a missing, extra or
    misshapen weight raises."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    model = unwrap(model)
    check_exportable(model)
    config = model.config
    state = decoder_state_dict(model)
    if config.use_moe:
        state = fuse_experts(state, config.num_hidden_layers, config.num_experts)
    hf_config = qwen3_config(config, pad_token_id)
    hf_model = (Qwen3MoeForCausalLM if config.use_moe else Qwen3ForCausalLM)(hf_config)
    hf_model.load_state_dict(state, strict=True)
    return hf_model.to(dtype).eval()


def export_qwen3(model: nn.Module, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32) -> None:
    """Write `out_dir` as a Qwen3 transformers folder: config.json (no auto_map), safetensors weights in `dtype`,
    generation_config.json and the tokenizer with its chat template.

    A VLM exports its decoder only (a note is printed). ValueError, before anything is written, for LoRA adapters
    still attached or a RoPE setting Qwen3 cannot express. The folder is filled under a temporary name and renamed.
    """
    from transformers import GenerationConfig

    hf_model = to_qwen3(model, dtype, tokenizer.pad_token_id)
    if hasattr(unwrap(model), "vision_proj"):
        print("note: exporting the language model only; the vision tower and projector are not part of a Qwen3 "
              "causal LM")
    hf_model.generation_config = GenerationConfig(
        bos_token_id=hf_model.config.bos_token_id, eos_token_id=hf_model.config.eos_token_id,
        pad_token_id=hf_model.config.pad_token_id,
    )
    tokenizer = with_chat_template(tokenizer)

    def write(folder: str) -> None:
        hf_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        drop_auto_map(os.path.join(folder, "tokenizer_config.json"))

    replace_folder(out_dir, write)


def with_chat_template(tokenizer):
    """The tokenizer itself when it has a chat template, else a copy carrying ours."""
    if tokenizer.chat_template:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def drop_auto_map(path: str) -> None:
    """A tokenizer loaded from one of our remote-code folders may carry an `auto_map` and our `processor_class`;
    the export has no code."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    dropped = [data.pop(key, None) for key in ("auto_map", "processor_class")]
    if any(value is not None for value in dropped):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
