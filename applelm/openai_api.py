"""The OpenAI API surface: request validation and response shaping. Pure functions: no I/O, no model.

`parse_chat` / `parse_completion` turn a decoded JSON body into a `GenerationParams` (prompt token ids
and settings) or raise `ApiError` with the HTTP status and OpenAI error body to send. The response
helpers build the JSON objects of /v1/chat/completions and /v1/completions (whole or as stream chunks).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .batch_sample import SamplingParams
from .errors import UserError
from .generation import prompt_token_ids

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "server_error",
}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16
INT64 = 2**63


class ApiError(Exception):
    """An error response: HTTP status + OpenAI error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, code: Optional[str] = None, param: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass
class Limits:
    """Server-side bounds a request must respect."""

    max_tokens: int  # largest max_tokens a request may ask for (and the default cap)
    context_length: int  # prompt + completion tokens the model may hold
    vocab_size: int = 1 << 31


@dataclass
class GenerationParams:
    """A validated request, ready for the engine."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    model: str = ""


# ---- field readers: None (or absent) means "not given" for every optional field ----

def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _integer(body: dict, name: str, lo: int, hi: int) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():  # JSON Schema counts 2.0 as an integer
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"'{name}' must be an integer, not {_type_name(v)}", name, "invalid_type")
    if not lo <= v <= hi:
        raise invalid(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def _number(body: dict, name: str, lo: float, hi: float, default: float, hi_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(f"'{name}' must be a number, not {_type_name(v)}", name, "invalid_type")
    if not (math.isfinite(v) and lo <= v and (v < hi if hi_open else v <= hi)):
        raise invalid(f"'{name}' must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v}", name)
    return float(v)


def _boolean(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(f"'{name}' must be a boolean, not {_type_name(v)}", name, "invalid_type")
    return v


def _unsupported(body: dict, name: str, ok) -> None:
    """Reject a known OpenAI field set to something this server would otherwise silently ignore."""
    v = body.get(name)
    if v is not None and not ok(v):
        raise invalid(f"'{name}' is not supported by this server", name, "unsupported_parameter")


def _model(body: dict, model_ids: Sequence[str]) -> str:
    v = body.get("model")
    if v is None:
        return model_ids[0]
    if not isinstance(v, str):
        raise invalid(f"'model' must be a string, not {_type_name(v)}", "model", "invalid_type")
    if v not in model_ids:
        raise ApiError(404, f"the model '{v}' does not exist; this server serves: {', '.join(model_ids)}",
                       code="model_not_found", param="model")
    return model_ids[0]


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise invalid("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(v) > MAX_STOP:
        raise invalid(f"'stop' may hold at most {MAX_STOP} strings, got {len(v)}", "stop")
    return [s for s in v if s]


def _common(body: dict, model_ids: Sequence[str], max_tokens_field: str) -> dict:
    """The settings chat and completions share (everything but the prompt)."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {_type_name(body)}", None, "invalid_type")
    model = _model(body, model_ids)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    min_p = _number(body, "min_p", 0.0, 1.0, 0.0, hi_open=True)
    top_k = _integer(body, "top_k", 0, 1 << 31) or 0
    seed = _integer(body, "seed", -INT64, 2**64 - 1)
    # chat's max_completion_tokens wins over its deprecated max_tokens; both must be valid
    budgets = {name: _integer(body, name, 1, 1 << 31) for name in dict.fromkeys([max_tokens_field, "max_tokens"])}
    budgets = {name: v for name, v in budgets.items() if v is not None}
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _boolean(options or {}, "include_usage")
    n = _integer(body, "n", 1, 128)
    if n not in (None, 1):
        raise invalid("'n' must be 1: this server returns one choice per request", "n", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise invalid(f"'{name}' is not supported by this server (only 0)", name, "unsupported_parameter")
    _unsupported(body, "logit_bias", lambda v: v == {})
    _unsupported(body, "tools", lambda v: v == [])
    _unsupported(body, "functions", lambda v: v == [])
    _unsupported(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")
    _unsupported(body, "user", lambda v: isinstance(v, str))
    return dict(model=model, max_tokens=budgets, stop=_stop(body), stream=stream, include_usage=include_usage,
                ignore_eos=_boolean(body, "ignore_eos"),
                sampling=SamplingParams(temperature, top_p, top_k, min_p, seed))


def _finish(prompt: list[int], settings: dict, limits: Limits) -> GenerationParams:
    """Check the prompt and token budget against the context window; fill in the default max_tokens."""
    n, room = len(prompt), limits.context_length - len(prompt)
    if n == 0:
        raise invalid("the prompt is empty", "prompt")
    if room < 1:
        raise invalid(f"this model's maximum context length is {limits.context_length} tokens, and the prompt "
                      f"holds {n}", None, "context_length_exceeded")
    budgets: dict = settings.pop("max_tokens")
    for name, v in budgets.items():
        if v > limits.max_tokens:
            raise invalid(f"'{name}' may be at most {limits.max_tokens} on this server, got {v}", name)
    name, asked = next(iter(budgets.items()), ("max_tokens", None))
    if asked is None:
        asked = min(limits.max_tokens, room)
    elif asked > room:
        raise invalid(f"this model's maximum context length is {limits.context_length} tokens; the prompt holds "
                      f"{n} and {asked} more were requested", name, "context_length_exceeded")
    return GenerationParams(prompt=prompt, max_tokens=asked, **settings)


def _message_text(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:  # OpenAI allows it only beside tool_calls, which this server does not take
        raise invalid(f"messages[{i}].content is required", f"messages[{i}].content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                              "(this server reads text only)", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content",
                  "invalid_type")


def chat_messages(body: dict) -> list[dict]:
    """The conversation as {"role", "content": str} dicts for a chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("'messages' is required and must be an array of messages", "messages",
                      "missing_required_parameter" if messages is None else "invalid_type")
    if not messages:
        raise invalid("'messages' must hold at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                          f"messages[{i}].role")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise invalid(f"messages[{i}].name must be a string", f"messages[{i}].name", "invalid_type")
        if m.get("tool_calls"):
            raise invalid("tool calls are not supported by this server", f"messages[{i}].tool_calls",
                          "unsupported_parameter")
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        out.append({"role": "system" if role == "developer" else role, "content": _message_text(m, i)})
    return out


def tokenize(tokenizer, text: str, param: str) -> list[int]:
    """Prompt text -> token ids; text that is not valid Unicode (a lone surrogate escape) is a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"'{param}' is not valid Unicode text (a lone surrogate \\u escape?)", param) from None
    return prompt_token_ids(tokenizer, text)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text for a conversation: the model's chat template, or plain "role: text" lines."""
    if tokenizer.chat_template is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except (UserError, ValueError, TypeError) as e:  # e.g. a template that insists on alternating roles
        raise invalid(f"the model's chat template rejected these messages: {e}", "messages") from None


def parse_chat(body: Any, model_ids: Sequence[str], tokenizer, limits: Limits) -> GenerationParams:
    """Validate a /v1/chat/completions body; raises ApiError."""
    settings = _common(body, model_ids, "max_completion_tokens")
    _unsupported(body, "logprobs", lambda v: v is False)
    _unsupported(body, "top_logprobs", lambda v: v == 0)
    messages = chat_messages(body)
    prompt = tokenize(tokenizer, render_chat(tokenizer, messages), "messages")
    return _finish(prompt, settings, limits)


def completion_prompt(body: dict, tokenizer, limits: Limits) -> list[int]:
    """Token ids for a /v1/completions prompt: a string, or token ids (either wrapped in a 1-item array)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenize(tokenizer, prompt, "prompt") if prompt else []
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
        if bad:
            raise invalid(f"token id {bad[0]} is outside this model's vocabulary (0..{limits.vocab_size - 1})",
                          "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("send one prompt per request (arrays of several prompts are not supported)", "prompt",
                      "unsupported_parameter")
    raise invalid("'prompt' is required: a string or an array of token ids", "prompt",
                  "missing_required_parameter" if prompt is None else "invalid_type")


def parse_completion(body: Any, model_ids: Sequence[str], tokenizer, limits: Limits) -> GenerationParams:
    """Validate a /v1/completions body; raises ApiError."""
    settings = _common(body, model_ids, "max_tokens")
    _unsupported(body, "echo", lambda v: v is False)
    _unsupported(body, "logprobs", lambda v: v == 0)
    _unsupported(body, "suffix", lambda v: v == "")
    _unsupported(body, "best_of", lambda v: v == 1)
    return _finish(completion_prompt(body, tokenizer, limits), settings, limits)


# ---- responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prompt cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: Optional[str] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: Optional[str] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(obj: str, rid: str, created: int, model: str, use: dict) -> dict:
    """The extra last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "applelm"}


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_object(model_id, created)]}
