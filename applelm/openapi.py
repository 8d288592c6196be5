"""The server's OpenAPI 3 document (served at GET /openapi.json), built for the loaded model and limits,
so that its enums and bounds are the ones the server enforces."""

from __future__ import annotations

from typing import Optional

from . import __version__
from .openai_api import MAX_STOP, ROLES


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


def _error_responses(*statuses: int) -> dict:
    words = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model or route",
             411: "Content-Length required", 413: "Request body too large", 429: "Queue full",
             500: "Generation failed (logged)", 503: "Model not loaded yet"}
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(s): {"description": words[s], "content": ref} for s in statuses}


def build_openapi(model_ids: list[str], max_tokens: int, vocab_size: Optional[int], api_key: bool) -> dict:
    """The document for a server serving `model_ids` (the first is the served id)."""
    int_max = 2**31
    sampling = {
        "model": {"type": "string", "enum": [*model_ids, None], "nullable": True,
                  "description": "The served model id (or \"default\"); defaults to the served model."},
        "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max_tokens}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2, "default": 1}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1, "default": 1}),
        "top_k": _nullable({"type": "integer", "minimum": 0, "maximum": int_max,
                            "description": "Extension: keep the k most likely tokens (0: off)."}),
        "min_p": _nullable({"type": "number", "minimum": 0, "exclusiveMaximum": True, "maximum": 1,
                            "description": "Extension: drop tokens below min_p times the top probability."}),
        "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1,
                           "description": "Makes sampling reproducible for this request."}),
        "stop": _nullable({"oneOf": [{"type": "string"},
                                     {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP}]}),
        "stream": _nullable({"type": "boolean", "default": False}),
        "stream_options": _nullable({"type": "object", "properties": {
            "include_usage": _nullable({"type": "boolean"})}}),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": 1}),
        "presence_penalty": _nullable({"type": "number", "minimum": 0, "maximum": 0}),
        "frequency_penalty": _nullable({"type": "number", "minimum": 0, "maximum": 0}),
        "user": _nullable({"type": "string"}),
        "ignore_eos": _nullable({"type": "boolean", "description": "Extension: do not stop at end-of-sequence."}),
    }
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": list(ROLES)},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
        "name": _nullable({"type": "string"})}}
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                           **({"maximum": vocab_size - 1} if vocab_size else {})}}
    chat_request = {"type": "object", "required": ["messages"], "properties": {
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max_tokens}),
        **sampling}}
    completion_request = {"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"oneOf": [  # one prompt: text or token ids, either also wrapped in a 1-item array
            {"type": "string", "minLength": 1}, token_ids,
            {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}},
            {"type": "array", "minItems": 1, "maxItems": 1, "items": token_ids}]}, **sampling}}
    counts = {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    cached = {"type": "object", "required": ["cached_tokens"], "properties": {  # served from the prompt cache
        "cached_tokens": {"type": "integer", "minimum": 0}}}
    usage = {"type": "object", "required": [*counts, "prompt_tokens_details"],
             "properties": {**counts, "prompt_tokens_details": cached}}
    finish = {"type": "string", "enum": ["stop", "length"]}
    chat_completion = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
        "created": {"type": "integer"}, "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "finish_reason": finish,
            "message": {"type": "object", "properties": {"role": {"type": "string"},
                                                          "content": {"type": "string"}}}}}},
        "usage": {"$ref": "#/components/schemas/Usage"}}}
    text_completion = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]},
        "created": {"type": "integer"}, "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": finish}}},
        "usage": {"$ref": "#/components/schemas/Usage"}}}
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
        "created": {"type": "integer"}, "owned_by": {"type": "string"}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": _nullable({"type": "string"}), "code": _nullable({"type": "string"})}}}}
    chunk = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion.chunk", "text_completion"]},
        "created": {"type": "integer"}, "model": {"type": "string"}, "choices": {"type": "array", "maxItems": 1},
        "usage": {"$ref": "#/components/schemas/Usage"}}}
    # One server-sent event (OpenAPI 3.0 reads an event-stream schema per event): a chunk, an error, or
    # the closing "[DONE]".
    sse = {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "description": "Server-sent events: `data: <chunk JSON>` lines, then `data: [DONE]`.",
        "properties": {"data": {"anyOf": [
            {"type": "string", "enum": ["[DONE]"]},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": "#/components/schemas/StreamChunk"},
                                         {"$ref": "#/components/schemas/Error"}]}}]}}}}}

    def generation(summary: str, request: str, response: str, errors: tuple) -> dict:
        return {"post": {
            "summary": summary, "operationId": request[0].lower() + request[1:],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request}"}}}},
            "responses": {"200": {"description": "The completion (JSON), or a stream of chunks when stream is true",
                                  "content": {"application/json": {
                                      "schema": {"$ref": f"#/components/schemas/{response}"}}, **sse}},
                          **_error_responses(*errors)}}}

    gen_errors = (400, 404, 411, 413, 429, 500, 503) + ((401,) if api_key else ())
    get_errors = (404, 503) + ((401,) if api_key else ())
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "applelm server", "version": __version__,
                 "description": "An OpenAI-compatible API over one local model, with continuous batching."},
        "paths": {
            "/v1/models": {"get": {"summary": "List the served model", "operationId": "listModels",
                                   "responses": {"200": {"description": "The served model", "content": {
                                       "application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}},
                                       **_error_responses(*get_errors[1:])}}},
            "/v1/models/{model}": {"get": {
                "summary": "Describe the served model", "operationId": "retrieveModel",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The model", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}},
                    **_error_responses(*get_errors)}}},
            "/v1/chat/completions": generation("Chat completion", "ChatCompletionRequest", "ChatCompletion",
                                               gen_errors),
            "/v1/completions": generation("Text completion", "CompletionRequest", "TextCompletion", gen_errors),
            "/health": {"get": {"summary": "Readiness", "operationId": "health", "security": [],
                                "responses": {"200": {"description": "Ready", "content": {"application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}}}},
                                    **_error_responses(503)}}},
            "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi", "security": [],
                                      "responses": {"200": {"description": "OpenAPI 3 document", "content": {
                                          "application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": {
            "ChatCompletionRequest": chat_request, "CompletionRequest": completion_request,
            "ChatCompletion": chat_completion, "TextCompletion": text_completion, "StreamChunk": chunk,
            "Usage": usage,
            "Model": model, "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                "object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": model}}},
            "Health": {"type": "object", "required": ["status"], "properties": {
                "status": {"type": "string"}, "model": {"type": "string"},
                "active": {"type": "integer"}, "queued": {"type": "integer"},
                "prompt_cache": {"type": "object", "description": "entries, bytes, max_bytes, lookups, hits, "
                                 "reused_tokens (absent when the prompt cache is off)"}}},
            "Error": error,
        }},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
