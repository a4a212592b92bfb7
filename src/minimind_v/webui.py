"""`minimind-v webui`: a Gradio chat with images and videos. The whole conversation (with its images and videos)
goes to the model each turn; videos (`video.VIDEO_EXTENSIONS`, animated GIFs) become `--video_frames` frames;
replies stream; temperature, top-p, reply length and reasoning are set in the page; a dropdown picks any model
found in `--models_dir`. Nothing is fetched from the internet (no analytics, no share link).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import threading
from dataclasses import dataclass

import torch

from .chat import load_engine
from .generate import ChatRequest, Engine, GenerationConfig
from .options import add_dtype_argument, add_model_arguments, add_sampling_arguments, add_vision_input_arguments
from .tokenizer import IMAGE_MARKER
from .video import VIDEO_EXTENSIONS, VIDEO_MARKER, Video, is_video_file, load_video
from .vision import load_image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
try:
    import gradio as gr
except ImportError as missing:
    raise SystemExit(f"`minimind-v webui` needs Gradio ({missing}): pip install 'minimind-v[webui]'") from missing

NATIVE_WEIGHTS = re.compile(r"^(?P<prefix>.+)_(?P<hidden>\d+)(?P<moe>_moe)?\.pth$")
TRANSFORMERS_FILES = (".bin", ".safetensors")
NEW_CONVERSATION = {"messages": [], "images": [], "videos": []}  # the page's state: what each turn sends again


@dataclass(frozen=True)
class ModelChoice:
    """A model found on disk: a transformers folder, or one native `{prefix}_{hidden}[_moe].pth` file."""

    label: str
    path: str
    native: bool


def _is_transformers_folder(folder: str) -> bool:
    names = os.listdir(folder)
    return any(n.endswith(TRANSFORMERS_FILES) for n in names) or "model.safetensors.index.json" in names


def _native_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if NATIVE_WEIGHTS.match(n) and not n.endswith("_resume.pth"))


def find_models(models_dir: str) -> list[ModelChoice]:
    """Models in `models_dir`, by the reference rule (its sub-folders in reverse name order, skipping names
    that start with `.` or `_`; a folder counts when it holds `.bin` / `.safetensors` weights), extended to
    native weights: each `{prefix}_{hidden}[_moe].pth` in `models_dir` itself or in such a sub-folder."""
    if not os.path.isdir(models_dir):
        return []
    choices = [ModelChoice(n, os.path.join(models_dir, n), True) for n in _native_files(models_dir)]
    for name in sorted(os.listdir(models_dir), reverse=True):
        folder = os.path.join(models_dir, name)
        if name.startswith((".", "_")) or not os.path.isdir(folder):
            continue
        if _is_transformers_folder(folder):
            choices.append(ModelChoice(name, folder, False))
        choices += [ModelChoice(f"{name}/{n}", os.path.join(folder, n), True) for n in _native_files(folder)]
    return choices


def model_args(args, choice: ModelChoice) -> argparse.Namespace:
    """The `add_model_arguments` flags that load `choice` (shape of native weights read from the file)."""
    picked = copy.copy(args)
    if not choice.native:
        picked.load_from = choice.path
        return picked
    match = NATIVE_WEIGHTS.match(os.path.basename(choice.path))
    state = torch.load(choice.path, map_location="cpu", weights_only=True, mmap=True)
    layers = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    picked.load_from, picked.save_dir, picked.weight = None, os.path.dirname(choice.path), match["prefix"]
    picked.hidden_size, picked.use_moe, picked.num_hidden_layers = (
        int(match["hidden"]),
        int(bool(match["moe"])),
        len(layers),
    )
    return picked


class ModelHost:
    """The loaded model; one generation or model switch at a time."""

    def __init__(self, args, choices: list[ModelChoice]):
        self.args, self.choices = args, {c.label: c for c in choices}
        self.engine: Engine | None = None
        self.lock = threading.Lock()

    def load(self, label: str | None) -> str:
        """Switch to the model called `label`; returns a status line for the page."""
        if label not in self.choices:
            return self.no_model_message()
        with self.lock:
            try:
                self.engine = load_engine(model_args(self.args, self.choices[label]))
            except (OSError, ValueError, RuntimeError) as err:
                self.engine = None
                return f"**Could not load {label}:** {err}"
        adapter = f" with the adapter `{self.args.lora}`" if self.args.lora else ""
        return f"Loaded **{label}**{adapter} on {self.args.device}."

    def no_model_message(self) -> str:
        return (
            f"**No model found in `{os.path.abspath(self.args.models_dir)}`.** Put a model folder there "
            "(`minimind-v export --out DIR`, or the folder the demo writes) or native `{prefix}_{hidden}.pth` "
            "weights, then restart with `--models_dir` pointing at it."
        )


def user_entry(text: str, files: list[str]) -> dict:
    return {"role": "user", "content": [{"path": f} for f in files] + ([text] if text else [])}


def respond(
    host: ModelHost,
    message: dict,
    history: list,
    conversation: dict,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    thinking: bool,
):
    """Stream one turn: yields (textbox value, chat history, conversation state)."""
    text, files = (message or {}).get("text", "").strip(), (message or {}).get("files", [])
    if not text and not files:
        yield None, history, conversation
        return
    history = history + [user_entry(text, files)]
    yield None, history, conversation
    try:
        attached = [load_video(f, host.args.video_frames) if is_video_file(f) else load_image(f) for f in files]
    except ValueError as err:
        yield None, history + [{"role": "assistant", "content": f"⚠️ {err}"}], conversation
        return
    if host.engine is None:
        yield None, history + [{"role": "assistant", "content": host.no_model_message()}], conversation
        return
    markers = "".join(VIDEO_MARKER if isinstance(a, Video) else IMAGE_MARKER for a in attached)
    turn = {"role": "user", "content": markers + ("\n" if attached else "") + text}
    request = ChatRequest(
        conversation["messages"] + [turn],
        conversation["images"] + [a for a in attached if not isinstance(a, Video)],
        bool(thinking),
        videos=conversation["videos"] + [a for a in attached if isinstance(a, Video)],
    )
    config = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        top_k=host.args.top_k,
        repetition_penalty=host.args.repetition_penalty,
        seed=host.args.seed,
    )
    reasoning, answer = "", ""
    with host.lock:
        try:
            for event in host.engine.stream(request, config):
                if event.completion is not None:
                    completion = event.completion
                    break
                reasoning, answer = reasoning + event.reasoning, answer + event.content
                yield None, history + reply_entries(reasoning, answer), conversation
        except ValueError as err:
            yield None, history + [{"role": "assistant", "content": f"⚠️ {err}"}], conversation
            return
    reply = {"role": "assistant", "content": completion.text}
    if completion.reasoning is not None:
        reply["reasoning_content"] = completion.reasoning
    conversation = {"messages": request.messages + [reply], "images": request.images, "videos": request.videos}
    yield None, history + reply_entries(completion.reasoning or "", completion.text), conversation


def reply_entries(reasoning: str, answer: str) -> list[dict]:
    """The assistant's turn in the chat: reasoning (if any) in a collapsible box, then the answer."""
    entries = [{"role": "assistant", "content": reasoning, "metadata": {"title": "Thinking"}}] if reasoning else []
    return entries + [{"role": "assistant", "content": answer}]


