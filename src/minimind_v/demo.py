"""`minimind-v demo`: train a vision-language model from zero on synthetic shapes, offline, and show that it sees.

The demo is a list of ordinary `minimind-v` commands (synth data, tokenizer, LLM pretrain, VLM pretrain, VLM SFT,
export, eval, plot), printed before each runs, so any step can be rerun or changed by hand. Then it chats
about a few held-out images with the exported transformers folder and writes a markdown report.

Outputs under --out_dir: data/ (synthetic files), tokenizer/, model/ (native .pth weights and the trained tower),
hf/ (self-contained transformers folder), runs/ (metrics), loss_*.png, eval.json, predictions.jsonl,
samples/*.png and report.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

AFTER_TRAINING_SECONDS = 30  # kept from the time budget for export, evaluation, plots and chats (5 s measured)


@dataclass
class Step:
    """One demo step: a `minimind-v` command line and what it is for."""

    title: str
    argv: list[str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out_dir", default="demo_out", help="folder for everything the demo writes")
    data = parser.add_argument_group("data")
    data.add_argument("--train_rows", type=int, default=20000,
                      help="rows of each training file (questions, captions, LLM text)")
    data.add_argument("--test_rows", type=int, default=600, help="held-out questions to evaluate")
    data.add_argument("--lang", choices=["en", "zh", "both"], default="en", help="language of the synthetic data")
    data.add_argument("--seed", type=int, default=0)
    model = parser.add_argument_group("model")
    model.add_argument("--hidden_size", type=int, default=128)
    model.add_argument("--num_hidden_layers", type=int, default=4)
    model.add_argument("--vision_model", default="random:small",
                       help="tower to train from zero (random:tiny, random:small, random:siglip2-base-p32-256)")
    model.add_argument("--vocab_size", type=int, default=1000,
                       help="tokenizer vocabulary (the synthetic text needs only a few hundred tokens)")
    optim = parser.add_argument_group("training")
    optim.add_argument("--llm_steps", type=int, default=150, help="optimizer steps of LLM pretraining on text")
    optim.add_argument("--pretrain_steps", type=int, default=500, help="steps of VLM pretraining on captions")
    optim.add_argument("--sft_steps", type=int, default=None,
                       help="steps of VLM SFT on questions and captions (default: 1500, or 900 when training on a "
                            "CPU in float32, which is ~1.4x slower than bf16)")
    optim.add_argument("--focus", nargs="*", default=None, metavar="TYPE:STEPS",
                       help="then phases of SFT on one question type alone, in order (default: position:600 "
                            "relation:300 shape:200 presence:200, or the first two when training on a CPU in "
                            "float32; none: `--focus` with no value); mixed training alone learns neither where a "
                            "shape is, nor relations, nor whether a kind is there")
    optim.add_argument("--focus_stop_loss", type=float, default=0.01,
                       help="a focus phase ends before its STEPS once its mean loss over 25 steps is below this "
                            "(its questions are answered); 0: always run the STEPS")
    optim.add_argument("--remix_steps", type=int, default=300,
                       help="after the focus phases, steps on the usual mix plus their questions, so the other "
                            "types come back")
    optim.add_argument("--batch_size", type=int, default=32)
    optim.add_argument("--learning_rate", type=float, default=2e-3)
    optim.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    optim.add_argument("--num_threads", type=int, default=0, help="CPU threads for training (0: every core)")
    optim.add_argument("--cpu_dtype", choices=["float32", "bfloat16"], default=None,
                       help="CPU training precision (default: bfloat16 where the CPU has native bf16, else float32)")
    parser.add_argument("--chats", type=int, default=3, help="held-out images to chat about at the end")
    parser.add_argument("--time_budget", type=float, default=30,
                        help="minutes for the whole demo: each training phase gets --max_minutes, its share (by "
                             f"steps) of what is left after {AFTER_TRAINING_SECONDS} s kept for evaluation and chats, "
                             "so a slow machine ends training early and still reports; 0: no limit")


def _check(args) -> None:
    for name in ("train_rows", "test_rows", "llm_steps", "pretrain_steps", "sft_steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"demo: --{name} must be at least 1 (got {getattr(args, name)})")
    if args.remix_steps < 1:
        raise SystemExit(f"demo: --remix_steps must be at least 1 (got {args.remix_steps})")
    if args.focus_stop_loss < 0:
        raise SystemExit(f"demo: --focus_stop_loss must not be negative (got {args.focus_stop_loss})")
    focus_phases(args)
    if args.chats < 0:
        raise SystemExit("demo: --chats must not be negative")
    if args.time_budget < 0:
        raise SystemExit("demo: --time_budget must not be negative (0: no limit)")


def init_std(hidden_size: int) -> float:
    """The reference initialises with std 0.02, tuned for hidden 768; narrow models learn much faster when the
    std grows as 1/sqrt(hidden), like the default of nn.Linear."""
    return round(0.02 * (768 / hidden_size) ** 0.5, 4)


def default_cpu_dtype() -> str:
    from .distributed import resolve_cpu_dtype

    return resolve_cpu_dtype("auto")


def fill_defaults(args) -> None:
    """Fill, once, the defaults that depend on the hardware: the CPU precision, then the mixed SFT steps and the
    focus phases that fit 15 minutes with set-up on a 2-core CPU. Float32 on a CPU is ~1.4x slower than bf16:
    it gets 900 mixed steps and the position and relation phases only (500 mixed steps and all four phases
    scored 71.7%: kinds were not learned)."""
    if args.cpu_dtype is None:
        args.cpu_dtype = default_cpu_dtype()
    slow = not str(args.device).startswith("cuda") and args.cpu_dtype == "float32"
    if args.sft_steps is None:
        args.sft_steps = 900 if slow else 1500
    if args.focus is None:
        args.focus = ["position:600", "relation:300"] + ([] if slow else ["shape:200", "presence:200"])


def focus_phases(args) -> list[tuple[str, int]]:
    """--focus as [(question type, steps)]; a clear error for anything else."""
    from .synth import QUESTION_TYPES

    phases = []
    for phase in args.focus:
        kind, _, steps = phase.partition(":")
        if kind not in QUESTION_TYPES or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"demo: --focus takes TYPE:STEPS with TYPE one of {', '.join(QUESTION_TYPES)} and "
                             f"STEPS at least 1, e.g. position:600 (got {phase!r})")
        phases.append((kind, int(steps)))
    return phases


def paths(out_dir: str) -> dict[str, str]:
    names = ("data", "focus_data", "tokenizer", "model", "hf", "runs", "checkpoints", "samples")
    return {name: os.path.join(out_dir, name) for name in names}


def plan(args) -> list[Step]:
    """The command lines of the demo, in order, after filling the hardware defaults and refusing bad values."""
    fill_defaults(args)
    _check(args)
    p = paths(args.out_dir)
    data = lambda name: os.path.join(p["data"], name)
    out = lambda name: os.path.join(args.out_dir, name)
    model = ["--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.num_hidden_layers),
             "--tokenizer", p["tokenizer"]]
    common = model + [
        "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--device", args.device,
        "--num_threads", str(args.num_threads), "--cpu_dtype", args.cpu_dtype,
        "--packing", "0",  # one sample per row: plain causal attention, 1.07-1.14x the tokens/s of packed rows here
        "--out_dir", p["model"], "--checkpoint_dir", p["checkpoints"], "--log_dir", p["runs"],
        "--initializer_range", str(init_std(args.hidden_size)), "--seed", str(args.seed), "--epochs", "100",
        "--log_interval", "25", "--save_interval", "200", "--add_system_ratio", "0", "--empty_think_ratio", "1",
    ]
    vision = ["--train_vision", "1", "--freeze_llm", "0", "--max_seq_len", "256", "--num_workers", "1"]
    lr = str(args.learning_rate)
    trained = ["--save_dir", p["model"], "--weight", "sft_vlm"] + model + ["--device", args.device]
    return [
        Step("synthetic data", ["data", "synth", "--out_dir", p["data"], "--train_rows", str(args.train_rows),
                                "--test_rows", str(args.test_rows), "--lang", args.lang, "--seed", str(args.seed),
                                "--files", "llm_pretrain", "vlm_pretrain", "vlm_sft", "vlm_test"]),
        Step("tokenizer", ["train-tokenizer", "--data_path", data("llm_pretrain.jsonl"), "--out_dir", p["tokenizer"],
                           "--vocab_size", str(args.vocab_size)]),
        Step("LLM pretraining on text", ["train", "llm-pretrain", "--data_path", data("llm_pretrain.jsonl"),
                                         "--from_weight", "none", "--max_seq_len", "128", "--num_workers", "1",
                                         "--learning_rate", lr, "--warmup_steps", "20",
                                         "--max_steps", str(args.llm_steps)] + common),
        Step("VLM pretraining on captions", ["train", "vlm-pretrain", "--data_path", data("vlm_pretrain.parquet"),
                                             "--from_weight", "pretrain", "--vision_model", args.vision_model,
                                             "--learning_rate", lr, "--warmup_steps", "50",
                                             "--max_steps", str(args.pretrain_steps)] + vision + common),
        Step("VLM SFT on questions", ["train", "vlm-sft", "--data_path", data("vlm_sft.parquet"),
                                      data("vlm_pretrain.parquet"), "--from_weight", "pretrain_vlm",
                                      "--save_weight", "sft_mixed" if args.focus else "sft_vlm",
                                      "--learning_rate", lr, "--warmup_steps", "50",
                                      "--max_steps", str(args.sft_steps)] + vision + common),
    ] + focus_commands(args, p, vision + common) + [
        Step("export a transformers folder", ["export", "--out", p["hf"]] + trained),
        Step("held-out evaluation", ["eval", "--data_path", data("vlm_test.parquet"), "--train_path",
                                     data("vlm_sft.parquet"), "--blind", "--out", out("eval.json"),
                                     "--predictions", out("predictions.jsonl")] + trained),
    ] + [
        Step(f"loss curve of {run}", ["plot", os.path.join(p["runs"], f"{run}_{args.hidden_size}"),
                                      "--out", os.path.join(args.out_dir, f"loss_{run}.png")])
        for run in training_runs(args)
    ]


def training_runs(args) -> list[str]:
    """The --save_weight of each training run, in order; the last one is the demo's model."""
    focus = [f"sft_focus_{kind}" for kind, _ in focus_phases(args)]
    return ["pretrain", "pretrain_vlm"] + (["sft_mixed", *focus, "sft_vlm"] if focus else ["sft_vlm"])


