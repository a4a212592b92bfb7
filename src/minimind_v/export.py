"""`minimind-v export`: native `.pth` weights (+ tower + tokenizer) -> a self-contained transformers folder."""

from __future__ import annotations

from .weights import add_model_arguments, export_pretrained, load_model_from_args


def add_arguments(parser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    parser.add_argument("--out", required=True, help="folder to write (config, safetensors, code, tokenizer)")


def main(args) -> None:
    args.device = "cpu"
    model, tokenizer = load_model_from_args(args)
    export_pretrained(model, args.out, tokenizer)
    print(f"exported to {args.out}; load it with AutoModelForCausalLM.from_pretrained({args.out!r}, "
          "trust_remote_code=True) or `minimind-v chat --load_from` it")
