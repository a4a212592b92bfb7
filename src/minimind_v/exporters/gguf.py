"""MiniMind decoder -> a GGUF file for llama.cpp (and an ollama `Modelfile` beside it).

The decoder is written as llama.cpp's `qwen3` architecture (`qwen3moe` for MoE) with the `gguf` package's
writer: the same graph (q/k RMSNorm per head, rotate-half "NEOX" RoPE, SwiGLU, GQA), tensor names from
`gguf.TENSOR_NAMES`, experts stacked into [E, I, H] / [E, H, I] arrays. The tokenizer goes in as llama.cpp's
"gpt2" byte-level BPE with the "gpt-2" pre-tokenizer, whose split regex is that of our `ByteLevel` pre-tokenizer.

Quantisation: f32, f16, bf16 and q8_0 are written directly; the llama.cpp types (q4_0 ... q6_k, q4_k_m) are made
by llama.cpp's own quantiser (`llama_cpp.llama_model_quantize`) from an f32 file. Norms and the MoE router stay
f32, as llama.cpp's converter keeps them. A VLM exports its decoder only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch
from torch import nn

try:
    import gguf
except ImportError as missing:
    raise ImportError("GGUF export needs the gguf package: pip install 'minimind-v[gguf]'") from missing

from ..tokenizer import CHAT_TEMPLATE, IM_END, IM_START
from ..weights import unwrap
from . import DIRECT_QUANTS, LLAMA_CPP_QUANTS, QUANTS
from .qwen3 import check_exportable, decoder_state_dict, rope_parameters

# Our ByteLevel pre-tokenizer splits with the GPT-2 regex, which llama.cpp knows as "gpt-2".
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}

# Per-layer weights: our name after `model.layers.{i}.` -> llama.cpp tensor (MODEL_TENSOR member name).
LAYER_TENSORS = {
    "input_layernorm.weight": "ATTN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "self_attn.q_norm.weight": "ATTN_Q_NORM",
    "self_attn.k_norm.weight": "ATTN_K_NORM",
    "post_attention_layernorm.weight": "FFN_NORM",
    "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
    "mlp.gate.weight": "FFN_GATE_INP",
}
EXPERT_TENSORS = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP", "down_proj": "FFN_DOWN_EXP"}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "TOKEN_EMBD", "model.norm.weight": "OUTPUT_NORM",
                  "lm_head.weight": "OUTPUT"}

# ollama's Go template for our chat format (system / user / assistant turns, thinking off): each assistant turn
# carries an empty think block, and the generation prompt opens the reply after one, as CHAT_TEMPLATE does.
OLLAMA_TEMPLATE = (
    '{{- range $i, $_ := .Messages }}\n'
    '{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
    '{{- if eq .Role "assistant" }}<|im_start|>assistant\n<think>\n\n</think>\n\n{{ .Content }}'
    '{{ if not $last }}<|im_end|>\n{{ end }}\n'
    '{{- else }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\n'
    '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n<think>\n\n</think>\n\n{{ end }}\n'
    '{{- end }}'
)
STOP_TOKENS = (IM_END, IM_START, "<|endoftext|>")


def export_gguf(model: nn.Module, tokenizer, out_dir: str, quant: str = "f16") -> str:
    """Write `{out_dir}/model-{quant}.gguf` and an ollama `Modelfile` next to it (pointing at this file, the last
    one exported to `out_dir`); returns the .gguf path.

    ValueError, before anything is written, for an unknown `quant`, LoRA adapters still attached, or anything
    llama.cpp's qwen3/qwen3moe graph or tokenizer cannot express (see `check_gguf_exportable`).
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if quant in LLAMA_CPP_QUANTS:
        require_llama_cpp(quant)
    model = unwrap(model)
    check_gguf_exportable(model, tokenizer)
    vocab = gguf_vocab(tokenizer, model.config.vocab_size)
    if hasattr(model, "vision_proj"):
        print("note: exporting the language model only; the vision tower and projector are not in this GGUF")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"model-{quant}.gguf")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".gguf-") as staging:
        direct = quant if quant in DIRECT_QUANTS else "f32"
        written = os.path.join(staging, f"model-{direct}.gguf")
        write_gguf(model, vocab, written, direct)
        if quant in LLAMA_CPP_QUANTS:
            quantized = os.path.join(staging, f"model-{quant}.gguf")
            llama_cpp_quantize(written, quantized, getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))
            written = quantized
        os.replace(written, path)
    with open(os.path.join(out_dir, "Modelfile"), "w", encoding="utf-8") as f:
        f.write(modelfile(os.path.basename(path)))
    return path


def check_gguf_exportable(model: nn.Module, tokenizer) -> None:
    """ValueError for what the GGUF cannot hold: LoRA adapters, int8 layers, RoPE settings Qwen3 cannot express (see
    `qwen3.rope_parameters`), an activation other than SiLU (llama.cpp's qwen3 graph hard-codes it), MoE without
    renormalised top-k weights (qwen3moe always renormalises), or a tokenizer larger than the embedding."""
    check_exportable(model)
    config = model.config
    if config.hidden_act != "silu":
        raise ValueError(f"llama.cpp's qwen3 graph uses SiLU; this model's hidden_act is {config.hidden_act!r}")
    if config.use_moe and not config.norm_topk_prob:
        raise ValueError("llama.cpp's qwen3moe graph always renormalises the top-k router weights; this model "
                         "has norm_topk_prob=False")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds {config.vocab_size}")


