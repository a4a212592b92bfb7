"""Faults during training: a SIGKILL at any moment (inside checkpoint writes too) resumes to bit-identical weights, a
failed write (full disk, file size limit) stops the run with the previous checkpoint intact, and broken data files
are used as far as they can be read, the rest counted by reason."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from minimind_v import cli, loop, trainer
from minimind_v.checkpoint import load_resume
from minimind_v.data import DataConfig, TrainingData, index_chunks, loader
from minimind_v.tracking import Tracker
from minimind_v.weights import recover_folder, replace_folder, tower_for_weights
from training_data import sft_records, write_jsonl

FLAGS = ("--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu", "--num_threads", "1",
         "--add_system_ratio", "0", "--log_interval", "1", "--save_interval", "1", "--batch_size", "4",
         "--max_seq_len", "64", "--from_weight", "none", "--learning_rate", "1e-3",
         "--cpu_dtype", "float32")  # exact resume: bf16 autocast is the default on CPUs with native bf16
STEPS = 12  # 32 rows in batches of 4: 8 steps per epoch, so the runs cross an epoch boundary
FILES = ("llm_64.pth", "llm_64_resume.pth")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    tiny_tokenizer.save_pretrained(folder / "tok")
    write_jsonl(folder / "sft.jsonl", sft_records(32))
    return folder


def argv(folder: Path, out: str, *extra: str, steps: int = STEPS, data: str = "sft.jsonl") -> list[str]:
    """A tiny llm-sft run from scratch writing everything into folder/out."""
    return ["train", "llm-sft", "--data_path", str(folder / data), "--tokenizer", str(folder / "tok"),
            "--out_dir", str(folder / out), "--checkpoint_dir", str(folder / out), "--log_dir", str(folder / out),
            "--max_steps", str(steps), "--num_workers", "0", *FLAGS, *extra]


def digests(out: Path) -> tuple[str | None, str | None]:
    """sha256 of the weight file's bytes and of the resume file's content (None: absent). Not of the resume file's
    bytes: after a resume the optimizer's key strings come from unpickling, so pickle's memo of repeated strings
    encodes the same content differently."""
    weights, resume = (out / name for name in FILES)
    return (hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None,
            hashlib.sha256(canonical(load_resume(str(resume)))).hexdigest() if resume.exists() else None)


def canonical(value) -> bytes:
    """The content of a resume state as bytes: tensors by dtype, shape and data; everything else by repr."""
    if isinstance(value, torch.Tensor):
        return repr((value.dtype, tuple(value.shape))).encode() + value.contiguous().numpy().tobytes()
    if isinstance(value, dict):
        return b"{" + b",".join(canonical(k) + b":" + canonical(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(map(canonical, value)) + b"]"
    return repr(value).encode()


def straight_run(folder: Path, out: str, *extra: str, steps: int = STEPS, keep: int = 0) -> dict[int, tuple]:
    """The uninterrupted run; returns the digests of its files after every save, by step. A copy of its folder
    after step `keep` goes to `{out}-{keep}`."""
    saves = {}
    save = trainer.Trainer.save

    def recording(self, streak):
        save(self, streak)
        saves[self.state.global_step] = digests(folder / out)
        if self.state.global_step == keep:
            shutil.copytree(folder / out, folder / f"{out}-{keep}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.Trainer, "save", recording)
        cli.main(argv(folder, out, *extra, steps=steps))
    return saves


@pytest.fixture(scope="module")
def straight(workspace) -> dict[int, tuple]:
    return straight_run(workspace, "straight", keep=2)


# ----------------------------------------------------------------------------------------------------------
# SIGKILL


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kind: str, at: int) -> None:
    """Make this (forked) process SIGKILL itself: right after its `at`-th optimizer step ("step"), once torch.save
    wrote `at` bytes of its checkpoint files ("byte", so inside a write), or just before / after its `at`-th
    os.replace ("rename": a complete temporary file not yet renamed, or a folder swap half done; "renamed")."""
    count = itertools.count(1)
    if kind == "step":
        step = loop.Loop._optimizer_step

        def stepping(self, group):
            step(self, group)
            if next(count) == at:
                die()

        loop.Loop._optimizer_step = stepping
    elif kind == "byte":
        save, written = torch.save, [0]

        class Dying:
            def __init__(self, file):
                self.file = file

            def write(self, data) -> int:
                data = memoryview(data).cast("B")
                if written[0] + len(data) >= at:
                    self.file.write(data[: at - written[0]])
                    self.file.flush()
                    die()
                written[0] += len(data)
                return self.file.write(data)

            def flush(self) -> None:
                self.file.flush()

        torch.save = lambda obj, file: save(obj, Dying(file))
    else:
        replace = os.replace

        def replacing(src, dst):
            n = next(count)
            if (n, kind) == (at, "rename"):
                die()
            replace(src, dst)
            if (n, kind) == (at, "renamed"):
                die()

        os.replace = replacing


def in_child(target, *args) -> int:
    """Run target(*args) in a forked process (no interpreter start-up); its exit code."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    deadline = time.monotonic() + 300
    # Polled, not join(timeout): that waits for a pipe which the child's DataLoader workers also hold open, and
    # orphaned workers take seconds to notice that their parent is gone.
    while child.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if child.exitcode is None:
        child.kill()
        child.join()
    return child.exitcode


