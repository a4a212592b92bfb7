"""`minimind-v export`: native `.pth` weights (+ tower + tokenizer) -> a self-contained transformers folder."""

from __future__ import annotations

from .loading import export_pretrained, load_model
from .lora import merge_lora
from .options import add_model_arguments, model_options


def add_arguments(parser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    parser.add_argument("--out", required=True, help="folder to write (config, safetensors, code, tokenizer)")


def main(args) -> None:
    model, tokenizer = load_model(**{**model_options(args), "device": "cpu"})
    merge_lora(model)  # a --lora adapter is folded into the exported weights
    export_pretrained(model, args.out, tokenizer)
    print(f"exported to {args.out}; load it with AutoModelForCausalLM.from_pretrained({args.out!r}, "
          "trust_remote_code=True) or `minimind-v chat --load_from` it")
