"""GGUF export: llama.cpp (through llama-cpp-python) tokenises, scores and decodes as our model does.

The models are tiny decoders trained for a few seconds on a short text and two chats, so that greedy decoding
follows a learned, well-separated path rather than noise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from minimind_v.config import MiniMindConfig, preset_config
from minimind_v.generate import ChatRequest, Engine, GenerationConfig
from minimind_v.llm import MiniMindForCausalLM
from minimind_v.lora import add_lora
from minimind_v.tokenizer import load_tokenizer, render_chat
from minimind_v.vlm import MiniMindVLM

from conftest import reference_path

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
from minimind_v.exporters.gguf import OLLAMA_TEMPLATE, export_gguf  # noqa: E402

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")

TEXT = ("The red circle is on the left of the blue square. A small purple square sits at the top right. "
        "图片里有一个绿色的三角形和一个黄色的圆。 There are 3 shapes: 1 circle, 1 square and 1 triangle.")
CHATS = [("What colour is the triangle?", "It is green."), ("How many shapes are there?", "There are three shapes.")]
PROMPT = "The red circle is on the left"
MIXED = ["Hello, world!  Two  spaces,\ttabs\n\nand new lines   ", "图片里有一个绿色的三角形。 价格是 12345.67 元",
         "don't I'm we'll 42nd 3.14159 x=y+1; #tag @user ü é ñ 😀", " leading space and trailing  "]
MODELS = {"dense": {}, "moe": dict(use_moe=True, num_experts=4, num_experts_per_tok=2)}


def llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def no_weight_repacking():
    """Load weights as stored: llama.cpp's AMX repacking of quantised weights segfaults on some AMX CPUs
    (ggml-org/llama.cpp#20824); llama-cli's --no-repack does the same."""
    if llama_cpp is None:
        yield
        return
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking)
        yield


def train(model: MiniMindForCausalLM, samples: list[list[int]], steps: int = 80) -> MiniMindForCausalLM:
    """A few full-batch AdamW steps over the samples (right padded, padding unscored): enough to memorise them."""
    longest = max(len(ids) for ids in samples)
    batch = torch.tensor([ids + [0] * (longest - len(ids)) for ids in samples])
    labels = torch.tensor([ids + [-100] * (longest - len(ids)) for ids in samples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(tiny_tokenizer):
    """kind -> a tiny model (seeded) trained on TEXT and CHATS, made on first use."""
    samples = [tiny_tokenizer.encode(TEXT)] + [
        tiny_tokenizer.encode(render_chat(tiny_tokenizer, [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": a}]))
        for q, a in CHATS]
    models = {}

    def get(kind: str) -> MiniMindForCausalLM:
        if kind not in models:
            torch.manual_seed(0)
            config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, vocab_size=len(tiny_tokenizer),
                                    **MODELS[kind])
            models[kind] = train(MiniMindForCausalLM(config), samples)
        return models[kind]

    return get


@pytest.fixture(scope="module")
def exported(trained, tiny_tokenizer, tmp_path_factory):
    """(kind, quant) -> GGUF path, made on first use."""
    root, paths = tmp_path_factory.mktemp("gguf"), {}

    def get(kind: str, quant: str = "f16"):
        if (kind, quant) not in paths:
            paths[kind, quant] = export_gguf(trained(kind), tiny_tokenizer, str(root / kind / quant), quant)
        return paths[kind, quant]

    return get


def with_yarn(model: MiniMindForCausalLM) -> MiniMindForCausalLM:
    """The same weights with inference_rope_scaling on."""
    config = MiniMindConfig(**{**model.config.to_dict(), "inference_rope_scaling": True})
    scaled = MiniMindForCausalLM(config).eval()
    scaled.load_state_dict(model.state_dict())
    return scaled


def our_greedy(model, ids: list[int], steps: int = 20) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


def llama_greedy(llm, ids: list[int], steps: int = 20) -> list[int]:
    llm.reset()
    generated = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        generated.append(token)
        if len(generated) == steps:
            return generated
    return generated


@needs_llama_cpp
def test_tokenisation_matches(exported, tiny_tokenizer):
    llm = llama(exported("dense"), vocab_only=True)
    for text in MIXED:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tiny_tokenizer.encode(text), text
    chat = render_chat(tiny_tokenizer, [{"role": "user", "content": "<think>图片</think> 12 shapes?"}],
                       add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=True, special=True) == tiny_tokenizer.encode(chat)
    # (llama-cpp-python detokenises through a 32-byte buffer: the tiny tokenizer's longest Chinese tokens exceed it)
    for text in (MIXED[0], MIXED[2]):
        assert llm.detokenize(tiny_tokenizer.encode(text)).decode() == text


@needs_llama_cpp
def test_embedding_rows_beyond_the_tokenizer(tiny_tokenizer, tmp_path):
    """A model whose embedding is larger than its tokenizer gets unused filler tokens for the extra rows."""
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1,
                                               vocab_size=len(tiny_tokenizer) + 7))
    path = export_gguf(model, tiny_tokenizer, str(tmp_path))
    types = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == len(tiny_tokenizer) + 7 and set(types[-7:]) == {gguf.TokenType.UNUSED}
    assert types[1] == gguf.TokenType.CONTROL and types[tiny_tokenizer.convert_tokens_to_ids("<think>")] == \
        gguf.TokenType.USER_DEFINED
    llm = llama(path, vocab_only=True)
    assert llm.n_vocab() == len(tiny_tokenizer) + 7
    assert llm.tokenize(MIXED[0].encode(), add_bos=False, special=False) == tiny_tokenizer.encode(MIXED[0])


@needs_llama_cpp
def test_reference_tokenizer_matches(tmp_path):
    """The upstream 6400-token MiniMind tokenizer gives the same ids in llama.cpp."""
    tokenizer = load_tokenizer(str(reference_path("upstream_tokenizer")))
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, vocab_size=len(tokenizer)))
    llm = llama(export_gguf(model, tokenizer, str(tmp_path)), vocab_only=True)
    for text in MIXED + [TEXT]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["dense", "moe", "yarn"])
