"""OpenAI-compatible chat and RAG service on Ray Serve.

Three deployments: `OpenAIIngress` (FastAPI: parsing, limits, errors, RAG orchestration), `ChatDeployment`
(one engine; concurrent non-streaming requests are batched) and `RetrieverDeployment` (embedder + passage
index, only when `rag` is configured). `build_app` binds them into one application; `run_app` starts it.

Errors a request causes are answered with a 4xx in OpenAI's shape `{"error": {...}}`; a 500 in that shape
means a real server fault. The engine deployment returns expected per-request errors (`APIError`) as values
rather than raising them, so they cross the Ray boundary unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from trustray.artifacts import ArtifactMismatchError, atomic_write_text, read_metadata
from trustray.config import load_config
from trustray.core.rag.index import Passage, PassageIndex
from trustray.core.rag.prompting import format_passages, rag_messages
from trustray.models.embedders import Embedder, EmbedderConfig
from trustray.models.engine_factory import build_engine
from trustray.models.engines import Completion, EngineConfig, SamplingParams
from trustray.models.engines import Request as EngineRequest
from trustray.models.sources import model_fingerprint
from trustray.serve_apps.config import EditServeConfig, RagServeConfig, ServeConfig
from trustray.serve_apps.schemas import APIError, ChatCompletionRequest, CompletionRequest, EditsRequest

logger = logging.getLogger(__name__)

APP_NAME = "trustray"
# Edit sets one chat replica keeps loaded (Serve model multiplexing routes an edit set's requests to a replica
# that holds it; the least recently used is dropped beyond this).
EDIT_SETS_PER_REPLICA = 8
EDIT_ID = re.compile(r"^[0-9a-f]{12}$")


# -- index check ---------------------------------------------------------------------------------------
def index_embedder_fingerprint(metadata: dict[str, Any]) -> str | None:
    """The embedder fingerprint an index's metadata records (flat `embedder_fingerprint` or nested
    `embedder.fingerprint`), or None when it records none."""
    if metadata.get("embedder_fingerprint"):
        return str(metadata["embedder_fingerprint"])
    embedder = metadata.get("embedder")
    if isinstance(embedder, dict) and embedder.get("fingerprint"):
        return str(embedder["fingerprint"])
    return None


def check_index_embedder(index_dir: str | Path, embedder_model: str, fingerprint: str) -> None:
    """Fail when the index at `index_dir` was built with another embedder than `embedder_model`: its vectors
    would be compared with question vectors from a different space and retrieval would be silently wrong."""
    metadata = read_metadata(index_dir)
    if metadata is None:
        logger.warning("index %s has no metadata.json; its embedder cannot be checked", index_dir)
        return
    found = index_embedder_fingerprint(metadata)
    if found is None:
        logger.warning("index %s does not record its embedder fingerprint; it cannot be checked", index_dir)
        return
    if found != fingerprint:
        built_with = metadata.get("embedder_model") or metadata.get("embedder") or "another embedder"
        raise ArtifactMismatchError(
            f"index at {index_dir} was built with embedder fingerprint {found} ({built_with}), but the "
            f"configured embedder {embedder_model!r} has fingerprint {fingerprint}. Serve it with the embedder "
            f"that built it (rag.embedder.model) or rebuild the index with this embedder."
        )


# -- deployments hosting models ------------------------------------------------------------------------
class _SerialExecutor:
    """One thread for everything that touches a model or its tokenizer: fast tokenizers raise "Already
    borrowed" when two threads use one at once, and the model runs one call at a time anyway."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def _log_failure(task: asyncio.Future) -> None:
    """Report an error of generation that finished after its caller went away."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("generation failed after the client left: %r", task.exception())


@serve.deployment
class ChatDeployment:
    """Hosts one engine. Non-streaming requests are batched by `@serve.batch` and split by sampling settings;
    streaming requests run one at a time through `engine.stream`."""

    def __init__(self, engine_config: dict[str, Any], batch_max_size: int, batch_wait_timeout_s: float,
                 edit_store: str | None = None):
        config = EngineConfig.model_validate(engine_config)
        self.engine = build_engine(config)
        self.max_model_len = config.max_model_len
        self.edit_store = Path(edit_store) if edit_store else None
        self.fingerprint = model_fingerprint(config.model)
        self._executor = _SerialExecutor("engine")
        self._generate_batch.set_max_batch_size(batch_max_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("chat deployment ready: %s", config.model)

    async def count_tokens(self, text: str) -> int:
        return await self._executor.run(self.engine.count_tokens, text)

    @serve.multiplexed(max_num_models_per_replica=EDIT_SETS_PER_REPLICA)
    async def get_edit_set(self, edit_id: str) -> dict[str, Any]:
        """An edit set's weight changes keyed by parameter name, loaded once per replica (LRU-evicted)."""
        return await self._executor.run(self._load_edit_set, edit_id)

    def _load_edit_set(self, edit_id: str) -> dict[str, Any]:
        from trustray.core.editing.editset import FINGERPRINT_KEY, load

        edit_set = load(self.edit_store / edit_id, {FINGERPRINT_KEY: self.fingerprint})
        return {f"{module}.weight": delta for module, delta in edit_set.deltas.items()}

    async def _edit(self, edit_id: str | None) -> tuple[str, dict[str, Any]] | None:
        return (edit_id, await self.get_edit_set(edit_id)) if edit_id else None

    @contextlib.contextmanager
    def _edited(self, edit: tuple[str, dict[str, Any]] | None):
        """The edit set's weights for the block only: every engine call runs on the one executor thread, so no
        other request ever sees them, and revert restores the base weights bit for bit."""
        if edit is None:
            yield
            return
        self.engine.apply_delta(*edit)
        try:
            yield
        finally:
            self.engine.revert_delta(edit[0])

    async def generate(self, request: EngineRequest, sampling: SamplingParams,
                       edit_id: str | None = None) -> Completion | APIError:
        return await self._generate_batch(request, sampling, await self._edit(edit_id))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate_batch(
        self, requests: list[EngineRequest], samplings: list[SamplingParams], edits: list[Any]
    ) -> list[Completion | APIError]:
        return await self._executor.run(self._generate_sync, requests, samplings, edits)

    def _generate_sync(
        self, requests: list[EngineRequest], samplings: list[SamplingParams], edits: list[Any]
    ) -> list[Completion | APIError]:
        results: list[Completion | APIError | None] = [None] * len(requests)
        groups: dict[tuple[str, str | None], list[int]] = {}
        for row, (request, sampling, edit) in enumerate(zip(requests, samplings, edits, strict=True)):
            checked = self._check_prompt(request)
            if isinstance(checked, APIError):
                results[row] = checked
            else:
                groups.setdefault((sampling.model_dump_json(), edit[0] if edit else None), []).append(row)
        for rows in groups.values():
            with self._edited(edits[rows[0]]):
                completions = self.engine.generate([requests[row] for row in rows], samplings[rows[0]])
            for row, completion in zip(rows, completions, strict=True):
                results[row] = completion
        return results

    def _check_prompt(self, request: EngineRequest) -> int | APIError:
        """Prompt length in tokens, or the 400 to answer when the prompt leaves no room to generate."""
        from jinja2 import TemplateError

        param = "prompt" if isinstance(request, str) else "messages"
        try:
            prompt_tokens = self.engine.count_tokens(self.engine.render(request))
        except (TemplateError, ValueError) as error:
            return APIError(400, f"the messages cannot be rendered with the model's chat template: {error}", param=param)
        if prompt_tokens >= self.max_model_len:
            return APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens. Shorten the {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return prompt_tokens

    async def stream(self, request: EngineRequest, sampling: SamplingParams,
                     edit_id: str | None = None) -> AsyncIterator[Any]:
        """Yield `{"prompt_tokens"}` (or an `APIError`) first, then text pieces, then
        `{"completion_tokens", "finish_reason"}`."""
        edit = await self._edit(edit_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                with self._edited(edit):
                    self._stream_sync(request, sampling, put, cancelled)
            finally:
                put(done)

        task = asyncio.ensure_future(self._executor.run(work))
        try:
            while (item := await queue.get()) is not done:
                yield item
            await task  # re-raises an engine error
        finally:
            cancelled.set()
            if not task.done():
                task.add_done_callback(_log_failure)

    def _stream_sync(
        self, request: EngineRequest, sampling: SamplingParams, put: Callable[[Any], None], cancelled: threading.Event
    ) -> None:
        checked = self._check_prompt(request)
        put({"prompt_tokens": checked} if isinstance(checked, int) else checked)
        if not isinstance(checked, int):
            return
        text = ""
        # Read to the end even after the client left: engine.stream's generation thread keeps using the
        # tokenizer until it finishes, and nothing else may use it meanwhile (see _SerialExecutor).
        for piece in self.engine.stream(request, sampling):
            text += piece
            if not cancelled.is_set():
                put(piece)
        completion_tokens = self.engine.count_tokens(text)
        # The engine does not report why streaming ended; a full token budget (or context) means "length".
        budget = min(sampling.max_tokens, self.max_model_len - checked)
        put({
            "completion_tokens": completion_tokens,
            "finish_reason": "length" if completion_tokens >= budget else "stop",
        })


@serve.deployment
class RetrieverDeployment:
    """Embeds questions and searches the passage index (`retrieve` mirrors `trustray.actors.retriever`)."""

    def __init__(self, index_dir: str, embedder_config: dict[str, Any]):
        self.embedder = Embedder(EmbedderConfig.model_validate(embedder_config))
        check_index_embedder(index_dir, self.embedder.config.model, self.embedder.fingerprint)
        self.index = PassageIndex.load(index_dir)
        if self.index.dim != self.embedder.dim:
            raise ValueError(
                f"index at {index_dir} holds {self.index.dim}-dim vectors but the embedder makes {self.embedder.dim}-dim ones"
            )
        self._executor = _SerialExecutor("retriever")
        logger.info("retriever ready: %d passages from %s", len(self.index), index_dir)

    async def retrieve(self, questions: list[str], k: int) -> list[list[Passage]]:
        return await self._executor.run(self._retrieve_sync, questions, k)

    def _retrieve_sync(self, questions: list[str], k: int) -> list[list[Passage]]:
        return self.index.search(self.embedder.encode(questions), k)


@serve.deployment
class CompressorDeployment:
    """Compresses retrieved passages under the budget (`trustray.actors.compressor.PassageCompressor`)."""

    def __init__(self, config: dict[str, Any], chat_model: str):
        from trustray.actors.compressor import CompressorConfig, PassageCompressor

        self.compressor = PassageCompressor(CompressorConfig.model_validate(config), chat_model)
        self._executor = _SerialExecutor("compressor")
        logger.info("compressor ready: %s, budget %d tokens", self.compressor.config.name, self.compressor.config.budget)

    async def compress(self, question: str, passages: list[tuple[str, str]]) -> Any:
        return await self._executor.run(self.compressor.compress, question, passages)


# -- HTTP ingress --------------------------------------------------------------------------------------
app = FastAPI(title="trustray", description="OpenAI-compatible chat and retrieval-augmented chat.")


@serve.deployment
class EditorDeployment:
    """Runs the configured editor on a copy of the base model for POST /v1/edits and saves edit sets."""

    def __init__(self, model: str, edits: dict[str, Any]):
        from trustray.core.editing.factory import build_editor
        from trustray.models.loading import load_causal_lm, load_tokenizer

        self.config = EditServeConfig.model_validate(edits)
        self.fingerprint = model_fingerprint(model)
        self.model = load_causal_lm(model)
        self.tokenizer = load_tokenizer(model)
        self.editor = build_editor(self.config.editor, self.model, self.tokenizer, self.fingerprint,
                                   self.config.editor_dir, self.config.editor_settings)
        self._executor = _SerialExecutor("editor")
        self._jobs: set[asyncio.Future] = set()  # jobs answered with 202, kept referenced until they finish
        logger.info("editor deployment ready: %s on %s", self.config.editor, model)

    async def create(self, records: list[dict[str, Any]], name: str | None, wait: bool = True) -> dict[str, Any] | APIError:
        """Edit set of `records`; with `wait=False` the job runs on and its status is answered at once."""
        edit_id = uuid.uuid4().hex[:12]
        job = {"status": "running", "name": name, "editor": self.config.editor, "n_edits": len(records),
               "created": int(time.time())}
        write_job(self.config, edit_id, job)
        running = asyncio.ensure_future(self._executor.run(self._create_sync, edit_id, job, records))
        if wait:
            result = await running
            if isinstance(result, APIError):  # the caller gets the reason now: no failed job is kept
                job_path(self.config, edit_id).unlink(missing_ok=True)
            return result
        self._jobs.add(running)
        running.add_done_callback(self._jobs.discard)
        return edit_set_summary(self.config, edit_id, job)

    def _create_sync(self, edit_id: str, job: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | APIError:
        from trustray.core.editing.editset import FINGERPRINT_KEY, EditSet
        from trustray.core.editing.evaluation import locality_reference, teacher_forced_scores

        try:
            reference = locality_reference(self.model, self.tokenizer, records)
            began = time.perf_counter()
            deltas = self.editor.compute_deltas(records)
            seconds = time.perf_counter() - began
            with EditSet(deltas).apply(self.model):
                metrics = teacher_forced_scores(self.model, self.tokenizer, records, reference)
        except ValueError as error:  # e.g. a prompt longer than the editor's max_length
            write_job(self.config, edit_id, {**job, "status": "failed", "error": str(error)})
            return APIError(400, f"the edits cannot be applied: {error}", param="edits")
        except Exception as error:
            write_job(self.config, edit_id, {**job, "status": "failed", "error": repr(error)})
            raise
        metadata = {
            **job, FINGERPRINT_KEY: self.fingerprint, "status": "succeeded",
            "edits": [{k: r[k] for k in ("prompt", "target_new")} for r in records],
            "metrics": {**metrics, "edit_seconds": round(seconds, 3)},
        }
        EditSet(deltas, metadata).save(Path(self.config.store_dir) / edit_id)
        job_path(self.config, edit_id).unlink(missing_ok=True)
        return edit_set_summary(self.config, edit_id, metadata)


def job_path(config: EditServeConfig, edit_id: str) -> Path:
    """Status of an edit set still being made (or that failed): `<store_dir>/.jobs/<id>.json`."""
    return Path(config.store_dir) / ".jobs" / f"{edit_id}.json"


def write_job(config: EditServeConfig, edit_id: str, job: dict[str, Any]) -> None:
    atomic_write_text(job_path(config, edit_id), json.dumps(job))


def edit_set_summary(config: EditServeConfig, edit_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """What /v1/edits answers about an edit set."""
    return {
        "id": edit_id, "object": "edit_set", "model": f"{config.model_prefix}{edit_id}",
        "status": metadata.get("status", "succeeded"), "created": metadata.get("created"),
        "name": metadata.get("name"), "editor": metadata.get("editor"), "n_edits": metadata.get("n_edits"),
        "metrics": metadata.get("metrics", {}), **({"error": metadata["error"]} if "error" in metadata else {}),
    }


@app.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    # OpenAI answers schema errors with 400, not FastAPI's 422.
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in item.get('loc', ()) if p != 'body') or 'body'}: {item.get('msg')}" for item in problems
    )
    return JSONResponse(APIError(400, message, param=param).body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if error.status_code == 404 else None
    return JSONResponse(APIError(error.status_code, str(error.detail), code=code).body(), status_code=error.status_code)


@app.exception_handler(Exception)
async def _server_error(_: Request, error: Exception) -> JSONResponse:
    logger.error("unhandled error: %r", error)
    return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Job:
    """One request after validation: what to generate and how to present it."""

    def __init__(self, body: ChatCompletionRequest | CompletionRequest, chat: bool, model: str):
        self.body, self.chat, self.model = body, chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.engine_request: EngineRequest = ""
        self.sources: list[dict[str, Any]] | None = None
        self.context_text: str | None = None
        self.compression: dict[str, Any] | None = None
        self.edit_id: str | None = None

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
        return payload


def _served_names(config: ServeConfig) -> list[str]:
    return [config.model_name] + ([config.rag.model_name] if config.rag else [])


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
                 editor: DeploymentHandle | None = None, compressor: DeploymentHandle | None = None):
        self.config = ServeConfig.model_validate(config)
        self.limits = self.config.limits
        self.chat = chat
        self.retriever = retriever
        self.editor = editor
        self.compressor = compressor
        self.created = int(time.time())

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        names = _served_names(self.config)
        edits = self.config.edits
        if edits is not None and Path(edits.store_dir).is_dir():
            names += [f"{edits.model_prefix}{path.name}" for path in sorted(Path(edits.store_dir).iterdir())
                      if EDIT_ID.match(path.name) and (path / "metadata.json").is_file()]
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "trustray"} for name in names],
        }

    # -- edit sets ---------------------------------------------------------------------------------------
    def _edits_config(self, request: Request) -> EditServeConfig:
        """The edit-set settings, after checking the API key (401 without the right one)."""
        edits = self.config.edits
        if edits is None:
            raise APIError(404, "edit sets are not enabled on this server", code="not_found")
        key = edits.api_key
        given = request.headers.get("authorization", "")
        if key is None or not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")
        return edits

    def _edit_folder(self, edits: EditServeConfig, edit_id: str) -> Path:
        folder = Path(edits.store_dir) / edit_id
        if not EDIT_ID.match(edit_id) or not (folder / "metadata.json").is_file():
            raise APIError(404, f"no edit set {edit_id!r}", param="edit_id", code="not_found")
        return folder

    @app.post("/v1/edits")
    async def create_edits(self, request: Request) -> Any:
        edits = self._edits_config(request)
        body = await self._read(request, EditsRequest)
        if len(body.edits) > edits.max_edits_per_request:
            raise APIError(400, f"at most {edits.max_edits_per_request} edits per request", param="edits")
        records = [item.record(index) for index, item in enumerate(body.edits)]
        summary = await self._await(self.editor.create.remote(records, body.name, body.wait))
        return JSONResponse(summary, status_code=200 if body.wait else 202)

    @app.get("/v1/edits/{edit_id}")
    async def get_edits(self, edit_id: str, request: Request) -> Any:
        edits = self._edits_config(request)
        job = job_path(edits, edit_id)
        if EDIT_ID.match(edit_id) and job.is_file():
            return edit_set_summary(edits, edit_id, json.loads(job.read_text()))
        return edit_set_summary(edits, edit_id, read_metadata(self._edit_folder(edits, edit_id)))

    @app.delete("/v1/edits/{edit_id}")
    async def delete_edits(self, edit_id: str, request: Request) -> Any:
        edits = self._edits_config(request)
        job = job_path(edits, edit_id)
        if EDIT_ID.match(edit_id) and job.is_file():
            if json.loads(job.read_text())["status"] == "running":
                raise APIError(409, f"edit set {edit_id!r} is still being made", param="edit_id", code="conflict")
            job.unlink()
            return {"id": edit_id, "object": "edit_set", "deleted": True}
        shutil.rmtree(self._edit_folder(edits, edit_id))
        return {"id": edit_id, "object": "edit_set", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        body = await self._read(request, ChatCompletionRequest)
        rag, edit_id = self._route(body.model)
        if not body.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        if len(body.messages) > self.limits.max_messages:
            raise APIError(400, f"at most {self.limits.max_messages} messages are accepted", param="messages")
        job = _Job(body, chat=True, model=body.model)
        job.edit_id = edit_id
        messages = [message.as_engine_message() for message in body.messages]
        job.engine_request = await self._augment(job, messages) if rag else messages
        return await self._answer(job)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        body = await self._read(request, CompletionRequest)
        rag, edit_id = self._route(body.model)
        if rag:
            raise APIError(
                400, "the RAG model answers chat requests only: use /v1/chat/completions", param="model"
            )
        job = _Job(body, chat=False, model=body.model)
        job.edit_id = edit_id
        job.engine_request = body.prompt_text()
        return await self._answer(job)

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

    def _route(self, model: str) -> tuple[bool, str | None]:
        """(whether the model retrieves, the edit set it names or None); 404 for an unknown model."""
        if model == self.config.model_name:
            return False, None
        if self.config.rag is not None and model == self.config.rag.model_name:
            return True, None
        edits = self.config.edits
        if edits is not None and model.startswith(edits.model_prefix):
            edit_id = model[len(edits.model_prefix):]
            if EDIT_ID.match(edit_id) and (Path(edits.store_dir) / edit_id / "metadata.json").is_file():
                return False, edit_id
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")

    def _chat_handle(self, job: _Job) -> DeploymentHandle:
        """The chat deployment, routed by Serve model multiplexing to a replica holding the job's edit set."""
        return self.chat.options(multiplexed_model_id=job.edit_id) if job.edit_id else self.chat

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
    async def _augment(self, job: _Job, messages: list[dict[str, str]]) -> list[dict[str, str]]:
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
        job.sources = [{"id": p.id, "title": p.title, "score": p.score} for p in passages]
        if self.compressor is not None:
            compressed = await self._await(self.compressor.compress.remote(question, pairs))
            pairs = compressed.passages
            job.compression = {
                "compressor": rag.compressor.name, "context": format_passages(pairs) if pairs else "",
                "tokens_before": compressed.source_tokens, "tokens_after": compressed.context_tokens,
                "closed_book": compressed.empty,
            }
        job.context_text = format_passages(pairs)
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
        except Exception as error:  # a replica fault: logged here, answered as a JSON 500
            logger.error("deployment call failed: %r", error)
            raise APIError(500, f"the model server failed: {type(error).__name__}", type="server_error") from None
        if isinstance(result, APIError):
            raise result
        return result

    async def _context_tokens(self, job: _Job) -> int | None:
        if job.context_text is None:
            return None
        return await self._await(self.chat.count_tokens.remote(job.context_text)) if job.context_text else 0

    async def _answer(self, job: _Job) -> Any:
        sampling = self._sampling(job.body)
        if job.body.stream:
            return await self._answer_stream(job, sampling)
        completion, context_tokens = await asyncio.gather(
            self._await(self._chat_handle(job).generate.remote(job.engine_request, sampling, job.edit_id)),
            self._context_tokens(job),
        )
        usage = _usage(completion.prompt_tokens, completion.completion_tokens, context_tokens)
        return JSONResponse(job.response(completion, usage))

    async def _answer_stream(self, job: _Job, sampling: SamplingParams) -> StreamingResponse:
        pieces = self._chat_handle(job).options(stream=True).stream.remote(job.engine_request, sampling, job.edit_id)
        # The first item settles validation (prompt length), so a bad request still gets a plain 4xx.
        try:
            head = await self._await(pieces.__anext__())
        except APIError:
            pieces.cancel()
            raise
        context_tokens = await self._context_tokens(job)
        include_usage = job.body.include_usage()

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                extra = {key: value for key, value in (("sources", job.sources), ("compression", job.compression))
                         if value is not None}
                yield _sse(job.chunk([job.choice(None, None, first=True)], **extra))
                tail: dict[str, Any] = {"completion_tokens": 0, "finish_reason": "stop"}
                async for item in pieces:
                    if isinstance(item, str):
                        yield _sse(job.chunk([job.choice(item, None)]))
                    else:
                        tail = item
                finished = True
                yield _sse(job.chunk([job.choice(None, tail["finish_reason"])]))
                if include_usage:
                    usage = _usage(head["prompt_tokens"], tail["completion_tokens"], context_tokens)
                    yield _sse(job.chunk([], usage=usage))
            except Exception as error:  # the response has started: report the fault in the stream itself
                finished = True
                logger.error("streaming failed: %r", error)
                yield _sse(APIError(500, "the model server failed while streaming", type="server_error").body())
            finally:
                if not finished:
                    pieces.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- building and running ------------------------------------------------------------------------------
def _local_path(source: str) -> str:
    """Absolute path for a source that is a folder here (replicas may run in another working directory)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def build_app(config: ServeConfig) -> serve.Application:
    """Bind the deployments of `config` into one Serve application (not yet running)."""
    chat_config = config.chat.model_copy(update={"model": _local_path(config.chat.model)})
    edits, editor = config.edits, None
    if edits is not None:
        # Resolved here: replicas may not see the environment this process was started with.
        edits = edits.model_copy(update={"api_key": edits.resolved_api_key(),
                                         "store_dir": str(Path(edits.store_dir).expanduser().resolve())})
        Path(edits.store_dir).mkdir(parents=True, exist_ok=True)
        editor = EditorDeployment.options(**config.deployments.editor.serve_options()).bind(
            chat_config.model, edits.model_dump()
        )
        config = config.model_copy(update={"edits": edits})
    chat = ChatDeployment.options(**config.deployments.chat.serve_options()).bind(
        chat_config.model_dump(), config.batch_max_size, config.batch_wait_timeout_s,
        edits.store_dir if edits is not None else None,
    )
    retriever = compressor = None
    if config.rag is not None:
        index_dir = _local_path(config.rag.index_dir)
        embedder = config.rag.embedder.model_copy(update={"model": _local_path(config.rag.embedder.model)})
        if Path(index_dir).is_dir():
            # Checked here too, so a mismatch fails at once instead of after Serve's replica retries.
            check_index_embedder(index_dir, embedder.model, model_fingerprint(embedder.model))
        retriever = RetrieverDeployment.options(**config.deployments.retriever.serve_options()).bind(
            index_dir, embedder.model_dump()
        )
        if config.rag.compressor is not None:
            compressor_config = config.rag.compressor
            scorer_dir = compressor_config.scorer_dir
            compressor_config = compressor_config.model_copy(update={
                "scorer_dir": _local_path(scorer_dir) if scorer_dir else None,
                "embedder": compressor_config.embedder.model_copy(
                    update={"model": _local_path(compressor_config.embedder.model)}),
            })
            compressor = CompressorDeployment.options(**config.deployments.compressor.serve_options()).bind(
                compressor_config.model_dump(), chat_config.model
            )
    return OpenAIIngress.options(**config.deployments.ingress.serve_options()).bind(
        config.model_dump(), chat, retriever, editor, compressor
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Builder for Serve config files (`import_path: trustray.serve_apps.openai_app:app_builder`); `args` holds
    `config` (a ServeConfig YAML path, optional) and `overrides` (dotted `key=value` strings, optional)."""
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ValueError(f"unknown app_builder args {sorted(unknown)}; expected 'config' and 'overrides'")
    return build_app(load_config(ServeConfig, args.get("config"), list(args.get("overrides") or [])))


def base_url(config: ServeConfig) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://{host}:{config.port}"


def run_app(config: ServeConfig, blocking: bool = False) -> str:
    """Start Ray (or connect), start Serve's HTTP proxy on `config.host:port`, deploy the app and return its
    base URL; with `blocking`, serve until interrupted and then shut down."""
    from trustray.actors.cluster import init_ray

    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = base_url(config)
    logger.info("serving %s at %s/v1", ", ".join(_served_names(config)), url)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            logger.info("interrupted; shutting down")
            shutdown()
    return url


def shutdown() -> None:
    """Delete the application and stop Serve (its replicas give their CPUs back); Ray itself keeps running."""
    import ray

    if not ray.is_initialized():
        return
    serve.delete(APP_NAME)
    serve.shutdown()
