"""Model FLOPs of training steps and the peak FLOP/s of the device. MFU (model FLOPs utilisation) is the model FLOPs
of some steps divided by their wall time, divided by the peak.

Model FLOPs count what the model needs, not what the kernels happen to run:
* matrix products only, 2 FLOPs per multiply-add: the linear layers, the patch embedding, attention's scores and
  weighted values; norms, activations, softmax, RoPE and the loss are left out;
* the decoder on the real tokens (padding is waste, not work), and its attention on the query-key pairs causal
  attention inside each document needs: n (n + 1) / 2 for a document of n tokens, 4 x heads x head size each;
* the output layer on the supervised positions, the only logits a loss reads;
* the vision tower on each image it encodes (not those whose features come from a vision cache): the patch
  embedding and every layer on each patch, attention between all its patches; the projector on each visual token;
* a MoE layer's router, and top-k of its experts per token; a LoRA adapter of rank r on a layer of `in` inputs and
  `out` outputs adds 2 r (in + out) per token;
* the backward, product by product: the gradient of its input (1x its forward) when anything before it in the
  graph trains, plus the gradient of its weight (1x) when that weight trains. Attention's products multiply two
  activations, so a gradient through them costs 2x. A fully trained model costs 3x its forward, frozen layers after
  a trained one 2x (forward and input gradient), frozen layers before any trained one 1x (forward only).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from .data import Batch
from .llm import MiniMindBlock, MOEFeedForward

MATMUL_SIZE = 1024  # side of the square matrices timed for a measured peak
MEASURE_SECONDS = 0.2  # time spent timing them (at least two products)

# Dense (no sparsity) peaks in TFLOP/s from NVIDIA's datasheets, by precision: the autocast dtype, tf32 for a float32
# run with TF32 matmuls allowed, else float32. The first pattern found in torch.cuda.get_device_name gives the row.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H[12]00 NVL", {"bfloat16": 835, "float16": 835, "tf32": 418, "float32": 60}),
    (r"H100 PCIe", {"bfloat16": 756, "float16": 756, "tf32": 378, "float32": 51}),
    (r"H100|H200", {"bfloat16": 989, "float16": 989, "tf32": 495, "float32": 67}),
    (r"A100", {"bfloat16": 312, "float16": 312, "tf32": 156, "float32": 19.5}),
    (r"L40S", {"bfloat16": 362, "float16": 362, "tf32": 183, "float32": 91.6}),
    (r"\bL4\b", {"bfloat16": 121, "float16": 121, "tf32": 60, "float32": 30.3}),
    (r"\bA10\b", {"bfloat16": 125, "float16": 125, "tf32": 62.5, "float32": 31.2}),
    (r"RTX 4090", {"bfloat16": 165, "float16": 165, "tf32": 82.6, "float32": 82.6}),
    (r"RTX 3090", {"bfloat16": 71, "float16": 71, "tf32": 35.6, "float32": 35.6}),
    (r"V100", {"float16": 125, "float32": 15.7}),
    (r"\bT4\b", {"float16": 65, "float32": 8.1}),
)


@dataclass(frozen=True)
class Work:
    """What micro-batches run through a model: images through the tower, images through the projector (also those
    whose tower features come from a vision cache), real decoder tokens, query-key pairs of causal attention inside
    the documents, and supervised positions (where the output layer runs)."""

    image: int = 0
    projected_image: int = 0
    token: int = 0
    pair: int = 0
    logit: int = 0


UNITS = tuple(f.name for f in fields(Work))


def batch_work(batch: Batch) -> Work:
    """The work of one micro-batch, counted on the host from its CPU tensors (no device sync)."""
    lengths = torch.bincount(batch.documents[batch.documents >= 0])  # tokens of each document
    images = sum(len(row) for row in batch.pixel_values) if batch.pixel_values else 0
    projected = sum(batch.lookup.row_counts) if batch.lookup is not None else images
    pairs = int((lengths * (lengths + 1)).sum()) // 2
    return Work(images, projected, batch.real_tokens, pairs, int(batch.targets))


@dataclass(frozen=True)
class Product:
    """Matrix products of the forward pass: `flops` forward FLOPs per `unit` (a field of `Work`); `trains`: their
    weight gets a gradient; `weightless`: both operands are activations (attention)."""

    unit: str
    flops: float
    trains: bool = False
    weightless: bool = False

    def backward(self, upstream_trains: bool) -> float:
        """Backward FLOPs per unit, when something before it in the graph trains or not."""
        inputs = (2 if self.weightless else 1) if upstream_trains else 0
        return self.flops * (inputs + self.trains)


Stage = list[Product]  # products that read the same input


def linears(unit: str, *layers: nn.Linear, times: float = 1) -> Stage:
    """Linear layers reading the same input, each run `times` per unit, with their LoRA adapters (each counted as
    one trained product: the input gradient of B, which A's weight gradient needs, is left out, a few per mille)."""
    stage = []
    for layer in layers:
        stage.append(Product(unit, 2 * times * layer.in_features * layer.out_features, layer.weight.requires_grad))
        adapter = getattr(layer, "lora", None)
        if adapter is not None:
            flops = 2 * times * adapter.rank * (layer.in_features + layer.out_features)
            stage.append(Product(unit, flops, adapter.A.weight.requires_grad))
    return stage


def weights_only(*modules: nn.Module) -> Stage:
    """Modules with weights but no matrix product (norms, embedding tables): no FLOPs, but when they train, every
    product after them must pass the gradient of its input back."""
    return [Product("token", 0.0, any(p.requires_grad for m in modules for p in m.parameters()))]


def decoder_stages(layer: MiniMindBlock) -> list[Stage]:
    """One decoder block per token: q/k/v, attention per query-key pair, o, then the MLP (dense or MoE)."""
    attn, mlp = layer.self_attn, layer.mlp
    attention = Product("pair", 4 * attn.num_heads * attn.head_dim, weightless=True)
    stages = [
        weights_only(layer.input_layernorm),
        linears("token", attn.q_proj, attn.k_proj, attn.v_proj),
        weights_only(attn.q_norm, attn.k_norm),
        [attention],
        linears("token", attn.o_proj),
        weights_only(layer.post_attention_layernorm),
    ]
    if isinstance(mlp, MOEFeedForward):
        share = mlp.top_k / mlp.num_experts
        gates_and_ups = [linear for expert in mlp.experts for linear in (expert.gate_proj, expert.up_proj)]
        return stages + [
            linears("token", mlp.gate) + linears("token", *gates_and_ups, times=share),
            linears("token", *(expert.down_proj for expert in mlp.experts), times=share),
        ]
    return stages + [linears("token", mlp.gate_proj, mlp.up_proj), linears("token", mlp.down_proj)]


def tower_stages(tower: nn.Module, patches: int) -> list[Stage]:
    """A SigLIP tower per image: the patch embedding, then each layer on every patch, attention between them all."""
    embeddings = tower.embeddings
    conv = embeddings.patch_embedding
    per_patch = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    stages = [
        [Product("image", 2 * patches * per_patch, conv.weight.requires_grad)],
        weights_only(embeddings.position_embedding),
    ]
    for layer in tower.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attention = Product("image", 4 * patches**2 * attn.embed_dim, weightless=True)
        stages += [
            weights_only(layer.layer_norm1),
            linears("image", attn.q_proj, attn.k_proj, attn.v_proj, times=patches),
            [attention],
            linears("image", attn.out_proj, times=patches),
            weights_only(layer.layer_norm2),
            linears("image", mlp.fc1, times=patches),
            linears("image", mlp.fc2, times=patches),
        ]
    return stages + [weights_only(tower.post_layernorm)]


def model_stages(model: nn.Module) -> list[Stage]:
    """The products of a MiniMind LLM or VLM in graph order: tower and projector, decoder, output layer."""
    stages = []
    tower = getattr(model, "vision_encoder", None)
    if tower is not None:
        patches, projector = model.config.image_token_len, model.vision_proj.mlp
        stages += tower_stages(tower, patches)
        stages += [
            weights_only(projector[0]),
            linears("projected_image", projector[1], times=patches),
            linears("projected_image", projector[3], times=patches),
        ]
    stages.append(weights_only(model.model.embed_tokens))
    for layer in model.model.layers:
        stages += decoder_stages(layer)
    return stages + [weights_only(model.model.norm), linears("logit", model.lm_head)]


def training_rates(stages: list[Stage]) -> dict[str, float]:
    """Forward + backward FLOPs per unit of a model trained as its parameters' requires_grad say."""
    rates = dict.fromkeys(UNITS, 0.0)
    upstream_trains = False
    for stage in stages:
        for product in stage:
            rates[product.unit] += product.flops + product.backward(upstream_trains)
        upstream_trains = upstream_trains or any(product.trains for product in stage)
    return rates


def forward_rates(stages: list[Stage]) -> dict[str, float]:
    """Forward FLOPs per unit (a model run without gradients)."""
    rates = dict.fromkeys(UNITS, 0.0)
    for stage in stages:
        for product in stage:
            rates[product.unit] += product.flops
    return rates


class StepFlops:
    """Model FLOPs of micro-batches: the forward and backward of `model` as its parameters train, plus the forward
    of `frozen` models run on the same batches without gradients (a DPO reference, a distillation teacher)."""

    def __init__(self, model: nn.Module, frozen: Sequence[nn.Module] = ()):
        rates = [training_rates(model_stages(model))] + [forward_rates(model_stages(m)) for m in frozen]
        self.rates = {unit: sum(r[unit] for r in rates) for unit in UNITS}

    def __call__(self, work: Work) -> float:
        return sum(self.rates[unit] * getattr(work, unit) for unit in UNITS)


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU in `precision` (bfloat16, float16, tf32, float32), else None."""
    peaks = next((peaks for pattern, peaks in GPU_PEAKS if re.search(pattern, device_name)), {})
    return peaks[precision] * 1e12 if precision in peaks else None


_measured: dict[tuple[str, torch.dtype, int], float] = {}


def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the fastest of MATMUL_SIZE-square matrix products in `dtype`, timed for about MEASURE_SECONDS the
    first time a process asks for this device, dtype and thread count."""
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _measured:
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device).to(dtype)
        b = torch.randn_like(a)
        times, deadline = [], time.perf_counter() + MEASURE_SECONDS
        while len(times) < 2 or time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        _measured[key] = 2 * MATMUL_SIZE**3 / min(times)
    return _measured[key]


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The peak FLOP/s of `device` for matrix products in `dtype` (the training's autocast dtype, float32 without
    autocast) and where the figure comes from: a known GPU's datasheet, else a timed matrix product."""
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        precision = "tf32" if name == "float32" and torch.get_float32_matmul_precision() != "highest" else name
        peak = datasheet_peak(device_name, precision)
        if peak is not None:
            return peak, f"{device_name} datasheet, dense {precision}"
    threads = torch.get_num_threads()
    on_threads = f" on {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else ""
    return measured_peak(device, dtype), f"measured: {MATMUL_SIZE}x{MATMUL_SIZE} {name} matrix product{on_threads}"
