"""API models of the gateway's frames. The OpenAPI document is generated from these."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 200_000


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class AskRequest(BaseModel):
    """`POST /v1/ask`: a bare prompt or a list of chat messages, and an optional model hint."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=1000)
    model: str | None = Field(
        None, min_length=1, max_length=100, description="Model hint; default: the router's choice."
    )
    stream: bool = Field(False, description="Answer as server-sent events: `delta` frames, then one `done` frame.")

    @model_validator(mode="after")
    def _one_input(self) -> AskRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' (a string) or 'messages' (a list of {role, content})")
        return self

    def as_messages(self) -> list[Message]:
        return self.messages if self.messages is not None else [Message(role="user", content=self.prompt or "")]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AskResponse(BaseModel):
    request_id: str
    model: str
    answer: str
    usage: Usage
    cost: Decimal = Field(description="Exact cost of the call in `currency` (a decimal string in JSON).")
    currency: str


class ErrorBody(BaseModel):
    code: str
    message: str
    fields: list[str] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


class AskDelta(BaseModel):
    """A streamed `/v1/ask` frame (`event: delta`): the next piece of the answer."""

    request_id: str
    text: str


# --- OpenAI-compatible chat completions (the subset clients send) ---------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, object]] | None = None
    name: str | None = None

    def text(self) -> str:
        """Plain text of the message (text parts of a multi-part content list)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ToolFunction(BaseModel):
    """A function the model may call, as OpenAI describes tools; `parameters` is a JSON Schema."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="Also the name tool scopes are checked against.")
    description: str | None = Field(None, max_length=1024)
    parameters: dict[str, object] = Field(default_factory=dict, description="JSON Schema of the arguments.")
    strict: bool | None = None


class ToolDescriptor(BaseModel):
    """One entry of `tools` in a chat completion request."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`, as the OpenAI SDK and LiteLLM send it."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=100)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    user: str | None = Field(None, max_length=256)
    tools: list[ToolDescriptor] | None = Field(
        None, max_length=128, description="Declared tools; validated here, checked against scopes by the policy."
    )

    @model_validator(mode="after")
    def _text_limit(self) -> ChatCompletionRequest:
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {MAX_PROMPT_CHARS} characters; shorten the conversation")
        return self

    def as_messages(self) -> list[Message]:
        role_map = {"developer": "system"}
        return [Message(role=role_map.get(m.role, m.role), content=m.text()) for m in self.messages]  # type: ignore[arg-type]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"] = "stop"


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE `data:` frame of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: ChatUsage | None = None


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a quality signal for one of the caller's own requests."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
                            description="The request_id the gateway returned (a UUIDv7).")  # fmt: skip
    score: float = Field(ge=0, le=1, description="1 is best.")
    label: Literal["good", "wrong", "unsafe", "slow", "off_topic", "other"] | None = None


class FeedbackResponse(BaseModel):
    feedback_id: str
    request_id: str
