"""The `AutoProcessor` of our remote-code folders: the transformers quickstart (chat template with image parts,
processor, `generate`, `batch_decode`) gives our engine's greedy ids, on a folder we export and on a folder written
the way the reference project writes it (re-exported with `minimind-v export`)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from skimage import data
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

from minimind_v.cli import main as cli_main
from minimind_v.config import preset_config
from minimind_v.generate import ChatRequest, Engine, GenerationConfig
from minimind_v.loading import load_pretrained_folder
from minimind_v.processor import IMAGE_MARKER, MiniMindVProcessor, multimodal_chat_template
from minimind_v.tokenizer import CHAT_TEMPLATE, expand_image_markers, load_tokenizer
from minimind_v.vision import ImagePreprocessor
from minimind_v.vlm import MiniMindVLM

from conftest import reference_path

NEW_TOKENS = 12
QUESTION = [{"type": "image"}, {"type": "text", "text": "Describe this"}, {"type": "image"},
            {"type": "text", "text": " and compare."}]

# config.json fields of the reference's transformers export (scripts/convert_vlm.py), besides the model_type.
REFERENCE_FIELDS = (
    "bos_token_id", "eos_token_id", "dropout", "flash_attn", "head_dim", "hidden_act", "hidden_size",
    "inference_rope_scaling", "intermediate_size", "max_position_embeddings", "moe_intermediate_size",
    "norm_topk_prob", "num_attention_heads", "num_experts", "num_experts_per_tok", "num_hidden_layers",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "router_aux_loss_coef", "tie_word_embeddings", "use_moe",
    "vocab_size", "image_hidden_size", "image_ids", "image_special_token", "image_token_len",
)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """A square and two non-square photographs."""
    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")]


@pytest.fixture(scope="module")
def exported(tiny_model_dir):
    """(the lively tiny VLM of `tiny_model_dir`, reloaded, and that remote-code folder)."""
    return load_pretrained_folder(str(tiny_model_dir)).eval(), tiny_model_dir


def engine_ids(model, tokenizer, images: list) -> list[int]:
    """Our engine's greedy continuation of QUESTION with these images."""
    request = ChatRequest([{"role": "user", "content": f"{IMAGE_MARKER}Describe this{IMAGE_MARKER} and compare."}],
                          images)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False)
    return Engine(model, tokenizer).generate([request], config)[0].token_ids


