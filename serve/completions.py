"""OpenAI request fields -> `SamplingParams`, and engine outputs -> OpenAI responses and SSE chunks.

Engine outputs are cumulative snapshots (text and tokens so far). Streaming turns them into deltas,
holding back what may still change: the last `len(longest stop string) - 1` characters (a stop
string completing at the next token is cut from the text, and must never have been sent) and a
trailing U+FFFD (half of a multi-byte character whose other bytes are in the next token).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from internvl_jax.outputs import CompletionOutput, Logprob, RequestOutput
from internvl_jax.sampling import SamplingError, SamplingParams
from serve.protocol import SSE_DONE, ApiError, ChatCompletionRequest, CompletionRequest, now, sse, usage

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


def sampling_params(request: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    """The request's sampling fields as engine parameters; a 400 naming the field when invalid."""
    chat = isinstance(request, ChatCompletionRequest)
    if chat:
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        max_tokens_name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        logprobs_name = "top_logprobs"
    else:
        max_tokens, max_tokens_name = request.max_tokens, "max_tokens"
        logprobs, logprobs_name = request.logprobs, "logprobs"
    names = {"max_tokens": max_tokens_name, "logprobs": logprobs_name}
    try:
        return SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k is None else request.top_k,
            seed=request.seed, max_tokens=max_tokens, min_tokens=request.min_tokens, stop=request.stop or (),
            stop_token_ids=request.stop_token_ids or (), ignore_eos=request.ignore_eos, logprobs=logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output)
    except SamplingError as error:
        field, _, detail = str(error).partition(": ")
        field = names.get(field, field)
        raise ApiError(400, f"{field}: {detail}", param=field, code="invalid_value") from error


# ---- logprobs -------------------------------------------------------------------------------------