def build_app(args, host: ModelHost, status: str) -> gr.Blocks:
    with gr.Blocks(title="MiniMind-V", analytics_enabled=False) as app:
        gr.Markdown("# MiniMind-V\nUpload images or videos, ask about them; the whole conversation is sent each turn.")
        with gr.Row():
            model = gr.Dropdown(
                list(host.choices),
                value=next(iter(host.choices), None),
                label="Model",
                interactive=bool(host.choices),
                scale=1,
            )
            status_box = gr.Markdown(status, elem_id="status")
        chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chat", render_markdown=False, reasoning_tags=[])
        textbox = gr.MultimodalTextbox(
            file_types=["image", "video", *VIDEO_EXTENSIONS],
            file_count="multiple",
            sources=["upload"],
            placeholder="Ask something (attach images or videos with the clip)",
            elem_id="ask",
        )
        with gr.Row():
            temperature = gr.Slider(0, 2, value=args.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=args.top_p, step=0.05, label="Top-p")
            max_new_tokens = gr.Slider(
                1, max(args.max_new_tokens, 2048), value=args.max_new_tokens, step=1, label="Max new tokens"
            )
            thinking = gr.Checkbox(value=bool(args.open_thinking), label="Thinking")
            clear = gr.Button("New conversation")
        conversation = gr.State(NEW_CONVERSATION)

        model.change(host.load, model, status_box)
        textbox.submit(
            functools.partial(respond, host),
            [textbox, chatbot, conversation, temperature, top_p, max_new_tokens, thinking],
            [textbox, chatbot, conversation],
        )
        clear.click(lambda: ([], NEW_CONVERSATION), None, [chatbot, conversation])
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    add_dtype_argument(parser)
    add_sampling_arguments(parser, temperature=0.7, top_p=0.95)
    add_vision_input_arguments(parser)
    parser.add_argument(
        "--models_dir", default=".", help="folder scanned for models (transformers folders and native .pth weights)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8888)


def start(args) -> tuple[gr.Blocks, ModelHost]:
    """Find the models (`--load_from` first, then `--models_dir`), load the first and build the page (not
    yet launched)."""
    choices = find_models(args.models_dir)
    if args.load_from:  # an explicitly named folder comes first
        choices.insert(0, ModelChoice(os.path.basename(os.path.normpath(args.load_from)), args.load_from, False))
    host = ModelHost(args, choices)
    status = host.load(next(iter(host.choices), None))
    return build_app(args, host, status), host


def main(args) -> None:
    app, _ = start(args)
    app.queue().launch(
        server_name=args.host, server_port=args.port, share=False, ssr_mode=False, mcp_server=False, footer_links=[]
    )
