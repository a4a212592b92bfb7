"""`minimind-v chat` (history, images, commands, piped input) and `minimind-v describe` over real photographs
stored in every PIL mode, with unreadable files skipped."""

import io
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from minimind_v import cli
from minimind_v.chat import ChatSession
from minimind_v.generate import ChatRequest, Engine, GenerationConfig
from minimind_v.loading import load_pretrained_folder

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Sample photographs saved in every PIL mode a file can hold, plus three unreadable files."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut, coffee = Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())
    chelsea, camera = Image.fromarray(skimage.data.chelsea()), skimage.data.camera()
    grace = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
    gray = Image.fromarray(camera)
    with_alpha = coffee.convert("RGBA")
    with_alpha.putalpha(Image.linear_gradient("L").resize(coffee.size))
    images = {
        "01_bilevel.png": gray.convert("1"),
        "02_gray.png": gray,
        "03_gray_alpha.png": with_alpha.convert("LA"),
        "04_palette.png": chelsea.convert("P", palette=Image.Palette.ADAPTIVE),
        "05_palette_alpha.tiff": with_alpha.convert("PA"),
        "06_rgba.png": with_alpha,
        "07_rgba.webp": with_alpha,
        "08_cmyk.jpg": astronaut.convert("CMYK"),
        "09_cmyk.tiff": chelsea.convert("CMYK"),
        "10_lab.tiff": astronaut.convert("LAB"),
        "11_gray16.png": Image.fromarray(camera.astype(np.uint16) * 257),
        "12_int32.tiff": Image.fromarray(camera.astype(np.int32) * 1000),
        "13_float.tiff": Image.fromarray(camera.astype(np.float32) / 255.0),
        "14_rgb.bmp": astronaut,
        "15_ycbcr.jpg": coffee.convert("YCbCr"),
    }
    gif = astronaut.convert("P", palette=Image.Palette.ADAPTIVE)
    gif.info["transparency"] = 0
    images["16_palette_transparency.gif"] = gif
    for name, image in images.items():
        image.save(folder / name)
    (folder / "17_grace_hopper.JPG").write_bytes(grace)
    (folder / "18_truncated.jpg").write_bytes(grace[:3000])
    (folder / "19_not_an_image.png").write_bytes(b"this is text, not a PNG")
    (folder / "20_empty.webp").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    modes = {Image.open(folder / name).mode for name in images}
    assert {"1", "L", "LA", "P", "PA", "RGBA", "CMYK", "LAB", "I;16", "I", "F", "RGB"} <= modes
    return folder


@pytest.fixture(scope="module")
def folder_engine(tiny_model_dir, tiny_tokenizer):
    return Engine(load_pretrained_folder(str(tiny_model_dir)).eval(), tiny_tokenizer)


def test_session_keeps_history_images_and_commands(folder_engine, photo_dir):
    session = ChatSession(folder_engine, GREEDY, show_speed=False)
    out = io.StringIO()
    for line in [f"/image {photo_dir / '02_gray.png'}", f"/image {photo_dir / '14_rgb.bmp'}",
                 f"/image {photo_dir / '19_not_an_image.png'}", "What is here?", "/think on", "And why?"]:
        assert session.handle(line, out)
    assert "cannot read image" in out.getvalue() and "19_not_an_image.png" in out.getvalue()
    assert len(session.images) == 2 and not session.pending
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[0]["content"] == "<image><image>\nWhat is here?"
    assert "reasoning_content" in session.messages[3]

    # The last reply is what the model says to the whole conversation, images included.
    expected = folder_engine.generate([ChatRequest(session.messages[:3], session.images, open_thinking=True)],
                                      GREEDY)[0]
    assert session.messages[3]["content"] == expected.text
    assert session.messages[3]["reasoning_content"] == expected.reasoning

    assert session.handle("/reset", out) and session.messages == [] and session.images == []
    assert session.handle("/bogus", out) and "unknown command" in out.getvalue()
    assert not session.handle("/quit", out)


def test_too_long_conversation_is_reported_not_fatal(folder_engine):
    engine = Engine(folder_engine.model, folder_engine.tokenizer, max_prompt_tokens=20)
    session = ChatSession(engine, GREEDY, show_speed=False)
    out = io.StringIO()
    assert session.handle("tell me a very long story about the red circle and the blue square", out)
    assert "more than the limit of 20" in out.getvalue() and session.messages == []


@pytest.mark.slow
def test_chat_command_reads_piped_input(tiny_model_dir, photo_dir, folder_engine):
    script = f"/image {photo_dir / '17_grace_hopper.JPG'}\nWho is this?\n/quit\nnever read\n"
    result = subprocess.run(
        [sys.executable, "-m", "minimind_v", "chat", "--load_from", str(tiny_model_dir), "--temperature", "0",
         "--max_new_tokens", "12", "--device", "cpu", "--dtype", "float32"],
        input=script, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(photo_dir / "17_grace_hopper.JPG").convert("RGB")
    expected = folder_engine.generate([ChatRequest([{"role": "user", "content": "<image>\nWho is this?"}],
                                                   [image])], GREEDY)[0]
    assert "image 1 attached" in result.stdout
    assert expected.text in result.stdout
    assert "[Speed]:" in result.stdout and "never read" not in result.stdout


def test_describe_reads_every_mode_and_skips_broken_files(tiny_model_dir, photo_dir, capsys):
    cli.main(["describe", "--load_from", str(tiny_model_dir), "--image_dir", str(photo_dir), "--max_new_tokens",
              "4", "--device", "cpu", "--prompt", "What is in the picture?"])
    out, err = capsys.readouterr()
    described = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("[Image]: ")]
    assert described == sorted(n for n in os.listdir(photo_dir) if n[:2] <= "17")
    assert out.count("[Speed]:") == 17 and out.count("[Q]: What is in the picture?") == 17
    assert "described 17 image(s), skipped 3: 18_truncated.jpg, 19_not_an_image.png, 20_empty.webp" in out
    assert err.count("[skipped]") == 3


