"""The trainer: the chained CLI run of every stage, exact resume after SIGKILL, 2-process DDP, bad-row and
NaN stops, signals and corrupt resume files."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimind_v import cli, loop
from minimind_v.checkpoint import load_resume
from minimind_v.loading import load_model
from minimind_v.loop import learning_rate
from minimind_v.objectives import causal_lm
from minimind_v.options import add_model_arguments, model_options
from training_data import sft_records, vlm_rows, write_all, write_jsonl, write_parquet

TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_workers", "0", "--device", "cpu",
        "--add_system_ratio", "0", "--log_interval", "1", "--num_threads", "1",
        "--cpu_dtype", "float32"]  # exact resume and parity: bf16 autocast is the default on CPUs with native bf16


def run_cli(folder: Path, stage: str, *flags: str) -> None:
    cli.main(["train", stage, "--tokenizer", str(folder / "tok"), "--out_dir", str(folder / "out"),
              "--checkpoint_dir", str(folder / "ckpt"), "--log_dir", str(folder / "runs"), *TINY, *flags])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """train-tokenizer, llm-pretrain, llm-sft, vlm-pretrain (random tower, trained), vlm-sft, from the CLI."""
    folder = tmp_path_factory.mktemp("chain")
    files = write_all(folder / "data", rows=32)
    cli.main(["train-tokenizer", "--data_path", str(files["pretrain"]), str(files["sft"]), "--out_dir",
              str(folder / "tok"), "--vocab_size", "400"])
    common = ["--batch_size", "4", "--max_steps", "3", "--save_interval", "2", "--max_seq_len", "160"]
    run_cli(folder, "llm-pretrain", "--data_path", str(files["pretrain"]), "--accumulation_steps", "2",
            "--learning_rate", "5e-3", *common)
    run_cli(folder, "llm-sft", "--data_path", str(files["sft"]), "--learning_rate", "1e-3", *common)
    run_cli(folder, "vlm-pretrain", "--data_path", str(files["vlm"]), "--vision_model", "random:tiny",
            "--train_vision", "1", *common)
    run_cli(folder, "vlm-sft", "--data_path", str(files["vlm"]), "--train_vision", "1", *common)
    return folder


def test_chained_stages_write_reference_files_that_load(chain):
    out = chain / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "llm_64.pth", "pretrain_64.pth", "pretrain_vlm_64.pth", "pretrain_vlm_64_vision", "sft_vlm_64.pth",
        "sft_vlm_64_vision"]
    pretrain, llm = weights(out / "pretrain_64.pth"), weights(out / "llm_64.pth")
    vlm_pretrain, vlm_sft = weights(out / "pretrain_vlm_64.pth"), weights(out / "sft_vlm_64.pth")
    assert all(v.dtype == torch.float16 for v in vlm_sft.values())
    assert not any(k.startswith("vision_encoder.") for k in vlm_sft) and "lm_head.weight" in vlm_sft
    assert set(vlm_pretrain) == set(llm) | {k for k in vlm_pretrain if k.startswith("vision_proj.")}
    assert not torch.equal(pretrain["model.layers.0.mlp.up_proj.weight"], llm["model.layers.0.mlp.up_proj.weight"])
    # vlm-pretrain (freeze_llm 2) trains only the projector; vlm-sft (1) also the first and last blocks
    assert all(torch.equal(llm[k], vlm_pretrain[k]) for k in llm)
    assert torch.equal(vlm_pretrain["model.embed_tokens.weight"], vlm_sft["model.embed_tokens.weight"])
    assert not torch.equal(vlm_pretrain["model.layers.1.mlp.up_proj.weight"],
                           vlm_sft["model.layers.1.mlp.up_proj.weight"])
    towers = [load_file(out / f"{p}_64_vision" / "model.safetensors") for p in ("pretrain_vlm", "sft_vlm")]
    assert any(not torch.equal(towers[0][k], towers[1][k]) for k in towers[0])  # the tower kept training
    summary = json.loads((chain / "runs" / "sft_vlm_64" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 12 and sum(summary["bad_rows"].values()) == 0
    metrics = [json.loads(line) for line in (chain / "runs" / "sft_vlm_64" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(0 < m["padding_efficiency"] <= 1 for m in metrics)
    assert all(m["bad_rows"] == 0 and m["bad_rows_by_reason"] == {} for m in metrics)
    parser = cli.argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--save_dir", str(out), "--hidden_size", "64", "--num_hidden_layers", "2",
                              "--vision_model", str(out / "sft_vlm_64_vision"), "--tokenizer", str(chain / "tok"),
                              "--device", "cpu"])
    model, _ = load_model(**model_options(args))
    for key, value in vlm_sft.items():
        assert torch.equal(model.state_dict()[key].half(), value)
    assert torch.equal(model.vision_encoder.state_dict()["embeddings.patch_embedding.weight"],
                       towers[1]["embeddings.patch_embedding.weight"])


def test_vlm_stage_logs_the_projector_missing_from_llm_weights(chain, capsys):
    run_cli(chain, "vlm-pretrain", "--data_path", str(chain / "data" / "vlm.parquet"), "--vision_model", "random:tiny",
            "--save_weight", "again", "--batch_size", "2", "--max_steps", "1")
    log = capsys.readouterr().out
    assert "llm_64.pth; 6 vision_proj.* tensors are not in it and start from random init" in log
    assert "random and frozen; pass --train_vision 1" in log


def test_learning_rate_schedule():
    peak, total = 4e-4, 50
    assert learning_rate(total, total, peak) == pytest.approx(0.1 * peak)
    assert learning_rate(1, total, peak) == pytest.approx(peak * (0.1 + 0.45 * (1 + math.cos(math.pi / total))))
    assert learning_rate(5, total, peak, warmup=10) == pytest.approx(learning_rate(5, total, peak) / 2)


def test_corrupt_or_truncated_resume_file_is_a_clear_error(chain, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    good = (chain / "ckpt" / "llm_64_resume.pth").read_bytes()
    flags = ["--data_path", str(chain / "data" / "sft.jsonl"), "--checkpoint_dir", str(ckpt), "--from_resume", "1"]
    for content in (good[: len(good) // 2], b"garbage"):
        (ckpt / "llm_64_resume.pth").write_bytes(content)
        with pytest.raises(SystemExit, match="is corrupt or truncated"):
            run_cli(chain, "llm-sft", *flags)
    (ckpt / "llm_64_resume.pth").write_bytes(good)
    with pytest.raises(SystemExit, match="seed=42, this run has 7"):
        run_cli(chain, "llm-sft", *flags, "--seed", "7")


def test_too_many_bad_rows_stop_with_the_counts(chain, tmp_path):
    lines = [json.dumps(r) for r in sft_records(20)] + ["{broken"] * 2 + [json.dumps({"conversations": None})]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(SystemExit, match=r"3 of 23 rows read \(13.0%\) were unusable.*missing_field: 1, "
                                         r"invalid_json: 2"):
        run_cli(chain, "llm-sft", "--data_path", str(path), "--checkpoint_dir", str(tmp_path), "--out_dir",
                str(tmp_path), "--from_weight", "none", "--epochs", "1", "--batch_size", "8")


def test_nan_steps_are_skipped_then_stop_the_run(chain, tmp_path, monkeypatch):
    shutil.copy(chain / "out" / "llm_64.pth", tmp_path / "llm_64.pth")
    real_loss = causal_lm.supervised_loss
    monkeypatch.setattr(causal_lm, "supervised_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="3 optimizer steps in a row had a NaN/inf loss"):
        run_cli(chain, "llm-sft", "--data_path", str(chain / "data" / "sft.jsonl"), "--out_dir", str(tmp_path),
                "--from_weight", "llm", "--save_weight", "nan", "--max_nonfinite_steps", "3", "--save_interval", "1",
                "--batch_size", "4")
    before, after = weights(tmp_path / "llm_64.pth"), weights(tmp_path / "nan_64.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped steps left the weights alone


def test_sigterm_saves_and_stops_cleanly(chain, tmp_path, monkeypatch):
    step = loop.Loop._optimizer_step

    def step_then_signal(self, group):
        step(self, group)
        if self.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.Loop, "_optimizer_step", step_then_signal)
    with pytest.raises(SystemExit) as stopped:
        run_cli(chain, "llm-sft", "--data_path", str(chain / "data" / "sft.jsonl"), "--out_dir", str(tmp_path),
                "--checkpoint_dir", str(tmp_path), "--from_weight", "none", "--batch_size", "4", "--max_steps", "5")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert load_resume(str(tmp_path / "llm_64_resume.pth"))["counters"]["global_step"] == 2


def test_max_minutes_ends_training_early_with_the_weights_saved(chain, tmp_path, monkeypatch, capsys):
    """A time budget: the step that passes --max_minutes is the last one, and the run ends as at its last step
    (weights and summary written), not as a stopped run."""
    step = loop.Loop._optimizer_step

    def slow_step(self, group):
        step(self, group)
        if self.state.global_step == 2:  # counted after the step: this is the third
            self.started -= 120  # it takes two minutes

    monkeypatch.setattr(loop.Loop, "_optimizer_step", slow_step)
    run_cli(chain, "llm-sft", "--data_path", str(chain / "data" / "sft.jsonl"), "--out_dir", str(tmp_path),
            "--checkpoint_dir", str(tmp_path), "--log_dir", str(tmp_path), "--from_weight", "none", "--batch_size",
            "4", "--max_steps", "20", "--max_minutes", "1")
    assert "--max_minutes 1 passed: training ends at step 3 of 16" in capsys.readouterr().out
    assert load_resume(str(tmp_path / "llm_64_resume.pth"))["counters"]["global_step"] == 3
    assert json.loads((tmp_path / "llm_64" / "summary.json").read_text())["steps"] == 3


def test_stop_loss_ends_at_the_same_step_straight_or_stopped_mid_interval_and_resumed(chain, tmp_path, monkeypatch,
                                                                                      capsys):
    """--stop_loss ends the run at the first log line whose mean loss since the previous one is below it. The sums
    of the interval under way are in the resume state: a run stopped mid-interval and resumed logs the same means
    and ends at the same step with the same weights."""
    def train(out: str, *flags: str) -> None:
        run_cli(chain, "llm-sft", "--data_path", str(chain / "data" / "sft.jsonl"), "--out_dir", str(tmp_path / out),
                "--checkpoint_dir", str(tmp_path / out), "--log_dir", str(tmp_path / out), "--from_weight", "none",
                "--batch_size", "2", "--learning_rate", "5e-3", "--max_steps", "16", "--log_interval", "3", *flags)

    def logged(out: str) -> list[tuple[int, float]]:
        lines = (tmp_path / out / "llm_64" / "metrics.jsonl").read_text().splitlines()
        return [(row["step"], row["loss"]) for row in map(json.loads, lines)]

    train("full")
    means = logged("full")
    stop_loss = means[2][1] + 1e-6  # the third log line (step 9) reaches it; the first two must not
    assert means[0][1] > stop_loss and means[1][1] > stop_loss, means
    capsys.readouterr()
    train("straight", "--stop_loss", str(stop_loss))
    assert f"--stop_loss {stop_loss:g} reached" in capsys.readouterr().out
    assert logged("straight") == means[:3]

    step = loop.Loop._optimizer_step

    def step_then_signal(self, group):
        step(self, group)
        if self.state.global_step == 3:  # counted after the step: the signal lands in step 5, mid-interval
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.Loop, "_optimizer_step", step_then_signal)
    with pytest.raises(SystemExit):
        train("resumed", "--stop_loss", str(stop_loss))
    monkeypatch.setattr(loop.Loop, "_optimizer_step", step)
    assert load_resume(str(tmp_path / "resumed" / "llm_64_resume.pth"))["counters"]["global_step"] == 4
    train("resumed", "--stop_loss", str(stop_loss), "--from_resume", "1")
    assert logged("resumed") == means[:3]
    straight, resumed = weights(tmp_path / "straight" / "llm_64.pth"), weights(tmp_path / "resumed" / "llm_64.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def vlm_argv(folder: Path, out: str, *flags: str) -> list[str]:
    """A tiny vlm-sft run from scratch (random tower, everything trained) writing into folder/out."""
    return ["train", "vlm-sft", "--data_path", str(folder / "vlm.parquet"), "--tokenizer", str(folder / "tok"),
            "--out_dir", str(folder / out), "--checkpoint_dir", str(folder / out), "--log_dir", str(folder / out),
            "--from_weight", "none", "--vision_model", "random:tiny", "--train_vision", "1", "--freeze_llm", "0",
            "--learning_rate", "1e-3", "--max_seq_len", "160", *TINY, *flags]


def subprocess_train(argv: list[str], launcher: tuple[str, ...] = ("-m", "minimind_v")) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *launcher, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


@pytest.fixture(scope="module")
def small_vlm_data(chain, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm")
    write_parquet(folder / "vlm.parquet", vlm_rows(16), row_group_size=4)
    shutil.copytree(chain / "tok", folder / "tok")
    return folder


def resume_state(folder: Path, out: str) -> dict:
    return load_resume(str(folder / out / "sft_vlm_64_resume.pth"))


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(small_vlm_data, capsys):
    folder = small_vlm_data
    flags = ("--batch_size", "4", "--max_steps", "10", "--save_interval", "1", "--num_workers", "1")
    cli.main(vlm_argv(folder, "straight", *flags))
    killed = subprocess_train(vlm_argv(folder, "killed", *flags))
    metrics = folder / "killed" / "sft_vlm_64" / "metrics.jsonl"
    while killed.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    output = killed.communicate()[0]
    assert killed.returncode == -signal.SIGKILL, output
    interrupted_at = resume_state(folder, "killed")["counters"]["global_step"]
    assert 0 < interrupted_at < 10
    capsys.readouterr()
    cli.main(vlm_argv(folder, "killed", *flags, "--from_resume", "1"))
    assert f"global step {interrupted_at}" in capsys.readouterr().out
    straight, resumed = resume_state(folder, "straight"), resume_state(folder, "killed")
    assert resumed["counters"] == straight["counters"] and resumed["counters"]["epoch"] == 1  # the 2nd epoch
    assert straight["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    a, b = weights(folder / "straight" / "sft_vlm_64.pth"), weights(folder / "killed" / "sft_vlm_64.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def step_losses(folder: Path, out: str) -> list[float]:
    lines = (folder / out / "sft_vlm_64" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_unpacked_rows_train_like_packed_rows_and_bf16_autocast_stays_close(small_vlm_data):
    """--packing 0 drops the position ids (one sample per right-padded row: plain causal attention is exact), so
    the losses must match packed rows; --cpu_dtype bfloat16 must change them a little, not a lot."""
    flags = ("--batch_size", "4", "--max_steps", "3", "--save_interval", "100")
    for name, extra in (("packed", ()), ("unpacked", ("--packing", "0")),
                        ("bf16", ("--packing", "0", "--cpu_dtype", "bfloat16"))):
        cli.main(vlm_argv(small_vlm_data, name, *flags, *extra))
    packed, unpacked, bf16 = (step_losses(small_vlm_data, name) for name in ("packed", "unpacked", "bf16"))
    assert unpacked == pytest.approx(packed, rel=1e-5)
    assert bf16 != unpacked and bf16 == pytest.approx(unpacked, rel=2e-2)


def test_an_error_in_a_step_ends_the_process_despite_its_data_workers(small_vlm_data, tmp_path):
    """The workers ignore SIGTERM (the main process saves first); an exception in the main process must still
    end the run instead of leaving the interpreter waiting for them at exit."""
    failing = ("import sys; from minimind_v import cli\n"
               "from minimind_v.objectives import causal_lm\n"
               "def fail(*args): raise RuntimeError('forward failed')\n"
               "causal_lm.forward = fail\n"
               "cli.main(sys.argv[1:])")
    argv = vlm_argv(small_vlm_data, "failing", "--batch_size", "4", "--max_steps", "3", "--num_workers", "1")
    run = subprocess_train(argv, launcher=("-c", failing))
    try:
        output = run.communicate(timeout=60)[0]
    finally:
        run.kill()
    assert run.returncode == 1 and "RuntimeError: forward failed" in output


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(small_vlm_data, capsys):
    folder = small_vlm_data
    flags = ("--max_steps", "3", "--save_interval", "100", "--accumulation_steps", "2")
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minimind_v")
    ddp = subprocess_train(vlm_argv(folder, "ddp", *flags, "--batch_size", "2"), launcher=torchrun)
    output = ddp.communicate(timeout=300)[0]
    assert ddp.returncode == 0, output
    cli.main(vlm_argv(folder, "one", *flags, "--batch_size", "4"))
    two, one = resume_state(folder, "ddp"), resume_state(folder, "one")
    assert two["world_size"] == 2 and two["counters"]["samples"] == one["counters"]["samples"]
    # The loss is normalised by the supervised tokens of all processes, so the logged step losses (the
    # token-weighted mean over the global batch) agree to float rounding.
    losses = [[m["loss"] for m in map(json.loads, (folder / run / "sft_vlm_64" / "metrics.jsonl").open())]
              for run in ("ddp", "one")]
    assert len(losses[0]) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(*losses))
    # Weights: only the float summation order differs (other row packing, gradient all-reduce), ~1e-6 relative
    # in the gradients; AdamW's normalised early steps amplify that to at most ~1e-5 here (measured 9e-6),
    # while a weight with a gradient moves by ~1e-3 per step of lr 1e-3. 1e-4 separates the two.
    for key, value in one["model"].items():
        assert torch.allclose(two["model"][key], value, atol=1e-4, rtol=0), key
    capsys.readouterr()
    cli.main(vlm_argv(folder, "ddp", "--max_steps", "4", "--batch_size", "2", "--accumulation_steps", "2",
                      "--from_resume", "1"))
    log = capsys.readouterr().out
    assert "world size x batch x accumulation changed from 2 x 2 x 2 to 1 x 2 x 2: continuing at row 8" in log
    assert resume_state(folder, "ddp")["counters"]["global_step"] == 4


def test_plot_writes_a_loss_curve_from_the_run_metrics(chain, tmp_path):
    from PIL import Image

    out = tmp_path / "curves.png"
    cli.main(["plot", str(chain / "runs" / "llm_64"), str(chain / "runs" / "sft_vlm_64" / "metrics.jsonl"),
              "--out", str(out)])
    assert Image.open(out).size == (960, 720)
    with pytest.raises(SystemExit, match="no metrics at"):
        cli.main(["plot", str(tmp_path / "missing")])


def test_missing_logger_package_is_a_clear_error(chain, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(SystemExit, match=r"--logger wandb needs `pip install wandb`"):
        run_cli(chain, "llm-sft", "--data_path", str(chain / "data" / "sft.jsonl"), "--out_dir", str(tmp_path),
                "--log_dir", str(tmp_path), "--logger", "wandb", "--max_steps", "1", "--from_weight", "none")


def test_missing_default_files_are_named(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = ["--tokenizer", str(chain / "tok")]
    with pytest.raises(SystemExit, match="no data file at 'dataset/sft_t2t_mini.jsonl'. Pass --data_path"):
        cli.main(["train", "llm-sft", "--from_weight", "none", *tokenizer, *TINY])
    with pytest.raises(SystemExit, match="no vision tower at model/siglip2-base-p32-256-ve \\(the default\\)"):
        cli.main(["train", "vlm-pretrain", "--from_weight", "none", *tokenizer, *TINY])
    with pytest.raises(SystemExit, match="no weights at out/llm_64.pth: train the previous stage first"):
        cli.main(["train", "vlm-pretrain", "--vision_model", "random:tiny", *tokenizer, *TINY])


def test_external_logger_gets_the_metrics_and_the_resumed_run_id(chain, tmp_path, monkeypatch):
    calls = []

    class FakeLogger:  # the wandb / swanlab module surface the tracker uses
        @staticmethod
        def init(**kwargs):
            calls.append(("init", kwargs))
            return type("Run", (), {"id": kwargs["id"] or "run-1"})()

        @staticmethod
        def log(metrics, step):
            calls.append(("log", step, sorted(metrics)))

        @staticmethod
        def finish():
            calls.append(("finish",))

    monkeypatch.setitem(sys.modules, "swanlab", FakeLogger)
    flags = ["--data_path", str(chain / "data" / "sft.jsonl"), "--out_dir", str(tmp_path), "--checkpoint_dir",
             str(tmp_path), "--log_dir", str(tmp_path), "--use_wandb", "--from_weight", "none", "--batch_size", "4"]
    run_cli(chain, "llm-sft", *flags, "--max_steps", "2")
    run_cli(chain, "llm-sft", *flags, "--max_steps", "3", "--from_resume", "1")
    assert calls[0][0] == "init" and calls[0][1]["project"] == "MiniMind-Full-SFT" and calls[0][1]["id"] is None
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3]
    assert ("loss" in calls[1][2] and "learning_rate" in calls[1][2])
    assert calls[4][0] == "init" and calls[4][1]["id"] == "run-1" and calls[-1] == ("finish",)


FREE_AND_ALLOCATE_AGAIN = """
import resource, torch
from minimind_v.train import keep_freed_memory
assert keep_freed_memory()

def step():  # a step's activations: allocated in the forward, all freed after the backward
    kept = [torch.ones(32, 82, 448) for _ in range(16)] + [torch.ones(32, 82, 128) for _ in range(40)]
    del kept

step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_activations_are_reused_without_page_faults():
    """CPU training sets glibc's malloc to keep freed blocks: a step's activations, freed and allocated again,
    then cost next to no page faults (glibc's default trims the heap and faults them in again every step)."""
    run = subprocess.run([sys.executable, "-c", FREE_AND_ALLOCATE_AGAIN], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    assert int(run.stdout.split()[-1]) < 2000, run.stdout  # 0 or a few hundred here; glibc's default ~150000
