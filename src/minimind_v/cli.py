"""`minimind-v` command line: one subcommand per job. Each command lives in its own module, imported only
when it runs, and provides `add_arguments(parser)` and `main(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). "data" and "lora" hold nested commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("minimind_v.demo", "train a VLM from zero on synthetic data, offline, and show that it sees"),
    "train": ("minimind_v.train", "train a stage: llm-pretrain, llm-sft, llm-dpo, vlm-pretrain, vlm-sft or vlm-dpo "
                                  "(any of them with LoRA adapters)"),
    "train-tokenizer": ("minimind_v.tokenizer", "train a byte-level BPE tokenizer with the MiniMind tokens"),
    "eval": ("minimind_v.evaluate", "held-out exact-match evaluation (synthetic or generic VQA parquet)"),
    "chat": ("minimind_v.chat", "interactive multi-turn chat with images"),
    "describe": ("minimind_v.describe", "describe every image in a folder (streamed, with tokens/s)"),
    "serve": ("minimind_v.serve", "OpenAI-compatible chat completions API with images"),
    "webui": ("minimind_v.webui", "Gradio chat web UI"),
    "export": ("minimind_v.export", "export a model for transformers (remote code, Qwen3, LFM2-VL), llama.cpp "
                                    "or ollama (GGUF), with a model card"),
    "plot": ("minimind_v.plot", "loss curves of a training run as a PNG"),
}
GROUPS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "data": ("dataset tools: synth, convert, preview", {
        "synth": ("minimind_v.synth", "generate a synthetic image question-answer parquet"),
        "convert": ("minimind_v.convert", "convert LLaVA JSON, ShareGPT jsonl or a saved datasets dataset to our "
                                          "parquet"),
        "preview": ("minimind_v.preview", "PNG grid of the first image/text pairs of a parquet"),
    }),
    "lora": ("LoRA adapters: merge", {
        "merge": ("minimind_v.lora_merge", "fold a LoRA adapter into its base: reference .pth and/or transformers "
                                           "folder"),
    }),
}


def _add(subparsers, name: str, module: str, help_text: str, argv: list[str]) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(_module=module)
    if name in argv:  # only the chosen command's module is imported
        importlib.import_module(module).add_arguments(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minimind-v", description="Train, run and serve a tiny vision-language model."
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        _add(commands, name, module, help_text, argv)
    for group, (group_help, members) in GROUPS.items():
        nested = commands.add_parser(group, help=group_help).add_subparsers(
            title=f"{group} commands", metavar=f"{group.upper()}_COMMAND")
        for name, (module, help_text) in members.items():
            _add(nested, name, module, help_text, argv)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_module"):
        parser.print_help()
        raise SystemExit(2)
    importlib.import_module(args._module).main(args)
