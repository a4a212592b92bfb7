"""`minimind-v export`: native `.pth` weights or a folder -> a model folder another tool loads.

Formats: `remote-code` (our classes through `trust_remote_code`, the default), `qwen3` (the decoder as a plain
transformers Qwen3 / Qwen3-MoE folder), `gguf` (the decoder for llama.cpp and ollama, with a Modelfile) and
`lfm2-vl` (the whole VLM as a transformers-native `Lfm2VlForConditionalGeneration`). Every folder gets a model
card (README.md) and can be uploaded with `--push_to_hub`.
"""

from __future__ import annotations

import os

from .exporters import QUANTS
from .loading import export_pretrained, load_model
from .lora import merge_lora
from .options import add_model_arguments, model_options

FORMATS = ("remote-code", "qwen3", "gguf", "lfm2-vl")


def add_arguments(parser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--format", default="remote-code", choices=FORMATS,
                        help="remote-code: our classes (trust_remote_code); qwen3: the decoder as a plain transformers "
                             "Qwen3 folder; gguf: the decoder for llama.cpp/ollama; lfm2-vl: the VLM as a "
                             "transformers-native image-text model")
    parser.add_argument("--quant", default="f16", choices=QUANTS,
                        help="GGUF weight type (--format gguf); the k-quants and q4/q5 types need llama-cpp-python")
    card = parser.add_argument_group("model card and upload")
    card.add_argument("--eval_json", default=None,
                      help="scores to put in the model card (default: eval.json in --load_from, its parent or "
                           "--save_dir, when there is one)")
    card.add_argument("--license", default="apache-2.0")
    card.add_argument("--datasets", nargs="*", default=[], help="training datasets named in the card's metadata")
    card.add_argument("--push_to_hub", default=None, metavar="REPO",
                      help="upload the folder to this Hugging Face repo (needs a token: `hf auth login`)")
    card.add_argument("--private", type=int, default=0, choices=[0, 1], help="create the hub repo as private")


def export(model, tokenizer, out: str, fmt: str = "remote-code", quant: str = "f16") -> None:
    """Write `model` (adapters merged) and `tokenizer` to `out` in format `fmt`."""
    if fmt == "remote-code":
        export_pretrained(model, out, tokenizer)
    elif fmt == "qwen3":
        from .exporters.qwen3 import export_qwen3

        export_qwen3(model, tokenizer, out)
    elif fmt == "gguf":
        from .exporters.gguf import export_gguf

        export_gguf(model, tokenizer, out, quant=quant)
    elif fmt == "lfm2-vl":
        from .exporters.lfm2_vl import export_lfm2_vl

        export_lfm2_vl(model, tokenizer, out)
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def find_eval_json(load_from: str | None, save_dir: str) -> str | None:
    """The first eval.json in the --load_from folder, its parent, or --save_dir."""
    folders = [load_from, os.path.dirname(os.path.abspath(load_from))] if load_from else []
    for folder in [*folders, save_dir]:
        path = os.path.join(folder, "eval.json")
        if os.path.isfile(path):
            return path
    return None


def main(args) -> None:
    from .exporters.card import push_to_hub, write_model_card

    if args.format != "gguf" and args.quant != "f16":
        raise SystemExit(f"--quant applies to --format gguf only (got --format {args.format})")
    if args.quantize != "none":
        raise SystemExit("export: --quantize is for inference (chat, describe, serve, webui, eval); exports hold "
                         "full-precision weights: load them with a QuantoConfig (docs/quantization.md), or use "
                         "--format gguf --quant q8_0")
    try:
        model, tokenizer = load_model(**{**model_options(args), "device": "cpu"})
        merge_lora(model)  # a --lora adapter is folded into the exported weights
        export(model, tokenizer, args.out, fmt=args.format, quant=args.quant)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"export failed: {err}") from err
    eval_json = args.eval_json or find_eval_json(args.load_from, args.save_dir)
    write_model_card(args.out, model.config, fmt=args.format, quant=args.quant, eval_json=eval_json,
                     license=args.license, datasets=args.datasets, repo=args.push_to_hub)
    print(f"exported ({args.format}) to {args.out}; see {os.path.join(args.out, 'README.md')} for how to load it")
    if args.push_to_hub:
        url = push_to_hub(args.out, args.push_to_hub, private=bool(args.private))
        print(f"uploaded to {url}")
