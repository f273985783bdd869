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
