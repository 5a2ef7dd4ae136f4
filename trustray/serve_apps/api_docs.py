"""The OpenAPI document of trustray's HTTP apps, complete although handlers read the raw request.

The OpenAI routes read and bound the request body themselves (size limits, OpenAI-shaped errors), so FastAPI
cannot see their request models. `DocumentedAPI` adds them back to `/openapi.json` (and so to `/docs` and to
schema-based fuzzers): the JSON body each route validates against, its successful answer, and the error shape
every route answers with (`{"error": {...}}`, 4xx and 5xx; FastAPI's 422 is never sent: schema errors are 400).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from trustray.serve_apps.schemas import ErrorResponse

COMPONENTS = "#/components/schemas/{model}"
# One server-sent event of a streamed answer: `data` holds a chunk as JSON, and `[DONE]` last.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}


class DocumentedAPI(FastAPI):
    """FastAPI with request and response models declared per route: `{(path, method): Model}`; routes named in
    `streams` may also answer as server-sent events."""

    def __init__(self, *, request_bodies: dict[tuple[str, str], type[BaseModel]] | None = None,
                 responses: dict[tuple[str, str], type[BaseModel]] | None = None,
                 streams: frozenset[tuple[str, str]] = frozenset(), **kwargs: Any):
        super().__init__(**kwargs)
        self.request_bodies = dict(request_bodies or {})
        self.response_bodies = dict(responses or {})
        self.streams = streams

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self._declare(super().openapi())
        return self.openapi_schema

    def _declare(self, document: dict[str, Any]) -> None:
        """Add the declared models to `document` in place (FastAPI caches it)."""
        inputs = [(model, "validation") for model in self.request_bodies.values()]
        outputs = [(model, "serialization") for model in [*self.response_bodies.values(), ErrorResponse]]
        refs, definitions = models_json_schema(inputs + outputs, ref_template=COMPONENTS)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(definitions.get("$defs", {}))
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        error = {"description": "An error in OpenAI's shape.",
                 "content": {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}}}
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                key = (path, method)
                if key in self.request_bodies:
                    operation["requestBody"] = {"required": True, "content": {"application/json": {
                        "schema": refs[(self.request_bodies[key], "validation")]}}}
                answers = operation.setdefault("responses", {})
                answers.pop("422", None)
                if key in self.response_bodies:
                    content: dict[str, Any] = {
                        "application/json": {"schema": refs[(self.response_bodies[key], "serialization")]}}
                    if key in self.streams:
                        content["text/event-stream"] = {"schema": SSE_EVENT}
                    answers["200"] = {"description": "The answer.", "content": content}
                answers["default"] = error
