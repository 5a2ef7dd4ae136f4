"""The Serve deployments hosting models, each a thin wrapper around a plain worker class of `trustray.actors`.

`ChatDeployment` (an engine; concurrent non-streaming requests are batched; with vLLM, every request reaches its
continuous batching), `RetrieverDeployment` (embedder +
passage index), `CompressorDeployment` (the passage compressor), `EditorDeployment` (makes edit sets for
POST /v1/edits) and `RewardDeployment` (a reward model for /v1/rewards and selective answers). Every call that
touches a model runs on the deployment's executor threads (`ModelExecutor`: one, except for vLLM). Errors a request
causes come back as `APIError` values rather than raised, so they cross the Ray boundary unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from trustray.actors.chat import ChatModel, EditWeights, PromptRejected
from trustray.actors.compressor import CompressorConfig, PassageCompressor
from trustray.actors.editor import EditSetMaker
from trustray.actors.retriever import Retriever
from trustray.actors.reward import RewardScorer
from trustray.core.rag.index import Passage
from trustray.data.corpus import edit_train_texts
from trustray.data.edits import default_locality_anchors, locality_probe_questions
from trustray.models.embedders import EmbedderConfig
from trustray.models.engines import Completion, EngineConfig, SamplingParams
from trustray.models.engines import Request as EngineRequest
from trustray.models.sources import model_fingerprint
from trustray.serve_apps.config import EditServeConfig
from trustray.serve_apps.edit_store import HEARTBEAT_S, EditStore
from trustray.serve_apps.schemas import APIError

logger = logging.getLogger(__name__)

# Edit sets one chat replica keeps loaded (Serve model multiplexing routes an edit set's requests to a replica
# that holds it; the least recently used is dropped beyond this).
EDIT_SETS_PER_REPLICA = 8
# Versions of one published adapter a chat replica keeps loaded: the newest, and the one before it for requests
# that read the old pointer just before a swap.
ADAPTER_VERSIONS_KEPT = 2
# A published adapter as a request names it: ("<name>@<version>", its folder).
AdapterRef = tuple[str, str]


class ModelExecutor:
    """The threads that touch a model or its tokenizer. One by default: fast tokenizers raise "Already borrowed"
    when two threads use one at once, and most models run one call at a time anyway. A concurrent engine (vLLM:
    its own tokenizer lock, continuous batching) gets one thread per request the replica may hold."""

    def __init__(self, name: str, threads: int = 1):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def pin_torch_threads(threads: int | None) -> None:
    """The replica's torch threads (`deployments.<name>.resources.torch_threads`; None keeps torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def rejected(error: PromptRejected) -> APIError:
    return APIError(400, str(error), param=error.param, code=error.code)


