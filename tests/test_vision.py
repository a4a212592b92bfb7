"""Vision tower loading and image preprocessing against transformers' SiglipImageProcessor."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as samples
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from minimind_v.config import TINY_VISION, VLMConfig, vision_dims
from minimind_v.vision import ImagePreprocessor, build_vision_tower, to_rgb
from minimind_v.vlm import MiniMindVLM


def photos() -> dict[str, Image.Image]:
    astronaut = Image.fromarray(samples.astronaut())
    rgba = np.array(astronaut.convert("RGBA"))
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)
    return {
        "RGB": astronaut, "L": Image.fromarray(samples.camera()), "RGBA": Image.fromarray(rgba),
        "LA": Image.fromarray(samples.camera()).convert("LA"), "P": astronaut.convert("P"),
        "PA": Image.fromarray(rgba).convert("PA"), "CMYK": astronaut.convert("CMYK"),
        "1": Image.fromarray(samples.camera()).convert("1"), "tiny": astronaut.resize((7, 31)),
        "wide": Image.fromarray(samples.coffee()),
    }


@pytest.mark.parametrize("size, mean, std", [(256, (0.5,) * 3, (0.5,) * 3),
                                             (64, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))])
def test_preprocessing_equals_siglip_image_processor(size, mean, std):
    reference = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    ours = ImagePreprocessor(size, mean, std)
    for mode, image in photos().items():
        expected = reference(image, return_tensors="pt")["pixel_values"]
        assert (ours(image) - expected).abs().max().item() <= 1e-5, mode


def test_batched_preprocessing_stacks_in_order():
    pics = list(photos().values())[:3]
    batch = ImagePreprocessor(64)(pics)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    assert torch.equal(batch[1], ImagePreprocessor(64)(pics[1])[0])


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_rescaled_not_clipped(mode):
    ramp = np.tile(np.linspace(0, 1, 50), (20, 1))
    values = ramp * (1.0 if mode == "F" else 65535)
    image = Image.fromarray(values.astype(np.float32 if mode == "F" else np.int32)).convert(mode)
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (20, 50, 3)
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and 100 < rgb[0, 25, 0] < 155


@pytest.fixture(scope="module")
def saved_tower(tmp_path_factory):
    """A random SigLIP tower saved in fp16 with a preprocessor config, like the released one."""
    folder = tmp_path_factory.mktemp("tower")
    fields = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**{**fields, "vision_use_head": True})).half().save_pretrained(folder)
    SiglipImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.4] * 3, image_std=[0.3] * 3).save_pretrained(
        folder)
    return folder


def test_tower_loads_in_float32_with_its_preprocessing(saved_tower):
    config = VLMConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=300, **vision_dims(TINY_VISION))
    model = MiniMindVLM(config, vision_model_path=str(saved_tower))
    assert model.vision_encoder.dtype == torch.float32
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert not hasattr(model.vision_encoder, "head")  # the pooling head is never used
    assert model.config.image_mean == [0.4] * 3 and model.image_processor.std == [0.3] * 3
    assert model.config.vision_config["image_size"] == 64
    reference = SiglipVisionModel.from_pretrained(saved_tower, dtype=torch.float32).eval()
    pixels = model.image_processor(photos()["RGB"])
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels), reference(pixel_values=pixels).last_hidden_state)


def test_missing_tower_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load the SigLIP vision tower"):
        MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=1), vision_model_path=str(tmp_path / "nope"))


def test_tower_shape_must_match_the_config(saved_tower):
    with pytest.raises(ValueError, match="64 wide but image_hidden_size is 768"):
        MiniMindVLM(VLMConfig(hidden_size=64, num_hidden_layers=1), vision_model_path=str(saved_tower))


def test_preprocessor_config_written_for_exports_is_readable_by_transformers(tmp_path):
    ImagePreprocessor(64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)).save_pretrained(str(tmp_path))
    loaded = SiglipImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == {"height": 64, "width": 64} and list(loaded.image_mean) == [0.1, 0.2, 0.3]
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["resample"] == 3


def test_a_random_tower_knows_where_each_patch_is():
    """From-zero towers start with 2D sine-cosine positions as strong as the patch embeddings (RMS 0.5 per feature):
    half the features follow the row, half the column, and every patch gets its own vector."""
    tower = build_vision_tower(TINY_VISION)
    side = TINY_VISION["image_size"] // TINY_VISION["patch_size"]
    table = tower.embeddings.position_embedding.weight.detach().reshape(side, side, -1)
    half = table.shape[-1] // 2
    assert table.pow(2).mean().sqrt().item() == pytest.approx(0.5, rel=1e-4)
    assert torch.allclose(table[:, :1, :half].expand(side, side, half), table[..., :half])  # rows only
    assert torch.allclose(table[:1, :, half:].expand(side, side, half), table[..., half:])  # columns only
    patches = table.reshape(side * side, -1)
    assert torch.cdist(patches, patches).add(torch.eye(side * side)).min() > 0.5
