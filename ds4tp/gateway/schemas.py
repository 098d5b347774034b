"""Request bodies of the OpenAI endpoints.

Strict types (a string where a number belongs is a 400, not coerced), unknown fields accepted
and ignored: OpenAI clients send many optional fields we have no use for.

Accepted beyond the OpenAI fields: `top_k`, `min_p`, `ignore_eos`, `min_tokens`,
`return_token_ids` (vLLM), and the thinking switches of `ChatRequest.thinking_mode`.
Accepted and ignored: `presence_penalty`, `frequency_penalty`, `user`, `service_tier`, etc.
"""
from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StrictFloat = Union[float, int]


class _Base(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Base):
    include_usage: bool = False


class ContentPart(_Base):
    type: str
    text: str | None = None


class FunctionCall(_Base):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Base):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Base):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(_Base):
    type: str = "function"
    function: FunctionDef


class ThinkingSwitch(_Base):
    type: Literal["enabled", "disabled"]


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    logit_bias: dict[str, StrictFloat] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    return_token_ids: bool = False
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        return [s for s in stops if s]

    @field_validator("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        out = {}
        for k, b in v.items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b}")
            out[str(int(k))] = b
        return out


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    reasoning_effort: str | None = None
    thinking: bool | ThinkingSwitch | None = None
    chat_template_kwargs: dict | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.reasoning_effort is not None and self.reasoning_effort not in EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {sorted(EFFORTS)}")
        return self

    def thinking_mode(self) -> str:
        """"none", "high" or "max".

        Thinking is off unless asked for, by any of: `thinking: true` or
        `{"type": "enabled"}`; `chat_template_kwargs: {"thinking": true}` (or
        "enable_thinking"); `reasoning_effort` other than "none"/"minimal". An explicit off
        switch wins over reasoning_effort. Effort "max"/"xhigh" selects ds4's max mode (which
        falls back to high below a 384K context); any other effort is high."""
        switch = None
        if isinstance(self.thinking, bool):
            switch = self.thinking
        elif self.thinking is not None:
            switch = self.thinking.type == "enabled"
        kw = self.chat_template_kwargs or {}
        for key in ("thinking", "enable_thinking"):
            if switch is None and isinstance(kw.get(key), bool):
                switch = kw[key]
        effort = EFFORTS.get(self.reasoning_effort) if self.reasoning_effort else None
        if switch is False:
            return "none"
        if effort is not None:
            return effort if effort != "none" or switch is None else "high"
        return "high" if switch else "none"


EFFORTS = {"none": "none", "minimal": "none", "low": "high", "medium": "high", "high": "high",
           "xhigh": "max", "max": "max"}


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("empty prompt")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported")
                v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("empty prompt")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v