def _log_failure(task: asyncio.Future) -> None:
    """Report an error of generation that finished after its caller went away."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("generation failed after the client left: %r", task.exception())


@serve.deployment
class ChatDeployment:
    """Hosts one `ChatModel`. Non-streaming requests are batched by `@serve.batch` and streaming requests run one
    at a time, except on a concurrent engine (vLLM), where up to `max_ongoing_requests` calls run at once. Requests
    naming an edit set run with its weights applied (loaded once per replica); requests naming a published adapter
    run with it (each version loaded once per replica, when first asked for: a hot swap)."""

    def __init__(self, engine_config: dict[str, Any], batch_max_size: int, batch_wait_timeout_s: float,
                 edit_store_dir: str | None = None, torch_threads: int | None = None, max_ongoing_requests: int = 1):
        pin_torch_threads(torch_threads)
        config = EngineConfig.model_validate(engine_config)
        self.chat = ChatModel(config)
        self.edit_store_dir = Path(edit_store_dir) if edit_store_dir else None
        self._adapter_versions: dict[str, list[str]] = {}  # name -> loaded "<name>@<version>" ids, oldest first
        self._adapter_lock = threading.Lock()
        self._executor = ModelExecutor("engine", max_ongoing_requests if self.chat.concurrent else 1)
        self._generate_batch.set_max_batch_size(batch_max_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("chat deployment ready: %s", config.model)

    async def count_tokens(self, text: str) -> int:
        return await self._executor.run(self.chat.count_tokens, text)

    @serve.multiplexed(max_num_models_per_replica=EDIT_SETS_PER_REPLICA)
    async def get_edit_set(self, edit_id: str) -> tuple[dict[str, Any], Any]:
        """An edit set's weight changes keyed by parameter name and its scope, loaded once per replica
        (LRU-evicted)."""
        return await self._executor.run(self.chat.edit_weights, self.edit_store_dir / edit_id)

    async def _edit(self, edit_id: str | None) -> EditWeights | None:
        return (edit_id, *await self.get_edit_set(edit_id)) if edit_id else None

    def _load_adapter(self, adapter: AdapterRef) -> None:
        """Load a published adapter version unless this replica has it; drop versions beyond the kept ones."""
        adapter_id, folder = adapter
        name = adapter_id.split("@")[0]
        with self._adapter_lock:
            versions = self._adapter_versions.setdefault(name, [])
            if adapter_id in versions:
                return
            began = time.perf_counter()
            self.chat.load_adapter(adapter_id, folder)
            versions.append(adapter_id)
            while len(versions) > ADAPTER_VERSIONS_KEPT:
                self.chat.remove_adapter(versions.pop(0))
        logger.info("adapter %s loaded in %.3f s", adapter_id, time.perf_counter() - began)

    async def _adapter(self, adapter: AdapterRef | None) -> str | None:
        if adapter is None:
            return None
        await self._executor.run(self._load_adapter, adapter)
        return adapter[0]

    async def generate(self, request: EngineRequest, sampling: SamplingParams, edit_id: str | None = None,
                       adapter: AdapterRef | None = None) -> Completion | APIError:
        edit, adapter_id = await self._edit(edit_id), await self._adapter(adapter)
        if self.chat.concurrent:  # vLLM batches across requests itself; `@serve.batch` would run one batch at a time
            result = (await self._executor.run(self.chat.generate_each, [request], [sampling], [edit], [adapter_id]))[0]
            return rejected(result) if isinstance(result, PromptRejected) else result
        return await self._generate_batch(request, sampling, edit, adapter_id)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate_batch(
        self, requests: list[EngineRequest], samplings: list[SamplingParams], edits: list[EditWeights | None],
        adapters: list[str | None],
    ) -> list[Completion | APIError]:
        results = await self._executor.run(self.chat.generate_each, requests, samplings, edits, adapters)
        return [rejected(result) if isinstance(result, PromptRejected) else result for result in results]

    async def stream(self, request: EngineRequest, sampling: SamplingParams, edit_id: str | None = None,
                     adapter: AdapterRef | None = None) -> AsyncIterator[Any]:
        """Yield `{"prompt_tokens"}` (or an `APIError`) first, then text pieces, then
        `{"completion_tokens", "finish_reason"}`."""
        edit = await self._edit(edit_id)
        adapter_id = await self._adapter(adapter)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            events = self.chat.stream_events(request, sampling, edit, adapter_id)
            try:
                # After the client left, a concurrent engine (vLLM) aborts the request when the stream is closed;
                # the others read to the end: their generation thread keeps using the tokenizer until it
                # finishes, and nothing else may use it meanwhile (see ModelExecutor).
                for item in events:
                    if not cancelled.is_set():
                        put(item)
                    elif self.chat.concurrent:
                        events.close()
                        break
            except PromptRejected as error:
                put(rejected(error))
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


@serve.deployment
class RetrieverDeployment:
    """Hosts one `Retriever`: embeds questions and searches the passage index."""

    def __init__(self, index_dir: str, embedder_config: dict[str, Any], torch_threads: int | None = None):
        pin_torch_threads(torch_threads)
        self.retriever = Retriever(index_dir, EmbedderConfig.model_validate(embedder_config))
        self._executor = ModelExecutor("retriever")

    async def retrieve(self, questions: list[str], k: int) -> list[list[Passage]]:
        return await self._executor.run(self.retriever.retrieve, questions, k)


@serve.deployment
class CompressorDeployment:
    """Hosts one `PassageCompressor`: compresses retrieved passages under the budget."""

    def __init__(self, config: dict[str, Any], chat_model: str, torch_threads: int | None = None):
        pin_torch_threads(torch_threads)
        self.compressor = PassageCompressor(CompressorConfig.model_validate(config), chat_model)
        self._executor = ModelExecutor("compressor")
        logger.info("compressor ready: %s, budget %d tokens", self.compressor.config.name, self.compressor.config.budget)

    async def compress(self, question: str, passages: list[tuple[str, str]]) -> Any:
        return await self._executor.run(self.compressor.compress, question, passages)


@serve.deployment
class EditorDeployment:
    """Hosts one `EditSetMaker` on a copy of the base model: makes the edit sets of POST /v1/edits and saves them."""

    def __init__(self, model: str, edits: dict[str, Any], torch_threads: int | None = None):
        pin_torch_threads(torch_threads)
        self.config = EditServeConfig.model_validate(edits)
        self.store = EditStore(self.config)
        config = self.config
        self.maker = EditSetMaker.load(
            model, model_fingerprint(model), config.editor, config.editor_dir, config.editor_settings,
            general_text=edit_train_texts(config.replay_texts) if config.replay_texts else None,
            default_anchors=default_locality_anchors(config.locality_probes),
            anchors_per_edit=config.anchors_per_edit, preserved_chats=config.preserved_chats,
        )
        self.maker.editor.prepare()
        # The unedited model's answers to the probes, taken once: every edit set is compared with them.
        self.check = self.maker.locality_check(locality_probe_questions(config.locality_probes),
                                               config.locality_max_new_tokens)
        self._executor = ModelExecutor("editor")
        self._jobs: set[asyncio.Future] = set()  # jobs answered with 202, kept referenced until they finish
        logger.info("editor deployment ready: %s on %s", config.editor, model)

    async def create(self, records: list[dict[str, Any]], name: str | None, wait: bool = True,
                     accept_locality_loss: bool = False) -> dict[str, Any] | APIError:
        """Edit set of `records`; with `wait=False` the job runs on and its status is answered at once."""
        edit_id = self.store.new_id()
        job = {"status": "running", "name": name, "editor": self.config.editor, "n_edits": len(records),
               "created": int(time.time())}
        self.store.write_job(edit_id, job)
        self.store.beat(edit_id)
        running = asyncio.ensure_future(
            self._executor.run(self._make, edit_id, job, records, accept_locality_loss)
        )
        heartbeat = asyncio.ensure_future(self._heartbeat(edit_id, running))
        running.add_done_callback(lambda _: heartbeat.cancel())
        if wait:
            result = await running
            if isinstance(result, APIError):  # the caller gets the reason now: no failed job is kept
                self.store.drop_job(edit_id)
            return result
        self._jobs.add(running)
        running.add_done_callback(self._jobs.discard)
        return self.store.summary(edit_id, job)

    async def _heartbeat(self, edit_id: str, running: asyncio.Future) -> None:
        """Touch the job's heartbeat until it ends, so a job left behind by a dead replica is seen as failed."""
        while not running.done():
            await asyncio.sleep(HEARTBEAT_S)
            if not running.done():
                self.store.beat(edit_id)

    def _make(self, edit_id: str, job: dict[str, Any], records: list[dict[str, Any]],
              accept_locality_loss: bool) -> dict[str, Any] | APIError:
        """Make, check and save the edit set; one that fails the locality check is kept as a rejected job only."""
        from trustray.core.editing.editset import FINGERPRINT_KEY, EditSet

        try:
            made = self.maker.edit(records, check=self.check)
        except ValueError as error:  # e.g. a prompt longer than the editor's max_length
            self.store.write_job(edit_id, {**job, "status": "failed", "error": str(error)})
            return APIError(400, f"the edits cannot be applied: {error}", param="edits")
        except Exception as error:
            self.store.write_job(edit_id, {**job, "status": "failed", "error": repr(error)})
            raise
        metrics = {**made.scores, "edit_seconds": round(made.seconds, 3)}
        kept, threshold = metrics["locality_kept"], self.config.min_locality_kept
        if kept < threshold and not accept_locality_loss:
            changed = round((1 - kept) * metrics["locality_probes"])
            reason = (f"the edit set changed the answers to {changed} of {metrics['locality_probes']} unrelated "
                      f"questions (locality_kept {kept} < min_locality_kept {threshold}); it is not served. Send "
                      "the edits again with accept_locality_loss=true to serve it anyway.")
            rejected = {**job, "status": "rejected", "metrics": metrics, "error": reason}
            self.store.write_job(edit_id, rejected)
            return self.store.summary(edit_id, rejected)
        metadata = {
            **job, FINGERPRINT_KEY: self.maker.fingerprint, "status": "succeeded",
            "edits": [{k: r[k] for k in ("prompt", "target_new")} for r in records],
            "metrics": metrics, "accepted_locality_loss": kept < threshold,
        }
        return self.store.finish(edit_id, EditSet(made.edit_set.deltas, metadata, scope=made.edit_set.scope))


@serve.deployment
class RewardDeployment:
    """Hosts one `RewardScorer` (its own copy of the frozen backbone) for /v1/rewards and selective answers."""

    def __init__(self, model_dir: str, torch_threads: int | None = None):
        pin_torch_threads(torch_threads)
        self.scorer = RewardScorer(model_dir)
        self._executor = ModelExecutor("reward")

    async def score(self, prompt: list[dict[str, str]], responses: list[str]) -> list[dict[str, Any]]:
        return await self._executor.run(self.scorer.score, prompt, responses)

    async def threshold(self, max_risk: float | None, threshold: float | None) -> float | APIError:
        try:
            return self.scorer.threshold(max_risk, threshold)
        except ValueError as error:
            return APIError(400, str(error), param="selective")

    async def info(self) -> dict[str, Any]:
        return {key: self.scorer.metadata.get(key) for key in ("task", "base_model", "pooling", "ood_threshold")}
