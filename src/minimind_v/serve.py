"""`minimind-v serve`: an OpenAI-compatible chat completions API with images (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (OpenAI schema; images as `image_url` parts holding `data:` base64
URLs), `GET /v1/models`, `GET /health`. One worker thread owns the model: the requests waiting when it
becomes free are decoded together as one left-padded batch, later ones queue. Bad requests get a 400 with
an OpenAI error body, a wrong or missing key (with `--api_key`) a 401.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import io
import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .chat import load_engine_or_exit
from .generate import ChatRequest, Completion, Engine, GenerationConfig, PromptTooLong, StreamEvent
from .options import add_model_arguments
from .tokenizer import IMAGE_MARKER
from .vision import load_image
from .weights import run_name

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException
except ImportError as missing:
    raise SystemExit(f"`minimind-v serve` needs FastAPI and uvicorn ({missing}): "
                     "pip install 'minimind-v[serve]'") from missing

ROLES = {"system", "developer", "user", "assistant", "tool"}
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.92  # the reference server's defaults


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class Limits:
    """What one request may ask for."""

    max_images: int = 8
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 8192
    local_image_root: str | None = None

    @property
    def max_body_bytes(self) -> int:
        return self.max_images * (self.max_image_bytes * 4 // 3 + 1024) + 2**20


class ChatCompletionBody(BaseModel):
    """The request fields this server reads; other OpenAI fields (user, logprobs, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: list[dict] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: dict | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    tools: list[dict] | None = None
    open_thinking: bool = False
    chat_template_kwargs: dict | None = None


@dataclass
class Parsed:
    request: ChatRequest
    config: GenerationConfig
    stream: bool
    include_usage: bool


def decode_image_url(url: str, limits: Limits, param: str):
    """An `image_url` -> RGB PIL image: `data:` base64 URLs, or local files under `--local_image_root`."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError("image data URLs must be base64: data:image/png;base64,<data>", param, "invalid_image_url")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(f"an image is larger than the limit of {limits.max_image_bytes} bytes", param,
                           "image_too_large")
        try:
            data = io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as err:
            raise ApiError(f"the image data URL is not valid base64: {err}", param, "invalid_image_url") from err
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        raise ApiError("remote image URLs are not fetched by this server; send the image inline as a data URL "
                       "(data:image/jpeg;base64,...)", param, "unsupported_image_url")
    else:
        data = local_image_path(url.removeprefix("file://"), limits, param)
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ValueError as err:
        raise ApiError(f"the image could not be read: {err.__cause__ or err}", param, "invalid_image") from err


def local_image_path(path: str, limits: Limits, param: str) -> str:
    if limits.local_image_root is None:
        raise ApiError("local file paths are refused; start the server with --local_image_root DIR to allow "
                       "files under DIR, or send the image as a data URL", param, "unsupported_image_url")
    root = os.path.realpath(limits.local_image_root)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise ApiError(f"{path!r} is outside --local_image_root", param, "unsupported_image_url")
    if not os.path.isfile(full):
        raise ApiError(f"no image file at {path!r}", param, "invalid_image")
    if os.path.getsize(full) > limits.max_image_bytes:
        raise ApiError(f"an image is larger than the limit of {limits.max_image_bytes} bytes", param,
                       "image_too_large")
    return full


def message_text(content, param: str, allow_images: bool, limits: Limits, images: list) -> str:
    """A message's content (string or list of parts) as text, images replaced by `<image>` markers."""
    if content is None or isinstance(content, str):
        parts = [{"type": "text", "text": content or ""}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ApiError("content must be a string or a list of parts", param)
    pieces = []
    for i, part in enumerate(parts):
        where = f"{param}[{i}]" if isinstance(content, list) else param
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_MARKER in part["text"]:
                raise ApiError(f"text may not contain {IMAGE_MARKER}; send images as image_url parts", where)
            pieces.append(part["text"])
        elif kind == "image_url" and allow_images:
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise ApiError("an image_url part needs {'url': ...}", where)
            if len(images) >= limits.max_images:
                raise ApiError(f"more than {limits.max_images} images in one request", where, "too_many_images")
            images.append(decode_image_url(url, limits, where))
            pieces.append(IMAGE_MARKER)
        elif kind == "image_url":
            raise ApiError("images are accepted in user messages only", where)
        else:
            raise ApiError(f"unsupported content part {kind!r}; use text or image_url parts", where)
    return "".join(pieces)


def parse_messages(messages: list[dict], limits: Limits) -> tuple[list[dict], list]:
    """OpenAI messages -> (chat-template messages with `<image>` markers, images in order)."""
    parsed, images = [], []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(f"role must be one of {sorted(ROLES)}, got {role!r}", f"{param}.role")
        text = message_text(message.get("content"), f"{param}.content", role == "user", limits, images)
        entry = {"role": "system" if role == "developer" else role, "content": text}
        for key in ("reasoning_content", "tool_calls"):
            if message.get(key):
                entry[key] = message[key]
        parsed.append(entry)
    return parsed, images


def parse_body(data, limits: Limits) -> Parsed:
    """A decoded JSON body -> what to generate, or ApiError."""
    try:
        body = ChatCompletionBody.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(f"{where}: {first['msg']}" if where else first["msg"], where) from err
    max_tokens = body.max_tokens or body.max_completion_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(f"max_tokens is {max_tokens}, more than this server's limit of {limits.max_tokens}",
                       "max_tokens", "invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError("stop may hold at most 4 strings", "stop")
    messages, images = parse_messages(body.messages, limits)
    options = body.chat_template_kwargs or {}
    thinking = bool(body.open_thinking or options.get("open_thinking") or options.get("enable_thinking"))
    config = GenerationConfig(
        max_new_tokens=max_tokens, stop=stop, seed=body.seed,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=DEFAULT_TOP_P if body.top_p is None else body.top_p,
        top_k=50 if body.top_k is None else body.top_k,
        repetition_penalty=body.repetition_penalty or 1.0,
    )
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return Parsed(ChatRequest(messages, images, thinking, body.tools), config, body.stream, include_usage)


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Answer text -> (text without `<tool_call>` blocks, OpenAI tool_calls). Malformed blocks stay text."""
    calls = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            return match.group(0)
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
        return ""

    rest = TOOL_CALL.sub(take, text)
    return (rest.strip() if calls else text), calls


ACCEPTED = object()  # the worker's first message to a job whose prompt is valid


@dataclass
class Job:
    """One request in flight. The worker thread sends it ACCEPTED or an ApiError, then StreamEvents."""

    request: ChatRequest
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """The only thread that touches the model: it takes every job waiting and decodes them as one batch."""

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.largest_batch = 0
        threading.Thread(target=self._serve, name="generation", daemon=True).start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _serve(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch and not self.jobs.empty():
                batch.append(self.jobs.get())
            self._decode([job for job in batch if not job.cancelled])

    def _decode(self, batch: list[Job]) -> None:
        ready, prompts = [], []
        for job in batch:
            try:
                prompts.append(self.engine.prompt_ids(job.request))
            except PromptTooLong as err:
                job.send(ApiError(str(err), "messages", "context_length_exceeded"))
                continue
            except Exception as err:  # e.g. markers that do not match, or tool calls the template cannot render
                job.send(ApiError(f"could not build the prompt: {err}", "messages"))
                continue
            ready.append(job)
            job.send(ACCEPTED)
        if not ready:
            return
        self.largest_batch = max(self.largest_batch, len(ready))
        try:
            for event in self.engine.run([j.request for j in ready], [j.config for j in ready], prompts,
                                         cancelled=lambda row: ready[row].cancelled):
                ready[event.row].send(event)
        except Exception as err:  # a failed batch must not stop the server: its clients get a 500
            for job in ready:
                job.send(ApiError(f"generation failed: {err!r}", status=500, kind="server_error"))


class ClientGone(Exception):
    pass


async def next_event(job: Job, request: Request):
    """The job's next message; cancels the job when the client has hung up."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                raise ClientGone from None


def usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


class Api:
    """The FastAPI app around one engine."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits, api_key: str | None = None,
                 max_batch: int = 16):
        self.worker = Worker(engine, max_batch)
        self.model_name, self.limits, self.api_key = model_name, limits, api_key
        self.created = int(time.time())
        self.app = FastAPI(title="MiniMind-V API")
        self.app.add_exception_handler(ApiError, lambda request, err: err.response())
        self.app.add_exception_handler(HTTPException, lambda request, err: ApiError(
            str(err.detail), status=err.status_code).response())
        self.app.get("/health")(self.health)
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/chat/completions")(self.chat_completions)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError("missing or incorrect API key (send Authorization: Bearer <key>)", None,
                           "invalid_api_key", status=401)

    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "queued": self.worker.jobs.qsize(),
                "largest_batch": self.worker.largest_batch}

    async def models(self, request: Request) -> dict:
        self.authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "minimind-v"}]}

    async def chat_completions(self, request: Request):
        self.authorize(request)
        if int(request.headers.get("content-length") or 0) > self.limits.max_body_bytes:
            raise ApiError(f"the request body is larger than {self.limits.max_body_bytes} bytes", None,
                           "request_too_large")
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(f"the request body is not valid JSON: {err}") from err
        parsed = await run_in_threadpool(parse_body, data, self.limits)
        job = Job(parsed.request, parsed.config, asyncio.get_running_loop())
        self.worker.submit(job)
        try:
            first = await next_event(job, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)
        if isinstance(first, ApiError):
            return first.response()
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            return StreamingResponse(self.chunks(job, request, parsed, reply_id, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.complete(job, request, reply_id, created)

    async def complete(self, job: Job, request: Request, reply_id: str, created: int):
        try:
            while True:
                event = await next_event(job, request)
                if isinstance(event, ApiError):
                    return event.response()
                if event.completion is not None:
                    break
        except ClientGone:
            return JSONResponse({}, status_code=499)
        completion = event.completion
        message = {"role": "assistant", "content": completion.text}
        if completion.reasoning is not None:
            message["reasoning_content"] = completion.reasoning
        finish = completion.finish_reason
        if job.request.tools:
            message["content"], calls = split_tool_calls(completion.text)
            if calls:
                message["tool_calls"], finish = calls, "tool_calls"
        return {"id": reply_id, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": usage(completion)}

    async def chunks(self, job: Job, request: Request, parsed: Parsed, reply_id: str,
                     created: int) -> AsyncIterator[str]:
        """Server-sent `chat.completion.chunk` events, ending with `data: [DONE]`."""

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                 "logprobs": None}]
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event: StreamEvent | ApiError = await next_event(job, request)
                if isinstance(event, ApiError):
                    yield f"data: {json.dumps(event.body(), ensure_ascii=False)}\n\n"
                    break
                if event.completion is None:
                    delta = {"reasoning_content": event.reasoning} if event.reasoning else {}
                    yield chunk(delta | ({"content": event.content} if event.content else {}))
                    continue
                finish = event.completion.finish_reason
                calls = split_tool_calls(event.completion.text)[1] if job.request.tools else []
                if calls:
                    finish = "tool_calls"
                    yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                yield chunk({}, finish)
                if parsed.include_usage:
                    yield chunk(None, usage=usage(event.completion))
                break
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            job.cancelled = True  # no effect once the reply is complete; stops decoding if the client left


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, weight="sft_vlm")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--model_name", default=None, help="model id reported by the API (default: from the weights)")
    parser.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $MINIMIND_API_KEY, else no key)")
    parser.add_argument("--max_batch", type=int, default=16, help="most requests decoded together")
    parser.add_argument("--max_seq_len", type=int, default=8192, help="longest prompt, in tokens")
    parser.add_argument("--max_tokens_limit", type=int, default=8192,
                        help="largest max_tokens a request may ask for (also the default)")
    parser.add_argument("--max_images", type=int, default=8, help="most images in one request")
    parser.add_argument("--max_image_bytes", type=int, default=10 * 2**20, help="largest image file, in bytes")
    parser.add_argument("--max_image_pixels", type=int, default=4096 * 4096, help="largest image, in pixels")
    parser.add_argument("--local_image_root", default=None,
                        help="also accept image URLs that are paths of files under this folder")


def default_model_name(args) -> str:
    if args.load_from:
        return os.path.basename(os.path.normpath(args.load_from))
    return run_name(args.weight, args.hidden_size, bool(args.use_moe))


def main(args) -> None:
    engine = load_engine_or_exit(args)
    limits = Limits(args.max_images, args.max_image_bytes, args.max_image_pixels, args.max_tokens_limit,
                    args.local_image_root)
    api = Api(engine, args.model_name or default_model_name(args), limits, args.api_key, args.max_batch)
    print(f"serving {api.model_name} at http://{args.host}:{args.port}/v1 (OpenAI chat completions)")
    uvicorn.run(api.app, host=args.host, port=args.port, log_level="info")
