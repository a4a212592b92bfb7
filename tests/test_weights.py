"""Weight files: strict reference-format loading, the fp16 save format, transformers export round trips."""

import json

import pytest
import torch
from PIL import Image
from skimage import data as samples
from transformers import AutoModelForCausalLM

from minimind_v.config import MiniMindConfig, preset_config
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.loading import export_pretrained, load_pretrained_folder
from minimind_v.vlm import MiniMindVLM
from minimind_v.weights import load_native, native_state_dict, save_native

from conftest import reference_path


def tiny(**overrides) -> MiniMindVLM:
    torch.manual_seed(0)
    return MiniMindVLM(preset_config("tiny", **{"vocab_size": 300, **overrides})).eval()


def sample_inputs(model: MiniMindVLM):
    ids = torch.tensor([[1, 40, 41] + [12] * 64 + [42, 2]])
    return ids, model.image_processor(Image.fromarray(samples.astronaut()))


def test_native_file_is_fp16_with_both_tied_keys_and_no_tower(tmp_path):
    model = tiny()
    save_native(model, str(tmp_path / "w.pth"))
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    assert state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr()
    assert not any(k.startswith("vision_encoder.") for k in state)
    assert {k for k in state if k.startswith("vision_proj.")} == {
        f"vision_proj.mlp.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    assert not list(tmp_path.glob("*.tmp"))


def test_reference_768_key_set():
    config = MiniMindConfig()
    with torch.device("meta"):
        vlm_keys = list(MiniMindVLM(preset_config("minimind-3v")).state_dict())
        dense = MiniMindForCausalLM(config).state_dict()
    lines = reference_path("state_dict_keys.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## dense"))
    expected = [line.split("\t")[0] for line in lines[start + 1 : start + 92]]
    assert list(dense) == expected
    assert len([k for k in vlm_keys if not k.startswith("vision_encoder.")]) == 97


def test_save_then_load_round_trips(tmp_path):
    model, other = tiny(), tiny()
    torch.nn.init.zeros_(other.vision_proj.mlp[1].weight)
    save_native(model, str(tmp_path / "w.pth"))
    load_native(other, str(tmp_path / "w.pth"))
    ids, pixels = sample_inputs(model)
    load_native(model, str(tmp_path / "w.pth"))  # the same fp16 rounding on both sides
    with torch.no_grad():
        assert torch.equal(other(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)


def test_reference_fixture_loads_strictly():
    state = torch.load(reference_path("parity", "vlm_state_dict.pth"), weights_only=True)
    config = json.loads(json.dumps(torch.load(reference_path("parity", "vlm_io.pt"), weights_only=True)["config"]))
    from minimind_v.config import VLMConfig

    assert load_native(MiniMindVLM(VLMConfig(**config)), state) == []


@pytest.mark.parametrize("overrides, message", [
    (dict(use_moe=True), r"missing: model\.layers\.0\.mlp\.gate\.weight.*unexpected: model\.layers\.0\.mlp\.gate_proj"),
    (dict(hidden_size=128), r"wrong shape: model\.embed_tokens\.weight: file \(300, 64\) vs model \(300, 128\)"),
    (dict(num_hidden_layers=3), r"missing: model\.layers\.2\.self_attn\.q_proj\.weight"),
])
def test_strict_load_names_the_bad_keys(tmp_path, overrides, message):
    save_native(tiny(), str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match=message):
        load_native(tiny(**overrides), str(tmp_path / "w.pth"))


def test_unexpected_keys_are_named(tmp_path):
    state = native_state_dict(tiny())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected: extra\.weight"):
        load_native(tiny(), state)


def test_llm_weights_start_a_vlm_only_when_the_projector_is_optional():
    llm_state = {k: v for k, v in native_state_dict(tiny()).items() if not k.startswith("vision_proj.")}
    with pytest.raises(ValueError, match=r"missing: vision_proj\.mlp\.0\.weight"):
        load_native(tiny(), llm_state)
    assert len(load_native(tiny(), llm_state, optional_prefixes=("vision_proj.",))) == 6


def test_wrapper_prefixes_are_stripped():
    state = {"module." + k: v for k, v in native_state_dict(tiny()).items()}
    assert load_native(tiny(), state) == []


def test_export_is_self_contained_and_reloads_identically(tmp_path, tiny_tokenizer):
    model = tiny()
    ids, pixels = sample_inputs(model)
    with torch.no_grad():
        expected = model(ids, pixel_values=pixels).logits
    export_pretrained(model, str(tmp_path), tiny_tokenizer)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "vlm.py"} <= names
    for _ in range(2):  # the RoPE angles are recomputed on every load, never read from uninitialised memory
        remote = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
        native = load_pretrained_folder(str(tmp_path)).eval()
        with torch.no_grad():
            assert torch.equal(remote(ids, pixel_values=pixels).logits, expected)
            assert torch.equal(native(ids, pixel_values=pixels).logits, expected)
    greedy = dict(pixel_values=pixels, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert torch.equal(remote.generate(ids, **greedy), model.generate(ids, **greedy))


def test_export_command_from_native_weights(tmp_path, tiny_tokenizer):
    import subprocess
    import sys

    model = tiny(vocab_size=len(tiny_tokenizer))
    model.vision_encoder.save_pretrained(tmp_path / "tower")
    model.image_processor.save_pretrained(str(tmp_path / "tower"))
    save_native(model, str(tmp_path / "out" / "sft_vlm_64.pth"))
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    subprocess.run([sys.executable, "-m", "minimind_v", "export", "--save_dir", str(tmp_path / "out"),
                    "--hidden_size", "64", "--num_hidden_layers", "2", "--vision_model", str(tmp_path / "tower"),
                    "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "hf")], check=True,
                   capture_output=True)
    reloaded = load_pretrained_folder(str(tmp_path / "hf")).eval()
    load_native(model, str(tmp_path / "out" / "sft_vlm_64.pth"))
    ids, pixels = sample_inputs(model)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)
