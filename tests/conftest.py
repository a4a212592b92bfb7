"""Shared fixtures: the reference facts folder (tests skip without it), a tiny trained tokenizer and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minimind_v.config import preset_config
from minimind_v.tokenizer import train_tokenizer
from minimind_v.vlm import MiniMindVLM

REFERENCE_DIR = Path(
    os.environ.get("MINIMIND_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)

torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS = [
    "The red circle is on the left of the blue square.",
    "How many shapes are there? There are three shapes.",
    "图片里有一个绿色的三角形和一个黄色的圆。",
    "What colour is the triangle? It is green.",
    "Is there a star in the picture? No, there is no star.",
    "Describe the image. A small purple square sits at the top right.",
] * 50


GREEDY = dict(do_sample=False, eos_token_id=None)


def photo(seed: int, size: int = 64) -> Image.Image:
    """A random RGB image, the same for the same seed."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def reference_path(*parts: str) -> Path:
    """A file under the reference folder, or skip the test when the folder is not there."""
    path = REFERENCE_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference fixtures not found at {path} (set MINIMIND_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 600-token MiniMind-format tokenizer trained on a small English/Chinese corpus."""
    return train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tokenizer")), vocab_size=600)


@pytest.fixture
def tiny_vlm(tiny_tokenizer):
    """A seeded tiny VLM (random 64x64 tower, 64 visual tokens) matching the tiny tokenizer, in eval mode."""
    torch.manual_seed(0)
    return MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer))).eval()


def liven(model: MiniMindVLM, seed: int = 0, std: float = 0.15) -> MiniMindVLM:
    """Redraw the decoder and projector matrices with a large spread, so that greedy decoding of a random
    tiny model gives varied tokens (the standard init makes it repeat one token)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and not name.startswith("vision_encoder."):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.fixture
def lively_vlm(tiny_vlm):
    """`tiny_vlm` whose greedy output varies from token to token."""
    return liven(tiny_vlm)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory):
    """A lively tiny VLM exported with its tokenizer as a transformers folder (for `--load_from`)."""
    from minimind_v.loading import export_pretrained

    torch.manual_seed(0)
    model = liven(MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer))).eval())
    folder = tmp_path_factory.mktemp("models") / "tiny-vlm"
    export_pretrained(model, str(folder), tiny_tokenizer)
    return folder
