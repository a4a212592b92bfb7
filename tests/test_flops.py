"""Model FLOPs against a count by hand and against torch's FLOP counter, the device peaks, the training precision
chosen by hardware, and MFU and data stall in a real run's log lines and metrics."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minimind_v import demo, distributed, loop
from minimind_v.config import MiniMindConfig, preset_config
from minimind_v.data import Batch
from minimind_v.flops import StepFlops, Work, batch_work, datasheet_peak, peak_flops
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.loop import training_precision
from minimind_v.lora import add_lora, target_names
from minimind_v.tokenizer import train_tokenizer
from minimind_v.tracking import format_efficiency
from minimind_v.train import train
from minimind_v.train_config import TrainConfig
from minimind_v.vlm import MiniMindVLM
from training_data import text_records, write_jsonl

ROWS, LENGTH, VOCAB = 2, 96, 300


def tiny_vlm() -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(preset_config("tiny", vocab_size=VOCAB)).train()


def train_all(model):
    return model.requires_grad_(True)


def projector_only(model):  # --freeze_llm 2
    model.requires_grad_(False)
    model.vision_proj.requires_grad_(True)
    return model


def first_and_last_blocks(model):  # --freeze_llm 1
    projector_only(model)
    model.model.layers[0].requires_grad_(True)
    model.model.layers[-1].requires_grad_(True)
    return model


def lora_adapters(model):
    model.requires_grad_(False)
    add_lora(model, target_names(model, ["attention", "mlp"]), rank=4, alpha=4)
    return model


def measured_flops(model, pixel_values) -> int:
    """FLOPs torch counts in a forward (logits and cross-entropy on every position) and its backward, with the
    math attention kernel, which runs as matrix products torch can count."""
    torch.manual_seed(1)
    ids = torch.randint(40, VOCAB, (ROWS, LENGTH))
    if pixel_values is not None:
        ids[:, 4 : 4 + model.config.image_token_len] = model.config.image_token_id
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids, pixel_values=pixel_values).logits if pixel_values is not None else model(ids).logits
        F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("freeze", [train_all, projector_only, first_and_last_blocks, lora_adapters])
def test_vlm_formula_matches_the_flop_counter(freeze):
    model = freeze(tiny_vlm())
    images = torch.randn(ROWS, 3, 64, 64)
    # what the kernels run: every row one document attended in full, logits on every position
    kernel_work = Work(
        image=ROWS, projected_image=ROWS, token=ROWS * LENGTH, pair=ROWS * LENGTH**2, logit=ROWS * LENGTH
    )
    assert StepFlops(model)(kernel_work) == pytest.approx(measured_flops(model, images), rel=0.02)


def test_moe_formula_matches_the_flop_counter():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(
        MiniMindConfig(
            hidden_size=64, num_hidden_layers=2, use_moe=True, num_experts=4, num_experts_per_tok=2, vocab_size=VOCAB
        )
    ).train()
    kernel_work = Work(token=ROWS * LENGTH, pair=ROWS * LENGTH**2, logit=ROWS * LENGTH)
    assert StepFlops(model)(kernel_work) == pytest.approx(measured_flops(model, None), rel=0.02)


def test_dense_decoder_rates_by_hand():
    """hidden 64, 8 query and 4 key/value heads of 8, MLP 256, 2 layers, vocabulary 300."""
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB))
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 256  # q, k and v, o, gate, up and down
    attention = 2 * 4 * 8 * 8  # 2 layers x scores and values x heads x head size
    trained = StepFlops(model).rates
    assert trained == {
        "image": 0,
        "projected_image": 0,
        "token": 3 * 2 * 2 * per_layer,
        "pair": 3 * attention,
        "logit": 3 * 2 * 64 * VOCAB,
    }
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # tied: the embedding trains too, so the gradient crosses the decoder
    assert StepFlops(model).rates["token"] == 2 * 2 * 2 * per_layer
    model.lm_head.weight.requires_grad_(False)
    assert StepFlops(model).rates == {
        "image": 0,
        "projected_image": 0,
        "token": 2 * 2 * per_layer,
        "pair": attention,
        "logit": 2 * 64 * VOCAB,
    }
    assert StepFlops(model, frozen=[model]).rates["token"] == 2 * 2 * 2 * per_layer


def test_batch_work_counts_real_tokens_causal_pairs_per_document_and_supervised_positions():
    documents = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]])
    zeros = torch.zeros_like(documents)
    images = [torch.zeros(2, 3, 8, 8), torch.zeros(0, 3, 8, 8)]
    batch = Batch(zeros, zeros, zeros, documents, images, torch.tensor(5), samples=3, real_tokens=9, rows_read=3)
    assert batch_work(batch) == Work(
        image=2, projected_image=2, token=9, pair=3 * 4 // 2 + 2 * 3 // 2 + 4 * 5 // 2, logit=5
    )


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H200", "float16", 989e12),
        ("NVIDIA H200 NVL", "bfloat16", 835e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
        ("NVIDIA A10", "bfloat16", 125e12),
        ("NVIDIA L4", "float32", 30.3e12),
        ("NVIDIA L40S", "bfloat16", 362e12),
        ("NVIDIA GeForce RTX 4090", "bfloat16", 165e12),
        ("NVIDIA GeForce RTX 3090", "float32", 35.6e12),
        ("Tesla V100-SXM2-16GB", "bfloat16", None),
        ("NVIDIA A10G", "bfloat16", None),
        ("Some Future GPU", "bfloat16", None),
    ],
)
def test_gpu_peaks_come_from_the_datasheet_table(name, precision, peak):
    assert datasheet_peak(name, precision) == peak


def test_cpu_peak_is_measured_quickly_once_per_process():
    start = time.perf_counter()
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert time.perf_counter() - start < 1.5
    assert peak_flops(torch.device("cpu"), torch.float32)[0] == peak  # a second timing would differ
    assert peak > 1e9 and source.startswith("measured: 1024x1024 float32 matrix product on ")


@pytest.mark.parametrize(
    ("feature", "requested", "dtype", "line"),
    [
        (
            "AMX",
            "auto",
            torch.bfloat16,
            "precision: bfloat16 autocast on CPU (native bf16: AMX); --cpu_dtype float32 to keep fp32",
        ),
        ("AVX512-BF16", "float32", None, "precision: float32 on CPU (--cpu_dtype float32, native bf16: AVX512-BF16)"),
        (None, "auto", None, "precision: float32 on CPU (no native bf16 (AVX512-BF16 or AMX) here)"),
        (
            None,
            "bfloat16",
            torch.bfloat16,
            "precision: bfloat16 autocast on CPU (--cpu_dtype bfloat16 without native bf16: slower than float32 here)",
        ),
    ],
)
def test_cpu_precision_follows_the_hardware_unless_asked(monkeypatch, feature, requested, dtype, line):
    monkeypatch.setattr(distributed, "cpu_bf16_feature", lambda: feature)
    config = TrainConfig(stage="llm-pretrain", device="cpu", cpu_dtype=requested).resolved()
    assert config.cpu_dtype == str(dtype or torch.float32).removeprefix("torch.")
    assert training_precision(config, cuda=False) == (dtype, line)
    assert demo.default_cpu_dtype() == ("bfloat16" if feature else "float32")


def test_cuda_precision_is_the_dtype_flag():
    config = TrainConfig(stage="llm-pretrain", device="cpu", dtype="float16").resolved()
    assert training_precision(config, cuda=True) == (
        torch.float16,
        "precision: float16 autocast with a GradScaler on CUDA (--dtype float16)",
    )


def test_efficiency_on_the_log_line():
    assert format_efficiency(4.061e10, 0.0312, 0.009) == ", 40.61 GFLOP/s, MFU 3.1%, data stall 0.9%"
    assert format_efficiency(1.2e15, 0.5, 0.0) == ", 1.20 PFLOP/s, MFU 50.0%, data stall 0.0%"
    assert format_efficiency(None, None, 0.25) == ", data stall 25.0%"  # GRPO: no FLOP count


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flops")
    records = text_records(48)
    train_tokenizer([r["text"] for r in records] * 4, str(folder / "tok"), vocab_size=320)
    write_jsonl(folder / "text.jsonl", records)
    return folder


def test_log_lines_and_metrics_report_mfu_and_the_stall_of_a_slow_loader(text_data, monkeypatch, capsys):
    delay = 0.4
    real_loader = loop.loader

    def slow_loader(*args, **kwargs):
        for batch in real_loader(*args, **kwargs):
            time.sleep(delay)
            yield batch

    monkeypatch.setattr(loop, "loader", slow_loader)
    folder = text_data
    train(
        "llm-pretrain",
        data_path=str(folder / "text.jsonl"),
        tokenizer=str(folder / "tok"),
        hidden_size=64,
        num_hidden_layers=2,
        batch_size=8,
        accumulation_steps=1,
        max_seq_len=64,
        max_steps=4,
        log_interval=2,
        num_workers=0,
        num_threads=1,
        device="cpu",
        cpu_dtype="float32",
        from_weight="none",
        out_dir=str(folder / "out"),
        checkpoint_dir=str(folder / "ckpt"),
        log_dir=str(folder / "runs"),
    )
    out = capsys.readouterr().out
    assert "precision: float32 on CPU (" in out and "MFU against a peak of " in out
    lines = [line for line in out.splitlines() if line.startswith("Epoch:")]
    assert len(lines) == 2 and all(", MFU " in line and ", data stall " in line for line in lines)
    metrics = [json.loads(line) for line in (folder / "runs" / "pretrain_64" / "metrics.jsonl").open()]
    for record in metrics:
        assert record["flops_per_s"] > 0 and 0 < record["mfu"] < 1
        assert delay / record["step_seconds"] - 0.05 < record["data_stall"] <= 1
