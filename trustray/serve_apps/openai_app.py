"""OpenAI-compatible chat and RAG service on Ray Serve: building, starting and stopping the application.

`build_app` binds the deployments of a `ServeConfig` into one application: the HTTP front (`ingress`), the chat
model, and, when configured, the retriever, the passage compressor, the editor of `/v1/edits` and the reward model
of `/v1/rewards` (`deployments`). `run_app` starts it; `app_builder` is the entry point of Serve config files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray import serve

from trustray.actors.retriever import check_index_embedder
from trustray.config import load_config
from trustray.models.sources import model_fingerprint
from trustray.serve_apps.config import ServeConfig
from trustray.serve_apps.deployments import (
    ChatDeployment,
    CompressorDeployment,
    EditorDeployment,
    RetrieverDeployment,
    RewardDeployment,
)
from trustray.serve_apps.ingress import OpenAIIngress

logger = logging.getLogger(__name__)

APP_NAME = "trustray"


def _local_path(source: str) -> str:
    """Absolute path for a source that is a folder here (replicas may run in another working directory)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def build_app(config: ServeConfig) -> serve.Application:
    """Bind the deployments of `config` into one Serve application (not yet running)."""
    options = config.deployments
    chat_config = config.chat.model_copy(update={"model": _local_path(config.chat.model)})
    edits, editor = config.edits, None
    if edits is not None:
        # Resolved here: replicas may not see the environment this process was started with.
        edits = edits.model_copy(update={"api_key": edits.resolved_api_key(),
                                         "store_dir": str(Path(edits.store_dir).expanduser().resolve())})
        Path(edits.store_dir).mkdir(parents=True, exist_ok=True)
        editor = EditorDeployment.options(**options.editor.serve_options()).bind(
            chat_config.model, edits.model_dump(), options.editor.resources.torch_threads
        )
        config = config.model_copy(update={"edits": edits})
    chat = ChatDeployment.options(**options.chat.serve_options()).bind(
        chat_config.model_dump(), config.batch_max_size, config.batch_wait_timeout_s,
        edits.store_dir if edits is not None else None, options.chat.resources.torch_threads,
        options.chat.max_ongoing_requests,
    )
    retriever = compressor = None
    if config.rag is not None:
        index_dir = _local_path(config.rag.index_dir)
        embedder = config.rag.embedder.model_copy(update={"model": _local_path(config.rag.embedder.model)})
        if Path(index_dir).is_dir():
            # Checked here too, so a mismatch fails at once instead of after Serve's replica retries.
            check_index_embedder(index_dir, embedder.model, model_fingerprint(embedder.model))
        retriever = RetrieverDeployment.options(**options.retriever.serve_options()).bind(
            index_dir, embedder.model_dump(), options.retriever.resources.torch_threads
        )
        if config.rag.compressor is not None:
            compressor_config = config.rag.compressor
            scorer_dir = compressor_config.scorer_dir
            compressor_config = compressor_config.model_copy(update={
                "scorer_dir": _local_path(scorer_dir) if scorer_dir else None,
                "embedder": compressor_config.embedder.model_copy(
                    update={"model": _local_path(compressor_config.embedder.model)}),
            })
            compressor = CompressorDeployment.options(**options.compressor.serve_options()).bind(
                compressor_config.model_dump(), chat_config.model, options.compressor.resources.torch_threads
            )
    if config.adapters is not None:
        store = str(Path(config.adapters.store_dir).expanduser().resolve())
        config = config.model_copy(update={"adapters": config.adapters.model_copy(update={"store_dir": store})})
    reward = None
    if config.reward is not None:
        reward_dir = _local_path(config.reward.model_dir)
        config = config.model_copy(update={"reward": config.reward.model_copy(update={"model_dir": reward_dir})})
        reward = RewardDeployment.options(**options.reward.serve_options()).bind(
            reward_dir, options.reward.resources.torch_threads)
    return OpenAIIngress.options(**options.ingress.serve_options()).bind(
        config.model_dump(), chat, retriever, editor, compressor, reward
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


def run_app(config: ServeConfig) -> str:
    """Start Ray (or connect), start Serve's HTTP proxy on `config.host:port`, deploy the app and return its
    base URL; `shutdown` stops it."""
    from trustray.actors.cluster import init_ray

    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = base_url(config)
    logger.info("serving %s at %s/v1", ", ".join(config.served_names()), url)
    return url


def shutdown() -> None:
    """Delete the application and stop Serve (its replicas give their CPUs back); Ray itself keeps running."""
    import ray

    if not ray.is_initialized():
        return
    serve.delete(APP_NAME)
    serve.shutdown()
