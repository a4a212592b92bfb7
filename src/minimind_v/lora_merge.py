"""`minimind-v lora merge`: fold a LoRA adapter into its base model and write the result as reference `.pth`
weights (`--out_weight`), as a transformers folder (`--out`), or both.

The base is picked by the usual model flags (native weights or `--load_from` folder); the merge is computed in
float32 (W + alpha / r * B A). A tower the weights need (one trained with them, or one an adapter changed) is
written next to the merged `.pth` as `{out_weight}_{hidden}[_moe]_vision/`, where every command looks for it.
"""

from __future__ import annotations

import argparse

from .checkpoint import save_vision_tower
from .loading import export_pretrained, load_model
from .lora import adapters, merge_lora
from .options import add_model_arguments, model_options
from .weights import needs_tower_folder, save_native, tower_for_weights, vision_folder, weight_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    parser.add_argument("--out_weight", default=None,
                        help="write reference weights {save_dir}/{out_weight}_{hidden}[_moe].pth")
    parser.add_argument("--out", default=None, help="write a self-contained transformers folder here")


def main(args: argparse.Namespace) -> None:
    if not args.lora:
        raise SystemExit("lora merge: pass --lora with the adapter to merge (a PEFT folder or a reference .pth)")
    if not (args.out_weight or args.out):
        raise SystemExit("lora merge: pass --out_weight NAME (reference .pth), --out FOLDER (transformers), or both")
    if args.quantize != "none":
        raise SystemExit("lora merge: --quantize is for inference; merged weights are written in full precision")
    try:
        model, tokenizer = load_model(**{**model_options(args), "device": "cpu"})
    except (OSError, ValueError) as err:
        raise SystemExit(f"lora merge: {err}") from err
    tower_adapted = any(name.startswith("vision_encoder.") for name in adapters(model))
    count = merge_lora(model)
    print(f"merged {count} adapted layers of {args.lora}")
    if args.out_weight:
        shape = (model.config.hidden_size, bool(model.config.use_moe))
        path = weight_path(args.save_dir, args.out_weight, *shape)
        save_native(model, path)
        print(f"wrote {path}")
        source_tower = args.vision_model or args.load_from or tower_for_weights(args.save_dir, args.weight, *shape)
        if getattr(model, "vision_encoder", None) is not None and needs_tower_folder(source_tower, tower_adapted):
            folder = vision_folder(args.save_dir, args.out_weight, *shape)
            save_vision_tower(model, folder)
            print(f"wrote its vision tower to {folder}")
    if args.out:
        export_pretrained(model, args.out, tokenizer)
        print(f"wrote {args.out}")
