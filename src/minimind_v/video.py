"""Videos as a few frames: a video file (mp4, webm, gif, ... decoded by PyAV) or a list of frame images ->
`num_frames` frames sampled uniformly in time, with their timestamps.

In a conversation a video is marked `<video>`; `splice_videos` replaces each marker by `video_text` (one line with
the frame count, then one `{t:.1f}s: <image>` line per frame) and puts the video's frames, squared to the tower's
input size, into the image list at that place, so each frame is one thumbnail-size image of `image_token_len`
visual tokens and the rest of the pipeline sees only images.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image

from .tokenizer import IMAGE_MARKER
from .vision import to_rgb

VIDEO_MARKER = "<video>"  # where a video goes in message text
INSTALL_HINT = 'reading video files needs PyAV: pip install "minimind-v[video]"'
MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
CONTAINERS = {"mov": "mp4 / mov", "matroska": "webm / mkv", "avi": "avi", "gif": "gif"}  # FFmpeg demuxer: files
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")  # files taken as videos, besides animated GIFs
TIE = 1e-6  # seconds: a frame that starts this close to a sampling time counts as showing at it

VideoSource = str | os.PathLike | bytes | bytearray | BinaryIO | Sequence[Any]


@dataclass
class Video:
    """Frames sampled from a video (RGB) and the time each one is shown, in seconds from the first frame."""

    frames: list[Image.Image]
    timestamps: list[float]


class VideoError(ValueError):
    """A video that cannot be used; `reason` says why in snake_case: `bad_video` (not decodable), `no_frames`,
    `video_too_long` (over `max_seconds`), `video_too_large` (a frame over `max_pixels`), `video_mismatch`
    (`<video>` markers and videos disagree), `video_support_missing` (PyAV not installed)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def is_video_file(path: str) -> bool:
    """A video by its name (`VIDEO_EXTENSIONS`, any case), or an animated GIF; a still GIF, or one that cannot be
    read, is an image."""
    name = os.fspath(path).lower()
    if name.endswith(VIDEO_EXTENSIONS):
        return True
    if not name.endswith(".gif"):
        return False
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) > 1
    except Exception:  # PIL signals bad files with many exception types; reading it as an image reports them
        return False


def sample_times(duration: float, num_frames: int) -> list[float]:
    """The uniform sampling times: frame k is the one shown at (k + 0.5) * duration / num_frames."""
    return [(k + 0.5) * duration / num_frames for k in range(num_frames)]


