"""`minimind-v export`: the model card every format gets, the hub upload call, and the flag checks."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from minimind_v import cli
from minimind_v.config import MiniMindConfig, preset_config
from minimind_v.exporters import card as card_module
from minimind_v.exporters.card import write_model_card

EVAL = {
    "accuracy": 0.9333, "blind_accuracy": 0.34, "majority_baseline": 0.31, "n": 300,
    "per_type": {
        "colour": {"n": 150, "accuracy": 0.98, "blind_accuracy": 0.2, "majority_baseline": 0.18},
        "shape": {"n": 150, "accuracy": 0.8866, "blind_accuracy": 0.48, "majority_baseline": 0.44},
    },
}


@pytest.fixture
def eval_json(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(EVAL))
    return str(path)


def test_card_of_a_vlm_has_metadata_usage_and_the_eval_table(tmp_path, eval_json):
    path = write_model_card(str(tmp_path), preset_config("tiny"), fmt="remote-code", eval_json=eval_json,
                            datasets=["jingyaogong/minimind-v_dataset"], repo="me/minimind-v-tiny")
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "transformers"
    assert card.data.datasets == ["jingyaogong/minimind-v_dataset"]
    assert "trust_remote_code=True" in card.text and "'me/minimind-v-tiny'" in card.text
    assert "| colour | 150 | 98.0% | 20.0% | 18.0% |" in card.text
    assert "| **overall** | 300 | 93.3% | 34.0% | 31.0% |" in card.text
    assert "64 visual tokens per image" in card.text


@pytest.mark.parametrize("fmt, library, snippet", [
    ("qwen3", "transformers", "vllm serve"), ("gguf", "gguf", "ollama create"),
    ("lfm2-vl", "transformers", "AutoModelForImageTextToText"),
])
def test_card_names_each_formats_consumer(tmp_path, fmt, library, snippet):
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, use_moe=True) if fmt != "lfm2-vl" else \
        preset_config("tiny")
    card = ModelCard.load(write_model_card(str(tmp_path), config, fmt=fmt, quant="q8_0"))
    assert card.data.library_name == library and snippet in card.text
    assert "No evaluation was recorded" in card.text
    if fmt == "gguf":
        assert "model-q8_0.gguf" in card.text and card.data.pipeline_tag == "text-generation"
    if fmt == "qwen3":
        assert "4 experts (1 per token" in card.text


def test_llm_formats_of_a_vlm_say_the_tower_is_left_out(tmp_path):
    card = ModelCard.load(write_model_card(str(tmp_path), preset_config("tiny"), fmt="qwen3"))
    assert "language model only" in card.text and card.data.pipeline_tag == "text-generation"


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))

    monkeypatch.setattr(card_module, "HfApi", FakeApi)
    assert card_module.push_to_hub(str(tmp_path), "me/m", private=True) == "https://huggingface.co/me/m"
    assert calls == [("create", "me/m", True, True), ("upload", str(tmp_path), "me/m")]


def test_export_command_writes_the_card_with_the_eval_next_to_the_model(tmp_path, tiny_model_dir, monkeypatch):
    source = tmp_path / "run" / "hf"
    source.parent.mkdir()
    shutil.copytree(tiny_model_dir, source)
    (tmp_path / "run" / "eval.json").write_text(json.dumps(EVAL))
    pushed = []
    monkeypatch.setattr(card_module, "push_to_hub", lambda folder, repo, private: pushed.append((folder, repo)) or
                        f"https://huggingface.co/{repo}")
    out = tmp_path / "exported"
    cli.main(["export", "--load_from", str(source), "--out", str(out), "--device", "cpu", "--push_to_hub", "me/x"])
    card = ModelCard.load(out / "README.md")
    assert "| **overall** | 300 | 93.3%" in card.text
    assert pushed == [(str(out), "me/x")]
    assert (out / "model.safetensors").is_file()


def test_quant_without_gguf_is_refused_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="--quant applies to --format gguf only"):
        cli.main(["export", "--load_from", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                  "--quant", "q8_0"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["qwen3", "gguf", "lfm2-vl"])
def test_every_format_from_the_command_line_loads_in_its_consumer(tmp_path, tiny_model_dir, fmt):
    out = tmp_path / fmt
    cli.main(["export", "--load_from", str(tiny_model_dir), "--out", str(out), "--format", fmt, "--device", "cpu"])
    assert ModelCard.load(out / "README.md").data.tags[2] == fmt
    if fmt == "gguf":
        llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
        llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=64, verbose=False)
        assert llm.n_vocab() == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
        assert "FROM ./model-f16.gguf" in (out / "Modelfile").read_text()
        return
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not list(out.glob("*.py"))
    model_class = AutoModelForImageTextToText if fmt == "lfm2-vl" else AutoModelForCausalLM
    assert type(model_class.from_pretrained(str(out))).__name__ == {
        "qwen3": "Qwen3ForCausalLM", "lfm2-vl": "Lfm2VlForConditionalGeneration"}[fmt]


def test_a_model_without_a_tower_is_refused_by_lfm2_vl_before_writing(tmp_path, tiny_model_dir):
    out = tmp_path / "vl"
    with pytest.raises(SystemExit, match="export failed: .*tower"):
        cli.main(["export", "--load_from", str(tiny_model_dir), "--vision_model", "none", "--out", str(out),
                  "--format", "lfm2-vl", "--device", "cpu"])
    assert not out.exists()


def test_int8_inference_flag_is_refused_by_export(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit, match="--quantize is for inference"):
        cli.main(["export", "--load_from", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--quantize", "int8"])
    assert not (tmp_path / "o").exists()