def require_llama_cpp(quant: str) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        raise ValueError(f"quant {quant!r} is made by llama.cpp's quantiser: pip install llama-cpp-python, or "
                         f"choose one of {', '.join(DIRECT_QUANTS)}") from err


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as GGUF fields: tokens and types (one per embedding row), merges, special ids.

    Special added tokens are CONTROL (rendered only on request, never produced by splitting text), other added
    tokens (<think>, <tool_call>, ...) USER_DEFINED (always whole, as in transformers), embedding rows beyond the
    tokenizer UNUSED. ValueError for a tokenizer llama.cpp would split differently.
    """
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = data.get("pre_tokenizer") or {}
    if data["model"]["type"] != "BPE" or data.get("normalizer") is not None or \
            any(pre.get(key) != value for key, value in GPT2_PRE_TOKENIZER.items()):
        raise ValueError("GGUF export needs a byte-level BPE tokenizer with a ByteLevel(add_prefix_space=False) "
                         f"pre-tokenizer and no normalizer (got pre_tokenizer={pre}, "
                         f"normalizer={data.get('normalizer')})")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id >= len(tokenizer):
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tokenizer.convert_ids_to_tokens(token_id))
        if token_id in added:
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "tokens": tokens, "types": types, "merges": merges, "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "chat_template": tokenizer.chat_template
        or CHAT_TEMPLATE,
    }


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 tensor, our shapes (numpy's row-major order is what GGUF's reversed `ne` wants:
    [out, in] for matrices, [E, out, in] for stacked experts)."""
    config = model.config
    state = {name: tensor.float() for name, tensor in decoder_state_dict(model).items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")  # llama.cpp reuses token_embd when output is absent

    def name_of(member: str, layer: int | None = None) -> str:
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=layer) + ".weight"

    tensors = {name_of(member): state.pop(ours) for ours, member in GLOBAL_TENSORS.items() if ours in state}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for ours, member in LAYER_TENSORS.items():
            if prefix + ours in state:
                tensors[name_of(member, layer)] = state.pop(prefix + ours)
        if config.use_moe:
            for part, member in EXPERT_TENSORS.items():
                tensors[name_of(member, layer)] = torch.stack(
                    [state.pop(f"{prefix}mlp.experts.{e}.{part}.weight") for e in range(config.num_experts)])
    if state:
        raise ValueError(f"weights with no GGUF counterpart: {sorted(state)}")
    return tensors


def tensor_type(name: str, tensor: torch.Tensor, quant: str):
    """The GGML type a tensor is written in: norms (1-D) and the MoE router in f32, the rest in `quant` (f16
    when a row does not fill whole q8_0 blocks)."""
    types = gguf.GGMLQuantizationType
    if tensor.dim() == 1 or name.endswith("ffn_gate_inp.weight") or quant == "f32":
        return types.F32
    if quant == "q8_0" and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return types.F16
    return {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[quant]


def write_gguf(model: nn.Module, vocab: dict, path: str, quant: str) -> None:
    """Write the decoder and tokenizer to `path` with tensors in `quant` (one of DIRECT_QUANTS)."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[
        gguf.MODEL_ARCH.QWEN3MOE if config.use_moe else gguf.MODEL_ARCH.QWEN3])
    writer.add_name("MiniMind")
    writer.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    add_tokenizer(writer, vocab)
    for name, tensor in gguf_tensors(model).items():
        qtype = tensor_type(name, tensor, quant)
        writer.add_tensor(name, gguf.quants.quantize(tensor.numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_hyperparameters(writer, config) -> None:
    """Model shape, RoPE (YaRN included) and MoE routing keys of the qwen3 / qwen3moe architectures."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        # Recorded for converters; llama.cpp itself reads neither beta and uses 32 / 1, which are ours.
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        # llama.cpp's YaRN multiplies cos/sin by 1 + 0.1 ln(factor) and then by rope.scaling.attn_factor, so the
        # latter carries our attention_factor divided by that.
        writer.add_rope_scaling_attn_factors(rope["attention_factor"] / (1 + 0.1 * math.log(rope["factor"])))
    if config.use_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def add_tokenizer(writer, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    if vocab["pad"] is not None:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab["chat_template"])


def llama_cpp_quantize(source: str, target: str, ftype: int) -> None:
    """Quantise a GGUF file with llama.cpp's quantiser (K-quants fall back per tensor where rows are too short)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {source} to ftype {ftype}")


def sampling_defaults() -> dict:
    """Temperature, top_p and top_k of our chat CLI."""
    import argparse

    from ..options import add_sampling_arguments

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args([])
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def modelfile(gguf_name: str) -> str:
    """An ollama Modelfile: the GGUF, our chat format as a Go template, stop tokens, our chat CLI's sampling
    defaults (and no repetition penalty, as ours; ollama's default is 1.1)."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{token}"' for token in STOP_TOKENS]
    lines += [f"PARAMETER {key} {value}" for key, value in sampling_defaults().items()]
    lines.append("PARAMETER repeat_penalty 1.0")
    return "\n".join(lines) + "\n"
