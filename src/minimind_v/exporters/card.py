"""The model card (README.md with hub metadata) of an exported folder, and the upload to the Hugging Face hub."""

from __future__ import annotations

import json
import os

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..config import VLMConfig

LIBRARY = {"remote-code": "transformers", "qwen3": "transformers", "gguf": "gguf", "lfm2-vl": "transformers"}


def _is_vlm(config, fmt: str) -> bool:
    return fmt in ("remote-code", "lfm2-vl") and isinstance(config, VLMConfig)


def architecture(config, fmt: str) -> str:
    """A few lines on the shapes: decoder, experts, and the tower when the format carries it."""
    decoder = (f"decoder: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
               f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads of "
               f"{config.head_dim}, vocabulary {config.vocab_size}")
    if config.use_moe:
        decoder += (f", {config.num_experts} experts ({config.num_experts_per_tok} per token, "
                    f"{config.moe_intermediate_size} wide)")
    else:
        decoder += f", SwiGLU {config.intermediate_size} wide"
    lines = [f"- {decoder}"]
    if _is_vlm(config, fmt):
        tower = config.vision_config or {}
        lines.append(f"- vision tower: SigLIP, {tower.get('num_hidden_layers', '?')} layers, width "
                     f"{config.image_hidden_size}, {config.image_size}x{config.image_size} input, "
                     f"{config.image_token_len} visual tokens per image")
        lines.append("- projector: LayerNorm -> Linear -> GELU -> Linear")
    elif isinstance(config, VLMConfig):
        lines.append("- this format holds the language model only (the vision tower and projector are left out)")
    return "\n".join(lines)


def usage(fmt: str, repo: str, quant: str) -> str:
    """Loading snippets for the format; `repo` is a hub id or a folder."""
    if fmt == "gguf":
        gguf = f"model-{quant}.gguf"
        return (f"```bash\nllama-cli -m {gguf} -cnv          # llama.cpp\nollama create minimind -f Modelfile && "
                f"ollama run minimind\n```\n\n```python\nfrom llama_cpp import Llama\n\nllm = Llama(model_path="
                f"{gguf!r})\nprint(llm.create_chat_completion([{{\"role\": \"user\", \"content\": \"Hello\"}}]))\n```")
    if fmt == "qwen3":
        return (f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\ntokenizer = "
                f"AutoTokenizer.from_pretrained({repo!r})\nmodel = AutoModelForCausalLM.from_pretrained({repo!r})\n"
                "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello\"}], "
                "add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
                "print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0]))\n```\n\n"
                f"vLLM serves it as a Qwen3 model: `vllm serve {repo}`.")
    model_class, remote = (("AutoModelForImageTextToText", "") if fmt == "lfm2-vl"
                           else ("AutoModelForCausalLM", ", trust_remote_code=True"))
    return (f"```python\nfrom PIL import Image\nfrom transformers import AutoProcessor, {model_class}\n\n"
            f"processor = AutoProcessor.from_pretrained({repo!r}{remote})\n"
            f"model = {model_class}.from_pretrained({repo!r}{remote})\n"
            "messages = [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", "
            "\"text\": \"Describe the image.\"}]}]\n"
            "text = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
            "inputs = processor(images=[Image.open(\"photo.jpg\")], text=text, return_tensors=\"pt\")\n"
            "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
            "print(processor.batch_decode(out[:, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True)[0])\n"
            f"```\n\nWith this project: `minimind-v chat --load_from {repo}`.")


def scores(eval_json: str | None) -> str:
    """The held-out table of a `minimind-v eval` result file, or a line saying there is none."""
    if not eval_json:
        return "No evaluation was recorded with this export (`minimind-v eval` writes eval.json)."
    with open(eval_json, encoding="utf-8") as f:
        result = json.load(f)

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    rows = [f"| {name} | {row['n']} | {pct(row['accuracy'])} | {pct(row.get('blind_accuracy'))} | "
            f"{pct(row.get('majority_baseline'))} |" for name, row in result.get("per_type", {}).items()]
    if result.get("accuracy") is not None:
        rows.append(f"| **overall** | {result['n']} | {pct(result['accuracy'])} | {pct(result.get('blind_accuracy'))} "
                    f"| {pct(result.get('majority_baseline'))} |")
    if not rows:
        return "The recorded evaluation holds no question-answer scores."
    header = "| question type | n | accuracy | blind (no image) | majority baseline |\n|---|---|---|---|---|\n"
    return header + "\n".join(rows)


def write_model_card(out_dir: str, config, fmt: str = "remote-code", quant: str = "f16", eval_json: str | None = None,
                     license: str = "apache-2.0", datasets: list[str] | None = None, repo: str | None = None) -> str:
    """Write `{out_dir}/README.md`: hub metadata, architecture, usage for the format, held-out scores."""
    vlm = _is_vlm(config, fmt)
    data = ModelCardData(
        license=license, library_name=LIBRARY[fmt], datasets=list(datasets or []) or None,
        pipeline_tag="image-text-to-text" if vlm else "text-generation",
        tags=["minimind", "minimind-v", fmt] + (["vision-language-model"] if vlm else []),
    )
    title = repo or os.path.basename(os.path.abspath(out_dir))
    body = (f"# {title}\n\nA MiniMind-V {'vision-language' if vlm else 'language'} model exported as `{fmt}`"
            f"{f' ({quant})' if fmt == 'gguf' else ''}.\n\n## Architecture\n\n{architecture(config, fmt)}\n\n"
            f"## Usage\n\n{usage(fmt, repo or out_dir, quant)}\n\n## Held-out evaluation\n\n{scores(eval_json)}\n")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = os.path.join(out_dir, "README.md")
    card.save(path)
    return path


def push_to_hub(folder: str, repo: str, private: bool = False) -> str:
    """Create `repo` if needed and upload `folder` to it; returns the repo URL."""
    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo, commit_message="Upload MiniMind-V export")
    return str(url)
