"""The OpenAI wire format: request models (pydantic), error bodies, and response/chunk builders.

Requests are parsed in pydantic's strict mode from the raw JSON bytes, so `"max_tokens": "5"` or
`"stream": 1` is an error that names the field instead of being silently coerced. Unknown fields are
ignored (as OpenAI and vLLM do), except the ones that would change the answer and that we do not
implement (tools, response_format, penalties): those are refused so that a client never gets an
answer it did not ask for.

Nothing here knows about the engine's internals beyond the `SamplingParams` field names.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# ---- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error the client can fix (or wait out), with the HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(error: ValidationError) -> ApiError:
    """Pydantic's errors as one 400 whose message lists every bad field and what it expected."""
    problems = []
    param = None
    for item in error.errors(include_url=False):
        if item["type"] == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {item['msg']}", code="invalid_json")
        location = ".".join(str(part) for part in item["loc"])
        param = param or location or None
        if item["type"] == "model_type" and not location:
            problems.append("the request body must be a JSON object")
            continue
        problems.append(f"{location}: {item['msg']}" if location else item["msg"])
    return ApiError(400, "; ".join(problems), param=param, code="invalid_value")


# ---- requests -------------------------------------------------------------------------------------

_STRICT = ConfigDict(strict=True, extra="ignore")


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage in every chunk (vLLM's extension)


class _CommonRequest(BaseModel):
    """Fields shared by chat and text completions (OpenAI's, plus vLLM's sampling extensions)."""

    model_config = _STRICT

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # vLLM's extension: token ids in every choice / chunk
    user: str | None = None
    # Accepted only at their neutral values: the engine has no penalties.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for every field set to something this server cannot honour."""
        found = []
        for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1)):
            value = getattr(self, name)
            if value is not None and value != neutral:
                found.append((name, f"{name} is not supported (only {neutral})"))
        if self.logit_bias:
            found.append(("logit_bias", "logit_bias is not supported"))
        if self.stream_options is not None and not self.stream:
            found.append(("stream_options", "stream_options is only allowed with stream=true"))
        return found


class ChatCompletionRequest(_CommonRequest):
    # Messages stay plain JSON here: the prompt renderer validates roles and content parts and its
    # messages name the exact message and part that is wrong.
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.tools:
            found.append(("tools", "tool calling is not supported"))
        if self.tool_choice not in (None, "none"):
            found.append(("tool_choice", "tool calling is not supported"))
        if self.response_format is not None and self.response_format.get("type") != "text":
            found.append(("response_format", "only response_format {\"type\": \"text\"} is supported"))
        if self.top_logprobs is not None and not self.logprobs:
            found.append(("top_logprobs", "top_logprobs needs logprobs=true"))
        return found


class CompletionRequest(_CommonRequest):
    # A string, a list of strings (a batch), a list of token ids, or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.echo:
            found.append(("echo", "echo is not supported"))
        if self.suffix:
            found.append(("suffix", "suffix is not supported"))
        if self.best_of is not None and self.best_of != self.n:
            found.append(("best_of", "best_of is not supported (only equal to n)"))
        return found


# ---- responses ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "internvl-jax"
    root: str
    max_model_len: int
    demo: bool = False  # random weights: answers are gibberish
    description: str | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event as OpenAI streams them: `data: <json>` and a blank line."""
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = sse("[DONE]")