def test_describe_asks_about_a_subfolder_of_images_together(tiny_model_dir, folder_engine, tmp_path, capsys):
    """A subfolder is one question about its images in name order; one whose prompt is over --max_seq_len is
    skipped with the reason, the others still run."""
    for name, colour in (("b.png", "blue"), ("a.png", "red")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    (tmp_path / "pair").mkdir()
    (tmp_path / "crowd").mkdir()
    for name, colour in (("2.png", "green"), ("1.png", "yellow")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "pair" / name)
    for k in range(12):
        Image.new("RGB", (40, 30), "white").save(tmp_path / "crowd" / f"{k:02d}.png")
    (tmp_path / "empty").mkdir()
    cli.main(["describe", "--load_from", str(tiny_model_dir), "--image_dir", str(tmp_path), "--max_new_tokens",
              "4", "--device", "cpu", "--temperature", "0", "--group_prompt", "Which differs?", "--max_seq_len",
              "300"])
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("[Image")] == [
        "[Image]: a.png", "[Image]: b.png", "[Images (2)]: pair"]
    assert "described 2 image(s) and 1 group(s) of images, skipped 1: crowd" in out
    assert "[skipped] crowd: the prompt has" in err and "more than the limit of 300" in err
    images = [Image.open(tmp_path / "pair" / n).convert("RGB") for n in ("1.png", "2.png")]
    request = ChatRequest([{"role": "user", "content": "Image 1: <image>\nImage 2: <image>\nWhich differs?"}],
                          images)
    expected = folder_engine.generate([request], GenerationConfig(max_new_tokens=4, do_sample=False))[0].text
    assert f"[Q]: Which differs?\n[A]: {expected}" in out


def test_describe_without_images_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no images"):
        cli.main(["describe", "--image_dir", str(tmp_path)])


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """An mp4, an animated GIF, a still GIF, a photograph and a file that is not a video."""
    pytest.importorskip("av")
    from test_video import encode, write_gif

    folder = tmp_path_factory.mktemp("videos")
    encode(str(folder / "a_clip.mp4"), "libx264", count=12)
    write_gif(folder / "b_moving.gif", count=6)
    Image.new("RGB", (32, 32), "red").save(folder / "c_still.gif")
    Image.fromarray(skimage.data.coffee()).save(folder / "d_coffee.png")
    (folder / "e_broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really a webm")
    return folder


def test_session_attaches_videos_and_images_in_order(folder_engine, video_dir):
    from minimind_v.video import load_video

    session = ChatSession(folder_engine, GREEDY, show_speed=False, video_frames=3)
    out = io.StringIO()
    for line in [f"/video {video_dir / 'a_clip.mp4'}", f"/image {video_dir / 'd_coffee.png'}",
                 f"/video {video_dir / 'e_broken.webm'}", "What happens?"]:
        assert session.handle(line, out)
    assert "[video 1 attached" in out.getvalue() and "[image 1 attached" in out.getvalue()
    assert "cannot read video" in out.getvalue() and "e_broken.webm" in out.getvalue()
    assert session.messages[0]["content"] == "<video><image>\nWhat happens?" and not session.pending
    assert len(session.images) == 1 and [len(v.frames) for v in session.videos] == [3]

    video = load_video(str(video_dir / "a_clip.mp4"), 3)
    request = ChatRequest(session.messages[:1], session.images, videos=[video])
    assert session.messages[1]["content"] == folder_engine.generate([request], GREEDY)[0].text
    messages, images = folder_engine.visuals(request)
    assert messages[0]["content"].startswith("Video, 3 frames:\n0.2s: <image>\n0.6s: <image>\n1.0s: <image><image>")
    assert len(images) == 4

    assert session.handle("Where was I?", out) and len(session.messages) == 4  # the video stays in the history
    assert session.handle("/reset", out) and session.videos == [] and session.images == []


def test_describe_takes_videos_and_animated_gifs(tiny_model_dir, video_dir, capsys):
    cli.main(["describe", "--load_from", str(tiny_model_dir), "--image_dir", str(video_dir), "--max_new_tokens",
              "4", "--device", "cpu", "--video_frames", "2", "--video_prompt", "What moves?"])
    out, err = capsys.readouterr()
    kinds = [line.split(": ", 1) for line in out.splitlines() if line.startswith(("[Image]: ", "[Video]: "))]
    assert kinds == [["[Video]", "a_clip.mp4"], ["[Video]", "b_moving.gif"], ["[Image]", "c_still.gif"],
                     ["[Image]", "d_coffee.png"]]
    assert out.count("[Q]: What moves?") == 2
    assert "described 2 image(s) and 2 video(s), skipped 1: e_broken.webm" in out
    assert "[skipped] cannot read video" in err
