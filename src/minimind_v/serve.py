"""`minimind-v serve`: an OpenAI-compatible chat completions API with images and videos (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (OpenAI schema; images as `image_url` parts and videos as `video_url`
parts, holding `data:` base64 URLs or, with `--local_image_root`, local paths), `GET /v1/models`, `GET /health`,
and the OpenAPI schema of exactly what they accept at `/openapi.json`. One worker thread owns the model and
decodes the requests together with continuous batching: a request joins the running batch at the next step and
leaves it as soon as it ends or its client leaves. Every error gets an OpenAI error body: 400 for a bad request
(over a limit: a code naming it), 401 for a wrong or missing key (with `--api_key`), 413 for a body over the
limit, 429 when the queue is full, 504 past `--request_timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import itertools
import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, BinaryIO

from PIL import Image

from .chat import load_engine_or_exit
from .generate import (
    ChatRequest,
    Completion,
    Engine,
    GenerationConfig,
    PreparedPrompt,
    PromptTooLong,
    RunningBatch,
    StreamEvent,
)
from .options import add_dtype_argument, add_model_arguments, add_vision_input_arguments
from .tokenizer import IMAGE_MARKER
from .video import VIDEO_MARKER, Video, VideoError, load_video
from .vision import to_rgb
from .weights import run_name

try:
    import anyio
    import uvicorn
    from fastapi import FastAPI, Request, Security
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import ValidationError
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from .api_schema import (
        MESSAGES,
        AssistantMessage,
        ChatCompletion,
        ChatCompletionBody,
        ChatCompletionChunk,
        ErrorBody,
        Health,
        ImagePart,
        ModelList,
        TextPart,
        VideoPart,
    )
except ImportError as missing:
    raise SystemExit(
        f"`minimind-v serve` needs FastAPI and uvicorn ({missing}): pip install 'minimind-v[serve]'"
    ) from missing

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.92  # the reference server's defaults
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # the formats OpenAI accepts; PIL tries no other decoder on them
BEARER = HTTPBearer(auto_error=False)  # `Authorization: Bearer KEY`, checked by `Api.authorize`
MEDIA = {"image": ("an image", "data:image/jpeg;base64,..."), "video": ("a video", "data:video/mp4;base64,...")}
VIDEO_ERROR_CODES = {"video_too_long": "video_too_long", "video_too_large": "video_too_large",
                     "video_support_missing": "video_unsupported"}  # VideoError.reason -> code; others: invalid_video


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class Limits:
    """What one request may ask for, and how long it may take. `max_image_pixels` also bounds each video frame;
    a video's frames each count `image_token_len` visual tokens (one thumbnail-size tile), an image its tiles'."""

    max_images: int = 8
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 8192
    local_image_root: str | None = None
    max_messages: int = 256
    max_body_bytes: int | None = None  # None: room for max_images base64 images and 1 MiB of text
    max_queue: int = 256
    request_timeout: float = 600.0
    send_timeout: float = 30.0
    max_videos: int = 2
    max_video_bytes: int = 16 * 2**20
    max_video_seconds: float = 120.0
    video_frames: int = 8
    max_visual_tokens: int = 4096

    def __post_init__(self):
        if self.max_body_bytes is None:
            self.max_body_bytes = self.max_images * (self.max_image_bytes * 4 // 3 + 1024) + 2**20


def error_param(error: dict, data: Any) -> str | None:
    """The input location of a pydantic error as OpenAI names it (`messages[0].content`), without the union
    labels pydantic adds to `loc` (`user`, `str`, ...): only the keys found in the input are kept."""
    param, node = "", data
    for i, key in enumerate(error["loc"]):
        if (
            isinstance(node, dict)
            and key in node
            or isinstance(node, list)
            and isinstance(key, int)
            and key < len(node)
        ):
            param += f"[{key}]" if isinstance(key, int) else f".{key}" if param else str(key)
            node = node[key]
        elif error["type"] == "missing" and i == len(error["loc"]) - 1:
            param += f".{key}" if param else str(key)
    return param or None


def invalid(errors: Sequence[dict], data: Any) -> ApiError:
    """Pydantic errors on `data` -> one 400 about the first bad location (all its messages)."""
    param = error_param(errors[0], data)
    text = "; ".join(dict.fromkeys(e["msg"] for e in errors if error_param(e, data) == param))
    return ApiError(f"{param}: {text}" if param else f"the request body: {text}", param)


@dataclass
class Parsed:
    request: ChatRequest
    config: GenerationConfig
    stream: bool
    include_usage: bool


def read_image(source: str | BinaryIO, limits: Limits, param: str) -> Image.Image:
    """A PNG, JPEG, WEBP or GIF as RGB. The size comes from the header and is checked before anything is decoded
    (no decompression bomb gets decoded); an animated image gives its first frame only."""
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise ApiError(
                    f"the image is {image.width}x{image.height} pixels, more than the limit of "
                    f"{limits.max_image_pixels}",
                    param,
                    "image_too_large",
                )
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb  # the file closes with the `with`
    except ApiError:
        raise
    except Image.DecompressionBombError as err:  # over PIL's own limit, found while reading the header
        raise ApiError(f"the image is too large: {err}", param, "image_too_large") from err
    except Exception as err:  # PIL signals bad files with many exception types
        raise ApiError(f"the image could not be read: {type(err).__name__}: {err}", param, "invalid_image") from err


def media_source(url: str, max_bytes: int, limits: Limits, kind: str, param: str) -> bytes | str:
    """An `image_url` / `video_url` (`kind`: image or video) -> the bytes of its `data:` base64 URL, or the path of
    a local file under `--local_image_root`; the size is checked before anything is decoded."""
    noun, example = MEDIA[kind]
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(f"{kind} data URLs must be base64: {example.replace('...', '<data>')}", param,
                           f"invalid_{kind}_url")
        if len(payload) * 3 // 4 > max_bytes:
            raise ApiError(f"{noun} is larger than the limit of {max_bytes} bytes", param, f"{kind}_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(f"the {kind} data URL is not valid base64: {err}", param, f"invalid_{kind}_url") from err
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        raise ApiError(
            f"remote {kind} URLs are not fetched by this server; send the {kind} inline as a data URL ({example})",
            param,
            f"unsupported_{kind}_url",
        )
    return local_path(url.removeprefix("file://"), max_bytes, limits, kind, param)


def local_path(path: str, max_bytes: int, limits: Limits, kind: str, param: str) -> str:
    if limits.local_image_root is None:
        raise ApiError(
            "local file paths are refused; start the server with --local_image_root DIR to allow "
            f"files under DIR, or send the {kind} as a data URL",
            param,
            f"unsupported_{kind}_url",
        )
    root = os.path.realpath(limits.local_image_root)
    try:
        full = os.path.realpath(os.path.join(root, path))
    except ValueError as err:  # a NUL byte in the path
        raise ApiError(f"not a file path: {err}", param, f"invalid_{kind}") from err
    if os.path.commonpath([root, full]) != root:
        raise ApiError(f"{path!r} is outside --local_image_root", param, f"unsupported_{kind}_url")
    if not os.path.isfile(full):
        raise ApiError(f"no {kind} file at {path!r}", param, f"invalid_{kind}")
    if os.path.getsize(full) > max_bytes:
        raise ApiError(f"{MEDIA[kind][0]} is larger than the limit of {max_bytes} bytes", param, f"{kind}_too_large")
    return full


def decode_image_url(url: str, limits: Limits, param: str) -> Image.Image:
    """An `image_url` -> RGB PIL image: `data:` base64 URLs, or local files under `--local_image_root`."""
    source = media_source(url, limits.max_image_bytes, limits, "image", param)
    return read_image(io.BytesIO(source) if isinstance(source, bytes) else source, limits, param)


def decode_video_url(url: str, limits: Limits, param: str) -> Video:
    """A `video_url` -> `--video_frames` frames sampled uniformly: `data:` base64 URLs of mp4/mov, webm/mkv, avi or
    gif files, or such files under `--local_image_root`."""
    source = media_source(url, limits.max_video_bytes, limits, "video", param)
    try:
        return load_video(source, limits.video_frames, limits.max_video_seconds, limits.max_image_pixels)
    except VideoError as err:
        code = VIDEO_ERROR_CODES.get(err.reason, "invalid_video")
        raise ApiError(f"the video cannot be used: {err}", param, code) from err


def message_text(content: str | list[TextPart | ImagePart | VideoPart] | None, param: str, limits: Limits,
                 images: list, videos: list) -> str:
    """A validated message content as text; its images and videos are read into `images` and `videos` and replaced
    by `<image>` and `<video>` markers."""
    pieces = []
    for i, part in enumerate(content if isinstance(content, list) else [content or ""]):
        where = f"{param}[{i}]" if isinstance(content, list) else param
        if isinstance(part, ImagePart):
            if len(images) >= limits.max_images:
                raise ApiError(f"more than {limits.max_images} images in one request", where, "too_many_images")
            images.append(decode_image_url(part.image_url.url, limits, f"{where}.image_url.url"))
            pieces.append(IMAGE_MARKER)
            continue
        if isinstance(part, VideoPart):
            if len(videos) >= limits.max_videos:
                raise ApiError(f"more than {limits.max_videos} videos in one request", where, "too_many_videos")
            videos.append(decode_video_url(part.video_url.url, limits, f"{where}.video_url.url"))
            pieces.append(VIDEO_MARKER)
            continue
        text = part if isinstance(part, str) else part.text
        for marker, kind in ((IMAGE_MARKER, "image"), (VIDEO_MARKER, "video")):
            if marker in text:
                raise ApiError(f"text may not contain {marker}; send {kind}s as {kind}_url parts", where)
        pieces.append(text)
    return "".join(pieces)


def parse_messages(messages: Any, limits: Limits) -> tuple[list[dict], list, list]:
    """OpenAI messages (decoded JSON, or already validated) -> (chat-template messages with `<image>` and
    `<video>` markers, images in order, videos in order), or ApiError."""
    try:
        messages = MESSAGES.validate_python(messages)
    except ValidationError as err:
        raise invalid([e | {"loc": ("messages", *e["loc"])} for e in err.errors()], {"messages": messages}) from err
    if len(messages) > limits.max_messages:
        raise ApiError(f"more than {limits.max_messages} messages in one request", "messages", "too_many_messages")
    parsed, images, videos = [], [], []
    for i, message in enumerate(messages):
        entry = {
            "role": "system" if message.role == "developer" else message.role,
            "content": message_text(message.content, f"messages[{i}].content", limits, images, videos),
        }
        if isinstance(message, AssistantMessage) and message.reasoning_content:
            entry["reasoning_content"] = message.reasoning_content
        if isinstance(message, AssistantMessage) and message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        parsed.append(entry)
    return parsed, images, videos


def parse_body(body: ChatCompletionBody, limits: Limits) -> Parsed:
    """A validated body -> what to generate, or ApiError for what the schema cannot say (this server's limits,
    images that cannot be read)."""
    max_tokens = body.max_tokens or body.max_completion_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(
            f"max_tokens is {max_tokens}, more than this server's limit of {limits.max_tokens}",
            "max_tokens",
            "invalid_value",
        )
    messages, images, videos = parse_messages(body.messages, limits)
    options = body.chat_template_kwargs or {}
    thinking = bool(body.open_thinking or options.get("open_thinking") or options.get("enable_thinking"))
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        seed=None if body.seed is None else body.seed % 2**64,  # any int; a torch.Generator takes 64 bits
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=DEFAULT_TOP_P if body.top_p is None else body.top_p,
        top_k=50 if body.top_k is None else min(body.top_k, 2**31),  # k past the vocabulary keeps every token
        repetition_penalty=body.repetition_penalty or 1.0,
    )
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return Parsed(ChatRequest(messages, images, thinking, tools, videos=videos), config, body.stream, include_usage)


def visual_tokens(model, request: ChatRequest) -> int:
    """Visual tokens of a request's images and videos, row separators aside: `image_token_len` per tile (an
    image's tiles and thumbnail, `ImagePreprocessor.num_tiles`; one per video frame)."""
    processor = getattr(model, "image_processor", None)
    if processor is None:  # a text model, whose chat encoder refuses images
        return 0
    tiles = sum(processor.num_tiles(image) for image in request.images)
    return (tiles + sum(len(video.frames) for video in request.videos)) * model.config.image_token_len


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Answer text -> (text without `<tool_call>` blocks, OpenAI tool_calls). Malformed blocks stay text."""
    calls = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            return match.group(0)
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": str(name), "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
        return ""

    rest = TOOL_CALL.sub(take, text)
    return (rest.strip() if calls else text), calls


class ClientGone(Exception):
    pass


@dataclass
class Job:
    """One request in flight. The worker thread sends it StreamEvents, or an ApiError when its batch failed."""

    parsed: Parsed
    prompt: PreparedPrompt
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def next(self) -> StreamEvent:
        event = await self.events.get()
        if isinstance(event, Exception):
            raise event
        return event

    async def completion(self) -> Completion:
        while (event := await self.next()).completion is None:
            pass
        return event.completion


class Worker:
    """The only thread that touches the model. It decodes the running requests together with continuous batching:
    before every step the waiting requests join (first come, first served, up to `max_batch` rows), so a request
    gets its first token within one step of its arrival while there is room; each request leaves the batch the step
    it ends or its client goes."""

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.largest_batch = 0
        self.active = 0  # requests in the batch that have not ended
        self.running: dict[int, Job] = {}
        self.keys = itertools.count()
        threading.Thread(target=self._serve, name="generation", daemon=True).start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _serve(self) -> None:
        batch = RunningBatch(self.engine)
        while True:
            self._admit(batch)
            try:
                events = batch.step(cancelled=lambda key: self.running[key].cancelled)
            except Exception as err:  # a failed step must not stop the server: its clients get a 500
                for job in self.running.values():
                    job.send(ApiError(f"generation failed: {err!r}", status=500, kind="server_error"))
                self.running.clear()
                batch = RunningBatch(self.engine)
                events = []
            for event in events:
                self.running[event.row].send(event)
                if event.completion is not None:
                    del self.running[event.row]
            self.active = len(self.running)

    def _admit(self, batch: RunningBatch) -> None:
        """Move waiting jobs into the batch while it has room; wait for one when nothing is running."""
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get(block=not batch)
            except queue.Empty:
                break
            if job.cancelled:
                continue
            key = next(self.keys)
            self.running[key] = job
            batch.add(key, job.parsed.request, job.parsed.config, job.prompt)
        self.active = len(self.running)
        self.largest_batch = max(self.largest_batch, len(batch))


async def cancel_on_hang_up(request: Request, job: Job) -> None:
    """Cancel the job when its client disconnects (the body has been read, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True
    job.events.put_nowait(ClientGone())


class EventStream(StreamingResponse):
    """The server-sent events of one job. A client that takes no chunk for `send_timeout` seconds (it stopped
    reading but keeps the connection open) is dropped; when the stream ends for any reason the job is cancelled,
    which stops its decoding at the next step if it is still running."""

    def __init__(self, job: Job, chunks: AsyncIterator[str], send_timeout: float):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job, self.send_timeout = job, send_timeout

    async def stream_response(self, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            with anyio.fail_after(self.send_timeout):
                await send(message)

        try:
            await super().stream_response(send_in_time)
        except TimeoutError:
            pass  # the response ends unfinished, so uvicorn closes the connection
        finally:
            self.job.cancelled = True


class BodyLimit:
    """ASGI middleware: reading a request body past `limit` bytes, as Content-Length declares or as a chunked body
    comes, raises a 413 (answered with an OpenAI body); nothing past the limit is read. (FastAPI's `max_body_size`
    answers a declared size with a plain-text 413 instead.)"""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.limit:
                raise HTTPException(413)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, receive_within_limit, send)


class Deadline:
    """ASGI middleware: a request not answered within `seconds` (a body trickling in, a long wait in the queue, a
    long generation) gets a 504, or is cut off if its stream has started; its job is cancelled."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            with anyio.fail_after(self.seconds):
                await self.app(scope, receive, send_started)
        except TimeoutError:
            if not started:
                error = ApiError(
                    f"the request took longer than {self.seconds:g} s", None, "timeout", status=504, kind="server_error"
                )
                await error.response()(scope, receive, send)


def usage(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


SCHEMAS = "#/components/schemas/"
ERRORS = {"4XX": {"model": ErrorBody, "description": "an OpenAI error body"}}
STREAM_EVENT = {  # each server-sent event (OpenAPI 3.1 without itemSchema: the schema of one event)
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [{"$ref": SCHEMAS + "ChatCompletionChunk"}, {"$ref": SCHEMAS + "ErrorBody"}]
                    },
                },
            ]
        }
    },
}
CHAT_RESPONSES = ERRORS | {
    200: {
        "model": ChatCompletion,
        "description": "the completion, or with `stream: true` server-sent "
        "`chat.completion.chunk` events ending with `data: [DONE]`",
        "content": {"text/event-stream": {"schema": STREAM_EVENT}},
    },
    504: {"model": ErrorBody, "description": "the request took longer than --request_timeout"},
}


class Api:
    """The FastAPI app around one engine."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        limits: Limits,
        api_key: str | None = None,
        max_batch: int = 16,
        cors_origins: Sequence[str] = (),
    ):
        self.worker = Worker(engine, max_batch)
        self.model_name, self.limits, self.api_key = model_name, limits, api_key
        self.created = int(time.time())
        self.app = FastAPI(title="MiniMind-V API", docs_url=None, redoc_url=None)
        self.app.add_exception_handler(ApiError, lambda request, err: err.response())
        self.app.add_exception_handler(RequestValidationError, self.invalid_request)
        self.app.add_exception_handler(HTTPException, self.http_error)
        self.app.add_exception_handler(
            Exception,
            lambda request, err: ApiError(f"internal error: {err!r}", status=500, kind="server_error").response(),
        )
        self.app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
        self.app.add_middleware(Deadline, seconds=limits.request_timeout)
        if cors_origins:
            self.app.add_middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        auth = [Security(self.authorize)] if api_key else []
        self.app.get("/health", response_model=Health)(self.health)
        self.app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=auth)(self.models)
        self.app.post("/v1/chat/completions", responses=CHAT_RESPONSES, dependencies=auth)(self.chat_completions)
        self.app.openapi = self.openapi

    def openapi(self) -> dict:
        """FastAPI's schema plus the stream's chunk schema (FastAPI only collects the models of JSON bodies)."""
        if self.app.openapi_schema is None:
            schema = get_openapi(title=self.app.title, version=self.app.version, routes=self.app.routes)
            chunk = ChatCompletionChunk.model_json_schema(ref_template=SCHEMAS + "{model}", mode="serialization")
            schema["components"]["schemas"] |= chunk.pop("$defs") | {"ChatCompletionChunk": chunk}
            self.app.openapi_schema = schema
        return self.app.openapi_schema

    def authorize(self, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(
                "missing or incorrect API key (send Authorization: Bearer <key>)", None, "invalid_api_key", status=401
            )

    def invalid_request(self, request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if errors[0]["type"] == "json_invalid":
            return ApiError(f"the request body is not valid JSON: {errors[0]['ctx']['error']}").response()
        if isinstance(err.body, bytes):  # FastAPI leaves a body that is not declared as JSON unparsed
            return ApiError("the request body must be JSON, sent with Content-Type: application/json").response()
        return invalid([e | {"loc": e["loc"][1:]} for e in errors], err.body).response()  # loc[0] is "body"

    def http_error(self, request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 413:
            return ApiError(
                f"the request body is larger than {self.limits.max_body_bytes} bytes",
                None,
                "request_too_large",
                status=413,
            ).response()
        return ApiError(str(err.detail), status=err.status_code).response(err.headers)

    async def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_name,
            "queued": self.worker.jobs.qsize(),
            "active": self.worker.active,
            "largest_batch": self.worker.largest_batch,
        }

    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minimind-v"}],
        }

    def prepare(self, body: ChatCompletionBody, loop: asyncio.AbstractEventLoop) -> Job:
        """Images read and prompt tokenised here, in the request's thread, so that a heavy request delays only
        itself and the worker thread only decodes."""
        parsed = parse_body(body, self.limits)
        if parsed.request.images or parsed.request.videos:
            tokens = visual_tokens(self.worker.engine.model, parsed.request)
            if tokens > self.limits.max_visual_tokens:
                raise ApiError(
                    f"the images and videos make {tokens} visual tokens, more than the limit of "
                    f"{self.limits.max_visual_tokens}",
                    "messages",
                    "too_many_visual_tokens",
                )
        try:
            prompt = self.worker.engine.prepare(parsed.request)
        except PromptTooLong as err:
            raise ApiError(str(err), "messages", "context_length_exceeded") from err
        except ValueError as err:  # the chat encoder's EncodingError: a template that cannot render the messages
            raise ApiError(f"could not build the prompt: {err}", "messages") from err
        return Job(parsed, prompt, loop)

    async def chat_completions(self, body: ChatCompletionBody, request: Request):
        if self.worker.jobs.qsize() >= self.limits.max_queue:
            raise ApiError(
                f"the server is busy ({self.limits.max_queue} requests queued); retry later",
                None,
                "queue_full",
                status=429,
                kind="rate_limit_error",
            )
        job = await run_in_threadpool(self.prepare, body, asyncio.get_running_loop())
        self.worker.submit(job)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if job.parsed.stream:
            return EventStream(job, self.chunks(job, reply_id, created), self.limits.send_timeout)
        watcher = asyncio.create_task(cancel_on_hang_up(request, job))
        try:
            completion = await job.completion()
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        finally:
            watcher.cancel()
            job.cancelled = True  # no effect once the job is done; stops it on a timeout
        return self.reply(job, completion, reply_id, created)

    def reply(self, job: Job, completion: Completion, reply_id: str, created: int) -> dict:
        message = {"role": "assistant", "content": completion.text}
        if completion.reasoning is not None:
            message["reasoning_content"] = completion.reasoning
        finish = completion.finish_reason
        if job.parsed.request.tools:
            message["content"], calls = split_tool_calls(completion.text)
            if calls:
                message["tool_calls"], finish = calls, "tool_calls"
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage(completion),
        }

    async def chunks(self, job: Job, reply_id: str, created: int) -> AsyncIterator[str]:
        """Server-sent `chat.completion.chunk` events, ending with `data: [DONE]`."""

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            body = {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                event = await job.next()
            except ApiError as err:
                yield f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
                break
            if event.completion is None:
                delta = {"reasoning_content": event.reasoning} if event.reasoning else {}
                yield chunk(delta | ({"content": event.content} if event.content else {}))
                continue
            finish = event.completion.finish_reason
            calls = split_tool_calls(event.completion.text)[1] if job.parsed.request.tools else []
            if calls:
                finish = "tool_calls"
                yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
            yield chunk({}, finish)
            if job.parsed.include_usage:
                yield chunk(None, usage=usage(event.completion))
            break
        yield "data: [DONE]\n\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    add_dtype_argument(parser)
    add_vision_input_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: every interface)"
    )
    parser.add_argument("--port", type=int, default=8998, help="(default: %(default)s)")
    parser.add_argument("--model_name", default=None, help="model id reported by the API (default: from the weights)")
    parser.add_argument(
        "--api_key",
        default=os.environ.get("MINIMIND_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $MINIMIND_API_KEY, else no key)",
    )
    parser.add_argument(
        "--cors_origins",
        nargs="*",
        default=[],
        help="browser origins allowed to call the API (default: none, and no CORS headers)",
    )
    parser.add_argument(
        "--max_batch", type=int, default=16, help="most requests decoded together (default: %(default)s)"
    )
    parser.add_argument(
        "--max_seq_len", type=int, default=8192, help="longest prompt, in tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--max_tokens_limit",
        type=int,
        default=8192,
        help="largest max_tokens a request may ask for, also the default (default: %(default)s)",
    )
    parser.add_argument(
        "--max_messages", type=int, default=256, help="most messages in one request (default: %(default)s)"
    )
    parser.add_argument("--max_images", type=int, default=8, help="most images in one request (default: %(default)s)")
    parser.add_argument(
        "--max_image_bytes", type=int, default=10 * 2**20, help="largest image file, in bytes (default: %(default)s)"
    )
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=4096 * 4096,
        help="largest image, in pixels, read from its header before decoding (default: %(default)s)",
    )
    parser.add_argument("--max_videos", type=int, default=2, help="most videos in one request (default: %(default)s)")
    parser.add_argument(
        "--max_video_bytes",
        type=int,
        default=16 * 2**20,
        help="largest video file, in bytes; its frames are bounded by --max_image_pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--max_video_seconds",
        type=float,
        default=120.0,
        help="longest video, in seconds, from its header before decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--max_visual_tokens",
        type=int,
        default=4096,
        help="most visual tokens of one request: image_token_len per image tile (and thumbnail) and per video "
        "frame (default: %(default)s)",
    )
    parser.add_argument(
        "--max_body_bytes",
        type=int,
        default=None,
        help="largest request body, with or without Content-Length (default: room for --max_images "
        "base64 images of --max_image_bytes, plus 1 MiB)",
    )
    parser.add_argument(
        "--max_queue",
        type=int,
        default=256,
        help="most requests waiting for the model; more get a 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--max_connections",
        type=int,
        default=512,
        help="most open connections; more get a 503 from uvicorn (default: %(default)s)",
    )
    parser.add_argument(
        "--request_timeout",
        type=float,
        default=600.0,
        help="seconds a request may take from its headers to its last token; then a 504, or a "
        "stream cut off (default: %(default)s)",
    )
    parser.add_argument(
        "--send_timeout",
        type=float,
        default=30.0,
        help="seconds a streaming client may leave a chunk unread before it is dropped (default: %(default)s)",
    )
    parser.add_argument(
        "--local_image_root",
        default=None,
        help="also accept image and video URLs that are paths of files under this folder (default: none)",
    )


def default_model_name(args) -> str:
    if args.load_from:
        return os.path.basename(os.path.normpath(args.load_from))
    return run_name(args.weight, args.hidden_size, bool(args.use_moe))


def main(args) -> None:
    engine = load_engine_or_exit(args)
    limits = Limits(
        args.max_images,
        args.max_image_bytes,
        args.max_image_pixels,
        args.max_tokens_limit,
        args.local_image_root,
        args.max_messages,
        args.max_body_bytes,
        args.max_queue,
        args.request_timeout,
        args.send_timeout,
        max_videos=args.max_videos,
        max_video_bytes=args.max_video_bytes,
        max_video_seconds=args.max_video_seconds,
        video_frames=args.video_frames,
        max_visual_tokens=args.max_visual_tokens,
    )
    api = Api(
        engine, args.model_name or default_model_name(args), limits, args.api_key, args.max_batch, args.cors_origins
    )
    print(f"serving {api.model_name} at http://{args.host}:{args.port}/v1 (OpenAI chat completions)")
    uvicorn.run(api.app, host=args.host, port=args.port, log_level="info", limit_concurrency=args.max_connections)