def _finite(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else value


class TokenText:
    """Token id -> the text OpenAI shows for it (decoded alone), cached: the vocabulary is bounded."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, float]]:
    # The engine's entry holds the chosen token plus the top k; when the chosen token is not among the
    # top k it has the lowest logprob, so the k best entries are exactly the top k.
    ranked = sorted(entry.items(), key=lambda item: item[1].logprob, reverse=True)
    return [(token, value.logprob) for token, value in ranked[:k]]


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], k: int,
                  token_text: TokenText) -> list[dict[str, Any]]:
    content = []
    for token, entry in zip(token_ids, entries, strict=False):
        text = token_text(token)
        content.append({
            "token": text, "logprob": _finite(entry[token].logprob), "bytes": list(text.encode()),
            "top_logprobs": [{"token": token_text(t), "logprob": _finite(v), "bytes": list(token_text(t).encode())}
                             for t, v in _top(entry, k)],
        })
    return content


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]], k: int,
                        token_text: TokenText, offset: int = 0) -> dict[str, Any]:
    tokens, values, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries, strict=False):
        text = token_text(token)
        tokens.append(text)
        values.append(_finite(entry[token].logprob))
        tops.append({token_text(t): _finite(v) for t, v in _top(entry, k)} if k else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# ---- complete responses -----------------------------------------------------------------------------


def chat_response(request_id: str, model: str, request: ChatCompletionRequest, output: RequestOutput,
                  token_text: TokenText) -> dict[str, Any]:
    choices = []
    for choice in output.outputs:
        item: dict[str, Any] = {
            "index": choice.index, "message": {"role": "assistant", "content": choice.text},
            "logprobs": None, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
        if request.logprobs and choice.logprobs is not None:
            item["logprobs"] = {"content": chat_logprobs(choice.token_ids, choice.logprobs, request.top_logprobs or 0,
                                                         token_text)}
        if request.return_token_ids:
            item["token_ids"] = list(choice.token_ids)
        choices.append(item)
    body = {"id": request_id, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": usage(output.num_prompt_tokens, sum(len(c.token_ids) for c in output.outputs))}
    if request.return_token_ids:
        body["prompt_token_ids"] = list(output.prompt_token_ids)
    return body


def completion_response(request_id: str, model: str, request: CompletionRequest, outputs: list[RequestOutput],
                        token_text: TokenText) -> dict[str, Any]:
    choices = []
    for prompt_index, output in enumerate(outputs):
        for choice in output.outputs:
            item: dict[str, Any] = {"index": prompt_index * request.n + choice.index, "text": choice.text,
                                    "logprobs": None, "finish_reason": choice.finish_reason,
                                    "stop_reason": choice.stop_reason}
            if request.logprobs is not None and choice.logprobs is not None:
                item["logprobs"] = completion_logprobs(choice.token_ids, choice.logprobs, request.logprobs, token_text)
            if request.return_token_ids:
                item["token_ids"] = list(choice.token_ids)
                item["prompt_token_ids"] = list(output.prompt_token_ids)
            choices.append(item)
    prompt_tokens = sum(o.num_prompt_tokens for o in outputs)
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"id": request_id, "object": "text_completion", "created": now(), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


# ---- streaming ------------------------------------------------------------------------------------------


class ChoiceCursor:
    """What has been sent of one choice: characters and tokens."""

    def __init__(self, stop: Sequence[str]):
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.tokens = 0
        self.done = False

    def advance(self, choice: CompletionOutput) -> tuple[str, int, int] | None:
        """(new text, first new token, end token) to send now, or None when there is nothing new."""
        if self.done:
            return None
        finished = choice.finish_reason is not None
        text = choice.text
        if not finished:
            end = len(text) - self.holdback
            while end > len(self.text) and text[end - 1] == "\ufffd":
                end -= 1
            text = text[:max(end, len(self.text))]
        delta = text[len(self.text):]
        start, stop = self.tokens, len(choice.token_ids)
        if not delta and start == stop and not finished:
            return None
        self.text, self.tokens, self.done = text, stop, finished
        return delta, start, stop


async def chat_stream(request_id: str, model: str, request: ChatCompletionRequest,
                      outputs: AsyncIterator[RequestOutput], token_text: TokenText,
                      on_error: Callable[[BaseException], dict[str, Any]]) -> AsyncIterator[str]:
    created = now()
    options = request.stream_options
    include_usage = options is not None and options.include_usage
    continuous = include_usage and options.continuous_usage_stats
    cursors = [ChoiceCursor(request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else [])
               for _ in range(request.n)]

    def chunk(choices: list[dict[str, Any]], output: RequestOutput | None = None) -> str:
        body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": choices}
        if include_usage:
            body["usage"] = None
            if continuous and output is not None:
                body["usage"] = usage(output.num_prompt_tokens, sum(len(c.token_ids) for c in output.outputs))
        return sse(body)

    # OpenAI's first chunk carries the role, with empty content.
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(request.n)])
    last = None
    try:
        async for output in outputs:
            last = output
            for choice in output.outputs:
                step = cursors[choice.index].advance(choice)
                if step is None:
                    continue
                delta, start, stop = step
                item: dict[str, Any] = {"index": choice.index, "delta": {"content": delta} if delta else {},
                                        "logprobs": None, "finish_reason": choice.finish_reason}
                if choice.finish_reason is not None:
                    item["stop_reason"] = choice.stop_reason
                if request.logprobs and choice.logprobs is not None:
                    item["logprobs"] = {"content": chat_logprobs(choice.token_ids[start:stop],
                                                                 choice.logprobs[start:stop],
                                                                 request.top_logprobs or 0, token_text)}
                if request.return_token_ids:
                    item["token_ids"] = list(choice.token_ids[start:stop])
                yield chunk([item], output)
    except Exception as error:  # noqa: BLE001 - headers are sent: the error travels as an event
        yield sse(on_error(error))
        return
    if include_usage and last is not None:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage(last.num_prompt_tokens, sum(len(c.token_ids) for c in last.outputs))}
        yield sse(body)
    yield SSE_DONE


async def completion_stream(request_id: str, model: str, request: CompletionRequest,
                            outputs: AsyncIterator[tuple[int, RequestOutput]], num_prompts: int,
                            token_text: TokenText,
                            on_error: Callable[[BaseException], dict[str, Any]]) -> AsyncIterator[str]:
    """`outputs` yields (prompt index, snapshot) from the requests of all prompts, interleaved."""
    created = now()
    options = request.stream_options
    include_usage = options is not None and options.include_usage
    stop = request.stop if isinstance(request.stop, list) else [request.stop] if request.stop else []
    cursors = [[ChoiceCursor(stop) for _ in range(request.n)] for _ in range(num_prompts)]
    latest: dict[int, RequestOutput] = {}
    try:
        async for prompt_index, output in outputs:
            latest[prompt_index] = output
            for choice in output.outputs:
                cursor = cursors[prompt_index][choice.index]
                offset = len(cursor.text)
                step = cursor.advance(choice)
                if step is None:
                    continue
                delta, start, end = step
                item: dict[str, Any] = {"index": prompt_index * request.n + choice.index, "text": delta,
                                        "logprobs": None, "finish_reason": choice.finish_reason}
                if choice.finish_reason is not None:
                    item["stop_reason"] = choice.stop_reason
                if request.logprobs is not None and choice.logprobs is not None:
                    item["logprobs"] = completion_logprobs(choice.token_ids[start:end], choice.logprobs[start:end],
                                                           request.logprobs, token_text, offset)
                if request.return_token_ids:
                    item["token_ids"] = list(choice.token_ids[start:end])
                body: dict[str, Any] = {"id": request_id, "object": "text_completion", "created": created,
                                        "model": model, "choices": [item]}
                if include_usage:
                    body["usage"] = None
                yield sse(body)
    except Exception as error:  # noqa: BLE001 - headers are sent: the error travels as an event
        yield sse(on_error(error))
        return
    if include_usage:
        prompt_tokens = sum(o.num_prompt_tokens for o in latest.values())
        completion_tokens = sum(len(c.token_ids) for o in latest.values() for c in o.outputs)
        yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield SSE_DONE