def load_video(
    source: VideoSource,
    num_frames: int,
    max_seconds: float | None = None,
    max_pixels: int | None = None,
    timestamps: Sequence[float] | None = None,
) -> Video:
    """Sample `num_frames` frames uniformly from `source`: a video file (`CONTAINERS`: a path, its bytes, or a
    binary file) or a list/tuple of frame images (PIL images, encoded bytes or paths) with `timestamps` (default:
    one frame a second, frame i at i s). A frame shown at several sampling times is taken once, so a video with
    fewer frames than `num_frames` gives all of them. Raises VideoError (see its reasons); `max_seconds` applies to
    video files, `max_pixels` to every frame and is checked before the frame is decoded into an image."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if isinstance(source, (list, tuple)):
        return _from_frames(source, num_frames, max_pixels, timestamps)
    if timestamps is not None:
        raise ValueError("timestamps are given with a list of frames, not with a video file")
    return _decode(source, num_frames, max_seconds, max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int | None, where: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"{where} is {width}x{height} pixels, more than the limit of {max_pixels}", "video_too_large")


def _frame_image(item: Any, index: int, max_pixels: int | None) -> Image.Image:
    """One frame of a frame list (PIL image, encoded bytes or a path) as RGB."""
    where = f"frame {index}"
    if isinstance(item, Image.Image):
        _check_pixels(item.width, item.height, max_pixels, where)
        return to_rgb(item)
    try:
        with Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item) as image:
            _check_pixels(image.width, image.height, max_pixels, where)
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb
    except VideoError:
        raise
    except Exception as err:  # PIL signals bad files with many exception types
        raise VideoError(f"{where} cannot be read: {type(err).__name__}: {err}", "bad_video") from err


def _from_frames(
    frames: Sequence[Any], num_frames: int, max_pixels: int | None, timestamps: Sequence[float] | None
) -> Video:
    if not frames:
        raise VideoError("the video has no frames", "no_frames")
    if timestamps is not None and len(timestamps) != len(frames):
        raise ValueError(f"{len(timestamps)} timestamps for {len(frames)} frames")
    count = len(frames)
    picked = sorted({(2 * k + 1) * count // (2 * num_frames) for k in range(num_frames)})
    times = [float(timestamps[i]) if timestamps is not None else float(i) for i in picked]
    return Video([_frame_image(frames[i], i, max_pixels) for i in picked], times)


def _opener(source: str | os.PathLike | bytes | bytearray | BinaryIO) -> tuple[Callable[[], Any], str]:
    """(a function that gives the source from its start each time it is called, the source's name). A binary
    file is read from where it stands into memory, as container offsets count from the start of the video."""
    if isinstance(source, (str, os.PathLike)):
        return lambda: os.fspath(source), repr(os.fspath(source))
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else source.read()
    return lambda: io.BytesIO(data), "data"


def container_format(head: bytes) -> str | None:
    """The FFmpeg demuxer of a video file from its first 12 bytes (a key of `CONTAINERS`), or None. Only these
    are opened: FFmpeg's guess would also open playlists and other formats that read further files."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


def _head(opener: Callable[[], Any], is_path: bool) -> bytes:
    with open(opener(), "rb") if is_path else opener() as file:
        return file.read(12)


def _decode(
    source: str | os.PathLike | bytes | bytearray | BinaryIO,
    num_frames: int,
    max_seconds: float | None,
    max_pixels: int | None,
) -> Video:
    try:
        import av
    except ImportError as err:
        raise VideoError(INSTALL_HINT, "video_support_missing") from err
    opener, name = _opener(source)
    try:
        fmt = container_format(_head(opener, isinstance(source, (str, os.PathLike))))
        if fmt is None:
            raise VideoError(f"cannot read video {name}: not a file of a known kind ({', '.join(CONTAINERS.values())})",
                             "bad_video")
        with av.open(opener(), mode="r", format=fmt) as container:
            stream = _video_stream(container)
            _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels, "the video")
            duration = _header_duration(av, container, stream)
            if duration is None:
                duration = _scanned_duration(av, opener, fmt, max_seconds)
            if max_seconds is not None and duration > max_seconds:
                raise VideoError(f"the video lasts {duration:.1f} s, more than the limit of {max_seconds:g} s",
                                 "video_too_long")
            stream.thread_type = "AUTO"
            return _pick_frames(container.decode(stream), sample_times(duration, num_frames), _rate(stream),
                                max_pixels)
    except VideoError:
        raise
    except Exception as err:  # files, PyAV and FFmpeg signal bad videos with many exception types
        raise VideoError(f"cannot read video {name}: {type(err).__name__}: {err}", "bad_video") from err


def _video_stream(container):
    if not container.streams.video:
        raise VideoError("the file holds no video stream", "no_frames")
    return container.streams.video[0]


def _rate(stream) -> float:
    """Frames per second, for frames and packets without a timestamp."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 25.0


def _header_duration(av, container, stream) -> float | None:
    """The video stream's duration from the file's header, in seconds, or None when the header does not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _scanned_duration(av, opener: Callable[[], Any], fmt: str, max_seconds: float | None) -> float:
    """The video stream's duration from its packets (read, not decoded); stops once past `max_seconds`."""
    with av.open(opener(), mode="r", format=fmt) as container:
        stream = _video_stream(container)
        first, end, count = None, 0.0, 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            count += 1
            if packet.pts is not None:
                start = float(packet.pts * packet.time_base)
                first = start if first is None else min(first, start)
                end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            seconds = end - first if first is not None else count / _rate(stream)
            if max_seconds is not None and seconds > max_seconds:
                return seconds
        if count == 0:
            raise VideoError("the video has no frames", "no_frames")
        return seconds