def test_f16_logits_and_greedy_match(exported, trained, tiny_tokenizer, tmp_path, kind):
    ours = with_yarn(trained("dense")) if kind == "yarn" else trained(kind)
    path = export_gguf(ours, tiny_tokenizer, str(tmp_path)) if kind == "yarn" else exported(kind)
    text_ids, prompt_ids = tiny_tokenizer.encode(TEXT), tiny_tokenizer.encode(PROMPT)
    llm = llama(path, logits_all=True)
    llm.eval(text_ids)
    with torch.no_grad():
        expected = ours(torch.tensor([text_ids])).logits[0]
    got = torch.tensor(llm.scores[: len(text_ids)])
    assert (got - expected).abs().max() <= 5e-3 * expected.abs().max()
    assert llama_greedy(llm, prompt_ids) == our_greedy(ours, prompt_ids)


def test_yarn_changes_the_model(trained, tiny_tokenizer):
    """Without this, the YaRN case above could pass with the scaling ignored on both sides."""
    ids, model = torch.tensor([tiny_tokenizer.encode(TEXT)]), trained("dense")
    with torch.no_grad():
        plain, scaled = model(ids).logits, with_yarn(model)(ids).logits
    assert (plain - scaled).abs().max() > 0.05 * plain.abs().max()


@needs_llama_cpp
def test_q8_0_mostly_agrees(exported, trained, tiny_tokenizer):
    """q8_0 weights: same first 10 greedy tokens as our float32 model, and at least 15 of 20 overall."""
    path = exported("dense", "q8_0")
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    ids = tiny_tokenizer.encode(PROMPT)
    got, expected = llama_greedy(llama(path), ids), our_greedy(trained("dense"), ids)
    assert got[:10] == expected[:10]
    assert sum(a == b for a, b in zip(got, expected)) >= 15


@needs_llama_cpp
def test_llama_cpp_quantiser_q4_k_m(exported, trained, tiny_tokenizer):
    """q4_k_m comes from llama.cpp's own quantiser: the file says so and still loads and decodes."""
    path = exported("dense", "q4_k_m")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    ids = tiny_tokenizer.encode(PROMPT)
    assert len(llama_greedy(llama(path), ids, steps=5)) == 5


@needs_llama_cpp
def test_chat_completion_uses_embedded_template(exported, trained, tiny_tokenizer):
    from llama_cpp import llama_chat_format
    llm = llama(exported("dense"))
    messages = [{"role": "user", "content": CHATS[0][0]}]
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>")
    assert formatter(messages=messages).prompt == render_chat(tiny_tokenizer, messages, add_generation_prompt=True)
    answer = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=20)
    engine = Engine(trained("dense"), tiny_tokenizer)
    ours = engine.generate([ChatRequest(messages=messages)], GenerationConfig(max_new_tokens=20, do_sample=False))[0]
    assert answer["choices"][0]["message"]["content"] == ours.text == CHATS[0][1]
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_modelfile(exported, tiny_tokenizer):
    text = (Path(exported("dense")).parent / "Modelfile").read_text()
    assert text.startswith("FROM ./model-f16.gguf\n")
    assert re.findall(r'PARAMETER stop "(.+)"', text) == ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    assert "PARAMETER temperature 0.7" in text and "PARAMETER top_p 0.85" in text
    assert f'TEMPLATE """{OLLAMA_TEMPLATE}"""' in text
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What shape?"},
         {"role": "assistant", "content": "A circle."}, {"role": "user", "content": "图片?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"},
         {"role": "user", "content": "d"}],
    ]
    for messages in conversations:
        data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        assert render_go_template(OLLAMA_TEMPLATE, data) == \
            render_chat(tiny_tokenizer, messages, add_generation_prompt=True)


