"""Qwen3 export: the folder loads with plain transformers (no remote code) and computes what our model computes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minimind_v.config import MiniMindConfig, preset_config
from minimind_v.exporters.qwen3 import export_qwen3, rope_parameters
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.lora import add_lora
from minimind_v.vlm import MiniMindVLM

CASES = {
    "dense": {},
    "moe": dict(use_moe=True, num_experts=4, num_experts_per_tok=2),
    "yarn": dict(inference_rope_scaling=True),
    "untied": dict(tie_word_embeddings=False),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Matrices ~ N(0, 0.15^2) and norm weights ~ 1 + N(0, 0.5^2), so that a swapped or dropped weight (norms
    included) changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.5 * noise if param.dim() == 1 else 0.15 * noise)
    return model


def tiny_llm(vocab_size: int, **overrides) -> MiniMindForCausalLM:
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, vocab_size=vocab_size, **overrides)
    return randomise(MiniMindForCausalLM(config)).eval()


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """case -> (our model, the folder it was exported to)."""
    root = tmp_path_factory.mktemp("qwen3")
    out = {}
    for case, overrides in CASES.items():
        model = tiny_llm(len(tiny_tokenizer), **overrides)
        export_qwen3(model, tiny_tokenizer, str(root / case))
        out[case] = model, root / case
    return out


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer) -> torch.Tensor:
    """[1, T] ids of a mixed English/Chinese prompt, long enough (~100 positions) for YaRN to matter."""
    text = "The red circle is on the left. 图片里有一个绿色的三角形。 How many shapes? 3 shapes."
    return torch.tensor([tiny_tokenizer.encode(text) * 3])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_without_remote_code(exported, prompt_ids, case):
    ours, folder = exported[case]
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code
    assert type(theirs).__name__ == ("Qwen3MoeForCausalLM" if case == "moe" else "Qwen3ForCausalLM")
    with torch.no_grad():
        expected, got = ours(prompt_ids).logits, theirs(prompt_ids).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("case", ["dense", "moe", "yarn"])
def test_greedy_generation_matches(exported, prompt_ids, case):
    ours, folder = exported[case]
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = ours.generate(prompt_ids, max_new_tokens=20, do_sample=False, eos_token_id=None)
    got = theirs.generate(prompt_ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert got.tolist() == expected.tolist()
    assert len(set(expected[0, -20:].tolist())) > 3  # a varied continuation, not one repeated token


def test_yarn_is_exported_and_changes_the_model(exported, prompt_ids):
    """The YaRN case differs from plain RoPE (so the parity above tests the scaling), and the config says yarn."""
    (plain, _), (scaled, folder) = exported["dense"], exported["yarn"]
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_parameters"]["factor"] == 16
    with torch.no_grad():
        diff = (plain(prompt_ids).logits - scaled(prompt_ids).logits).abs().max()
    assert diff > 1e-2 * plain(prompt_ids).logits.abs().max()


def test_folder_is_plain_transformers(exported):
    _, folder = exported["moe"]
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "qwen3_moe"
    assert config["num_experts_per_tok"] == 2 and config["norm_topk_prob"] is True
    assert not list(folder.glob("*.py"))
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)


def test_tokenizer_round_trips(exported, tiny_tokenizer):
    _, folder = exported["dense"]
    theirs = AutoTokenizer.from_pretrained(folder)
    text = "Hello  world\n\n\t图片里有 123 个<think>圆</think> <|im_start|>x  "
    assert theirs.encode(text) == tiny_tokenizer.encode(text)
    assert theirs.decode(tiny_tokenizer.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What shape?"},
                {"role": "assistant", "content": "A circle."}, {"role": "user", "content": "Colour?"}]
    for kwargs in ({"add_generation_prompt": True}, {"add_generation_prompt": True, "open_thinking": True}, {}):
        assert theirs.apply_chat_template(messages, tokenize=False, **kwargs) == \
            tiny_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_bfloat16_export(exported, tiny_tokenizer, tmp_path, prompt_ids):
    ours, _ = exported["dense"]
    export_qwen3(ours, tiny_tokenizer, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").eval()
    assert theirs.dtype == torch.bfloat16
    with torch.no_grad():
        expected, got = ours(prompt_ids).logits, theirs(prompt_ids).logits.float()
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()


def test_vlm_exports_its_decoder(tiny_tokenizer, tmp_path, prompt_ids, capsys):
    vlm = randomise(MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer)))).eval()
    export_qwen3(vlm, tiny_tokenizer, str(tmp_path / "vlm"))
    assert "language model only" in capsys.readouterr().out
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "vlm").eval()
    with torch.no_grad():
        expected, got = vlm(prompt_ids).logits, theirs(prompt_ids).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_lora_attached_model_is_refused(tiny_tokenizer, tmp_path):
    model = tiny_llm(len(tiny_tokenizer))
    add_lora(model, ["model.layers.0.self_attn.q_proj"], rank=2)
    with pytest.raises(ValueError, match="LoRA"):
        export_qwen3(model, tiny_tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unrepresentable_yarn_is_refused():
    """A head so wide that our YaRN ramp clamp (hd/2 - 1) differs from transformers' (hd - 1)."""
    config = MiniMindConfig(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                            rope_theta=100.0, inference_rope_scaling=True)
    with pytest.raises(ValueError, match="YaRN"):
        rope_parameters(config)


def test_int8_quantized_model_is_refused(tiny_tokenizer, tmp_path):
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed")
    from minimind_v.quantize import quantize_decoder

    model = quantize_decoder(tiny_llm(len(tiny_tokenizer)))
    with pytest.raises(ValueError, match="int8"):
        export_qwen3(model, tiny_tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_yarn_inactive_within_the_original_length():
    """Our YaRN only rescales when max_position_embeddings exceeds its original 2048 positions."""
    config = MiniMindConfig(hidden_size=64, inference_rope_scaling=True, max_position_embeddings=2048)
    assert rope_parameters(config) == {"rope_type": "default", "rope_theta": 1e6}