def focus_commands(args, p: dict[str, str], common: list[str]) -> list[Step]:
    """Each --focus phase trains on its question type alone, from the previous phase's weights; then the usual mix
    plus all those questions; all at half the learning rate. In mixed training the decoder learns neither to say
    where a shape is, nor relations, nor whether a kind of shape is there (all near chance, even with 4x their
    share). Alone, each is learned suddenly, and the order matters (docs/synthetic_data.md): position questions
    after 150-350 steps (300 were sometimes too few), relations within 300 steps once positions are known (not
    after a shape phase), "Is there a circle?" within 200 steps once "What shape is at ...?" is (not without).
    Keeping their questions in the final mix brings the other types back and keeps most of each skill."""
    phases = focus_phases(args)
    if not phases:
        return []
    phase = ["--learning_rate", str(args.learning_rate / 2), "--warmup_steps", "20"]
    criterion = ["--stop_loss", str(args.focus_stop_loss)] if args.focus_stop_loss else []
    steps, focus_files, previous = [], [], "sft_mixed"
    for kind, count in phases:
        folder = os.path.join(p["focus_data"], kind)
        focus_files.append(os.path.join(folder, "vlm_sft.parquet"))
        steps += [
            Step(f"synthetic {kind} questions", ["data", "synth", "--out_dir", folder, "--files", "vlm_sft",
                                                 "--question_types", kind, "--train_rows", str(count * args.batch_size),
                                                 "--lang", args.lang, "--seed", str(args.seed)]),
            Step(f"VLM SFT on {kind} questions only", ["train", "vlm-sft", "--data_path", focus_files[-1],
                                                       "--from_weight", previous, "--save_weight", f"sft_focus_{kind}",
                                                       "--max_steps", str(count)] + phase + common + criterion),
        ]
        previous = f"sft_focus_{kind}"
    mix = [os.path.join(p["data"], "vlm_sft.parquet"), os.path.join(p["data"], "vlm_pretrain.parquet")]
    return steps + [
        Step("VLM SFT on the mix plus the focus questions", ["train", "vlm-sft", "--data_path", *mix, *focus_files,
                                                             "--from_weight", previous, "--save_weight", "sft_vlm",
                                                             "--max_steps", str(args.remix_steps)] + phase + common),
    ]