def quickstart(folder, images: list, tower=None) -> tuple[list[int], str]:
    """The transformers quickstart on a remote-code folder: greedy new ids and their decoded text."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "minimind-v"
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": QUESTION}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images, text=text, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    if tower is not None:
        model.vision_encoder = tower
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return new[0].tolist(), processor.batch_decode(new, skip_special_tokens=True)[0]


@pytest.mark.parametrize("source", ["ours", "reference"])
def test_template_renders_strings_as_before_and_image_parts_as_markers(tiny_tokenizer, source):
    base = CHAT_TEMPLATE
    if source == "reference":
        base = json.loads(reference_path("upstream_tokenizer", "tokenizer_config.json").read_text())["chat_template"]
    template = multimodal_chat_template(base)
    assert multimodal_chat_template(multimodal_chat_template(base, "<x>")) == template  # the block is replaced
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "<think>\nA cat.\n</think>\n\nA cat."},
        {"role": "user", "content": "And now?"},
    ]
    for thinking in (False, True):
        kwargs = dict(tokenize=False, add_generation_prompt=True, open_thinking=thinking)
        assert tiny_tokenizer.apply_chat_template(conversation, chat_template=template, **kwargs) == \
            tiny_tokenizer.apply_chat_template(conversation, chat_template=base, **kwargs)
    parts = [{"role": "user", "content": QUESTION}]
    text = tiny_tokenizer.apply_chat_template(parts, chat_template=template, tokenize=False)
    assert text == f"<|im_start|>user\n{IMAGE_MARKER}Describe this{IMAGE_MARKER} and compare.<|im_end|>\n"


def test_folder_has_the_processor_files(exported):
    _, folder = exported
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["processor_class"] == "MiniMindVProcessor"
    assert config["auto_map"]["AutoProcessor"] == "processor.MiniMindVProcessor"
    assert config["image_token_len"] == 64
    assert (folder / "processor.py").is_file() and (folder / "preprocessor_config.json").is_file()
    assert IMAGE_MARKER in (folder / "chat_template.jinja").read_text()


def test_quickstart_matches_the_engine(exported, tiny_tokenizer, photos):
    model, folder = exported
    ids, text = quickstart(folder, photos[:2])
    assert ids == engine_ids(model, tiny_tokenizer, photos[:2])
    assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_processor_outputs(exported, tiny_tokenizer, photos):
    model, folder = exported
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompt = f"{IMAGE_MARKER}Describe this{IMAGE_MARKER} and compare."
    inputs = processor(images=photos[:2], text=prompt, return_tensors="pt")
    expected = tiny_tokenizer(expand_image_markers(prompt, 64), return_tensors="pt").input_ids
    assert torch.equal(inputs["input_ids"], expected)
    assert torch.equal(inputs["pixel_values"], model.image_processor(photos[:2]).unsqueeze(0))  # [1, 2, 3, S, S]
    nested = processor(images=[[photos[0]], [photos[1], photos[2]]], text=[f"{IMAGE_MARKER}a", prompt],
                       return_tensors="pt", padding=True)
    assert [p.shape[0] for p in nested["pixel_values"]] == [1, 2]
    assert nested["attention_mask"][0, 0] == 0  # left padding, for generation
    with pytest.raises(ValueError, match="2 <image> marker"):
        processor(images=photos, text=prompt)
    with pytest.raises(ValueError, match="prompt 0 has 1"):
        processor(images=[[], [photos[0]]], text=[f"{IMAGE_MARKER}a", "b"])


def test_tokenized_chat_template(exported, photos):
    """`apply_chat_template(tokenize=True, return_dict=True)` with images inside the messages."""
    model, folder = exported
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": photos[0]}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert (inputs["input_ids"] == 12).sum() == 64
    assert torch.equal(inputs["pixel_values"][0], model.image_processor([photos[0]]))


def test_processor_from_config_pixels(tiny_tokenizer, photos):
    config = preset_config("tiny", vocab_size=len(tiny_tokenizer))
    processor = MiniMindVProcessor.from_config(config, tiny_tokenizer)
    pixels = processor(images=photos[1], text=IMAGE_MARKER, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels[0], ImagePreprocessor.from_config(config)([photos[1]]))


def write_reference_folder(model: MiniMindVLM, tokenizer, folder) -> None:
    """A folder laid out as the reference's convert_vlm.py writes it: reference config fields and auto_map,
    bf16 `pytorch_model.bin` with both tied keys and no vision tower, tokenizer files. (Its model_vlm.py /
    model_minimind.py code is not needed by the re-export, which reads config.json and weights with our classes.)"""
    folder.mkdir()
    config = {name: getattr(model.config, name) for name in REFERENCE_FIELDS}
    config.update(architectures=["MiniMindVLM"], model_type="minimind-v", dtype="bfloat16", max_seq_len=8192,
                  rope_scaling=None, auto_map={"AutoConfig": "model_vlm.VLMConfig",
                                               "AutoModelForCausalLM": "model_vlm.MiniMindVLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
    torch.save(weights, folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)


def test_quickstart_on_a_reference_folder(exported, tiny_tokenizer, photos, tmp_path):
    """A reference-format folder has no tower and no processor; `minimind-v export --load_from <it>
    --vision_model <tower>` writes a folder with both, on which the quickstart runs."""
    model, _ = exported
    tower = tmp_path / "tower"
    model.vision_encoder.save_pretrained(tower)
    model.image_processor.save_pretrained(tower)
    reference = tmp_path / "minimind-3v"
    write_reference_folder(model, tiny_tokenizer, reference)
    out = tmp_path / "re-exported"
    cli_main(["export", "--load_from", str(reference), "--vision_model", str(tower), "--out", str(out)])
    assert (out / "processor_config.json").is_file() and (out / "model.safetensors").is_file()
    ours = load_pretrained_folder(str(reference), vision_model=str(tower)).eval()
    ids, _ = quickstart(out, photos[:2])
    assert ids == engine_ids(ours, load_tokenizer(str(reference)), photos[:2])
