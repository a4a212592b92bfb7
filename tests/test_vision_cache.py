"""The frozen tower's feature cache (`--vision_cache`): cached features train exactly like the tower (misses in the
first epoch, hits in the second, with and without DataLoader workers, for SFT and DPO), hits neither decode nor
encode, a changed tower or preprocessing reads nothing stale, concurrent writers and readers never see a torn
record, the size bound, and the runs that switch it off."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from minimind_v import cli, samples
from minimind_v.checkpoint import load_resume
from minimind_v.config import preset_config
from minimind_v.vision import ImagePreprocessor
from minimind_v.vision_cache import (
    FeatureReader,
    FeatureWriter,
    open_cache,
    preprocessing_salt,
    tower_fingerprint,
    unusable_reason,
)
from minimind_v.vlm import MiniMindVLM
from training_data import COLOURS, SHAPES, conversation, image_bytes, write_all, write_parquet

MODEL = ["--hidden_size", "64", "--num_hidden_layers", "2", "--device", "cpu", "--num_threads", "1"]
DATA = ["--add_system_ratio", "0", "--max_seq_len", "160", "--batch_size", "4", "--max_bad_fraction", "0.5"]
TINY = [*MODEL, *DATA, "--log_interval", "1", "--save_interval", "1000", "--learning_rate", "1e-3"]
IMAGE_ROWS = 12  # rows whose image is used, each a different image
BAD_IMAGES = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tokenizer, an SFT parquet (images, text-only rows, two undecodable images) and a DPO parquet."""
    folder = tmp_path_factory.mktemp("vision_cache")
    files = write_all(folder / "text", rows=32)
    texts = [str(files["pretrain"]), str(files["sft"])]
    cli.main(["train-tokenizer", "--data_path", *texts, "--out_dir", str(folder / "tok"), "--vocab_size", "400"])
    question = json.dumps(conversation("<image>\nWhat is it?", "A shape."))
    rows = [
        {"conversations": question, "image_bytes": image_bytes(colour, shape, "JPEG", size=48 + 8 * i)}
        for i, (colour, shape) in enumerate(zip(list(COLOURS) * 3, SHAPES * 6))
    ]
    rows += [{"conversations": json.dumps(conversation("Say hello.", "Hello!")), "image_bytes": b""}] * 3
    rows += [
        {"conversations": question, "image_bytes": data}
        for data in (b"not an image", image_bytes("red", "circle")[:40])
    ]
    write_parquet(folder / "vlm.parquet", rows, row_group_size=4)
    pairs = [
        {
            "chosen": json.dumps(conversation("<image>\nWhat colour?", colour)),
            "rejected": json.dumps(conversation("<image>\nWhat colour?", "I cannot tell.")),
            "image_bytes": image_bytes(colour, shape, "JPEG"),
        }
        for colour in COLOURS
        for shape in SHAPES
    ]
    pq.write_table(
        pa.table({key: [row[key] for row in pairs] for key in pairs[0]}), folder / "dpo.parquet", row_group_size=4
    )
    return folder


def run_flags(folder: Path, out: str) -> list[str]:
    """A tiny vlm-sft run from zero with a random frozen tower, logged in folder/out."""
    paths = {
        "--data_path": "vlm.parquet",
        "--tokenizer": "tok",
        "--out_dir": out,
        "--checkpoint_dir": out,
        "--log_dir": out,
    }
    flags = [item for flag, path in paths.items() for item in (flag, str(folder / path))]
    return [*flags, "--from_weight", "none", "--vision_model", "random:tiny", *TINY]


def train(folder: Path, out: str, stage: str = "vlm-sft", *flags: str) -> dict:
    """Two epochs of a tiny run from the CLI in folder/out: its step losses, summary and trained weights. vlm-sft
    trains the whole decoder from zero; vlm-dpo starts from the SFT weights of folder/plain and writes there."""
    argv = ["train", stage, *run_flags(folder, out), "--freeze_llm", "0", "--epochs", "2", "--num_workers", "0"]
    if stage == "vlm-dpo":
        sft = folder / "plain"
        argv += ["--data_path", str(folder / "dpo.parquet"), "--from_weight", "sft_vlm", "--save_weight", out]
        argv += ["--vision_model", str(sft / "sft_vlm_64_vision"), "--out_dir", str(sft)]
    cli.main([*argv, *flags])
    name = "sft_vlm" if stage == "vlm-sft" else out
    run = folder / out / f"{name}_64"
    return {
        "losses": [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()],
        "summary": json.loads((run / "summary.json").read_text()),
        "model": load_resume(str(folder / out / f"{name}_64_resume.pth"))["model"],
    }