def run_steps(steps: list[Step], budget_minutes: float = 0) -> list[tuple[Step, float]]:
    """Run each command in this process; returns (step, seconds). With a budget, each training command gets
    `--max_minutes`: its share, by planned steps, of the time left for the training still to come."""
    from .cli import main as cli_main

    timings, start = [], time.perf_counter()
    for number, step in enumerate(steps, 1):
        if budget_minutes and step.argv[0] == "train":
            left = budget_minutes * 60 - (time.perf_counter() - start) - AFTER_TRAINING_SECONDS
            share = planned_steps(step) / sum(planned_steps(s) for s in steps[number - 1:])
            step = Step(step.title, step.argv + ["--max_minutes", f"{max(left * share / 60, 0.01):.2f}"])
        print(f"\n[{number}/{len(steps)}] {step.title}\n$ minimind-v {' '.join(step.argv)}", flush=True)
        started = time.perf_counter()
        cli_main(step.argv)
        timings.append((step, time.perf_counter() - started))
    return timings


def planned_steps(step: Step) -> int:
    """The --max_steps of a training command (0 for any other command)."""
    return int(step.argv[step.argv.index("--max_steps") + 1]) if step.argv[0] == "train" else 0


@dataclass
class Turn:
    question: str
    answer: str
    truth: str

    @property
    def correct(self) -> bool:
        """Scored as `minimind-v eval` scores: the first line of the answer, normalised."""
        from .evaluate import first_line, normalize_answer

        return normalize_answer(first_line(self.answer)) == normalize_answer(self.truth)


