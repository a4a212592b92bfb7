"""`minimind-v webui`: the model scan, the no-model message, native weights from the dropdown, and a headless
Chromium session that uploads an image, asks twice and reads the streamed answers (the second one proves
that the whole conversation, image included, reaches the model)."""

import importlib.util
import re
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from minimind_v import cli
from minimind_v.chat import load_image
from minimind_v.config import preset_config
from minimind_v.generate import ChatRequest, GenerationConfig
from minimind_v.loading import export_pretrained
from minimind_v.lora import adapters, add_lora, save_adapter, target_names
from minimind_v.vlm import MiniMindVLM
from minimind_v.weights import save_native

from conftest import liven

webui = pytest.importorskip("minimind_v.webui")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS = 48


def webui_args(*flags: str):
    return cli.build_parser(["webui"]).parse_args(["webui", "--device", "cpu", "--dtype", "float32", *flags])


def test_find_models_follows_the_reference_rule_and_finds_native_weights(tmp_path):
    for folder, files in {"b-model": ["model.safetensors"], "a-model": ["pytorch_model.bin"],
                          "sharded": ["model.safetensors.index.json"], ".hidden": ["model.safetensors"],
                          "_private": ["model.safetensors"], "empty": ["notes.txt"],
                          "out": ["sft_vlm_768.pth", "sft_vlm_768_moe.pth", "sft_vlm_768_resume.pth", "x.pth"]}.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_bytes(b"")
    (tmp_path / "pretrain_vlm_512.pth").write_bytes(b"")
    (tmp_path / "loose.safetensors").write_bytes(b"")
    labels = [c.label for c in webui.find_models(str(tmp_path))]
    assert labels == ["pretrain_vlm_512.pth", "sharded", "out/sft_vlm_768.pth", "out/sft_vlm_768_moe.pth",
                      "b-model", "a-model"]
    assert webui.find_models(str(tmp_path / "missing")) == []


def test_without_a_model_the_page_says_so(tmp_path):
    host = webui.ModelHost(webui_args("--models_dir", str(tmp_path)), [])
    status = host.load(None)
    assert "No model found" in status and str(tmp_path) in status
    turns = list(webui.respond(host, {"text": "hello", "files": []}, [], {"messages": [], "images": []},
                               0.7, 0.9, 8, False))
    assert "No model found" in turns[-1][1][-1]["content"]


