"""Each export format of a trained model against our own engine, on held-out questions. One line per format.

    python benchmarks/export_parity.py --load_from demo_out/hf --data_path demo_out/data/vlm_test.parquet

lfm2-vl answers each question with its image (the folder loaded by `AutoModelForImageTextToText`, fed our
pixels); qwen3 and gguf hold the decoder only, so they and our decoder answer the question text without its
image. Figures: greedy answers token-for-token equal to ours (of N), the largest logit difference over the
prompts relative to the largest logit, and held-out accuracy where the format sees the image.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from minimind_v.chat_encoder import ChatEncoder
from minimind_v.evaluate import is_correct, iter_items
from minimind_v.export import export
from minimind_v.exporters.lfm2_vl import lfm2_vl_pixels
from minimind_v.generate import ChatRequest, Engine
from minimind_v.loading import load_model
from minimind_v.tokenizer import IMAGE_MARKER


def text_prompt(encoder: ChatEncoder, question: str) -> list[int]:
    """The generation prompt of the question without its image."""
    messages = [{"role": "user", "content": question.replace(IMAGE_MARKER, "").strip()}]
    return encoder.encode(messages, generation_prompt=True).ids.tolist()


def greedy(model, ids: list[int], new_tokens: int, **inputs) -> tuple[list[int], torch.Tensor]:
    """(greedy continuation, prompt logits [T, V]) of a transformers-style model."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=input_ids, **inputs).logits[0].float()
        out = model.generate(input_ids=input_ids, max_new_tokens=new_tokens, do_sample=False, **inputs)
    return out[0, len(ids):].tolist(), logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def compare_lfm2_vl(model, tokenizer, items, folder: str, new_tokens: int) -> str:
    from transformers import AutoModelForImageTextToText

    native = AutoModelForImageTextToText.from_pretrained(folder).eval()
    engine = Engine(model, tokenizer)
    patch = model.vision_encoder.config.patch_size
    same = ours_right = theirs_right = 0
    worst = 0.0
    for item in items:
        ids = engine.prepare(ChatRequest(messages=[{"role": "user", "content": item.question}],
                                         images=list(item.images))).ids
        pixels = model.image_processor(item.images)
        ours, our_logits = greedy(model, ids, new_tokens, pixel_values=pixels)
        theirs, their_logits = greedy(native, ids, new_tokens, **lfm2_vl_pixels(pixels, patch))
        ours, theirs = until_eos(ours, tokenizer.eos_token_id), until_eos(theirs, tokenizer.eos_token_id)
        same += ours == theirs
        worst = max(worst, relative(their_logits, our_logits))
        ours_right += is_correct(tokenizer.decode(ours, skip_special_tokens=True), item)
        theirs_right += is_correct(tokenizer.decode(theirs, skip_special_tokens=True), item)
    n = len(items)
    return (f"lfm2-vl     greedy equal {same}/{n}  max rel logit diff {worst:.1e}  accuracy ours "
            f"{100 * ours_right / n:.1f}% lfm2-vl {100 * theirs_right / n:.1f}%")


def compare_qwen3(model, tokenizer, items, folder: str, new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(folder).eval()
    encoder = ChatEncoder(tokenizer)
    same, worst = 0, 0.0
    for item in items:
        ids = text_prompt(encoder, item.question)
        ours, our_logits = greedy(model, ids, new_tokens)
        theirs, their_logits = greedy(native, ids, new_tokens)
        same += until_eos(ours, tokenizer.eos_token_id) == until_eos(theirs, tokenizer.eos_token_id)
        worst = max(worst, relative(their_logits, our_logits))
    return f"qwen3       greedy equal {same}/{len(items)}  max rel logit diff {worst:.1e}  (text only)"


def compare_gguf(model, tokenizer, items, path: str, new_tokens: int, quant: str) -> str:
    import llama_cpp

    params = llama_cpp.llama_cpp.llama_model_default_params
    llama_cpp.llama_cpp.llama_model_default_params = lambda: _without_repacking(params())
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False, logits_all=True)
    encoder = ChatEncoder(tokenizer)
    same, worst = 0, 0.0
    for item in items:
        ids = text_prompt(encoder, item.question)
        ours, our_logits = greedy(model, ids, new_tokens)
        llm.reset()
        llm.eval(ids)
        their_logits = torch.tensor(llm.scores[: len(ids)])
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            theirs.append(token)
            if token == tokenizer.eos_token_id or len(theirs) == new_tokens:
                break
        same += until_eos(ours, tokenizer.eos_token_id) == theirs
        worst = max(worst, relative(their_logits, our_logits))
    return f"gguf {quant:<6} greedy equal {same}/{len(items)}  max rel logit diff {worst:.1e}  (text only)"


def _without_repacking(params):
    """llama.cpp's AMX repacking of quantised weights can segfault (ggml-org/llama.cpp#20824)."""
    params.use_extra_bufts = False
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load_from", required=True, help="a trained model folder (e.g. the demo's hf/)")
    parser.add_argument("--data_path", required=True, help="held-out questions (e.g. the demo's vlm_test.parquet)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--formats", nargs="*", default=["lfm2-vl", "qwen3", "gguf:f16", "gguf:q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(load_from=args.load_from, device="cpu")
    items = list(iter_items(args.data_path, max_samples=args.samples))
    with tempfile.TemporaryDirectory() as out:
        for spec in args.formats:
            fmt, _, quant = spec.partition(":")
            folder = os.path.join(out, spec.replace(":", "-"))
            export(model, tokenizer, folder, fmt=fmt, quant=quant or "f16")
            if fmt == "lfm2-vl":
                print(compare_lfm2_vl(model, tokenizer, items, folder, args.new_tokens), flush=True)
            elif fmt == "qwen3":
                print(compare_qwen3(model, tokenizer, items, folder, args.new_tokens), flush=True)
            else:
                path = os.path.join(folder, f"model-{quant}.gguf")
                print(compare_gguf(model, tokenizer, items, path, args.new_tokens, quant), flush=True)


if __name__ == "__main__":
    main()