@dataclass
class Chat:
    image_file: str  # relative to --out_dir
    scene: str  # the true caption
    turns: list[Turn]


def sample_chats(args) -> list[Chat]:
    """Chats about the first held-out images, with the exported folder. Per image, one conversation asks for a
    caption and another asks as many questions as a training conversation."""
    import pyarrow.parquet as pq

    from . import synth
    from .generate import Engine, GenerationConfig
    from .loading import load_pretrained_folder
    from .tokenizer import load_tokenizer
    from .vision import load_image

    p = paths(args.out_dir)
    engine = Engine(load_pretrained_folder(p["hf"]).to(args.device).eval(), load_tokenizer(p["hf"]))
    config = GenerationConfig(max_new_tokens=64, do_sample=False)
    synth_config = synth.read_config(p["data"])
    test_file = pq.ParquetFile(os.path.join(p["data"], synth.FILE_NAMES["vlm_test"]))
    batch = next(test_file.iter_batches(batch_size=max(args.chats, 1), columns=["image_bytes", "scene", "lang"]))
    os.makedirs(p["samples"], exist_ok=True)
    chats = []
    for index, row in enumerate(batch.to_pylist()[:args.chats]):
        image = load_image(io.BytesIO(row["image_bytes"]))
        image_file = os.path.join("samples", f"test_{index}.png")
        image.save(os.path.join(args.out_dir, image_file))
        shapes = tuple(synth.Shape(**s) for s in json.loads(row["scene"]))
        lang = row["lang"]
        scene = synth.caption(shapes, lang)
        rng = np.random.default_rng([args.seed, index])
        types = synth.draw_question_types(rng, synth_config, synth_config.turns, len(shapes))
        turns = converse(engine, image, [("caption", synth.CAPTION_PROMPTS[lang][0], scene)], config)
        turns += converse(engine, image, synth.ask_several(rng, shapes, lang, types, synth_config), config)
        chats.append(Chat(image_file, scene, turns))
    return chats


