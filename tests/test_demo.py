"""`minimind-v demo`: a miniature run of every step (a few optimizer steps each) writes every promised output,
and the steps are plain `minimind-v` command lines."""

from __future__ import annotations

import json
import os

import pytest

from minimind_v import demo
from minimind_v.cli import main as cli
from minimind_v.synth import QUESTION_TYPES

MINIATURE = ["--train_rows", "48", "--test_rows", "12", "--llm_steps", "2", "--pretrain_steps", "2", "--sft_steps",
             "2", "--batch_size", "4", "--hidden_size", "64", "--num_hidden_layers", "1", "--vision_model",
             "random:tiny", "--chats", "1", "--device", "cpu", "--num_threads", "1", "--lang", "both",
             "--focus", "position:2", "relation:2", "--remix_steps", "3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cli(["demo", "--out_dir", str(out)] + MINIATURE)
    return out


def test_miniature_demo_writes_every_output(demo_run):
    out = demo_run
    for path in ("data/vlm_test.parquet", "tokenizer/tokenizer.json", "model/pretrain_64.pth",
                 "model/pretrain_vlm_64.pth", "model/sft_vlm_64.pth", "model/sft_vlm_64_vision/config.json",
                 "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "hf/preprocessor_config.json",
                 "loss_pretrain.png", "loss_pretrain_vlm.png", "loss_sft_mixed.png", "loss_sft_focus_position.png",
                 "loss_sft_focus_relation.png", "loss_sft_vlm.png", "focus_data/position/vlm_sft.parquet",
                 "focus_data/relation/vlm_sft.parquet", "predictions.jsonl",
                 "samples/test_0.png", "report.md"):
        assert (out / path).is_file(), path
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 12
    for key in ("accuracy", "blind_accuracy", "majority_baseline"):
        assert 0 <= result[key] <= 1, key
    assert set(result["per_type"]) <= set(QUESTION_TYPES)
    report = (out / "report.md").read_text()
    assert "| overall" not in report and "overall" in report  # the eval table sits in a code block
    assert "minimind-v train vlm-sft" in report and "![held-out image](samples/test_0.png)" in report


def test_exported_folder_chats_like_the_native_weights(demo_run):
    """The demo's chats go through the exported folder; it must answer exactly as the native weights do."""
    from PIL import Image

    from minimind_v.generate import ChatRequest, Engine, GenerationConfig
    from minimind_v.loading import load_model, load_pretrained_folder
    from minimind_v.tokenizer import load_tokenizer

    out = demo_run
    native, tokenizer = load_model(save_dir=str(out / "model"), weight="sft_vlm", hidden_size=64, num_hidden_layers=1,
                                   tokenizer=str(out / "tokenizer"))  # finds the trained tower next to the weights
    exported = load_pretrained_folder(str(out / "hf")).eval()
    image = Image.open(out / "samples" / "test_0.png")
    request = [ChatRequest(messages=[{"role": "user", "content": "<image>\nDescribe the image."}], images=[image])]
    config = GenerationConfig(max_new_tokens=12, do_sample=False)
    from_native = Engine(native, tokenizer).generate(request, config)[0].token_ids
    from_export = Engine(exported, load_tokenizer(str(out / "hf"))).generate(request, config)[0].token_ids
    assert from_native == from_export


def test_plan_is_a_chain_of_cli_commands(tmp_path):
    """Each stage starts from the previous one's weights, and every path lives under --out_dir."""
    from minimind_v.cli import build_parser

    argv = ["demo", "--out_dir", str(tmp_path)] + MINIATURE
    args = build_parser(argv).parse_args(argv)
    steps = demo.plan(args)
    value = lambda argv, flag: argv[argv.index(flag) + 1] if flag in argv else None
    chain = [(s.argv[1], value(s.argv, "--from_weight"), value(s.argv, "--save_weight"))
             for s in steps if s.argv[0] == "train"]
    assert chain == [("llm-pretrain", "none", None), ("vlm-pretrain", "pretrain", None),
                     ("vlm-sft", "pretrain_vlm", "sft_mixed"), ("vlm-sft", "sft_mixed", "sft_focus_position"),
                     ("vlm-sft", "sft_focus_position", "sft_focus_relation"),
                     ("vlm-sft", "sft_focus_relation", "sft_vlm")]
    focus = [s.argv for s in steps if "--question_types" in s.argv]
    assert [(value(f, "--question_types"), value(f, "--files")) for f in focus] == [("position", "vlm_sft"),
                                                                                    ("relation", "vlm_sft")]
    focus_files = [os.path.join(value(f, "--out_dir"), "vlm_sft.parquet") for f in focus]
    train = [s.argv for s in steps if s.argv[0] == "train"]
    assert [value(argv, "--max_steps") for argv in train[2:]] == ["2", "2", "2", "3"]
    assert [argv[argv.index("--data_path") + 1] for argv in train[3:5]] == focus_files
    remix_data = train[5][train[5].index("--data_path") + 1:train[5].index("--from_weight")]
    assert remix_data[2:] == focus_files and len(remix_data) == 4  # the usual mix plus the focus questions
    assert [value(argv, "--stop_loss") for argv in train] == [None] * 3 + ["0.01"] * 2 + [None]  # focus phases only
    no_stop = build_parser(argv).parse_args(argv + ["--focus_stop_loss", "0"])
    assert not any("--stop_loss" in s.argv for s in demo.plan(no_stop))
    no_focus = build_parser(argv + ["--focus"]).parse_args(argv + ["--focus"])
    assert not any("--question_types" in s.argv for s in demo.plan(no_focus))
    assert demo.training_runs(no_focus) == ["pretrain", "pretrain_vlm", "sft_vlm"]
    for step in steps:
        parser_argv = step.argv
        build_parser(parser_argv).parse_args(parser_argv)  # every step parses as a real command line
        for value in parser_argv:
            if os.sep in value:
                assert value.startswith(str(tmp_path)), (step.title, value)


def test_float32_cpu_runs_a_shorter_recipe(tmp_path):
    """Float32 on a CPU is ~1.4x slower than bf16: the default mixed SFT and focus phases shrink to stay in the
    time budget; explicit flags and CUDA keep theirs."""
    from minimind_v.cli import build_parser

    def recipe(*flags: str) -> tuple[str, list[str]]:
        argv = ["demo", "--out_dir", str(tmp_path), *flags]
        train = [s.argv for s in demo.plan(build_parser(argv).parse_args(argv)) if s.argv[0] == "train"]
        saved = [(argv[argv.index("--save_weight") + 1], argv[argv.index("--max_steps") + 1]) for argv in train[2:]]
        return saved[0][1], [f"{weight.removeprefix('sft_focus_')}:{steps}" for weight, steps in saved[1:-1]]

    four = ["position:600", "relation:300", "shape:200", "presence:200"]
    assert recipe("--cpu_dtype", "float32", "--device", "cpu") == ("900", four[:2])
    assert recipe("--cpu_dtype", "bfloat16", "--device", "cpu") == ("1500", four)
    assert recipe("--cpu_dtype", "float32", "--device", "cuda:0") == ("1500", four)
    assert recipe("--cpu_dtype", "float32", "--device", "cpu", "--sft_steps", "700", "--focus", "shape:5") == (
        "700", ["shape:5"])


def test_a_time_budget_shares_the_time_left_among_the_training_phases(tmp_path, monkeypatch):
    """Each training command gets --max_minutes: its share, by planned steps, of the budget left after the time
    kept for evaluation; other commands run as planned."""
    ran = []
    monkeypatch.setattr("minimind_v.cli.main", lambda argv: ran.append(argv))
    steps = [demo.Step("data", ["data", "synth"]), demo.Step("a", ["train", "llm-pretrain", "--max_steps", "100"]),
             demo.Step("b", ["train", "vlm-sft", "--max_steps", "300"]), demo.Step("eval", ["eval"])]
    demo.run_steps(steps, budget_minutes=10)
    left = 10 - demo.AFTER_TRAINING_SECONDS / 60
    assert ran[0] == ["data", "synth"] and ran[3] == ["eval"]
    assert ran[1][-2] == ran[2][-2] == "--max_minutes"
    assert float(ran[1][-1]) == pytest.approx(left / 4, abs=0.01)
    assert float(ran[2][-1]) == pytest.approx(left, abs=0.01)
    demo.run_steps(steps, budget_minutes=0)
    assert "--max_minutes" not in ran[5]


@pytest.mark.parametrize("flag, value", [("--sft_steps", "0"), ("--train_rows", "0"), ("--chats", "-1"),
                                         ("--focus", "position:0"), ("--focus", "where:300"), ("--focus", "position"),
                                         ("--remix_steps", "0"), ("--time_budget", "-1"),
                                         ("--focus_stop_loss", "-1")])
def test_bad_flags_are_refused_before_any_work(tmp_path, flag, value, capsys):
    with pytest.raises(SystemExit, match=flag.lstrip("-")):
        cli(["demo", "--out_dir", str(tmp_path / "x"), flag, value])
    assert not (tmp_path / "x").exists()


def test_init_std_grows_as_the_model_narrows():
    assert demo.init_std(768) == 0.02
    assert demo.init_std(192) == pytest.approx(0.04)


def test_llm_only_weights_load_as_a_text_model(demo_run):
    """`--vision_model none` loads the LLM stage's weights (no projector in the file) for text chat; with a
    tower, the same file is refused with the missing projector keys named."""
    from minimind_v.generate import ChatRequest, Engine, GenerationConfig
    from minimind_v.loading import load_model

    source = dict(save_dir=str(demo_run / "model"), weight="pretrain", hidden_size=64, num_hidden_layers=1,
                  tokenizer=str(demo_run / "tokenizer"))
    model, tokenizer = load_model(**source, vision_model="none")
    reply = Engine(model, tokenizer).generate([ChatRequest(messages=[{"role": "user", "content": "Hi"}])],
                                              GenerationConfig(max_new_tokens=4, do_sample=False))[0]
    assert reply.completion_tokens >= 1
    with pytest.raises(ValueError, match="vision_proj"):
        load_model(**source, vision_model="random:tiny")