def test_vlm_exports_its_decoder(tiny_tokenizer, tmp_path, capsys):
    vlm = MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer))).eval()
    path = export_gguf(vlm, tiny_tokenizer, str(tmp_path))
    assert "language model only" in capsys.readouterr().out
    names = [tensor.name for tensor in gguf.GGUFReader(path).tensors]
    assert "token_embd.weight" in names and not any("vision" in name or "mm" in name for name in names)


@pytest.mark.parametrize("problem", ["quant", "lora", "norm_topk_prob", "hidden_act", "vocab"])
def test_unrepresentable_is_refused_before_writing(tiny_tokenizer, tmp_path, problem):
    config = dict(hidden_size=64, num_hidden_layers=1, vocab_size=len(tiny_tokenizer))
    config.update({"norm_topk_prob": dict(use_moe=True, norm_topk_prob=False), "hidden_act": dict(hidden_act="gelu"),
                   "vocab": dict(vocab_size=100)}.get(problem, {}))
    model = MiniMindForCausalLM(MiniMindConfig(**config))
    if problem == "lora":
        add_lora(model, ["model.layers.0.self_attn.q_proj"], rank=2)
    with pytest.raises(ValueError):
        export_gguf(model, tiny_tokenizer, str(tmp_path / "out"), quant="q3" if problem == "quant" else "f16")
    assert not (tmp_path / "out").exists()


GO_FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda a, b: a and b,
            "not": lambda a: not a, "len": len, "slice": lambda seq, start: seq[start:]}


def render_go_template(template: str, data: dict) -> str:
    """The part of Go's text/template a Modelfile TEMPLATE uses: `{{-` / `-}}` trimming, if/else/range/end,
    `$var :=`, fields (`.Role`, `$.Messages`), string and int literals, eq/ne/and/not/len/slice, parentheses."""
    parts = re.split(r"({{.*?}})", template)
    nodes = []
    for i, part in enumerate(parts):
        if part.startswith("{{"):
            nodes.append(("act", part[2:-2].removeprefix("-").removesuffix("-").strip()))
            continue
        if i > 0 and parts[i - 1].endswith("-}}"):
            part = part.lstrip()
        if i + 1 < len(parts) and parts[i + 1].startswith("{{-"):
            part = part.rstrip()
        nodes.append(("text", part))
    out = []
    _run(_parse(nodes, 0)[0], {"$": data}, data, out)
    return "".join(out)


def _parse(nodes: list, i: int) -> tuple[list, int]:
    block = []
    while i < len(nodes):
        kind, value = nodes[i]
        word = value.split()[0] if kind == "act" else ""
        if word in ("end", "else"):
            return block, i
        if word in ("if", "range"):
            body, i = _parse(nodes, i + 1)
            orelse = []
            if nodes[i][1] == "else":
                orelse, i = _parse(nodes, i + 1)
            block.append((word, value[len(word):].strip(), body, orelse))
        else:
            block.append((kind, value))
        i += 1
    return block, i


def _run(block: list, scope: dict, dot, out: list) -> None:
    for node in block:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "if":
            _run(node[2] if _eval(node[1], scope, dot) else node[3], dict(scope), dot, out)
        elif node[0] == "range":
            index, item, expr = re.fullmatch(r"\$(\w+), \$(\w+) := (.+)", node[1]).groups()
            for i, value in enumerate(_eval(expr, scope, dot)):
                _run(node[2], {**scope, index: i, item: value}, value, out)
        elif (assign := re.fullmatch(r"\$(\w+) := (.+)", node[1])) is not None:
            scope[assign[1]] = _eval(assign[2], scope, dot)
        else:
            out.append(str(_eval(node[1], scope, dot)))


def _eval(expr: str, scope: dict, dot):
    value, rest = _call(re.findall(r'"[^"]*"|\(|\)|[^\s()]+', expr), scope, dot)
    assert not rest, expr
    return value


def _call(tokens: list, scope: dict, dot):
    args = []
    while tokens and tokens[0] != ")":
        token, tokens = tokens[0], tokens[1:]
        if token == "(":
            value, tokens = _call(tokens, scope, dot)
            tokens = tokens[1:]
        elif token.startswith('"'):
            value = token[1:-1]
        elif token.isdigit():
            value = int(token)
        elif token.startswith("$"):
            name, _, field = token[1:].partition(".")
            value = scope[name or "$"][field] if field else scope[name or "$"]
        elif token.startswith("."):
            value = dot[token[1:]]
        else:
            value = GO_FUNCS[token]
        args.append(value)
    return (args[0](*args[1:]) if callable(args[0]) else args[0]), tokens
