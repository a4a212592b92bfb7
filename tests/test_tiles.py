"""Images at any resolution: the tile grid, the squares of an image (thumbnail, then tiles), their placeholders
and row separators, their injection, and `--max_tiles` end to end in training, the engine and the exported
processor. `max_tiles=1` stays the one-square reading of the reference."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data
from transformers import AutoModelForCausalLM, AutoProcessor

from minimind_v import cli
from minimind_v.chat_encoder import ChatEncoder
from minimind_v.config import IMAGE_TOKEN_ID, TILE_ROW_END, preset_config
from minimind_v.generate import ChatRequest, Engine, GenerationConfig
from minimind_v.loading import export_pretrained, load_model
from minimind_v.samples import BadSample, SampleBuilder
from minimind_v.vision import ImagePreprocessor, grid_tiles, image_placeholder, select_grid
from minimind_v.vlm import MiniMindVLM

from conftest import liven, photo

GREEDY = GenerationConfig(max_new_tokens=8, do_sample=False)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(data.coffee())  # 600x400


@pytest.mark.parametrize("size, max_tiles, tile, grid", [
    ((1024, 768), 4, 256, (2, 2)), ((1024, 768), 6, 256, (2, 3)), ((768, 1024), 6, 256, (3, 2)),
    ((2000, 500), 4, 256, (1, 4)), ((256, 256), 9, 256, (1, 1)), ((100, 60), 4, 256, (1, 1)),
    ((512, 512), 4, 256, (2, 2)), ((600, 400), 1, 64, (1, 1)),
])
def test_grid_keeps_the_aspect_ratio_and_the_most_pixels(size, max_tiles, tile, grid):
    assert select_grid(*size, max_tiles, tile) == grid


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 12))
def test_grid_never_exceeds_max_tiles_and_small_images_stay_one_square(width, height, max_tiles):
    rows, cols = select_grid(width, height, max_tiles, 64)
    assert 1 <= rows * cols <= max_tiles
    if width <= 64 and height <= 64:
        assert (rows, cols) == (1, 1)


def test_squares_are_the_thumbnail_then_the_tiles_row_major(coffee):
    tiled, plain = ImagePreprocessor(64, max_tiles=6), ImagePreprocessor(64)
    assert tiled.grid(coffee) == (2, 3)
    squares = tiled(coffee)
    assert squares.shape == (7, 3, 64, 64)
    assert torch.equal(squares[0], plain(coffee)[0])  # the thumbnail is the one-square reading
    whole = ImagePreprocessor(192)._normalised(coffee, 192, 128)  # the image at the grid's resolution
    for k, tile in enumerate(squares[1:]):
        row, col = divmod(k, 3)
        assert np.array_equal(tile.numpy(), whole[:, row * 64:(row + 1) * 64, col * 64:(col + 1) * 64])
    small = photo(1, 64)
    assert torch.equal(tiled(small), plain(small))  # one square: nothing added


def test_placeholder_has_a_row_separator_after_each_row_of_tiles(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, image_token_len=4)
    messages = [{"role": "user", "content": "<image>look<image>"}, {"role": "assistant", "content": "ok"}]
    out = encoder.encode(messages, [(2, 3), (1, 1)])
    assert (out.images, out.squares) == (2, 8)
    ids = out.ids
    assert np.count_nonzero(ids == IMAGE_TOKEN_ID) == 8 * 4
    separator = tiny_tokenizer.convert_tokens_to_ids(TILE_ROW_END)
    first = int(np.flatnonzero(ids == IMAGE_TOKEN_ID)[0])
    expected = [IMAGE_TOKEN_ID] * 4 + ([IMAGE_TOKEN_ID] * 12 + [separator]) * 2
    assert ids[first:first + len(expected)].tolist() == expected
    assert image_placeholder((1, 1), 4).count("<|image_pad|>") == 4 and grid_tiles((2, 3)) == 7
    assert np.array_equal(encoder.encode(messages, 2).ids, encoder.encode(messages, [(1, 1), (1, 1)]).ids)


def test_each_square_reaches_its_block_and_separators_keep_their_embedding(tiny_tokenizer, coffee):
    torch.manual_seed(0)
    model = MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer), max_tiles=4)).eval()
    engine = Engine(model, tiny_tokenizer)
    request = ChatRequest([{"role": "user", "content": "<image>\nWhat is it?"}], [coffee])
    ids = torch.tensor([engine.prepare(request).ids])
    squares = model.image_processor([coffee])
    assert squares.shape[0] == 5  # 2x2 grid + thumbnail
    with torch.no_grad():
        embeds = model.embed_with_images(ids, [squares])
        features = model.vision_proj(model.encode_images(squares))  # [5, 64, H]
    image_rows = (ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
    assert torch.equal(embeds[0, image_rows], features.reshape(-1, features.shape[-1]))
    separator = tiny_tokenizer.convert_tokens_to_ids(TILE_ROW_END)
    rows = (ids[0] == separator).nonzero().flatten()
    assert len(rows) == 2 and torch.equal(embeds[0, rows], model.model.embed_tokens(ids[0, rows]))


def test_an_image_cut_by_max_seq_len_is_skipped_whole(tiny_tokenizer, coffee):
    processor = ImagePreprocessor(64, max_tiles=4)
    record = {"conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                                {"role": "assistant", "content": "A cup of coffee."}],
              "image_bytes": encoded(coffee)}
    fits = SampleBuilder("chat", tiny_tokenizer, 400, image_token_len=64, image_processor=processor,
                         add_system_ratio=0)
    sample = fits.build(record, random.Random(0))
    assert sample.pixels.shape == (5, 3, 64, 64)
    cut = SampleBuilder("chat", tiny_tokenizer, 200, image_token_len=64, image_processor=processor,
                        add_system_ratio=0)  # room for the thumbnail and two tiles, not the rest
    with pytest.raises(BadSample, match="image_truncated"):
        cut.build(record, random.Random(0))


@pytest.fixture(scope="module")
def tiled_folder(tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = liven(MiniMindVLM(preset_config("tiny", vocab_size=len(tiny_tokenizer), max_tiles=4)).eval())
    folder = tmp_path_factory.mktemp("tiled") / "tiny-tiled"
    export_pretrained(model, str(folder), tiny_tokenizer)
    return folder


def test_exported_processor_tiles_like_the_engine(tiled_folder, tiny_tokenizer, coffee):
    assert json.loads((tiled_folder / "config.json").read_text())["max_tiles"] == 4
    model, tokenizer = load_model(load_from=str(tiled_folder))
    images = [coffee, photo(3, 64)]
    request = ChatRequest([{"role": "user", "content": "<image>Compare<image> these."}], images)
    ours = Engine(model, tokenizer).generate([request], GREEDY)[0].token_ids
    processor = AutoProcessor.from_pretrained(tiled_folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                             {"type": "image"}, {"type": "text", "text": " these."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images, text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == Engine(model, tokenizer).prepare(request).ids
    assert inputs["pixel_values"].shape == (1, 6, 3, 64, 64)  # 5 squares of the photograph, 1 of the small image
    remote = AutoModelForCausalLM.from_pretrained(tiled_folder, trust_remote_code=True).eval()
    out = remote.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == ours[:8]


def test_max_tiles_overrides_the_folder_and_one_reads_one_square(tiled_folder, coffee):
    model, tokenizer = load_model(load_from=str(tiled_folder), max_tiles=1)
    request = ChatRequest([{"role": "user", "content": "<image>What?"}], [coffee])
    prompt = Engine(model, tokenizer).prepare(request).ids
    assert prompt.count(IMAGE_TOKEN_ID) == 64 and model.image_processor(coffee).shape[0] == 1


def big_scene(seed: int) -> tuple[bytes, str]:
    rng = np.random.default_rng(seed)
    colour = ["red", "blue"][seed % 2]
    pixels = np.full((150, 200, 3), 240, np.uint8)
    y, x = rng.integers(10, 120), rng.integers(10, 170)
    pixels[y:y + 20, x:x + 20] = (220, 30, 30) if colour == "red" else (30, 30, 220)
    return encoded(Image.fromarray(pixels)), colour


def train_tiles(folder, out: str, *flags: str) -> list[float]:
    """A tiny vlm-sft run from zero with --max_tiles 4 on folder/tiles.parquet; its step losses."""
    cli.main(["train", "vlm-sft", "--data_path", str(folder / "tiles.parquet"), "--tokenizer", str(folder / "tok"),
              "--out_dir", str(folder / out), "--checkpoint_dir", str(folder / out), "--log_dir", str(folder / out),
              "--from_weight", "none", "--vision_model", "random:tiny", "--hidden_size", "64",
              "--num_hidden_layers", "2", "--num_workers", "0", "--device", "cpu", "--batch_size", "4",
              "--max_steps", "6", "--max_seq_len", "512", "--max_tiles", "4", "--cpu_dtype", "float32",
              "--max_bad_fraction", "0.5", "--log_interval", "1", "--freeze_llm", "0", *flags])
    lines = (folder / out / "sft_vlm_64" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_training_with_tiles_end_to_end(tiny_tokenizer, tmp_path, capsys, monkeypatch):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    rows = []
    for i in range(12):
        image, colour = big_scene(i)
        rows.append({"conversations": json.dumps([{"role": "user", "content": "<image>\nWhat colour?"},
                                                  {"role": "assistant", "content": colour}]), "image_bytes": image})
    rows[5]["image_bytes"] = b"not an image"
    pq.write_table(pa.table({"conversations": pa.array([r["conversations"] for r in rows], pa.string()),
                             "image_bytes": pa.array([r["image_bytes"] for r in rows], pa.binary())}),
                   tmp_path / "tiles.parquet")
    plain = train_tiles(tmp_path, "plain")
    log = capsys.readouterr().out
    assert "bad_image: 2" in log and "samples 22" in log  # 2 epochs of 11 good rows
    assert len(plain) == 6 and all(np.isfinite(plain))
    squares = []
    encode = MiniMindVLM.encode_images
    monkeypatch.setattr(MiniMindVLM, "encode_images", lambda self, pixels: squares.append(len(pixels))
                        or encode(self, pixels))
    cache = str(tmp_path / "cache")
    assert train_tiles(tmp_path, "filling", "--vision_cache", cache) == plain  # epoch 1 misses, epoch 2 hits
    assert sum(squares) == 11 * 5  # every square of every good image once: 2x2 tiles and the thumbnail
    squares.clear()
    assert train_tiles(tmp_path, "reading", "--vision_cache", cache) == plain and sum(squares) == 0
    model, tokenizer = load_model(save_dir=str(tmp_path / "plain"), weight="sft_vlm", hidden_size=64,
                                  num_hidden_layers=2, tokenizer=str(tmp_path / "tok"), max_tiles=4)
    assert model.config.max_tiles == 4
    image = Image.open(io.BytesIO(big_scene(0)[0]))
    request = ChatRequest([{"role": "user", "content": "<image>\nWhat colour?"}], [image])
    assert Engine(model, tokenizer).generate([request], GREEDY)[0].finish_reason in ("stop", "length")
