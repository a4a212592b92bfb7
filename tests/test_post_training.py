"""Post-training from the command line, at tiny size on the synthetic task: the chain synth -> tokenizer ->
llm-pretrain -> vlm-pretrain -> vlm-sft -> vlm-dpo (and llm-dpo), GRPO and distillation, LoRA runs on a frozen base,
`lora merge`, `--lora` at inference, exact resume of DPO, GRPO and LoRA runs after SIGKILL, and 2-process runs equal
to 1 process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind_v import cli, distributed
from minimind_v.checkpoint import load_resume
from minimind_v.config import MiniMindConfig
from minimind_v.evaluate import engine_answerer, evaluate, preference_scores
from minimind_v.generate import Engine
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.loading import export_pretrained, load_model, load_pretrained_folder
from minimind_v.loop import Loop, StopRequest
from minimind_v.lora import adapters, merge_lora
from minimind_v.tokenizer import train_tokenizer
from minimind_v.train_config import TrainConfig
from minimind_v.trainer import Trainer
from minimind_v.weights import native_state_dict
from test_train import subprocess_train

pytestmark = pytest.mark.slow

SHAPE = ["--hidden_size", "64", "--num_hidden_layers", "2"]
COMMON = [*SHAPE, "--batch_size", "16", "--log_interval", "10", "--num_workers", "0", "--device", "cpu",
          "--num_threads", "2", "--add_system_ratio", "0", "--empty_think_ratio", "1", "--epochs", "100",
          "--save_interval", "1000", "--max_seq_len", "128", "--initializer_range", "0.069",
          "--cpu_dtype", "float32"]  # exact resume, parity and the accuracies: bf16 is the default on native-bf16 CPUs


def train_argv(folder: Path, stage: str, *flags: str) -> list[str]:
    return ["train", stage, "--tokenizer", str(folder / "tok"), "--out_dir", str(folder / "out"), "--checkpoint_dir",
            str(folder / "ckpt"), "--log_dir", str(folder / "runs"), *COMMON, *flags]


def data(folder: Path, name: str) -> str:
    return str(folder / "data" / name)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A 64x2 VLM trained from zero for a minute: below majority on the held-out questions, a base to improve."""
    folder = tmp_path_factory.mktemp("post")
    cli.main(["data", "synth", "--out_dir", str(folder / "data"), "--train_rows", "1000", "--test_rows", "200",
              "--lang", "en", "--files", "llm_pretrain", "vlm_pretrain", "vlm_sft", "vlm_test", "llm_dpo", "vlm_dpo",
              "vlm_dpo_test", "vlm_rl", "llm_rl"])
    cli.main(["train-tokenizer", "--data_path", data(folder, "llm_pretrain.jsonl"), "--out_dir", str(folder / "tok"),
              "--vocab_size", "400"])
    cli.main(train_argv(folder, "llm-pretrain", "--data_path", data(folder, "llm_pretrain.jsonl"), "--from_weight",
                        "none", "--learning_rate", "3e-3", "--max_steps", "40"))
    vision = ["--train_vision", "1", "--freeze_llm", "0", "--learning_rate", "3e-3"]
    cli.main(train_argv(folder, "vlm-pretrain", "--data_path", data(folder, "vlm_pretrain.parquet"), "--from_weight",
                        "pretrain", "--vision_model", "random:small", "--max_steps", "80", *vision))
    cli.main(train_argv(folder, "vlm-sft", "--data_path", data(folder, "vlm_sft.parquet"), "--max_steps", "120",
                        *vision))
    return folder


def model(folder: Path, weight: str, lora: Path | None = None):
    return load_model(save_dir=str(folder / "out"), weight=weight, hidden_size=64, num_hidden_layers=2,
                      tokenizer=str(folder / "tok"), lora=str(lora) if lora else None)


def accuracy(folder: Path, weight: str, lora: Path | None = None) -> float:
    loaded, tokenizer = model(folder, weight, lora)
    return evaluate(engine_answerer(Engine(loaded, tokenizer)), data(folder, "vlm_test.parquet"))["accuracy"]


def metrics(folder: Path, run: str, logs: str = "runs") -> list[dict]:
    return [json.loads(line) for line in (folder / logs / run / "metrics.jsonl").open()]


