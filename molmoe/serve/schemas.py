"""Request and response bodies of the OpenAI-compatible API (pydantic), and its error shape.

Requests accept what OpenAI clients send (`extra="ignore"`: unknown fields such as `user` pass
through unread; `null` means the default) but refuse, with a 400 naming the field, what this
server cannot honour: `n != 1`, log-probabilities, tools, a JSON `response_format`, `logit_bias`
and penalties (UNSUPPORTED: their defaults pass), a role that is not OpenAI's, content parts that
are neither text nor an image, more than one image (Molmo 0924 takes one image per prompt), and a
conversation of more than one user turn (`single_turn`). Ignoring them would answer something
other than what was asked without saying so.

Responses follow OpenAI's `chat.completion` / `chat.completion.chunk` objects. The extra fields
`points` (pixels of the original image) and `count` ride on the message (non-streaming) or on the
final chunk's choice (streaming); OpenAI clients keep unknown fields and ignore them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
    `headers` are added to the response (Retry-After on a 429)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
             413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             502: "upstream_error", 503: "service_unavailable", 504: "upstream_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None  # OpenAI's; Molmo's crops are fixed by the processor


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


PART_TYPES = {"text": TextPart, "image_url": ImagePart}


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | ImagePart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        """Each part by its `type`, so an unsupported part is named as such (a plain union
        would report every alternative's complaint)."""
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("content must be a string or a list of content parts")
        parts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise ValueError(f"part {i}: type {kind!r} is not supported (only 'text' and "
                                 "'image_url' parts)")
            parts.append(PART_TYPES[kind].model_validate(part))
        return parts


class StreamOptions(_Lenient):
    include_usage: bool | None = False


class ChatRequest(_Lenient):
    model: str | None = None  # any value is answered by the one served model
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    n: int | None = 1
    # Asked for, not honoured: refused unless absent, null or their default (UNSUPPORTED).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    response_format: dict | None = None
    logit_bias: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be 1..{MAX_STOP_CHARS} characters")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


# field -> (is it asking for something?, what it asks for), for the fields this server cannot
# honour. `tools` with `tool_choice: "none"` asks for no tool call.
UNSUPPORTED = {
    "logprobs": (lambda v, r: bool(v), "log-probabilities are"),
    "top_logprobs": (lambda v, r: bool(v), "log-probabilities are"),
    "tools": (lambda v, r: bool(v) and r.tool_choice != "none", "tool calls are"),
    "functions": (lambda v, r: bool(v), "function calls are"),
    "response_format": (lambda v, r: v is not None and v.get("type", "text") != "text",
                        "structured (JSON) output is"),
    "logit_bias": (lambda v, r: bool(v), "a logit bias is"),
    "frequency_penalty": (lambda v, r: bool(v), "repetition penalties are"),
    "presence_penalty": (lambda v, r: bool(v), "repetition penalties are"),
}


def parse_chat_request(doc) -> ChatRequest:
    """The validated request, or APIError(400) naming the first bad field."""
    if not isinstance(doc, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(doc)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{loc}: {msg}" if loc else msg,
                       param=loc or None) from None
    for name, (asks, what) in UNSUPPORTED.items():
        value = getattr(req, name)
        if value is not None and asks(value, req):
            raise APIError(400, f"{name}: {what} not supported by this server",
                           param=name, code="unsupported_parameter")
    return req


def single_turn(req: ChatRequest) -> tuple[str, str | None]:
    """-> (prompt text, image URL or None) of the request's one user message.

    Molmo 0924 was trained on one user turn ("User: ... Assistant:"); its processor has no
    format for system prompts or earlier turns, and inventing one would change answers silently.
    So a conversation with anything but one user message is refused with a 400 saying so.
    Text parts are joined with newlines; the image (at most one) goes where the processor puts
    it, before the text.
    """
    if len(req.messages) != 1 or req.messages[0].role != "user":
        roles = [m.role for m in req.messages]
        raise APIError(400, f"messages: got roles {roles}; Molmo 0924 answers a single user "
                            "message (no system prompt, no earlier turns): send one "
                            "{\"role\": \"user\"} message", param="messages")
    content = req.messages[0].content
    if content is None:
        raise APIError(400, "messages.0.content: missing", param="messages.0.content")
    if isinstance(content, str):
        return content, None
    texts = [p.text for p in content if isinstance(p, TextPart)]
    images = [p.image_url.url for p in content if isinstance(p, ImagePart)]
    if len(images) > 1:
        raise APIError(400, f"messages.0.content: {len(images)} images; Molmo 0924 takes one "
                            "image per prompt", param="messages.0.content")
    return "\n".join(texts), (images[0] if images else None)
