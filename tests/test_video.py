"""Videos: uniform frame sampling from real mp4 / webm / gif files and frame lists, the errors of bad videos, and
how a video becomes text and images in a conversation."""

import io
import sys
import wave

import numpy as np
import pytest
from PIL import Image

from minimind_v.tokenizer import IMAGE_MARKER
from minimind_v.video import VIDEO_MARKER, Video, VideoError, load_video, splice_videos, video_text

av = pytest.importorskip("av")

FPS, COUNT, SIZE = 10, 30, (64, 48)  # a 3 s clip


def colour(index: int) -> tuple[int, int, int]:
    """Frame `index` is filled with this colour, so a decoded frame tells which one it is."""
    return (index * 8, 255 - index * 8, 128)


def frame_index(image: Image.Image) -> int:
    red = np.asarray(image.convert("RGB"), dtype=np.float64)[..., 0].mean()
    return int(round(red / 8))


def frame_array(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    return np.full((size[1], size[0], 3), colour(index), dtype=np.uint8)


def has_encoder(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        return False
    return True


def encode(target, codec: str, count: int = COUNT, fps: int = FPS, size=SIZE, container_format: str | None = None):
    """Write `count` coloured frames at `fps` with PyAV to a path or a writable file."""
    with av.open(target, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.bit_rate = 8_000_000  # nearly lossless, so each frame keeps its colour
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frame_array(index, size), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_gif(path, count: int = COUNT, frame_ms: int = 100) -> None:
    frames = [Image.fromarray(frame_array(i)) for i in range(count)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


CODECS = [
    ("h264.mp4", "libx264"),
    ("mpeg4.mp4", "mpeg4"),
    ("vp8.webm", "libvpx"),
    ("vp9.webm", "libvpx-vp9"),
]


@pytest.fixture(params=CODECS + [("clip.gif", "gif")], ids=lambda p: p[0])
def clip(request, tmp_path):
    """A 3 s, 10 fps clip of 30 coloured frames in each container and codec the PyAV wheel can write."""
    name, codec = request.param
    path = tmp_path / name
    if codec == "gif":
        write_gif(path)
    elif has_encoder(codec):
        encode(str(path), codec)
    else:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    return path


@pytest.mark.parametrize(
    "num_frames, expected",
    [(1, [15]), (4, [3, 11, 18, 26]), (8, [1, 5, 9, 13, 16, 20, 24, 28]), (30, list(range(30)))],
)
def test_uniform_sampling_picks_the_frame_shown_at_each_time(clip, num_frames, expected):
    video = load_video(str(clip), num_frames)
    assert [frame_index(f) for f in video.frames] == expected  # frame k is shown at (k + 0.5) * 3 s / N
    assert video.timestamps == pytest.approx([i / FPS for i in expected], abs=1e-6)
    assert all(f.mode == "RGB" and f.size == SIZE for f in video.frames)


def test_more_frames_asked_than_the_video_has_gives_each_frame_once(tmp_path):
    path = tmp_path / "short.mp4"
    encode(str(path), "libx264", count=5)
    video = load_video(path, 16)
    assert [frame_index(f) for f in video.frames] == [0, 1, 2, 3, 4]
    assert video.timestamps == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_bytes_and_binary_files_read_like_paths(tmp_path):
    path = tmp_path / "clip.mp4"
    encode(str(path), "libx264")
    data = path.read_bytes()
    expected = load_video(str(path), 4)
    prefixed = io.BytesIO(b"header" + data)
    prefixed.seek(6)  # a binary file is read from where it stands
    for source in (data, bytearray(data), io.BytesIO(data), prefixed):
        video = load_video(source, 4)
        assert video.timestamps == expected.timestamps
        assert [frame_index(f) for f in video.frames] == [frame_index(f) for f in expected.frames]


class WriteOnly(io.RawIOBase):
    """A file that cannot seek: the webm muxer cannot go back to write the duration into the header."""

    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, chunk) -> int:
        self.data += bytes(chunk)
        return len(chunk)


@pytest.mark.skipif(not has_encoder("libvpx"), reason="no vp8 encoder")
def test_a_webm_without_duration_in_its_header_is_measured_from_its_packets():
    sink = WriteOnly()
    encode(sink, "libvpx", container_format="webm")
    with av.open(io.BytesIO(bytes(sink.data))) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    video = load_video(bytes(sink.data), 4)
    assert [frame_index(f) for f in video.frames] == [3, 11, 18, 26]
    with pytest.raises(VideoError) as error:
        load_video(bytes(sink.data), 4, max_seconds=1.0)
    assert error.value.reason == "video_too_long"


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42" + bytes(500)])
def test_undecodable_bytes_are_a_bad_video(data):
    with pytest.raises(VideoError) as error:
        load_video(data, 4)
    assert error.value.reason == "bad_video"


def test_a_cut_file_is_a_bad_video_or_gives_the_frames_it_holds(tmp_path):
    path = tmp_path / "clip.mp4"
    encode(str(path), "libx264")
    try:
        video = load_video(path.read_bytes()[:2000], 4)
    except VideoError as err:
        assert err.reason in ("bad_video", "no_frames")
    else:
        assert 1 <= len(video.frames) <= 4


def test_a_file_without_frames_has_no_frames():
    sound = io.BytesIO()
    with av.open(sound, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(VideoError, match="no video stream") as error:
        load_video(sound.getvalue(), 4)
    assert error.value.reason == "no_frames"
    with pytest.raises(VideoError) as error:
        load_video([], 4)
    assert error.value.reason == "no_frames"


def test_only_known_containers_are_opened(tmp_path):
    """FFmpeg would also open a playlist or a WAV; only mp4/mov, webm/mkv, avi and gif files are tried."""
    sound = tmp_path / "sound.wav"
    with wave.open(str(sound), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(8000)
        file.writeframes(bytes(16000))
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n"
    for source in (str(sound), playlist, str(tmp_path / "missing.mp4")):
        with pytest.raises(VideoError) as error:
            load_video(source, 4)
        assert error.value.reason == "bad_video"


def test_limits_on_length_and_frame_size(tmp_path):
    path = tmp_path / "clip.mp4"
    encode(str(path), "libx264")
    with pytest.raises(VideoError, match="3.0 s, more than the limit of 2 s") as error:
        load_video(path, 4, max_seconds=2)
    assert error.value.reason == "video_too_long"
    assert len(load_video(path, 4, max_seconds=3.5).frames) == 4
    with pytest.raises(VideoError, match="64x48 pixels") as error:
        load_video(path, 4, max_pixels=64 * 48 - 1)
    assert error.value.reason == "video_too_large"
    with pytest.raises(ValueError, match="at least 1"):
        load_video(path, 0)


def test_missing_pyav_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoError, match=r'pip install "minimind-v\[video\]"') as error:
        load_video(b"anything", 4)
    assert error.value.reason == "video_support_missing"
    assert len(load_video([Image.new("RGB", (4, 4))], 1).frames) == 1  # frame lists need no PyAV


def test_frame_lists_sample_by_index_at_one_frame_a_second(tmp_path):
    images = [Image.fromarray(frame_array(i)) for i in range(10)]
    video = load_video(images, 3)
    assert [frame_index(f) for f in video.frames] == [1, 5, 8]
    assert video.timestamps == [1.0, 5.0, 8.0]
    assert load_video(images, 1).timestamps == [5.0]

    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    (tmp_path / "f.png").write_bytes(encoded[5])
    times = [i * 0.5 for i in range(10)]
    video = load_video(encoded, 3, timestamps=times)
    assert [frame_index(f) for f in video.frames] == [1, 5, 8] and video.timestamps == [0.5, 2.5, 4.0]
    assert frame_index(load_video([str(tmp_path / "f.png")], 1).frames[0]) == 5
    assert load_video([Image.new("LA", (4, 4))], 1).frames[0].mode == "RGB"


def test_bad_frames_in_a_list(tmp_path):
    with pytest.raises(VideoError, match="frame 1 cannot be read") as error:
        load_video([Image.new("RGB", (4, 4)), b"junk"], 2)
    assert error.value.reason == "bad_video"
    with pytest.raises(VideoError, match="frame 0 is 100x100") as error:
        load_video([Image.new("RGB", (100, 100))], 1, max_pixels=1000)
    assert error.value.reason == "video_too_large"
    with pytest.raises(ValueError, match="2 timestamps for 3 frames"):
        load_video([Image.new("RGB", (4, 4))] * 3, 1, timestamps=[0, 1])


def test_video_text():
    video = Video([Image.new("RGB", (4, 4))] * 2, [0.25, 1.75])
    assert video_text(video) == f"Video, 2 frames:\n0.2s: {IMAGE_MARKER}\n1.8s: {IMAGE_MARKER}"
    assert video_text(Video(video.frames[:1], [3.0])) == f"Video, 1 frame:\n3.0s: {IMAGE_MARKER}"


def test_splice_videos_keeps_images_and_frames_in_marker_order():
    image_a, image_b = Image.new("RGB", (300, 200), "red"), Image.new("RGB", (20, 20), "blue")
    clip_a = Video([Image.new("RGB", (64, 48), (i, 0, 0)) for i in (1, 2)], [0.5, 1.5])
    clip_b = Video([Image.new("RGB", (640, 480), (9, 0, 0))], [4.0])
    messages = [
        {"role": "system", "content": f"{VIDEO_MARKER} {IMAGE_MARKER} in a system prompt stay text"},
        {"role": "user", "content": f"{IMAGE_MARKER}{VIDEO_MARKER}\nand {VIDEO_MARKER}"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": f"{IMAGE_MARKER} again"},
    ]
    spliced, images = splice_videos(messages, [image_a, image_b], [clip_a, clip_b], frame_size=32)
    assert spliced[0] == messages[0] and spliced[2] == messages[2]
    assert spliced[1]["content"] == f"{IMAGE_MARKER}{video_text(clip_a)}\nand {video_text(clip_b)}"
    assert spliced[3] == messages[3]
    assert messages[1]["content"] == f"{IMAGE_MARKER}{VIDEO_MARKER}\nand {VIDEO_MARKER}"  # input untouched
    assert images[0] is image_a and images[-1] is image_b
    assert [im.getpixel((0, 0))[0] for im in images[1:4]] == [1, 2, 9]
    assert all(im.size == (32, 32) for im in images[1:4])
    assert sum(m["content"].count(IMAGE_MARKER) for m in spliced[1:]) == len(images)


def test_splice_without_videos_changes_nothing_and_mismatches_are_refused():
    messages = [{"role": "user", "content": f"{IMAGE_MARKER} hi"}]
    image = Image.new("RGB", (8, 8))
    assert splice_videos(messages, [image], [], 32) == (messages, [image])
    clip = Video([image], [0.5])
    for text, videos in ((f"{VIDEO_MARKER}", []), ("no marker", [clip]), (f"{VIDEO_MARKER}", [clip, clip])):
        with pytest.raises(VideoError) as error:
            splice_videos([{"role": "user", "content": text}], [], videos, 32)
        assert error.value.reason == "video_mismatch"
