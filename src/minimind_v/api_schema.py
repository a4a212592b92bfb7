"""The OpenAI chat completions schema that `minimind-v serve` accepts and answers, as pydantic models: what
`/openapi.json` publishes and what every request is validated against before the server's own limits."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


# The request schema. Strict: JSON types are not coerced ("5" is not an int), so the schema is what is accepted;
# fields not listed (user, logprobs, ...) are ignored.
class Fields(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(Fields):
    type: Literal["text"]
    text: str


class ImageUrl(Fields):
    url: str = Field(description="a data:image/...;base64 URL (PNG, JPEG, WEBP or GIF; an animated image gives its "
                                 "first frame), or a file under --local_image_root")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Fields):
    type: Literal["image_url"]
    image_url: ImageUrl


class VideoUrl(Fields):
    url: str = Field(description="a data:video/...;base64 URL (mp4, webm, gif, ...), or a file under "
                                 "--local_image_root; sampled into --video_frames frames")


class VideoPart(Fields):
    type: Literal["video_url"]
    video_url: VideoUrl


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(Fields):
    name: str
    arguments: str


class ToolCall(Fields):
    id: str
    type: Literal["function"]
    function: FunctionCall


class FunctionSpec(Fields):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Fields):
    type: Literal["function"]
    function: FunctionSpec


class SystemMessage(Fields):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(Fields):
    role: Literal["user"]
    content: str | list[Part]


class AssistantMessage(Fields):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(Fields):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
MESSAGES = TypeAdapter(list[Message])


class StreamOptions(Fields):
    include_usage: bool = False


# A request with a 2x2 PNG: shown in /openapi.json, and sent by the examples phase of schemathesis.
EXAMPLE = {"max_tokens": 8, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAF"
                                               "klEQVR42mM8ISfHwMDAxMDAwMDAAAANBAEIf62CUQAAAABJRU5ErkJggg=="}},
    {"type": "text", "text": "What is in the picture?"}]}]}


class ChatCompletionBody(Fields):
    """A chat completion request. The server's own limits (messages, images, videos, visual tokens, prompt tokens,
    max_tokens) come on top of this schema and are answered with a 400 naming them."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # beyond these float32 logits overflow
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    tools: list[Tool] | None = None
    open_thinking: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


# The response schema (for /openapi.json; the handlers build the same shapes as dicts). Closed: every field sent
# is listed.
class Sent(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Sent):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Sent):
    error: ErrorDetail


FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class Reply(Sent):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(Sent):
    index: int
    message: Reply
    finish_reason: FinishReason
    logprobs: None


class Usage(Sent):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(Sent):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ToolCallDelta(ToolCall):
    index: int


class Delta(Sent):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Sent):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletionChunk(Sent):
    """One server-sent event of a stream; the last one, with `stream_options.include_usage`, has no choices and
    the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(Sent):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Sent):
    object: Literal["list"]
    data: list[ModelCard]


class Health(Sent):
    status: Literal["ok"]
    model: str
    queued: int
    active: int
    largest_batch: int
