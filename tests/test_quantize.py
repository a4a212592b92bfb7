"""`--quantize int8`: the decoder's Linear layers hold int8 weights and everything else stays in full precision;
logits stay close to float32 (float32 and bfloat16 compute); the KV cache and batched decoding behave as
unquantized; LoRA is merged first; the commands accept the flag; transformers' QuantoConfig on an exported
folder quantizes the same layers; and the error cases."""

from __future__ import annotations

import copy
import io
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from minimind_v import cli, synth
from minimind_v.config import preset_config
from minimind_v.generate import ChatRequest, Decoder, Engine, GenerationConfig
from minimind_v.loading import export_pretrained, load_model
from minimind_v.lora import adapters, add_lora, save_adapter, target_names
from minimind_v.quantize import INSTALL_HINT, KEEP_FULL_PRECISION, quantize_decoder, quantized_modules
from minimind_v.vlm import MiniMindVLM

from conftest import liven

pytest.importorskip("optimum.quanto")

GREEDY = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None)


def lively(vocab_size: int, use_moe: bool = False) -> MiniMindVLM:
    torch.manual_seed(0)
    return liven(MiniMindVLM(preset_config("tiny", vocab_size=vocab_size, use_moe=use_moe)).eval())


def photo(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8))


def sample_inputs(model: MiniMindVLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of text around one image block: input_ids [2, 8 + L + 8], pixel_values [2, 3, S, S]."""
    generator = torch.Generator().manual_seed(1)
    config = model.config
    text = lambda: torch.randint(40, config.vocab_size, (2, 8), generator=generator)
    ids = torch.cat([text(), torch.full((2, config.image_token_len), config.image_token_id), text()], dim=1)
    return ids, torch.stack([model.image_processor(photo(seed))[0] for seed in (0, 1)])


def logits_of(model: nn.Module, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def decoder_linears(model: nn.Module) -> set[str]:
    """The Linear layers int8 should cover: attention, MLP and expert projections (not the MoE router)."""
    return {name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("model.layers.") and not name.endswith("mlp.gate")}


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_decoder_linears_are_int8_and_the_rest_is_untouched(tiny_tokenizer, use_moe):
    model = lively(len(tiny_tokenizer), use_moe)
    expected = decoder_linears(model)
    full = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    quantized = quantize_decoder(copy.deepcopy(model))
    assert set(quantized_modules(quantized)) == expected
    state = quantized.state_dict()
    for name in expected:
        assert state[f"{name}.weight._data"].dtype == torch.int8
        assert state[f"{name}.weight._scale"].shape == (state[f"{name}.weight._data"].shape[0], 1)  # per channel
    # tower, projector, embeddings, lm_head, norms and the router: plain float32 tensors with the same values
    kept = {k: v for k, v in state.items() if not k.startswith(tuple(expected))}
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in kept.values())
    assert all(torch.equal(kept[k], v) for k, v in full.items())
    if use_moe:
        assert all(f"model.layers.{i}.mlp.gate.weight" in kept for i in range(model.config.num_hidden_layers))
    size = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())
    decoder_bytes = sum(model.get_submodule(name).weight.numel() * 4 for name in expected)
    assert size(model) - size(quantized) > 0.7 * decoder_bytes  # 4 bytes -> 1 byte (+ scales) per weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_stay_close_and_greedy_choices_agree(tiny_tokenizer, dtype):
    model = lively(len(tiny_tokenizer))
    ids, pixels = sample_inputs(model)
    reference = logits_of(model, ids, pixels)
    quantized = quantize_decoder(copy.deepcopy(model).to(dtype))
    logits = logits_of(quantized, ids, pixels)
    assert cosine(logits, reference) > 0.99
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()
    # teacher-forced next-token choices (robust to one flip derailing a free-running generation)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_moe_logits_stay_close(tiny_tokenizer):
    model = lively(len(tiny_tokenizer), use_moe=True)
    ids, pixels = sample_inputs(model)
    reference = logits_of(model, ids, pixels)
    assert cosine(logits_of(quantize_decoder(copy.deepcopy(model)), ids, pixels), reference) > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kv_cache_and_batched_decoding_work_quantized(tiny_tokenizer, dtype):
    """The server's path: left-padded rows decoded together equal each row alone, and the cache equals
    recomputing everything."""
    model = quantize_decoder(lively(len(tiny_tokenizer)).to(dtype))
    engine = Engine(model, tiny_tokenizer)
    two_images = "<image><image> 图片里有一个绿色的三角形"
    requests = [ChatRequest([{"role": "user", "content": "hi"}]),
                ChatRequest([{"role": "user", "content": two_images}], [photo(1), photo(2)])]
    batched = engine.generate(requests, GREEDY)
    assert [c.token_ids for c in batched] == [engine.generate([r], GREEDY)[0].token_ids for r in requests]
    assert len(set(batched[1].token_ids)) > 3
    prepared = [engine.prepare(r) for r in requests]
    ids, mask = engine._batch([p.ids for p in prepared])
    pixels = engine._pixels([p.images for p in prepared])
    decoders = [Decoder(model, ids, mask, [GREEDY] * 2, pixels, use_cache=c) for c in (True, False)]
    cached, recomputed = ([d.step() for _ in range(GREEDY.max_new_tokens)] for d in decoders)
    assert torch.equal(torch.stack(cached), torch.stack(recomputed))
    assert decoders[0].cache.keys[0].dtype == dtype


def test_lora_is_merged_before_quantizing(tiny_model_dir, tmp_path):
    base, _ = load_model(load_from=str(tiny_model_dir))
    add_lora(base, target_names(base, ["attention", "mlp", "projector"]), rank=4, alpha=16)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lora in adapters(base).values():
            lora.B.weight.copy_(torch.randn(lora.B.weight.shape, generator=generator) * 0.05)
    save_adapter(base, str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="merge them before quantizing"):
        quantize_decoder(base)
    plain, _ = load_model(load_from=str(tiny_model_dir))
    adapted, _ = load_model(load_from=str(tiny_model_dir), lora=str(tmp_path / "adapter"))
    quantized, _ = load_model(load_from=str(tiny_model_dir), lora=str(tmp_path / "adapter"), quantize="int8")
    assert not adapters(quantized) and set(quantized_modules(quantized)) == decoder_linears(plain)
    ids, pixels = sample_inputs(plain)
    reference = logits_of(adapted, ids, pixels)
    assert cosine(logits_of(quantized, ids, pixels), reference) > 0.99
    assert cosine(reference, logits_of(plain, ids, pixels)) < 0.99  # the adapter matters


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_quanto_config_on_an_exported_folder(tiny_tokenizer, tmp_path, use_moe):
    """The transformers way (as in the MiniMax-VL-01 quickstart) quantizes the same layers as `--quantize int8`,
    with the same result."""
    from transformers import AutoModelForCausalLM, QuantoConfig

    model = lively(len(tiny_tokenizer), use_moe)
    export_pretrained(model, str(tmp_path), tiny_tokenizer)
    config = QuantoConfig(weights="int8", modules_to_not_convert=KEEP_FULL_PRECISION)
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True,
                                                  quantization_config=config).eval()
    ours, _ = load_model(load_from=str(tmp_path), quantize="int8")
    assert set(quantized_modules(remote)) == set(quantized_modules(ours)) == decoder_linears(model)
    ids, pixels = sample_inputs(model)
    logits = logits_of(remote, ids, pixels)
    assert torch.allclose(logits, logits_of(ours, ids, pixels), atol=1e-5)
    assert cosine(logits, logits_of(model, ids, pixels)) > (0.95 if use_moe else 0.99)


def test_chat_describe_and_eval_commands_accept_int8(tiny_model_dir, tmp_path, monkeypatch, capsys):
    folder = str(tiny_model_dir)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is the triangle?\n/quit\n"))
    cli.main(["chat", "--load_from", folder, "--quantize", "int8", "--device", "cpu", "--temperature", "0",
              "--max_new_tokens", "6"])
    assert "[Speed]:" in capsys.readouterr().out

    images = tmp_path / "images"
    images.mkdir()
    photo(0).save(images / "a.png")
    cli.main(["describe", "--load_from", folder, "--quantize", "int8", "--device", "cpu", "--image_dir",
              str(images), "--max_new_tokens", "4"])
    assert "described 1 image(s)" in capsys.readouterr().out

    synth.generate(synth.SynthConfig(seed=5), str(tmp_path / "synth"), {"vlm_test": 16})
    cli.main(["eval", "--load_from", folder, "--quantize", "int8", "--device", "cpu", "--data_path",
              str(tmp_path / "synth" / "vlm_test.parquet"), "--out", str(tmp_path / "eval.json"),
              "--max_new_tokens", "3", "--batch_size", "8"])
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 16


@pytest.mark.parametrize("command", ["chat", "describe", "serve", "webui", "eval"])
def test_every_inference_command_passes_the_flag_to_load_model(command):
    if command in ("serve", "webui"):
        pytest.importorskip({"serve": "fastapi", "webui": "gradio"}[command])
    from minimind_v.options import model_options

    extra = ["--data_path", "x.parquet"] if command == "eval" else []
    args = cli.build_parser([command]).parse_args([command, "--quantize", "int8", *extra])
    assert model_options(args)["quantize"] == "int8"


def test_unknown_method_and_missing_library_are_refused(monkeypatch, capsys, tiny_tokenizer):
    with pytest.raises(SystemExit):
        cli.main(["chat", "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_decoder(lively(len(tiny_tokenizer)), "int4")

    monkeypatch.setattr("minimind_v.options.backend_available", lambda: False)
    with pytest.raises(SystemExit):
        cli.main(["chat", "--quantize", "int8"])
    assert INSTALL_HINT in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # makes the import fail
    with pytest.raises(ImportError, match="needs optimum-quanto"):
        quantize_decoder(lively(len(tiny_tokenizer)))


def test_quanto_config_on_a_qwen3_export(tiny_tokenizer, tmp_path):
    """The plain Qwen3 folder (decoder only, no remote code) takes the same QuantoConfig."""
    qwen3 = pytest.importorskip("minimind_v.exporters.qwen3")
    from transformers import AutoModelForCausalLM, QuantoConfig

    model = lively(len(tiny_tokenizer))
    qwen3.export_qwen3(model, tiny_tokenizer, str(tmp_path))
    config = QuantoConfig(weights="int8", modules_to_not_convert=KEEP_FULL_PRECISION)
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=config).eval()
    assert set(quantized_modules(remote)) == decoder_linears(model)
    ids = sample_inputs(model)[0][:, :8]
    with torch.no_grad():
        assert cosine(remote(ids).logits, model(ids).logits) > 0.99


def test_int8_computes_in_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    from minimind_v import distributed
    from minimind_v.generate import inference_dtype

    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: True)
    assert inference_dtype("cpu")[0] == torch.bfloat16
    assert inference_dtype("cpu", "float32")[0] == torch.float32
    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: False)
    assert inference_dtype("cpu")[0] == torch.float32


def test_quanto_config_on_an_lfm2_vl_export(tiny_tokenizer, tmp_path):
    """The transformers-native VLM folder takes a QuantoConfig too, tower and projector kept in full precision."""
    from transformers import AutoModelForImageTextToText, QuantoConfig

    from minimind_v.exporters.lfm2_vl import LFM2_VL_KEEP_FULL_PRECISION, export_lfm2_vl, lfm2_vl_pixels

    model = lively(len(tiny_tokenizer))
    export_lfm2_vl(model, tiny_tokenizer, str(tmp_path))
    config = QuantoConfig(weights="int8", modules_to_not_convert=LFM2_VL_KEEP_FULL_PRECISION)
    native = AutoModelForImageTextToText.from_pretrained(str(tmp_path), quantization_config=config).eval()
    quantized = set(quantized_modules(native))
    assert quantized == {name.replace("model.layers.", "model.language_model.layers.")
                         for name in decoder_linears(model)}
    ids, pixels = sample_inputs(model)
    with torch.no_grad():
        theirs = native(input_ids=ids, **lfm2_vl_pixels(pixels, model.vision_encoder.config.patch_size)).logits
    assert cosine(theirs.float(), logits_of(model, ids, pixels)) > 0.99
