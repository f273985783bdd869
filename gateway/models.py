"""API models of the gateway's frames. The OpenAPI document is generated from these."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 200_000
_UUID7 = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"  # a request id
SESSION_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"  # a session id; it is scoped by the caller's tenant
MAX_TOKENS_LIMIT = 2_147_483_647  # OpenAI's own bound; keeps the cost estimate inside Cedar's decimal range

DataClassification = Literal["public", "internal", "confidential", "restricted"]
_CLASSIFICATION_DOC = (
    "How sensitive the prompt is (policy input); default `internal`. A classification header set by a "
    "proxy and this field may both be given: the stricter one applies."
)


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
    data_classification: DataClassification | None = Field(None, description=_CLASSIFICATION_DOC)
    session: str | None = Field(
        None,
        pattern=SESSION_PATTERN,
        description="Memory session: its window is prepended to the messages, and the new messages and the "
        "answer are appended to it (see /v1/memory/{session}).",
    )

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
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_LIMIT, description="Upper bound of the answer; the policy's cost estimate uses it."
    )
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    user: str | None = Field(None, max_length=256)
    tools: list[ToolDescriptor] | None = Field(
        None, max_length=128, description="Declared tools; validated here, checked against scopes by the policy."
    )
    data_classification: DataClassification | None = Field(None, description=_CLASSIFICATION_DOC)

    @model_validator(mode="after")
    def _text_limit(self) -> ChatCompletionRequest:
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {MAX_PROMPT_CHARS} characters; shorten the conversation")
        return self

    def tool_names(self) -> frozenset[str]:
        return frozenset(t.function.name for t in self.tools or ())

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
    request_id: str = Field(pattern=_UUID7,
                            description="The request_id the gateway returned (a UUIDv7).")  # fmt: skip
    score: float = Field(ge=0, le=1, description="1 is best.")
    label: Literal["good", "wrong", "unsafe", "slow", "off_topic", "other"] | None = None


class FeedbackResponse(BaseModel):
    feedback_id: str
    request_id: str


# --- policy what-if ---------------------------------------------------------------------------

_NOT_YOURS = ("tenant", "principal", "roles", "region")


class PolicyCheckRequest(BaseModel):
    """`POST /v1/policy/check`: would a call like this be allowed for me, and with what obligations?

    Tenant, principal, roles and region are never part of the body: they come from the
    credential and the attributes, so a caller can only ask about its own calls.
    """

    model_config = ConfigDict(extra="forbid")
    data_classification: DataClassification = Field("internal", description="How sensitive the prompt is.")
    tools: list[str] = Field(
        default_factory=list, max_length=128, description="Tool names the call would declare (checked one by one)."
    )
    model: str | None = Field(None, min_length=1, max_length=100, description="Model to pin; default: the router's.")
    estimated_cost: Decimal = Field(
        Decimal(0), ge=0, le=Decimal(1_000_000_000), description="Estimated cost of the call (a decimal string)."
    )
    route: Literal["/v1/ask", "/v1/chat/completions"] = "/v1/ask"

    @model_validator(mode="before")
    @classmethod
    def _own_identity_only(cls, data: object) -> object:
        if isinstance(data, dict):
            given = [k for k in _NOT_YOURS if k in data]
            if given:
                raise ValueError(
                    f"remove {', '.join(map(repr, given))}: tenant, principal, roles and region come from your "
                    "credential and the policy attributes, so a check is always about your own calls"
                )
        return data

    @model_validator(mode="after")
    def _tool_names(self) -> PolicyCheckRequest:
        bad = [t for t in self.tools if not _TOOL_NAME.match(t)]
        if bad:
            raise ValueError(f"tool names {bad} are not valid: 1-64 of letters, digits, '_' and '-'")
        return self


_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class PolicyCheckResponse(BaseModel):
    """The decision the gateway would enforce now, and why. Nothing is recorded."""

    tenant: str
    principal: str
    decision: Literal["allow", "deny"]
    policy_version: str
    determining_policies: list[str] = Field(description="Stable @id of each policy that determined the decision.")
    obligations: list[str] = Field(description="`kind:value` strings, as PolicyDecided records them.")
    redact: list[str] = Field(description="Redaction kinds the call would be masked with (beyond the tenant's).")
    regions: list[str] | None = Field(description="Regions the call may be served from; null = any.")
    max_cost: Decimal | None = Field(description="Cap on the call's cost; null = none.")
    allowed_models: list[str] = Field(description="Models the router could use for this call.")
    denied_tool: str | None = None
    reasons: list[str] = Field(default_factory=list, description="Why a denial happened, one line per check.")
    input_sha256: str


# --- memory fabric ------------------------------------------------------------------------------


class MemoryTurnRequest(BaseModel):
    """`POST /v1/memory/{session}`: append one turn to a session of the caller's tenant."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Masked as the tenant's policy asks.")
    request_id: str | None = Field(None, pattern=_UUID7, description="The request that produced the turn, if any.")


class MemoryTurn(BaseModel):
    index: int = Field(description="Position in the session, 0-based.")
    role: str
    content: str
    at: str = Field(description="When it was stored (ISO-8601 UTC).")
    request_id: str | None = None


class MemoryWriteResponse(BaseModel):
    session: str
    turn_index: int
    chars: int = Field(description="Characters stored (after masking).")
    content_sha256: str = Field(description="As recorded in the MemoryWritten fact.")
    redactions: dict[str, int] = Field(default_factory=dict, description="Spans masked, by kind.")
    event_id: str = Field(description="The MemoryWritten fact's event id.")


class MemoryWindowResponse(BaseModel):
    session: str
    turns: list[MemoryTurn] = Field(description="The newest whole turns within the bounds, oldest first.")
    chars: int


class MemoryEraseResponse(BaseModel):
    session: str
    turns_erased: int
    event_id: str = Field(description="The MemoryErased fact's event id.")
