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


def test_describe_without_images_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no images"):
        cli.main(["describe", "--image_dir", str(tmp_path)])
