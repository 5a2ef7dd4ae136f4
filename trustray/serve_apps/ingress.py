"""The HTTP front of the OpenAI-compatible app: wire format, request reading and limits, errors, routing by `model`.

`OpenAIIngress` validates requests, routes `model=` names (the chat model, the RAG model, an edit set), adds retrieved
(and compressed) passages for the RAG model, and answers from the chat deployment, streaming as server-sent events.
Errors a request causes are answered with a 4xx in OpenAI's shape `{"error": {...}}`; a 500 in that shape means a
real server fault.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from trustray.core.rag.index import Passage
from trustray.core.rag.prompting import format_passages, rag_messages
from trustray.data import adapter_store
from trustray.models.engines import Completion, SamplingParams
from trustray.models.engines import Request as EngineRequest
from trustray.serve_apps.api_docs import DocumentedAPI
from trustray.serve_apps.config import RagServeConfig, ServeConfig
from trustray.serve_apps.edit_store import EditStore
from trustray.serve_apps.errors import install_error_handlers
from trustray.serve_apps.schemas import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    EditsRequest,
    ModelList,
    RewardsRequest,
    TextCompletionResponse,
)

logger = logging.getLogger(__name__)

app = DocumentedAPI(
    title="trustray", description="OpenAI-compatible chat and retrieval-augmented chat.",
    request_bodies={("/v1/chat/completions", "post"): ChatCompletionRequest,
                    ("/v1/completions", "post"): CompletionRequest, ("/v1/edits", "post"): EditsRequest,
                    ("/v1/rewards", "post"): RewardsRequest},
    responses={("/v1/chat/completions", "post"): ChatCompletionResponse,
               ("/v1/completions", "post"): TextCompletionResponse, ("/v1/models", "get"): ModelList},
    streams=frozenset({("/v1/chat/completions", "post"), ("/v1/completions", "post")}),
)
install_error_handlers(app)


@app.exception_handler(Exception)
async def _server_error(_: Request, error: Exception) -> JSONResponse:
    logger.error("unhandled error: %r", error)
    return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def rag_setting(rag: RagServeConfig) -> dict[str, Any]:
    """What the `retrieval` field of a RAG answer reports: retriever, index, k, and the compressor with its budget."""
    compressor = rag.compressor
    return {"retriever": "dense", "index": Path(rag.index_dir.rstrip("/")).name, "embedder": rag.embedder.model,
            "top_k": rag.top_k, "compressor": compressor.display_name() if compressor else None,
            "budget": compressor.budget if compressor else None}


class _Reply:
    """One request after validation: what to generate and how to present it."""

    def __init__(self, body: ChatCompletionRequest | CompletionRequest, chat: bool, model: str):
        self.body, self.chat, self.model = body, chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.engine_request: EngineRequest = ""
        self.sources: list[dict[str, Any]] | None = None
        self.context_text: str | None = None
        self.compression: dict[str, Any] | None = None
        self.retrieval: dict[str, Any] | None = None
        self.edit_id: str | None = None
        self.selective: dict[str, Any] | None = None
        self.adapter: tuple[str, str] | None = None  # ("<name>@<version>", folder) of a published adapter

    def choice(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}

    def response(self, completion: Completion, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": completion.text, "finish_reason": completion.finish_reason, "logprobs": None}
        payload = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }
        if self.sources is not None:
            payload["sources"] = self.sources
        if self.compression is not None:
            payload["compression"] = self.compression
        if self.retrieval is not None:
            payload["retrieval"] = self.retrieval
        if self.selective is not None:
            payload["selective"] = self.selective
        if self.adapter is not None:  # which version of a hot-swapped adapter answered
            payload["system_fingerprint"] = self.adapter[0]
        return payload


async def _resolve(awaitable: Any) -> Any:
    return await awaitable


def _usage(prompt_tokens: int, completion_tokens: int, context_tokens: int | None) -> dict[str, int]:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if context_tokens is not None:
        usage["context_tokens"] = context_tokens
    return usage


# `serve.ingress` serialises the app when the class is defined: every helper it uses must be defined above.
@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    """HTTP front: validates requests, adds retrieved passages for the RAG model, calls the chat deployment."""

    def __init__(self, config: dict[str, Any], chat: DeploymentHandle, retriever: DeploymentHandle | None,
                 editor: DeploymentHandle | None = None, compressor: DeploymentHandle | None = None,
                 reward: DeploymentHandle | None = None):
        self.config = ServeConfig.model_validate(config)
        self.limits = self.config.limits
        self.chat = chat
        self.retriever = retriever
        self.editor = editor
        self.compressor = compressor
        self.reward = reward
        self.edit_store = EditStore(self.config.edits) if self.config.edits is not None else None
        self.created = int(time.time())

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        names = self.config.served_names()
        if self.edit_store is not None:
            names += [self.edit_store.model_name(edit_id) for edit_id in self.edit_store.finished_ids()]
        if self.config.adapters is not None:
            names += adapter_store.names(self.config.adapters.store_dir)
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "trustray"} for name in names],
        }

    # -- edit sets ---------------------------------------------------------------------------------------
    def _authorized_store(self, request: Request) -> EditStore:
        """The edit store, after checking the API key (401 without the right one)."""
        if self.edit_store is None:
            raise APIError(404, "edit sets are not enabled on this server", code="not_found")
        key = self.edit_store.config.api_key
        given = request.headers.get("authorization", "")
        if key is None or not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")
        return self.edit_store

    @app.post("/v1/edits")
    async def create_edits(self, request: Request) -> Any:
        limit = self._authorized_store(request).config.max_edits_per_request
        body = await self._read(request, EditsRequest)
        if len(body.edits) > limit:
            raise APIError(400, f"at most {limit} edits per request", param="edits")
        records = [item.record(index) for index, item in enumerate(body.edits)]
        summary = await self._await(
            self.editor.create.remote(records, body.name, body.wait, body.accept_locality_loss)
        )
        return JSONResponse(summary, status_code=200 if body.wait else 202)

    @app.get("/v1/edits/{edit_id}")
    async def get_edits(self, edit_id: str, request: Request) -> Any:
        return self._authorized_store(request).status(edit_id)

    @app.delete("/v1/edits/{edit_id}")
    async def delete_edits(self, edit_id: str, request: Request) -> Any:
        return self._authorized_store(request).delete(edit_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        body = await self._read(request, ChatCompletionRequest)
        rag, edit_id, adapter = self._route(body.model)
        if not body.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        if len(body.messages) > self.limits.max_messages:
            raise APIError(400, f"at most {self.limits.max_messages} messages are accepted", param="messages")
        if body.selective is not None:
            if self.reward is None:
                raise APIError(400, "selective answers need a reward model, and this server has none",
                               param="selective")
            if body.stream:
                raise APIError(400, "selective answers cannot stream: the answer is scored before it is sent",
                               param="selective")
        reply = _Reply(body, chat=True, model=body.model)
        reply.edit_id, reply.adapter = edit_id, adapter
        messages = [message.as_engine_message() for message in body.messages]
        reply.engine_request = await self._augment(reply, messages) if rag else messages
        return await self._answer(reply)

    @app.post("/v1/rewards")
    async def rewards(self, request: Request) -> Any:
        if self.reward is None:
            raise APIError(404, "no reward model is configured on this server (ServeConfig.reward)", code="not_found")
        body = await self._read(request, RewardsRequest)
        scores = await self._await(self.reward.score.remote(body.messages(), body.responses))
        return {"object": "list", "data": [{"object": "reward", "index": index, **score}
                                           for index, score in enumerate(scores)]}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        body = await self._read(request, CompletionRequest)
        rag, edit_id, adapter = self._route(body.model)
        if rag:
            raise APIError(
                400, "the RAG model answers chat requests only: use /v1/chat/completions", param="model"
            )
        reply = _Reply(body, chat=False, model=body.model)
        reply.edit_id, reply.adapter = edit_id, adapter
        reply.engine_request = body.prompt_text()
        return await self._answer(reply)

    # -- request parsing -------------------------------------------------------------------------------
    async def _read(self, request: Request, schema: type[ChatCompletionRequest] | type[CompletionRequest]):
        """Read the body under the size limit (declared and actual, so chunked bodies are bounded too),
        parse JSON and validate it against `schema`."""
        limit = self.limits.max_body_bytes
        too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, "invalid Content-Length header")
            if int(declared) > limit:
                raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            payload = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise APIError(400, f"request body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return schema.model_validate(payload)
        except ValidationError as error:
            raise RequestValidationError(error.errors(include_url=False)) from None

    def _route(self, model: str) -> tuple[bool, str | None, tuple[str, str] | None]:
        """(whether the model retrieves, the edit set it names or None, the published adapter it names or None:
        ("<name>@<version>", folder), read from the adapter store on every request so a new version is served
        from the next request on); 404 for an unknown model."""
        if model == self.config.model_name:
            return False, None, None
        if self.config.rag is not None and model == self.config.rag.model_name:
            return True, None, None
        edit_id = self.edit_store.edit_id_of(model) if self.edit_store is not None else None
        if edit_id is not None:
            return False, edit_id, None
        published = adapter_store.current(self.config.adapters.store_dir, model) if self.config.adapters else None
        if published is not None:
            return False, None, (f"{model}@{published[0]}", str(published[1]))
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")

    def _chat_handle(self, reply: _Reply) -> DeploymentHandle:
        """The chat deployment, routed by Serve model multiplexing to a replica holding the reply's edit set."""
        return self.chat.options(multiplexed_model_id=reply.edit_id) if reply.edit_id else self.chat

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = self.limits.default_max_tokens
        if max_tokens > self.limits.max_tokens:
            raise APIError(
                400, f"max_tokens is {max_tokens}; at most {self.limits.max_tokens} is accepted", param="max_tokens"
            )
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed
        )

    # -- retrieval -------------------------------------------------------------------------------------
    async def _augment(self, reply: _Reply, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Retrieve for the last user message and replace it with the RAG prompt (passages, then the question);
        earlier turns, system messages included, stay as they were."""
        rag: RagServeConfig = self.config.rag
        if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise APIError(
                400, "the RAG model needs the conversation to end with a non-empty user message", param="messages"
            )
        question = messages[-1]["content"]
        passages: list[Passage] = (await self._await(self.retriever.retrieve.remote([question], rag.top_k)))[0]
        pairs = [(passage.title, passage.text) for passage in passages]
        reply.sources = [{"id": p.id, "title": p.title, "score": p.score} for p in passages]
        reply.retrieval = rag_setting(rag)
        if self.compressor is not None:
            compressed = await self._await(self.compressor.compress.remote(question, pairs))
            pairs = compressed.passages
            reply.compression = {
                "compressor": rag.compressor.name, "context": format_passages(pairs) if pairs else "",
                "tokens_before": compressed.source_tokens, "tokens_after": compressed.context_tokens,
                "closed_book": compressed.empty,
            }
        reply.context_text = format_passages(pairs)
        return rag_messages(question, pairs, history=messages[:-1])

    # -- generation ------------------------------------------------------------------------------------
    async def _await(self, response: Any) -> Any:
        """Await a handle call under the request timeout; per-request errors come back as `APIError` values."""
        try:
            result = await asyncio.wait_for(_resolve(response), timeout=self.limits.request_timeout_s)
        except TimeoutError:
            if hasattr(response, "cancel"):
                response.cancel()
            raise APIError(504, "the request timed out", type="server_error", code="timeout") from None
        except APIError:
            raise
        except (RayActorError, ActorUnavailableError) as error:  # the replica died or is restarting: retryable
            logger.warning("model replica lost: %r", error)
            raise APIError(503, "the model replica answering this request went away; Serve is replacing it: retry",
                           type="server_error", code="replica_unavailable") from None
        except Exception as error:  # a replica fault: logged here, answered as a JSON 500
            logger.error("deployment call failed: %r", error)
            raise APIError(500, f"the model server failed: {type(error).__name__}", type="server_error") from None
        if isinstance(result, APIError):
            raise result
        return result

    async def _context_tokens(self, reply: _Reply) -> int | None:
        if reply.context_text is None:
            return None
        return await self._await(self.chat.count_tokens.remote(reply.context_text)) if reply.context_text else 0

    async def _answer(self, reply: _Reply) -> Any:
        sampling = self._sampling(reply.body)
        if reply.body.stream:
            return await self._answer_stream(reply, sampling)
        completion, context_tokens = await asyncio.gather(
            self._await(self._chat_handle(reply).generate.remote(
                reply.engine_request, sampling, reply.edit_id, reply.adapter)),
            self._context_tokens(reply),
        )
        usage = _usage(completion.prompt_tokens, completion.completion_tokens, context_tokens)
        if getattr(reply.body, "selective", None) is not None:
            completion = await self._select(reply, completion)
        return JSONResponse(reply.response(completion, usage))

    async def _select(self, reply: _Reply, completion: Completion) -> Completion:
        """Score the answer; below the threshold, the configured refusal replaces it (the scores say why)."""
        options = reply.body.selective
        threshold = await self._await(self.reward.threshold.remote(options.max_risk, options.threshold))
        prompt = [message.as_engine_message() for message in reply.body.messages]
        score = (await self._await(self.reward.score.remote(prompt, [completion.text])))[0]
        abstained = not score["reward"] >= threshold
        reply.selective = {"abstained": abstained, "threshold": threshold if math.isfinite(threshold) else None,
                           **score, **({"max_risk": options.max_risk} if options.max_risk is not None else {})}
        if not abstained:
            return completion
        return Completion(text=self.config.reward.refusal, prompt_tokens=completion.prompt_tokens,
                          completion_tokens=completion.completion_tokens, finish_reason="stop")

    async def _answer_stream(self, reply: _Reply, sampling: SamplingParams) -> StreamingResponse:
        pieces = self._chat_handle(reply).options(stream=True).stream.remote(
            reply.engine_request, sampling, reply.edit_id, reply.adapter)
        # The first item settles validation (prompt length), so a bad request still gets a plain 4xx.
        try:
            head = await self._await(pieces.__anext__())
        except APIError:
            pieces.cancel()
            raise
        context_tokens = await self._context_tokens(reply)
        include_usage = reply.body.include_usage()

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                extra = {key: value for key, value in (("sources", reply.sources), ("compression", reply.compression),
                                                       ("retrieval", reply.retrieval)) if value is not None}
                yield _sse(reply.chunk([reply.choice(None, None, first=True)], **extra))
                tail: dict[str, Any] = {"completion_tokens": 0, "finish_reason": "stop"}
                async for item in pieces:
                    if isinstance(item, str):
                        yield _sse(reply.chunk([reply.choice(item, None)]))
                    else:
                        tail = item
                finished = True
                yield _sse(reply.chunk([reply.choice(None, tail["finish_reason"])]))
                if include_usage:
                    usage = _usage(head["prompt_tokens"], tail["completion_tokens"], context_tokens)
                    yield _sse(reply.chunk([], usage=usage))
            except Exception as error:  # the response has started: report the fault in the stream itself
                finished = True
                logger.error("streaming failed: %r", error)
                yield _sse(APIError(500, "the model server failed while streaming", type="server_error").body())
            finally:
                if not finished:
                    pieces.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