def _pick_frames(frames, targets: list[float], rate: float, max_pixels: int | None) -> Video:
    """Decode `frames` once, in order, taking at each target time (seconds from the first frame) the frame shown
    then: the last one that started at or before it. Only the previous frame is held; decoding stops after the
    last target. Targets past the end take the last frame."""
    picked, times = [], []
    previous, origin, taken = None, None, -1
    pending = iter(targets)
    target = next(pending)

    def take(index: int, frame, time: float) -> None:
        nonlocal taken
        if index != taken:
            picked.append(to_rgb(frame.to_image()))
            times.append(time)
            taken = index

    for index, frame in enumerate(frames):
        _check_pixels(frame.width, frame.height, max_pixels, f"frame {index}")
        start = frame.time if frame.time is not None else index / rate
        origin = start if origin is None else origin
        time = start - origin
        while target is not None and previous is not None and time > target + TIE:
            take(*previous)
            target = next(pending, None)
        if target is None:
            break
        previous = (index, frame, time)
    if previous is None:
        raise VideoError("the video has no frames", "no_frames")
    if target is not None:
        take(*previous)
    return Video(picked, times)


def video_text(video: Video) -> str:
    """The text a video becomes in a message: `Video, N frames:` then one `{t:.1f}s: <image>` line per frame,
    lines joined by newlines (none after the last)."""
    count = len(video.frames)
    lines = [f"Video, {count} frame{'' if count == 1 else 's'}:"]
    return "\n".join(lines + [f"{t:.1f}s: {IMAGE_MARKER}" for t in video.timestamps])


def square_frame(frame: Image.Image, size: int) -> Image.Image:
    """A frame as one size x size image (bicubic), so that it is a single thumbnail-size tile."""
    return frame if frame.size == (size, size) else frame.resize((size, size), Image.Resampling.BICUBIC)


def splice_videos(
    messages: list[dict], images: Sequence[Image.Image], videos: Sequence[Video], frame_size: int
) -> tuple[list[dict], list[Image.Image]]:
    """Messages with `<image>` and `<video>` markers and their images and videos -> the same conversation with
    images only. The markers of the non-system messages with string content are walked in order: each `<image>`
    takes the next image, each `<video>` becomes `video_text(video)` and its frames (squared to `frame_size`) go
    into the image list at that place. Images left without a marker follow at the end, for the chat encoder to
    place or refuse. VideoError `video_mismatch` when the `<video>` markers and the videos differ in number."""
    remaining_images, remaining_videos = list(images)[::-1], list(videos)[::-1]
    markers = sum(m["content"].count(VIDEO_MARKER) for m in messages
                  if m.get("role") != "system" and isinstance(m.get("content"), str))
    if markers != len(videos):
        raise VideoError(f"the messages have {markers} {VIDEO_MARKER} marker(s) for {len(videos)} video(s)",
                         "video_mismatch")
    spliced, ordered = [], []
    for message in messages:
        content = message.get("content")
        if message.get("role") == "system" or not isinstance(content, str):
            spliced.append(message)
            continue
        pieces = []
        for piece in MARKERS.split(content):
            if piece == VIDEO_MARKER:
                video = remaining_videos.pop()
                pieces.append(video_text(video))
                ordered += [square_frame(frame, frame_size) for frame in video.frames]
                continue
            if piece == IMAGE_MARKER and remaining_images:
                ordered.append(remaining_images.pop())
            pieces.append(piece)
        spliced.append({**message, "content": "".join(pieces)})
    return spliced, ordered + remaining_images[::-1]