def assert_same_training(run: dict, reference: dict) -> None:
    assert run["losses"] == reference["losses"]
    assert run["summary"]["bad_rows"] == reference["summary"]["bad_rows"]
    assert run["model"].keys() == reference["model"].keys()
    assert all(torch.equal(run["model"][k], reference["model"][k]) for k in reference["model"])


class Counted:
    """Wraps a function to count its calls, or the images of its first argument (`images=True`)."""

    def __init__(self, function, images: bool = False):
        self.function, self.images, self.count = function, images, 0

    def __call__(self, *args, **kwargs):
        self.count += len(args[1]) if self.images else 1
        return self.function(*args, **kwargs)


@pytest.fixture(scope="module")
def plain(folder) -> dict:
    return train(folder, "plain")


def test_cached_features_train_exactly_like_the_tower_and_hits_skip_decoding_and_the_tower(folder, plain, monkeypatch):
    assert plain["summary"]["bad_rows"]["bad_image"] == 2 * BAD_IMAGES
    cache = str(folder / "cache")
    tower = Counted(MiniMindVLM.encode_images, images=True)
    decode = Counted(samples.load_image)
    monkeypatch.setattr(MiniMindVLM, "encode_images", lambda *args: tower(*args))
    monkeypatch.setattr(samples, "load_image", decode)
    filling = train(folder, "filling", "vlm-sft", "--vision_cache", cache)  # epoch 1 misses, epoch 2 hits
    assert_same_training(filling, plain)
    assert tower.count == IMAGE_ROWS and decode.count == 2 * BAD_IMAGES + IMAGE_ROWS
    tower.count = decode.count = 0
    reading = train(folder, "reading", "vlm-sft", "--vision_cache", cache)  # hits only
    assert_same_training(reading, plain)
    assert tower.count == 0 and decode.count == 2 * BAD_IMAGES  # bad images are still decoded and skipped


def test_data_workers_read_what_the_training_process_writes(folder, plain):
    workers = train(folder, "workers", "vlm-sft", "--vision_cache", str(folder / "workers_cache"), "--num_workers", "2")
    assert_same_training(workers, plain)


def test_preference_pairs_train_exactly_like_the_tower(folder, plain, capsys):
    reference = train(folder, "dpo", "vlm-dpo")
    cached = train(folder, "dpo_cached", "vlm-dpo", "--vision_cache", str(folder / "dpo_cache"))
    assert_same_training(cached, reference)
    assert "holds 0 images" in capsys.readouterr().out
    (tower_folder,) = (folder / "dpo_cache").iterdir()
    index_bytes = sum(path.stat().st_size for path in tower_folder.glob("*.index"))
    assert index_bytes == 32 * len(COLOURS) * len(SHAPES)  # each image once, though each pair holds it twice


def test_a_full_cache_adds_nothing_and_training_goes_on(folder, plain, capsys):
    cache = folder / "tiny_cache"
    full = train(folder, "full", "vlm-sft", "--vision_cache", str(cache), "--vision_cache_gb", "1e-6")
    assert_same_training(full, plain)
    assert "vision cache: adding no more features, it holds 1e-06 GB" in capsys.readouterr().out
    assert not list(cache.glob("*/*.features"))


@pytest.mark.parametrize("flags", [("--train_vision", "1"), ("--lora_rank", "2", "--lora_targets", "vision")])
def test_a_changing_tower_switches_the_cache_off(folder, flags, capsys):
    cache = ["--vision_cache", str(folder / "off_cache")]
    cli.main(["train", "vlm-sft", *run_flags(folder, "off"), "--max_steps", "1", "--num_workers", "0", *cache, *flags])
    assert "--vision_cache is off: the vision tower trains" in capsys.readouterr().out
    assert not (folder / "off_cache").exists()


def test_runs_whose_features_do_not_come_from_this_frozen_tower_alone_keep_it_off():
    assert unusable_reason(vision=True, objective="causal_lm", tower_trains=False) is None
    assert unusable_reason(vision=True, objective="dpo", tower_trains=False) is None
    assert "reads no images" in unusable_reason(vision=False, objective="causal_lm", tower_trains=False)
    assert "own tower" in unusable_reason(vision=True, objective="distill", tower_trains=False)
    assert "generate" in unusable_reason(vision=True, objective="grpo", tower_trains=False)


def tiny_tower():
    torch.manual_seed(0)
    return MiniMindVLM(preset_config("tiny", vocab_size=400)).vision_encoder