def converse(engine, image, asked: list[tuple[str, str, str]], config) -> list[Turn]:
    """One conversation about `image`: each question is sent with the whole conversation so far."""
    from .generate import ChatRequest

    messages, turns = [], []
    for turn_index, (_, question, truth) in enumerate(asked):
        messages.append({"role": "user", "content": f"<image>\n{question}" if turn_index == 0 else question})
        reply = engine.generate([ChatRequest(messages=list(messages), images=[image])], config)[0].text.strip()
        messages.append({"role": "assistant", "content": reply})
        turns.append(Turn(question, reply, truth))
    return turns


def format_chats(chats: list[Chat], folder: str = "", markdown: bool = False) -> str:
    """The chats as terminal text, or as markdown for the report in `folder` (image links relative to it)."""
    lines = []
    for chat in chats:
        if markdown:
            lines += [f"![held-out image]({chat.image_file})", "", f"Scene: {chat.scene}", "",
                      "| question | model | truth |", "|---|---|---|"]
            lines += [f"| {t.question} | {t.answer} | {t.truth} |" for t in chat.turns]
        else:
            lines += [f"{os.path.join(folder, chat.image_file)}  (scene: {chat.scene})"]
            for t in chat.turns:
                mark = "ok" if t.correct else "WRONG"
                lines += [f"  user:  {t.question}", f"  model: {t.answer}   [{mark}; truth: {t.truth}]"]
        lines.append("")
    return "\n".join(lines)


def write_report(args, timings, result: dict, chats) -> str:
    from .evaluate import format_table

    total = sum(seconds for _, seconds in timings)
    lines = [
        "# MiniMind-V demo report", "",
        f"A {args.hidden_size}x{args.num_hidden_layers} MiniMind-V with a `{args.vision_model}` tower, trained from "
        f"zero on {args.train_rows} synthetic rows per file on `{args.device}` in {total / 60:.1f} minutes.", "",
        "## Held-out accuracy", "",
        "Exact match on images whose layouts never occur in training; *blind* answers the same questions with "
        "every image replaced by one grey image; *majority* always gives the most common training answer.", "",
        "```", format_table(result), "```", "",
        "## Sample chats (exported transformers folder, greedy)", "", format_chats(chats, markdown=True),
        "## Steps", "", "| step | seconds | command |", "|---|---|---|",
    ]
    lines += [f"| {step.title} | {seconds:.0f} | `minimind-v {' '.join(step.argv)}` |" for step, seconds in timings]
    lines += ["", "Loss curves: " + ", ".join(f"![{run}](loss_{run}.png)" for run in training_runs(args)), ""]
    path = os.path.join(args.out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def main(args) -> None:
    from .evaluate import format_table

    steps = plan(args)
    start = time.perf_counter()
    timings = run_steps(steps, args.time_budget)
    print(f"\n[chat] {args.chats} held-out images, asked through {paths(args.out_dir)['hf']}", flush=True)
    chat_start = time.perf_counter()
    chats = sample_chats(args)
    timings.append((Step("sample chats", ["chat", "--load_from", paths(args.out_dir)["hf"]]),
                    time.perf_counter() - chat_start))
    print(format_chats(chats, args.out_dir))
    with open(os.path.join(args.out_dir, "eval.json"), encoding="utf-8") as f:
        result = json.load(f)
    report = write_report(args, timings, result, chats)
    print(format_table(result))
    print(f"\nheld-out accuracy {100 * result['accuracy']:.1f}% (blind {100 * result['blind_accuracy']:.1f}%, "
          f"majority {100 * result['majority_baseline']:.1f}%) in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"report: {report}\nchat with it: minimind-v chat --load_from {paths(args.out_dir)['hf']}")
