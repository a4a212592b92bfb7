"""LFM2-VL export: the folder loads with plain transformers (no remote code), computes our logits from our pixels
on photographs (one and two images per prompt), and the transformers quickstart gives our greedy ids."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from skimage import data
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    Lfm2VlProcessor,
)
from transformers.image_processing_base import ImageProcessingMixin

from minimind_v.config import preset_config
from minimind_v.exporters.lfm2_vl import export_lfm2_vl, lfm2_vl_pixels
from minimind_v.generate import ChatRequest, Engine, GenerationConfig
from minimind_v.lora import add_lora
from minimind_v.processor import IMAGE_MARKER
from minimind_v.vision import ImagePreprocessor
from minimind_v.vlm import MiniMindVLM

from conftest import liven

CASES = {"dense": {}, "moe": dict(use_moe=True, num_experts=4, num_experts_per_tok=2),
         "yarn": dict(inference_rope_scaling=True), "untied": dict(tie_word_embeddings=False)}
PATCH, SIDE = 8, 64  # the tiny tower: 64 x 64 pixels, 8 x 8 patches
NEW_TOKENS = 12
QUESTION = [{"type": "image"}, {"type": "text", "text": "Describe this"}, {"type": "image"},
            {"type": "text", "text": " and compare."}]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """A square and two non-square photographs."""
    return [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")]


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """case -> (our lively tiny VLM, the LFM2-VL folder it was exported to, the model loaded from it)."""
    root = tmp_path_factory.mktemp("lfm2-vl")
    out = {}
    for case, overrides in CASES.items():
        torch.manual_seed(0)
        model = liven(MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer), **overrides)).eval())
        export_lfm2_vl(model, tiny_tokenizer, str(root / case))
        out[case] = model, root / case, AutoModelForImageTextToText.from_pretrained(root / case).eval()
    return out


def engine_ids(model, tokenizer, images: list) -> list[int]:
    """Our engine's greedy continuation of QUESTION with these images."""
    request = ChatRequest([{"role": "user", "content": f"{IMAGE_MARKER}Describe this{IMAGE_MARKER} and compare."}],
                          images)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False)
    return Engine(model, tokenizer).generate([request], config)[0].token_ids


def greedy(model, processor, images: list) -> tuple[BatchFeature, list[int], str]:
    """The quickstart: template, processor, generate, batch_decode -> (inputs, new ids, text)."""
    text = processor.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    inputs = processor(images=images, text=text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return inputs, new[0].tolist(), processor.batch_decode(new, skip_special_tokens=True)[0]


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_on_photographs(exported, photos, case, images):
    model, _, native = exported[case]
    pixels = model.image_processor([photos[2]] if images == 1 else photos[:2])
    ids = torch.tensor([[1, 50, 60] + ([12] * 64 + [70]) * images + [80, 90] * 40])
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels.unsqueeze(0)).logits
        theirs = native(input_ids=ids, **lfm2_vl_pixels(pixels, PATCH)).logits
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()


def test_folder_needs_no_remote_code(exported):
    _, folder, _ = exported["dense"]
    assert not list(folder.glob("*.py"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "lfm2_vl" and "auto_map" not in config
    assert config["text_config"]["model_type"] == "qwen3" and config["downsample_factor"] == 1
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "Lfm2VlConfig"
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Lfm2VlProcessor"
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())


class StandInImageProcessor(ImageProcessingMixin):
    """What `Lfm2VlImageProcessor` returns for the images it resizes to S x S (square ones), made by our
    preprocessing: tests the rest of the quickstart where torchvision (which it needs) is missing."""

    def __call__(self, images, **kwargs) -> BatchFeature:
        flat = [image for row in images for image in row]
        pixels = ImagePreprocessor(self.tile_size, self.image_mean, self.image_std, self.resample)(flat)
        layout = {"image_rows": [1] * len(flat), "image_cols": [1] * len(flat),
                  "image_sizes": [[self.tile_size] * 2] * len(flat)}
        return BatchFeature({**lfm2_vl_pixels(pixels, self.encoder_patch_size), **layout})

    def _merge_and_standardize_kwargs(self, **kwargs) -> dict:
        """The processor reads the tile size and patch size through this from transformers 5.25 on: the settings
        of this processor under the passed ones, as `BaseImageProcessor` gives them."""
        return {**self.to_dict(), **kwargs}


def test_quickstart_with_a_stand_in_image_processor(exported, tiny_tokenizer, photos):
    model, folder, native = exported["dense"]
    image_config = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    processor = Lfm2VlProcessor(StandInImageProcessor(**image_config), AutoTokenizer.from_pretrained(folder),
                                chat_template=(folder / "chat_template.jinja").read_text())
    squares = [photo.resize((SIDE, SIDE), Image.Resampling.BICUBIC) for photo in photos[:2]]
    inputs, ids, text = greedy(native, processor, squares)
    assert (inputs["input_ids"] == 12).sum() == 2 * 64
    assert ids == engine_ids(model, tiny_tokenizer, squares)
    assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_quickstart(exported, tiny_tokenizer, photos):
    """The real `AutoProcessor`: our pixels for S x S images, within one grey level for other square ones; other
    shapes keep their aspect ratio (fewer patches than ours)."""
    pytest.importorskip("torchvision", reason="Lfm2VlImageProcessor needs torchvision")
    model, folder, native = exported["dense"]
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Lfm2VlProcessor"
    squares = [photo.resize((SIDE, SIDE), Image.Resampling.BICUBIC) for photo in photos[:2]]
    inputs, ids, _ = greedy(native, processor, squares)
    ours = lfm2_vl_pixels(model.image_processor(squares), PATCH)["pixel_values"]
    assert (inputs["pixel_values"] - ours).abs().max() < 1e-6
    assert ids == engine_ids(model, tiny_tokenizer, squares)
    square = processor.image_processor([photos[0]], return_tensors="pt")
    ours = lfm2_vl_pixels(model.image_processor([photos[0]]), PATCH)["pixel_values"]
    assert (square["pixel_values"] - ours).abs().max() <= 2 / 255 + 1e-6
    other = processor.image_processor([photos[1]], return_tensors="pt")
    assert other["spatial_shapes"].tolist() != [[SIDE // PATCH] * 2]


def test_refusals_write_nothing(tiny_tokenizer, tmp_path):
    config = preset_config("tiny", vocab_size=len(tiny_tokenizer))
    with_lora = MiniMindVLM(config)
    add_lora(with_lora, ["model.layers.0.self_attn.q_proj"], rank=2)
    towerless = MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer), vision_config=None))
    other_tower = MiniMindVLM(config)
    other_tower.vision_encoder = torch.nn.Identity()
    tiled = MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer), max_tiles=4))
    for model, reason in ((with_lora, "LoRA"), (towerless, "no vision tower"), (other_tower, "only a SigLIP"),
                          (tiled, "up to 4 tiles")):
        with pytest.raises(ValueError, match=reason):
            export_lfm2_vl(model, tiny_tokenizer, str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()