def train_killed(arguments: list[str], kind: str, at: int) -> None:
    arm(kind, at)
    cli.main(arguments)


def kill_chain(folder: Path, straight: dict[int, tuple], out: str, points: list[tuple[str, int]],
               *extra: str, steps: int = STEPS) -> list[dict]:
    """Kill a run at each point in turn (every run resuming the previous one), check the files each kill left, then
    finish in this process: the weights must be the uninterrupted run's byte for byte, the resume state value for
    value. One figure per kill."""
    figures = []
    for kind, at in points:
        code = in_child(train_killed, argv(folder, out, "--from_resume", "1", *extra, steps=steps), kind, at)
        assert code == -signal.SIGKILL, f"kill point {kind} {at} not reached (exit code {code})"
        figures.append({"kill": f"{kind} {at}", **left_intact(folder / out, straight)})
    cli.main(argv(folder, out, "--from_resume", "1", *extra, steps=steps))
    assert digests(folder / out) == straight[steps]
    assert not [p.name for p in (folder / out).iterdir() if p.name.endswith((".tmp", ".old"))]
    return figures


def left_intact(out: Path, straight: dict[int, tuple]) -> dict:
    """After a kill the resume file holds the uninterrupted run's state at some step, value for value, and the weight
    file is that save's or, when the kill fell between the two files of a save, the next one's, byte for byte."""
    resume = out / FILES[1]
    step = load_resume(str(resume))["counters"]["global_step"] if resume.exists() else 0
    weights, resume_digest = digests(out)
    assert resume_digest == straight.get(step, (None, None))[1]
    assert weights in {straight.get(step, (None,))[0], straight.get(step + 1, (None,))[0]}
    return {"resumes at step": step, "weights of step": step if weights == straight.get(step, (None,))[0] else step + 1}


def step_losses(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (out / "llm_64" / "metrics.jsonl").open())]


