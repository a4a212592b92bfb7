"""Property-based tests of the API server. Hypothesis feeds the message parser any JSON: it parses or refuses with
an OpenAI 4xx, never another exception. Schemathesis fuzzes a real server process from its own /openapi.json:
every answer is a success matching the schema or a 4xx with an OpenAI error body; never a 5xx, a hang or a
dropped connection."""

import base64
import io
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minimind_v.tokenizer import IMAGE_MARKER
from minimind_v.video import VIDEO_MARKER
from test_serve import KEY, gif_video, running_server, video_url

st = pytest.importorskip("hypothesis.strategies")
pytest.importorskip("schemathesis")
serve = pytest.importorskip("minimind_v.serve")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the importorskip above)

LIMITS = serve.Limits(max_images=2, max_image_bytes=20_000, max_image_pixels=64 * 64, max_videos=1,
                      max_video_bytes=20_000, max_video_seconds=2, video_frames=2)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def data_url(payload: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(payload).decode()}"


def encoded(seed: int, size: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
URL = st.one_of(
    st.builds(lambda seed, size, fmt: data_url(encoded(seed, size, fmt)), st.integers(0, 9), st.sampled_from([8, 80]),
              st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])),
    st.binary(max_size=40).map(data_url),
    st.text(max_size=20).map(lambda text: "data:image/png;base64," + text),
    st.sampled_from(["https://example.com/cat.png", "/etc/passwd", "file:///etc/passwd", "../x.png", "\0"]),
    st.text(max_size=20),
)
VIDEO_URL = st.one_of(
    st.builds(lambda count, ms: video_url(gif_video(count, ms)), st.integers(1, 6), st.sampled_from([50, 500])),
    st.binary(max_size=40).map(lambda data: video_url(data, "mp4")),
    st.sampled_from([video_url(b"\x1a\x45\xdf\xa3" + bytes(30), "webm"), video_url(b"#EXTM3U\nfile:///etc/passwd\n"),
                     "https://example.com/cat.mp4", "/etc/passwd", "../x.mp4"]),
    URL,
)
PART = st.one_of(JSON, st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "video_url", "input_audio"]) | JSON},
    optional={"text": st.text(max_size=20) | JSON, "image_url": st.fixed_dictionaries({"url": URL}) | JSON,
              "video_url": st.fixed_dictionaries({"url": VIDEO_URL}) | JSON}))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"]) | JSON},
    optional={"content": st.text(max_size=20) | st.lists(PART, max_size=3) | JSON,
              "tool_calls": JSON, "reasoning_content": JSON, "tool_call_id": JSON})


def parses_or_refuses(messages) -> None:
    try:
        parsed, images, videos = serve.parse_messages(messages, LIMITS)
    except serve.ApiError as err:
        assert 400 <= err.status < 500 and err.message
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
        return
    assert len(parsed) == len(messages) and all(isinstance(m["content"], str) for m in parsed)
    assert sum(m["content"].count(IMAGE_MARKER) for m in parsed) == len(images)
    assert all(image.mode == "RGB" and image.width * image.height <= LIMITS.max_image_pixels for image in images)
    assert sum(m["content"].count(VIDEO_MARKER) for m in parsed) == len(videos) <= LIMITS.max_videos
    assert all(1 <= len(video.frames) <= LIMITS.video_frames for video in videos)


@PROPERTY
@given(JSON)
def test_any_json_value_parses_or_gets_a_4xx(value):
    parses_or_refuses(value)


@PROPERTY
@given(st.lists(MESSAGE, max_size=4))
def test_any_messages_parse_or_get_a_4xx(messages):
    parses_or_refuses(messages)


def test_null_user_content_is_refused_where_it_is():
    with pytest.raises(serve.ApiError) as caught:
        serve.parse_messages([{"role": "system", "content": "x"}, {"role": "user", "content": None}], LIMITS)
    assert caught.value.status == 400 and caught.value.param == "messages[1].content"


@pytest.mark.parametrize("reason, code", [("video_too_long", "video_too_long"), ("video_too_large", "video_too_large"),
                                          ("bad_video", "invalid_video"), ("no_frames", "invalid_video"),
                                          ("video_support_missing", "video_unsupported")])
def test_each_video_error_has_its_code(monkeypatch, reason, code):
    def refuse(*args, **kwargs):
        raise serve.VideoError("no", reason)

    monkeypatch.setattr(serve, "load_video", refuse)
    with pytest.raises(serve.ApiError) as caught:
        serve.decode_video_url(video_url(gif_video(2)), LIMITS, "p")
    assert caught.value.status == 400 and caught.value.code == code and caught.value.param == "p"


def test_video_frames_are_bounded_by_the_image_pixel_limit():
    pytest.importorskip("av")
    small = serve.Limits(max_image_pixels=31 * 31, video_frames=2)
    with pytest.raises(serve.ApiError, match="32x32 pixels") as caught:
        serve.decode_video_url(video_url(gif_video(3, size=32)), small, "p")
    assert caught.value.code == "video_too_large"
    assert len(serve.decode_video_url(video_url(gif_video(3, size=31)), small, "p").frames) == 2


def test_visual_tokens_count_image_tiles_and_video_frames():
    from types import SimpleNamespace

    from minimind_v.generate import ChatRequest
    from minimind_v.video import Video
    from minimind_v.vision import ImagePreprocessor

    processor = ImagePreprocessor(size=64, max_tiles=4)
    model = SimpleNamespace(image_processor=processor, config=SimpleNamespace(image_token_len=16))
    wide, small = Image.new("RGB", (256, 128)), Image.new("RGB", (32, 32))
    video = Video([small] * 3, [0.5, 1.5, 2.5])
    request = ChatRequest([], [wide, small], videos=[video])
    assert serve.visual_tokens(model, request) == (processor.num_tiles(wide) + 1 + 3) * 16
    assert processor.num_tiles(wide) > 1
    assert serve.visual_tokens(SimpleNamespace(config=model.config), request) == 0


# The server's own limits (images that cannot be read, max_tokens over --max_tokens_limit) refuse some bodies the
# schema allows, with a 400: positive_data_acceptance does not hold by design. Every other default check does:
# no 5xx, statuses, content types and bodies (streamed events included) as documented, schema-violating bodies
# refused, the API key not ignored. Each phase (examples, coverage, fuzzing) runs; requests time out after 60 s.
FUZZ_EXAMPLES = 60


@pytest.mark.slow
def test_every_answer_is_a_documented_success_or_an_openai_4xx(tiny_model_dir, tmp_path):
    flags = ["--api_key", KEY, "--max_tokens_limit", "8", "--max_seq_len", "400", "--max_images", "2",
             "--max_image_bytes", "60000"]
    with running_server(tiny_model_dir, tmp_path, *flags) as (url, _):
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--max-examples",
             str(FUZZ_EXAMPLES), "--exclude-checks", "positive_data_acceptance", "-H", f"Authorization: Bearer {KEY}",
             "--request-timeout", "60", "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", run.stdout).groups())
    assert generated == passed >= 4 * FUZZ_EXAMPLES