def test_vlm_dpo_raises_the_held_out_preference_margin(chain):
    before = preference_scores(*model(chain, "sft_vlm"), data(chain, "vlm_dpo_test.parquet"))
    cli.main(train_argv(chain, "vlm-dpo", "--data_path", data(chain, "vlm_dpo.parquet"), "--learning_rate", "3e-4",
                        "--beta", "0.1", "--max_steps", "100"))
    after = preference_scores(*model(chain, "dpo_vlm"), data(chain, "vlm_dpo_test.parquet"))
    assert after["n"] == before["n"] == 200 and after["margin"] > before["margin"] + 0.1
    logged = metrics(chain, "dpo_vlm_64")
    steps = [m["step"] for m in logged]  # every 10 steps and at the end of each epoch (63 rows per epoch)
    assert steps == [10, 20, 30, 40, 50, 60, 63, 70, 80, 90, 100]
    assert all(0 <= m["reward_accuracy"] <= 1 and "reward_margin" in m and m["chosen_logp"] < 0 for m in logged)
    assert (chain / "out" / "dpo_vlm_64_vision").is_dir()  # the frozen trained tower goes with the weights


def test_llm_dpo_trains_on_the_reference_jsonl_format(chain):
    cli.main(train_argv(chain, "llm-dpo", "--data_path", data(chain, "llm_dpo.jsonl"), "--from_weight", "pretrain",
                        "--learning_rate", "1e-4", "--max_steps", "3", "--log_interval", "1"))
    summary = json.loads((chain / "runs" / "dpo_64" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 48 and summary["weights"].endswith("dpo_64.pth")


def test_lora_teaches_a_frozen_base_to_answer(chain):
    base = chain / "out" / "pretrain_vlm_64.pth"
    base_bytes = base.read_bytes()
    cli.main(train_argv(chain, "vlm-sft", "--data_path", data(chain, "vlm_sft.parquet"), "--from_weight",
                        "pretrain_vlm", "--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "1e-2",
                        "--max_steps", "150", "--lora_name", "lora_answers"))
    adapter = chain / "out" / "lora_answers_64"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    losses = [m["loss"] for m in metrics(chain, "lora_answers_64")]
    assert losses[-1] < 0.6 * losses[0]
    assert base.read_bytes() == base_bytes
    resume = load_resume(str(chain / "ckpt" / "lora_answers_64_resume.pth"))
    assert resume["model"] and all(".lora." in k for k in resume["model"])
    assert accuracy(chain, "pretrain_vlm", adapter) >= accuracy(chain, "pretrain_vlm") + 0.15


def test_a_lora_run_changes_no_base_weight(chain):
    config = TrainConfig(stage="vlm-sft", data_path=[data(chain, "vlm_sft.parquet")], tokenizer=str(chain / "tok"),
                         hidden_size=64, num_hidden_layers=2, out_dir=str(chain / "out"),
                         checkpoint_dir=str(chain / "ckpt"), log_dir=str(chain / "runs"), device="cpu",
                         from_weight="sft_vlm", num_workers=0, batch_size=8, max_steps=3, max_seq_len=128, lora_rank=4,
                         lora_targets=["attention", "mlp", "projector", "vision"], lora_name="lora_frozen",
                         learning_rate=1e-2).resolved()
    trainer = Trainer(config, distributed.setup("cpu"))
    Loop(trainer, StopRequest()).run()
    saved = torch.load(chain / "out" / "sft_vlm_64.pth", weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in native_state_dict(trainer.model).items())
    tower = load_file(chain / "out" / "sft_vlm_64_vision" / "model.safetensors")
    assert all(torch.equal(trainer.model.vision_encoder.state_dict()[k], v) for k, v in tower.items())
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for lora in adapters(trainer.model).values() for p in lora.parameters()}
    assert all(torch.count_nonzero(lora.B.weight) for lora in adapters(trainer.model).values())


def test_lora_merge_and_lora_at_inference(chain, tmp_path):
    adapter = chain / "out" / "lora_answers_64"
    flags = ["--save_dir", str(chain / "out"), "--weight", "pretrain_vlm", *SHAPE, "--tokenizer", str(chain / "tok"),
             "--device", "cpu", "--lora", str(adapter)]
    cli.main(["lora", "merge", *flags, "--out_weight", "answers", "--out", str(tmp_path / "hf")])
    unmerged, tokenizer = model(chain, "pretrain_vlm", adapter)
    ids = torch.tensor([tokenizer("<|im_start|>user\n" + "<|image_pad|>" * 16 + "\nHow many?<|im_end|>\n").input_ids])
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = unmerged(ids, pixel_values=pixels).logits
        from_folder = load_pretrained_folder(str(tmp_path / "hf")).eval()(ids, pixel_values=pixels).logits
        native = model(chain, "answers")[0](ids, pixel_values=pixels).logits  # fp16 weights, the tower beside them
    assert ((from_folder - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert ((native - expected).abs().max() / expected.abs().max()).item() < 1e-2
    merge_lora(unmerged)
    assert not adapters(unmerged)
    chat = subprocess.run([sys.executable, "-m", "minimind_v", "chat", *flags, "--temperature", "0",
                           "--max_new_tokens", "8", "--show_speed", "0"], input="How many shapes are there?\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(4, 32),
                "model.layers.0.self_attn.q_proj.lora.B.weight": torch.zeros(64, 4)}, tmp_path / "narrow.pth")
    with pytest.raises(SystemExit, match=r"does not fit this model: model\.layers\.0\.self_attn\.q_proj\.lora: "
                                         r"A \(4, 32\) and B \(64, 4\) do not fit a layer of 64 -> 64 features"):
        cli.main(["lora", "merge", *flags[:-1], str(tmp_path / "narrow.pth"), "--out", str(tmp_path / "never")])


def resumed_run(chain: Path, stage: str, name: str, out: str, output: str, *flags: str) -> None:
    """Run `stage` straight (logs and resume state in out/straight), then killed mid-run and resumed (in
    out/killed): the resume states and the written `output` (weights or adapters) must be bit-identical."""
    folders = {run: chain / out / run for run in ("straight", "killed")}
    argv = lambda run, *extra: ["train", stage, "--tokenizer", str(chain / "tok"), "--out_dir", str(chain / "out"),
                                "--checkpoint_dir", str(folders[run]), "--log_dir", str(folders[run]), *COMMON,
                                "--batch_size", "4", "--max_steps", "10", "--save_interval", "1", "--num_workers",
                                "1", "--log_interval", "1", *flags, *extra]
    cli.main(argv("straight"))
    straight = load_resume(str(folders["straight"] / f"{name}_64_resume.pth"))
    written = written_tensors(chain / "out" / output)
    killed = subprocess_train(argv("killed"))
    progress = folders["killed"] / f"{name}_64" / "metrics.jsonl"
    while killed.poll() is None and (not progress.exists() or len(progress.read_text().splitlines()) < 4):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, killed.communicate()[0]
    assert 0 < load_resume(str(folders["killed"] / f"{name}_64_resume.pth"))["counters"]["global_step"] < 10
    cli.main(argv("killed", "--from_resume", "1"))
    resumed = load_resume(str(folders["killed"] / f"{name}_64_resume.pth"))
    assert resumed["counters"] == straight["counters"] and resumed["model"].keys() == straight["model"].keys()
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    again = written_tensors(chain / "out" / output)
    assert again.keys() == written.keys() and all(torch.equal(written[k], again[k]) for k in written)


def written_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        return load_file(path / "adapter_model.safetensors")
    return torch.load(path, weights_only=True)


def test_sigkill_during_a_dpo_run_resumes_to_bit_identical_weights(chain):
    resumed_run(chain, "vlm-dpo", "dpo_killed", "dpo_resume", "dpo_killed_64.pth", "--data_path",
                data(chain, "vlm_dpo.parquet"),
                "--save_weight", "dpo_killed", "--learning_rate", "1e-4")


def test_sigkill_during_a_lora_run_resumes_to_bit_identical_adapters(chain):
    resumed_run(chain, "vlm-sft", "lora_killed", "lora_resume", "lora_killed_64", "--data_path",
                data(chain, "vlm_sft.parquet"), "--from_weight", "sft_vlm",
                "--lora_rank", "4", "--lora_name", "lora_killed", "--learning_rate", "1e-3")


def test_two_process_lora_dpo_matches_one_process_at_the_same_global_batch(chain):
    """DDP with adapters on a frozen base and the base (adapters off) as DPO's reference model."""
    def argv(run: str, batch: str) -> list[str]:
        return ["train", "vlm-dpo", "--tokenizer", str(chain / "tok"), "--out_dir", str(chain / "out"),
                "--checkpoint_dir", str(chain / run), "--log_dir", str(chain / run), *COMMON, "--data_path",
                data(chain, "vlm_dpo.parquet"), "--lora_rank", "4", "--lora_name", f"lora_{run}", "--batch_size",
                batch, "--max_steps", "3", "--log_interval", "1", "--learning_rate", "1e-3", "--num_threads", "1"]

    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minimind_v")
    ddp = subprocess_train(argv("ddp", "4"), launcher=torchrun)
    output = ddp.communicate(timeout=300)[0]
    assert ddp.returncode == 0, output
    cli.main(argv("one", "8"))
    two, one = (load_resume(str(chain / run / f"lora_{run}_64_resume.pth")) for run in ("ddp", "one"))
    assert two["world_size"] == 2 and two["counters"]["samples"] == one["counters"]["samples"] == 24
    losses = [[m["loss"] for m in metrics(chain / run, f"lora_{run}_64", "")] for run in ("ddp", "one")]
    assert len(losses[0]) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(*losses))
    assert one["model"].keys() == two["model"].keys()
    for key, value in one["model"].items():
        assert torch.allclose(two["model"][key], value, atol=1e-4, rtol=0), key


GRPO = ["--num_generations", "4", "--max_gen_len", "8", "--rewards", "exact_match", "--thinking_ratio", "0"]


def test_vlm_grpo_rewards_right_answers_and_logs_what_it_does(chain):
    cli.main(train_argv(chain, "vlm-grpo", "--data_path", data(chain, "vlm_rl.parquet"), "--batch_size", "8", *GRPO,
                        "--learning_rate", "3e-4", "--max_steps", "30"))
    logged = metrics(chain, "grpo_vlm_64")
    names = {"reward", "reward_exact_match", "zero_std_groups", "kl", "response_len", "rollout_s"}
    assert all(names <= m.keys() for m in logged) and logged[-1]["step"] == 30
    assert all(0 <= m["reward"] <= 1 and 0 <= m["zero_std_groups"] <= 1 and 1 <= m["response_len"] <= 8
               for m in logged)
    first, last = logged[0], logged[-1]
    assert last["reward"] > first["reward"], "GRPO should raise the share of right answers on its prompts"
    summary = json.loads((chain / "runs" / "grpo_vlm_64" / "summary.json").read_text())
    assert summary["samples"] == 240 and summary["weights"].endswith("grpo_vlm_64.pth")


def test_llm_grpo_reads_the_reference_rlaif_format(chain):
    cli.main(train_argv(chain, "llm-grpo", "--data_path", data(chain, "llm_rl.jsonl"), "--from_weight", "pretrain",
                        "--batch_size", "4", *GRPO, "--rewards", "exact_match", "format:0.5", "--max_steps", "2",
                        "--log_interval", "1", "--learning_rate", "1e-4"))
    logged = metrics(chain, "grpo_64")
    assert [m["step"] for m in logged] == [1, 2] and all("reward_format" in m for m in logged)


def test_sigkill_during_a_grpo_run_resumes_to_bit_identical_weights(chain):
    resumed_run(chain, "vlm-grpo", "grpo_killed", "grpo_resume", "grpo_killed_64.pth", "--data_path",
                data(chain, "vlm_rl.parquet"), "--save_weight", "grpo_killed", "--learning_rate", "1e-4", *GRPO)


def two_process_run(chain: Path, stage: str, name: str, per_process: int, *flags: str) -> None:
    """`stage` under torchrun with 2 processes of `per_process` rows, then 1 process of 2 x `per_process`: the logged
    losses and the trained weights must agree to float tolerance."""
    def argv(run: str, batch: int) -> list[str]:
        return ["train", stage, "--tokenizer", str(chain / "tok"), "--out_dir", str(chain / "out"),
                "--checkpoint_dir", str(chain / run), "--log_dir", str(chain / run), *COMMON, "--batch_size",
                str(batch), "--max_steps", "3", "--log_interval", "1", "--num_threads", "1", "--save_weight",
                f"{name}_{run}", *flags]

    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minimind_v")
    ddp = subprocess_train(argv("ddp", per_process), launcher=torchrun)
    output = ddp.communicate(timeout=300)[0]
    assert ddp.returncode == 0, output
    cli.main(argv("one", 2 * per_process))
    two, one = (load_resume(str(chain / run / f"{name}_{run}_64_resume.pth")) for run in ("ddp", "one"))
    assert two["world_size"] == 2 and two["counters"]["samples"] == one["counters"]["samples"] == 6 * per_process
    logged = [metrics(chain / run, f"{name}_{run}_64", "") for run in ("ddp", "one")]
    for key in ("loss", *(k for k in ("reward", "kl", "ce") if k in logged[1][0])):
        assert all(abs(a[key] - b[key]) < 1e-4 for a, b in zip(*logged)), key
    for key, value in one["model"].items():
        assert torch.allclose(two["model"][key], value, atol=1e-4, rtol=0), key


def test_two_process_grpo_matches_one_process_at_the_same_global_batch(chain):
    """Rollouts are sharded with their prompts, advantages stay per group, answers are seeded per prompt."""
    two_process_run(chain, "vlm-grpo", "grpo2", 2, "--data_path", data(chain, "vlm_rl.parquet"), *GRPO,
                    "--learning_rate", "1e-3", "--freeze_llm", "1")


def test_distillation_brings_a_smaller_student_towards_its_teacher(chain, tmp_path):
    flags = ["--data_path", data(chain, "vlm_sft.parquet"), "--teacher", "sft_vlm", "--hidden_size", "32",
             "--num_hidden_layers", "1", "--from_weight", "none", "--vision_model", "random:small", "--train_vision",
             "1", "--teacher_hidden_size", "64", "--teacher_num_hidden_layers", "2", "--learning_rate", "3e-3",
             "--max_steps", "60", "--initializer_range", "0.1"]
    cli.main(train_argv(chain, "vlm-distill", *flags))
    logged = metrics(chain, "dist_vlm_32")
    assert logged[-1]["kl"] < 0.5 * logged[0]["kl"] and logged[-1]["ce"] < logged[0]["ce"]
    with pytest.raises(SystemExit, match="no teacher weights at .*nothing_64.pth"):
        cli.main(train_argv(chain, "vlm-distill", *flags, "--teacher", "nothing", "--max_steps", "1"))
    cli.main(["export", "--out", str(tmp_path / "vlm_teacher"), "--save_dir", str(chain / "out"), "--weight", "sft_vlm",
              *SHAPE, "--tokenizer", str(chain / "tok")])
    teachers = {"native": "sft_vlm", "folder": str(tmp_path / "vlm_teacher")}  # the same teacher, two forms
    for form, teacher in teachers.items():
        cli.main(train_argv(chain, "vlm-distill", *flags, "--teacher", teacher, "--max_steps", "1", "--log_interval",
                            "1", "--save_weight", "dist_one", "--log_dir", str(tmp_path / form)))
    native, folder = (metrics(tmp_path / form, "dist_one_32", "")[0] for form in teachers)
    assert abs(native["kl"] - folder["kl"]) < 1e-4 and abs(native["ce"] - folder["ce"]) < 1e-4
    other = train_tokenizer(["Other words, another vocabulary."] * 50, str(tmp_path / "tok"), vocab_size=300)
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, vocab_size=len(other)))
    export_pretrained(teacher, str(tmp_path / "teacher"), other)
    with pytest.raises(SystemExit, match="another tokenizer than the student"):
        cli.main(train_argv(chain, "llm-distill", "--data_path", data(chain, "llm_rl.jsonl"), "--from_weight",
                            "pretrain", "--teacher", str(tmp_path / "teacher"), "--max_steps", "1"))


def test_two_process_distillation_matches_one_process_at_the_same_global_batch(chain):
    two_process_run(chain, "vlm-distill", "dist2", 4, "--data_path", data(chain, "vlm_sft.parquet"), "--teacher",
                    "sft_vlm", "--from_weight", "pretrain_vlm", "--learning_rate", "1e-3", "--freeze_llm", "1")