def test_sigkill_inside_writes_and_between_steps_resumes_bit_identical(workspace, straight):
    sizes = [(workspace / "straight" / name).stat().st_size for name in FILES]
    save = sum(sizes)
    points = [("byte", save + sizes[0] // 2),  # inside the weight file of the 2nd save
              ("renamed", 4),  # the 3rd save of the next run: weights renamed, resume file not yet written
              ("byte", 2 * save + sizes[0] + sizes[1] // 2),  # inside the resume file of the 3rd save
              ("step", 3)]  # after a step, before its save
    figures = kill_chain(workspace, straight, "killed", points)
    assert [(f["resumes at step"], f["weights of step"]) for f in figures] == [(1, 1), (2, 3), (4, 5), (6, 6)]
    assert step_losses(workspace / "killed") == step_losses(workspace / "straight")  # every step logged once


@pytest.mark.slow
def test_sigkill_at_ten_random_points_resumes_bit_identical(workspace):
    """Kill points drawn at random (seeded) over steps, bytes of checkpoint writes and renames, with a DataLoader
    worker; prints (with -s) the figures quoted in docs/robustness_training.md."""
    steps, extra = 40, ("--num_workers", "1", "--epochs", "5")
    straight = straight_run(workspace, "straight-workers", *extra, steps=steps)
    out = workspace / "straight-workers"
    save = sum((out / name).stat().st_size for name in FILES)
    rng = random.Random(0)
    draws = {"step": lambda: rng.randint(1, 4), "byte": lambda: rng.randint(1, 3 * save),
             "rename": lambda: rng.randint(1, 7), "renamed": lambda: rng.randint(1, 7)}
    points = [(kind, draws[kind]()) for kind in (rng.choice(sorted(draws)) for _ in range(10))]
    figures = kill_chain(workspace, straight, "killed-workers", points, *extra, steps=steps)
    print("\nkill point: the resume state and weight file left (both the uninterrupted run's at that step)")
    for figure in figures:
        print(f"  {figure['kill']:>14}: resume step {figure['resumes at step']}, weights of step "
              f"{figure['weights of step']}")
    print(f"final weights and resume state after {len(points)} kills: identical ({digests(out)[0][:16]}...)")


def test_a_kill_between_the_renames_of_a_folder_swap_keeps_the_previous_folder(tmp_path):
    folder = tmp_path / "pretrain_vlm_64_vision"

    def write(content: str):
        return lambda staging: Path(staging, "model.safetensors").write_text(content)

    def swap_killed() -> None:
        arm("rename", 2)  # the new folder is complete, the previous one renamed to .old, the new one not yet in place
        replace_folder(str(folder), write("new"))

    replace_folder(str(folder), write("previous"))
    assert in_child(swap_killed) == -signal.SIGKILL
    old = tmp_path / (folder.name + ".old")
    assert not folder.exists() and (old / "model.safetensors").read_text() == "previous"
    assert tower_for_weights(str(tmp_path), "pretrain_vlm", 64, False) == str(old)  # readers find it meanwhile
    recover_folder(str(folder))
    assert (folder / "model.safetensors").read_text() == "previous" and not old.exists()
    assert in_child(swap_killed) == -signal.SIGKILL
    replace_folder(str(folder), write("next"))  # the next save puts the previous folder back, then swaps
    assert (folder / "model.safetensors").read_text() == "next" and [p.name for p in tmp_path.iterdir()] == [
        folder.name]


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    Tracker(str(tmp_path), "none", "project", "run", {}, resume_step=2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ----------------------------------------------------------------------------------------------------------
# Failed writes


@pytest.mark.parametrize("failing", [0, 1], ids=FILES)
def test_a_full_disk_during_a_save_stops_the_run_and_keeps_the_previous_files(workspace, straight, failing,
                                                                               monkeypatch):
    out = f"full-{failing}"
    save, calls = torch.save, itertools.count()

    def filling(obj, file):  # every save writes the weights then the resume file; the 3rd save runs out of space
        if next(calls) != 4 + failing:
            return save(obj, file)
        file.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", filling)
    with pytest.raises(SystemExit, match=rf"saving at step 3 failed: \[Errno 28\] No space left on device: "
                                         rf"'[^']*{FILES[failing]}'\. Nothing is half-written"):
        cli.main(argv(workspace, out))
    expected = (straight[3][0] if failing else straight[2][0], straight[2][1])
    assert digests(workspace / out) == expected and not list((workspace / out).glob("*.tmp"))
    monkeypatch.undo()
    cli.main(argv(workspace, out, "--from_resume", "1"))
    assert digests(workspace / out) == straight[STEPS]


def train_with_file_limit(arguments: list[str], limit: int, message: str) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the child's output must not hit the limit)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        cli.main(arguments)
    except SystemExit as stop:
        Path(message).write_text(str(stop))
        raise


@pytest.mark.parametrize("failing", [0, 1], ids=FILES)
def test_a_file_size_limit_fails_the_write_and_keeps_the_previous_files(workspace, straight, failing):
    """A real failed write(2) (EFBIG under RLIMIT_FSIZE), which torch.save reports as a RuntimeError, in a run
    resumed from step 2 of the uninterrupted one."""
    out = workspace / f"limit-{failing}"
    shutil.copytree(workspace / "straight-2", out)
    weights, resume = ((out / name).stat().st_size for name in FILES)
    assert weights < resume
    limit = weights // 2 if failing == 0 else (weights + resume) // 2
    code = in_child(train_with_file_limit, argv(workspace, out.name, "--from_resume", "1"), limit,
                    str(out.parent / f"{out.name}.txt"))
    message = (out.parent / f"{out.name}.txt").read_text()
    assert code == 1 and f"saving at step 3 failed: [Errno 27] File too large: '{out / FILES[failing]}'" in message
    assert digests(out) == (straight[3][0] if failing else straight[2][0], straight[2][1])


# ----------------------------------------------------------------------------------------------------------
# Broken data files


def conversation_parquet(path: Path, rows: int, row_group_size: int) -> Path:
    conversations = [json.dumps(r["conversations"]) for r in sft_records(rows)]
    pq.write_table(pa.table({"conversations": conversations}), path, row_group_size=row_group_size)
    return path


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the page header at the start of a row group's column chunk."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 16)


def epoch_counts(data: TrainingData) -> tuple[int, int, dict]:
    """Rows read, samples and bad rows by reason of an epoch, in micro-batches of 4 rows."""
    batches = list(loader(data.epoch(0, 0, 4), num_workers=0, pin_memory=False))
    return (sum(b.rows_read for b in batches), sum(b.samples for b in batches),
            dict(sum((b.bad for b in batches), start=Counter())))


def test_a_corrupt_row_group_is_counted_and_the_other_row_groups_train(workspace):
    path = conversation_parquet(workspace / "corrupt.parquet", rows=32, row_group_size=4)
    corrupt_row_group(path, 5)
    with pytest.raises(SystemExit, match=r"4 of 32 rows read \(12.5%\) were unusable, more than --max_bad_fraction "
                                         r"0.05: unreadable_row_group: 4"):
        cli.main(argv(workspace, "corrupt", data="corrupt.parquet"))  # stopped at the end of the epoch
    cli.main(argv(workspace, "corrupt-workers", "--max_bad_fraction", "0.2", "--num_workers", "2", steps=8,
                  data="corrupt.parquet"))
    stopped, done = ([json.loads(line) for line in (workspace / name / "llm_64" / "metrics.jsonl").open()]
                     for name in ("corrupt", "corrupt-workers"))
    counts = [m["bad_rows_by_reason"].get("unreadable_row_group", 0) for m in done]
    assert counts[:7] == [m["bad_rows_by_reason"].get("unreadable_row_group", 0) for m in stopped]
    assert counts[-1] == 4 and counts == sorted(counts) and [m["bad_rows"] for m in done] == counts
    summary = json.loads((workspace / "corrupt-workers" / "llm_64" / "summary.json").read_text())
    assert summary["samples"] == 28 and summary["bad_rows"]["unreadable_row_group"] == 4


def test_bad_rows_by_reason_are_in_the_log_lines_and_metrics(workspace, capsys):
    lines = [json.dumps(r) for r in sft_records(8)] + ['{"conversations": [{"role": "user", "conte']
    (workspace / "cut.jsonl").write_text("\n".join(lines))  # the last line is cut, without its newline
    cli.main(argv(workspace, "cut", "--max_bad_fraction", "0.2", "--batch_size", "3", steps=3, data="cut.jsonl"))
    log = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch:")]
    assert len(log) == 3 and log[-1].endswith(", bad rows 1 (truncated_file 1)")
    metrics = [json.loads(line) for line in (workspace / "cut" / "llm_64" / "metrics.jsonl").open()]
    assert metrics[-1]["bad_rows_by_reason"] == {"truncated_file": 1} and metrics[-1]["bad_rows"] == 1


def test_a_jsonl_file_cut_short_after_indexing_counts_its_lost_lines(workspace, tiny_tokenizer):
    lines = [(json.dumps(r) + "\n").encode() for r in sft_records(12)]
    path = workspace / "shrinking.jsonl"
    path.write_bytes(b"".join(lines))
    data = TrainingData(DataConfig(paths=[str(path)], kind="chat", max_seq_len=64, add_system_ratio=0),
                        tiny_tokenizer)
    path.write_bytes(b"".join(lines[:9]) + lines[9][:10])  # the copy being read was cut inside line 10
    assert epoch_counts(data) == (12, 9, {"truncated_file": 3})


def test_a_parquet_file_without_its_footer_is_named_with_the_reason(workspace):
    healthy = conversation_parquet(workspace / "healthy.parquet", rows=8, row_group_size=4)
    content = healthy.read_bytes()
    cut = workspace / "cut.parquet"
    cut.write_bytes(content[: len(content) // 2])
    config = DataConfig(paths=[str(healthy), str(cut), str(cut)], kind="chat", max_seq_len=64)
    named = re.escape(str(cut)) + r" \(Parquet magic bytes not found in footer"
    with pytest.raises(ValueError, match=rf"cannot read the footer of {named}.*; {named}.*\. A parquet file locates "
                                         r"its rows from its footer.*a truncated file \(an interrupted download"):
        index_chunks(config)
    with pytest.raises(SystemExit, match="cannot read the footer of"):
        cli.main(argv(workspace, "footer", data="cut.parquet"))