def test_the_folder_follows_the_tower_and_the_key_follows_the_preprocessing(tmp_path):
    tower, fp32 = tiny_tower(), {"device": "cpu", "autocast": "float32"}
    fingerprint = tower_fingerprint(tower, fp32)
    assert tower_fingerprint(tiny_tower(), fp32) == fingerprint
    assert tower_fingerprint(tower, {"device": "cpu", "autocast": "bfloat16"}) != fingerprint
    with torch.no_grad():
        tower.post_layernorm.bias[0] += 1e-6
    assert tower_fingerprint(tower, fp32) != fingerprint
    image = [image_bytes("red", "circle")]
    keys = FeatureReader(str(tmp_path), preprocessing_salt(ImagePreprocessor(64))).keys(image)
    assert keys.shape == (1, 16)
    other = FeatureReader(str(tmp_path), preprocessing_salt(ImagePreprocessor(64, mean=(0.4, 0.5, 0.5))))
    assert not np.array_equal(other.keys(image), keys)


def test_features_read_back_bit_exact_and_a_torn_record_is_a_miss(tmp_path):
    preprocessor = ImagePreprocessor(64)
    options = {"device_type": "cpu", "autocast": "float32", "limit_bytes": 10**9, "log": print}
    cache = open_cache(root=str(tmp_path), tower=tiny_tower(), preprocessor=preprocessor, **options)
    images = [image_bytes(colour, "square") for colour in COLOURS]
    features = torch.randn(len(images), 64, 32).to(torch.bfloat16)
    assert not cache.reader.lookup(images).hit.any()
    cache.writer.add(cache.reader.keys(images[:3]), features[:3])
    found = cache.reader.lookup(images)
    assert found.hit.tolist() == [True, True, True, False]
    assert found.features.dtype == torch.bfloat16 and torch.equal(found.features, features[:3])
    (data,) = Path(cache.folder).glob("*.features")
    with open(data, "r+b") as f:  # the last record, torn
        f.seek(data.stat().st_size - 1)
        f.write(b"\x00\x01")  # its last byte changed, and a byte of the next record written
    fresh = FeatureReader(cache.folder, preprocessing_salt(preprocessor)).lookup(images)
    assert fresh.hit.sum() == 2 and torch.equal(fresh.features, features[:3][fresh.hit[:3]])


IMAGES = [f"image {i}".encode() for i in range(120)]  # stand-ins for encoded images


def write_features(folder: str, indices: range, start: float) -> None:
    """One writer process: image i's features are filled with i (what any writer computes for it)."""
    keys, writer = FeatureReader(folder, b"").keys(IMAGES), FeatureWriter(folder, 10**9, print)
    while time.time() < start:
        time.sleep(0.001)
    for i in indices:
        writer.add(keys[i : i + 1], torch.full((1, 64, 32), float(i)))


def read_features(folder: str, start: float, errors) -> None:
    """One reader process: looks the images up until all are found; any hit must hold that image's features."""
    reader = FeatureReader(folder, b"")
    while time.time() < start:
        time.sleep(0.001)
    missing = np.arange(len(IMAGES))
    while len(missing):
        found = reader.lookup([IMAGES[i] for i in missing])
        expected = torch.from_numpy(missing[found.hit]).float()[:, None, None].expand(-1, 64, 32)
        if found.features is not None and not torch.equal(found.features, expected):
            errors.put("a hit returned another image's or incomplete features")
            return
        missing = missing[~found.hit]


def test_concurrent_writers_and_readers_never_read_a_torn_record(tmp_path):
    folder = str(tmp_path / "tower")
    os.makedirs(folder)
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    start = time.time() + 1
    parts = [range(0, 120, 2), range(1, 120, 2), range(0, 120, 3)]  # the third overlaps the others
    writers = [context.Process(target=write_features, args=(folder, part, start)) for part in parts]
    readers = [context.Process(target=read_features, args=(folder, start, errors)) for _ in range(2)]
    for process in writers + readers:
        process.start()
    for process in writers + readers:
        process.join(timeout=120)
    assert all(process.exitcode == 0 for process in writers + readers)
    assert errors.empty()
    assert len(list(Path(folder).glob("*.features"))) == 3  # one file per writer


@pytest.mark.slow
def test_two_processes_share_the_cache_and_train_exactly_like_the_tower(folder):
    """Each process writes its own files and, in the second epoch, reads the images the other one wrote."""
    runs = {}
    for name, flags in (("ddp", ()), ("ddp_cached", ("--vision_cache", str(folder / "ddp_cache")))):
        argv = ["train", "vlm-sft", *run_flags(folder, name), "--freeze_llm", "0", "--epochs", "2", "--batch_size", "2"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command = [*torchrun, "-m", "minimind_v", *argv, "--num_workers", "1", *flags]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = load_resume(str(folder / name / "sft_vlm_64_resume.pth"))["model"]
    assert all(torch.equal(runs["ddp"][k], runs["ddp_cached"][k]) for k in runs["ddp"])
    # The second epoch orders the rows anew, so each process reads images that the other one wrote: no miss.
    index_files = list((folder / "ddp_cache").glob("*/*.index"))
    assert len(index_files) == 2 and sum(path.stat().st_size for path in index_files) == 32 * IMAGE_ROWS
