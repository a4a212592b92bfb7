"""Videos in training rows: a `video_bytes` cell (a list of encoded frames, or an encoded video file) behind a
`<video>` marker becomes `--video_frames` thumbnail-size images after their timestamps; bad videos are skipped
and counted by reason."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from minimind_v import cli
from minimind_v.config import IMAGE_TOKEN_ID
from minimind_v.samples import BadSample, SampleBuilder
from minimind_v.vision import ImagePreprocessor


def frame_bytes(value: int, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def video_row(frames: list[bytes] | bytes, answer: str = "left") -> dict:
    messages = [{"role": "user", "content": "<video>\nWhich way does it move?"},
                {"role": "assistant", "content": answer}]
    return {"conversations": json.dumps(messages), "video_bytes": frames}


def builder(tokenizer, frames: int, max_tiles: int = 1) -> SampleBuilder:
    return SampleBuilder("chat", tokenizer, 2048, image_token_len=16,
                         image_processor=ImagePreprocessor(64, max_tiles=max_tiles), add_system_ratio=0,
                         video_frames=frames)


@pytest.mark.parametrize("max_tiles", [1, 4])
def test_a_frame_list_becomes_timestamped_one_square_images(tiny_tokenizer, max_tiles):
    row = video_row([frame_bytes(v) for v in range(0, 250, 25)])  # 10 frames at 1 fps
    sample = builder(tiny_tokenizer, 4, max_tiles).build(row, random.Random(0))
    assert sample.pixels.shape == (4, 3, 64, 64)  # 4 frames, one square each whatever max_tiles
    assert np.count_nonzero(sample.ids == IMAGE_TOKEN_ID) == 4 * 16
    text = tiny_tokenizer.decode(sample.ids[sample.ids != IMAGE_TOKEN_ID])
    assert "Video, 4 frames:\n1.0s: \n3.0s: \n6.0s: \n8.0s: \n" in text  # frames shown at (k + 0.5) * 10 / 4 s
    middle = builder(tiny_tokenizer, 1).build(row, random.Random(0))
    expected = ImagePreprocessor(64)(Image.open(io.BytesIO(frame_bytes(125))))  # the frame shown at 5.0 s
    assert np.array_equal(middle.pixels, expected.numpy())


def test_an_encoded_video_file_trains_like_its_frames(tiny_tokenizer):
    av = pytest.importorskip("av", reason="reading video files needs PyAV (the video extra)")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for value in range(0, 250, 25):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), value, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    sample = builder(tiny_tokenizer, 5).build(video_row(buffer.getvalue()), random.Random(0))
    assert sample.pixels.shape == (5, 3, 64, 64)
    brightness = sample.pixels.mean(axis=(1, 2, 3))
    assert np.all(np.diff(brightness) > 0)  # frames in time order


@pytest.mark.parametrize("cell, reason", [
    (b"not a video", "bad_video"), ([], "no_frames"), ([b"not an image"], "bad_video"),
])
def test_bad_videos_are_refused_by_reason(tiny_tokenizer, cell, reason):
    with pytest.raises(BadSample, match=reason):
        builder(tiny_tokenizer, 4).build(video_row(cell), random.Random(0))


def test_markers_and_videos_must_agree(tiny_tokenizer):
    row = video_row([frame_bytes(0)])
    row["conversations"] = row["conversations"].replace("<video>", "<video><video>")
    with pytest.raises(BadSample, match="video_mismatch"):
        builder(tiny_tokenizer, 4).build(row, random.Random(0))
    del row["video_bytes"]
    with pytest.raises(BadSample, match="missing_field"):
        builder(tiny_tokenizer, 4).build(row, random.Random(0))


def test_training_on_video_rows_counts_bad_ones(tiny_tokenizer, tmp_path, capsys):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    rows = [video_row([frame_bytes((7 * i + 30 * k) % 250) for k in range(6)], ["left", "right"][i % 2])
            for i in range(10)]
    rows[3]["video_bytes"] = [b"corrupt"]
    path = tmp_path / "video.parquet"
    pq.write_table(pa.table({"conversations": pa.array([r["conversations"] for r in rows], pa.string()),
                             "video_bytes": pa.array([r["video_bytes"] for r in rows], pa.list_(pa.binary()))}),
                   path)
    cli.main(["train", "vlm-sft", "--data_path", str(path), "--tokenizer", str(tmp_path / "tok"),
              "--out_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
              "--log_dir", str(tmp_path / "runs"), "--from_weight", "none", "--vision_model", "random:tiny",
              "--hidden_size", "64", "--num_hidden_layers", "2", "--num_workers", "0", "--device", "cpu",
              "--batch_size", "3", "--max_steps", "3", "--max_seq_len", "1024", "--video_frames", "3",
              "--cpu_dtype", "float32", "--max_bad_fraction", "0.5", "--log_interval", "1"])
    log = capsys.readouterr().out
    assert "bad_video: 1" in log and "samples 8, rows read 9" in log


def test_the_engine_places_unmarked_videos_then_images_in_the_last_user_message(tiny_tokenizer, tiny_vlm):
    from minimind_v.generate import ChatRequest, Engine
    from minimind_v.video import Video

    frames = [Image.new("RGB", (80, 40), (v, v, v)) for v in (10, 200)]
    request = ChatRequest([{"role": "user", "content": "What happens?"}], [Image.new("RGB", (64, 64))],
                          videos=[Video(frames, [0.0, 1.5])])
    engine = Engine(tiny_vlm, tiny_tokenizer)
    messages, images = engine.visuals(request)
    assert messages[0]["content"] == "Video, 2 frames:\n0.0s: <image>\n1.5s: <image><image>\nWhat happens?"
    assert [image.size for image in images] == [(64, 64)] * 3  # frames squared to the tower's side
    ids = engine.prepare(request).ids
    assert ids.count(IMAGE_TOKEN_ID) == 3 * 64
    with pytest.raises(ValueError, match="no user message"):
        engine.prepare(ChatRequest([{"role": "system", "content": "Hi"}], videos=[Video(frames, [0.0, 1.5])]))


def test_a_request_is_rendered_once_from_prompt_to_prefill(tiny_tokenizer, tiny_vlm, monkeypatch):
    """The engine splices a request's videos once: the prefill takes the images `prepare` found."""
    from minimind_v import generate
    from minimind_v.generate import ChatRequest, Engine, GenerationConfig
    from minimind_v.video import Video

    calls = []
    splice = generate.splice_videos
    monkeypatch.setattr(generate, "splice_videos", lambda *a, **k: calls.append(1) or splice(*a, **k))
    frames = [Image.new("RGB", (80, 40), (v, v, v)) for v in (10, 200)]
    request = ChatRequest([{"role": "user", "content": "<video>\nWhat happens?"}], videos=[Video(frames, [0.0, 1.5])])
    completion = Engine(tiny_vlm, tiny_tokenizer).generate([request], GenerationConfig(max_new_tokens=2))[0]
    assert len(calls) == 1 and completion.prompt_tokens > 2 * 64