def test_native_weights_load_from_the_dropdown(tmp_path, tiny_vlm, tiny_tokenizer):
    save_native(tiny_vlm, str(tmp_path / "out" / "sft_vlm_64.pth"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    args = webui_args("--models_dir", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer"),
                      "--vision_model", "random:tiny")
    host = webui.ModelHost(args, webui.find_models(args.models_dir))
    assert host.load("sft_vlm_64.pth") == "Loaded **sft_vlm_64.pth** on cpu."
    loaded = host.engine.model.state_dict()
    for key, value in tiny_vlm.state_dict().items():
        if not key.startswith("vision_encoder."):
            assert torch.equal(loaded[key], value.half().float()), key


def test_an_adapter_given_with_lora_applies_to_the_model_picked(tmp_path, tiny_vlm, tiny_tokenizer):
    save_native(tiny_vlm, str(tmp_path / "out" / "sft_vlm_64.pth"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    add_lora(tiny_vlm, target_names(tiny_vlm, ["attention"]), rank=4)
    save_adapter(tiny_vlm, str(tmp_path / "lora_x_64"))
    args = webui_args("--models_dir", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer"),
                      "--vision_model", "random:tiny", "--lora", str(tmp_path / "lora_x_64"))
    host = webui.ModelHost(args, webui.find_models(args.models_dir))
    assert "with the adapter" in host.load("sft_vlm_64.pth")
    assert sorted(adapters(host.engine.model)) == sorted(target_names(tiny_vlm, ["attention"]))


def clean_speaker(model: MiniMindVLM, tokenizer) -> MiniMindVLM:
    """Let greedy decoding pick only tokens that are whole words, digits, punctuation or Chinese characters,
    so the page shows exactly the generated text (no markup, control bytes or half characters)."""
    clean = torch.tensor([re.fullmatch(r"[A-Za-z0-9 ,.?!\u4e00-\u9fff]+", tokenizer.decode([i])) is not None
                          and i > 35 for i in range(model.config.vocab_size)])
    with torch.no_grad():
        model.lm_head.weight[~clean] = 0  # a zero row scores 0, below the best of ~200 random rows
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_app(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = clean_speaker(liven(MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer))).eval()),
                          tiny_tokenizer)
    export_pretrained(model, str(tmp_path / "models" / "tiny-vlm"), tiny_tokenizer)
    args = webui_args("--models_dir", str(tmp_path / "models"), "--temperature", "0", "--max_new_tokens",
                      str(MAX_NEW_TOKENS))
    app, host = webui.start(args)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False,
                       ssr_mode=False, mcp_server=False, footer_links=[], quiet=True)
    yield f"http://127.0.0.1:{port}/", host, args
    app.close()


def words(text: str) -> str:
    return " ".join(text.split())


WATCH_BOT_TEXT = """() => {
    window.seen = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('#chat [data-testid="bot"]');
        if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
    }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="Playwright is not installed")
def test_browser_uploads_an_image_and_reads_streamed_answers(running_app, tmp_path):
    from playwright.sync_api import sync_playwright

    url, host, args = running_app
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "pic.png")
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0)
    first_turn = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    first = host.engine.generate([ChatRequest(first_turn, [load_image(str(tmp_path / "pic.png"))])], config)[0]
    second_turn = first_turn + [{"role": "assistant", "content": first.text},
                                {"role": "user", "content": "And what colour is it?"}]
    second = host.engine.generate([ChatRequest(second_turn, [load_image(str(tmp_path / "pic.png"))])], config)[0]
    forgetful = host.engine.generate([ChatRequest(second_turn[-1:])], config)[0]
    assert words(second.text) != words(forgetful.text)  # so the page's answer shows the history was sent

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#ask textarea")
            assert "Loaded tiny-vlm on cpu" in page.inner_text("#status")
            page.evaluate(WATCH_BOT_TEXT)
            page.set_input_files("#ask input[type=file]", str(tmp_path / "pic.png"))
            page.wait_for_selector("#ask img")
            for question, answer in [("What is in the picture?", first.text), ("And what colour is it?",
                                                                                second.text)]:
                page.fill("#ask textarea", question)
                page.press("#ask textarea", "Enter")
                page.wait_for_function(
                    """expected => { const bots = document.querySelectorAll('#chat [data-testid="bot"]');
                       return bots.length && bots[bots.length - 1].innerText.split(/\\s+/).join(' ').trim()
                              === expected; }""", arg=words(answer), timeout=60_000)
            assert page.locator('#chat [data-testid="user"] img').count() == 1
            seen = [words(t) for t in page.evaluate("window.seen")]
        finally:
            browser.close()
    partial = {t for t in seen if t and words(first.text).startswith(t) and t != words(first.text)}
    assert len(partial) >= 2  # the first answer arrived in pieces


def test_a_turn_with_a_video_and_an_image_sends_both(tmp_path, tiny_model_dir):
    pytest.importorskip("av")
    from minimind_v.video import load_video
    from test_serve import gif_video

    (tmp_path / "clip.gif").write_bytes(gif_video(8))
    Image.new("RGB", (40, 30), "green").save(tmp_path / "pic.png")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    args = webui_args("--load_from", str(tiny_model_dir), "--video_frames", "2", "--temperature", "0")
    host = webui.ModelHost(args, [webui.ModelChoice("tiny", str(tiny_model_dir), False)])
    assert host.load("tiny").startswith("Loaded")
    files = [str(tmp_path / "clip.gif"), str(tmp_path / "pic.png")]
    turns = list(webui.respond(host, {"text": "What moves?", "files": files}, [], webui.NEW_CONVERSATION,
                               0.0, 0.9, 6, False))
    history, conversation = turns[-1][1], turns[-1][2]
    assert conversation["messages"][0]["content"] == "<video><image>\nWhat moves?"
    assert [len(v.frames) for v in conversation["videos"]] == [2] and len(conversation["images"]) == 1
    request = ChatRequest(conversation["messages"][:1], [load_image(files[1])],
                          videos=[load_video(files[0], 2)])
    want = host.engine.generate([request], GenerationConfig(max_new_tokens=6, temperature=0))[0]
    assert history[-1]["content"] == want.text == conversation["messages"][1]["content"]

    turns = list(webui.respond(host, {"text": "?", "files": [str(tmp_path / "bad.mp4")]}, history, conversation,
                               0.0, 0.9, 6, False))
    assert "cannot read video" in turns[-1][1][-1]["content"] and turns[-1][2] is conversation
