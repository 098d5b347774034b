"""Request bodies of the OpenAI endpoints.

Strict types: a string where a number belongs is a 400, not coerced.

Top-level fields are checked, as the OpenAI API does: a field that is neither declared here nor
in the endpoint's `IGNORED` allow-list is a 400 naming it (`param` is the field; see
`api._validation_error`). Three kinds of top-level field are accepted:
- the OpenAI fields we implement (declared, typed and range-checked);
- our extensions: `top_k`, `min_p`, `ignore_eos`, `min_tokens`, `return_token_ids` (vLLM's), and
  on chat the thinking switches of `ChatRequest.thinking_mode` (`thinking`,
  `chat_template_kwargs`);
- documented OpenAI fields we do not implement but clients commonly send: accepted and ignored
  (`ChatRequest.IGNORED`, `CompletionRequest.IGNORED`, not type-checked). `presence_penalty` and
  `frequency_penalty` are declared (must be finite numbers) but also have no effect; `n` and
  `best_of` are declared and only 1 is accepted. Fields whose request we cannot honour are a 400
  rather than silently dropped: `response_format` other than `{"type": "text"}` (no JSON or
  schema-constrained decoding) and the deprecated `functions` / `function_call` (send `tools`).
Nested objects (messages, content parts, tools, stream_options, ...) stay lenient: unknown
fields there are accepted, and passed along where the object is (messages and tools reach the
chat template).
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal, Union

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
    """The fields both endpoints share; a top-level request body (unknown fields are errors)."""
    model_config = ConfigDict(extra="forbid")
    # documented OpenAI fields of the endpoint that are accepted and ignored (set per endpoint)
    IGNORED: ClassVar[frozenset[str]] = frozenset()

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

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in cls.IGNORED}
        return data

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
    # OpenAI chat-completions fields we accept and ignore
    IGNORED = frozenset({
        "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",  # caller tags
        "store", "metadata", "service_tier",          # OpenAI platform features
        "parallel_tool_calls",                        # several calls in one turn are allowed anyway
        "verbosity", "prediction",                    # output shaping we do not implement
        "modalities", "audio", "web_search_options",  # text only, no built-in tools
    })

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    reasoning_effort: str | None = None
    thinking: bool | ThinkingSwitch | None = None
    chat_template_kwargs: dict | None = None
    response_format: dict | None = None           # only {"type": "text"}
    functions: list | None = None                 # the deprecated tools: refused when given
    function_call: str | dict | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"type {v.get('type')!r} is not supported (this server has no JSON or "
                             'schema-constrained decoding); omit it or use {"type": "text"}')
        return v

    @field_validator("functions", "function_call")
    @classmethod
    def _no_functions(cls, v):
        if v and v not in ("none", "auto"):
            raise ValueError("the deprecated functions API is not supported; send `tools` and "
                             "`tool_choice` instead")
        return v

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
    # OpenAI (legacy) completions fields we accept and ignore
    IGNORED = frozenset({"user"})

    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(default=None, ge=1, le=1)   # server-side best-of-n: only 1
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
