"""The README's Python quick start runs as written: a 768x8 VLM with a random siglip2-base-p32-256-shaped tower,
reference-format `llm_768.pth` weights, and a forward pass on a real photograph."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as samples

from minimind_v.config import MiniMindConfig
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.weights import save_native

from conftest import REFERENCE_DIR

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    return re.search(r"## Quick start.*?```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)


@pytest.mark.slow
def test_readme_quick_start(tmp_path, monkeypatch, tiny_tokenizer, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_native(MiniMindForCausalLM(MiniMindConfig()), "out/llm_768.pth")  # reference LLM format, random weights
    if (REFERENCE_DIR / "upstream_tokenizer").is_dir():
        shutil.copytree(REFERENCE_DIR / "upstream_tokenizer", "model")
    else:
        tiny_tokenizer.save_pretrained("model")
    Image.fromarray(samples.chelsea()).save("photo.jpg")
    namespace: dict = {}
    exec(compile(quick_start_code(), "README quick start", "exec"), namespace)
    ids, logits = namespace["input_ids"], namespace["logits"]
    assert logits.shape == (1, ids.shape[1], 6400)
    assert (ids == 12).sum().item() == 64
    assert sorted(namespace["untouched"]) == sorted(f"vision_proj.mlp.{i}.{p}" for i in (0, 1, 3)
                                                    for p in ("weight", "bias"))
    assert "torch.Size([1," in capsys.readouterr().out


def test_readme_export_quickstart_runs_on_an_exported_folder(tmp_path, monkeypatch, tiny_model_dir, capsys):
    """The README's transformers quickstart, as written, on a folder `minimind-v export` wrote."""
    code = re.search(r"### Export.*?```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, "minimind-3v")
    Image.fromarray(samples.chelsea()).save("photo.jpg")
    namespace: dict = {}
    exec(compile(code, "README export quickstart", "exec"), namespace)
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    assert (namespace["inputs"]["input_ids"] == 12).sum().item() == 64
    assert capsys.readouterr().out.strip()
