"""ChatModelActor: one engine (transformers or vLLM) hosted in a Ray actor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ray

from trustray.config import ActorResources
from trustray.models.engine_factory import build_engine
from trustray.models.engines import Completion, EngineConfig, Request, SamplingParams


class ChatModel:
    """Plain class around an engine; `ChatModelActor` is its Ray actor."""

    def __init__(self, config: EngineConfig):
        self.engine = build_engine(config)

    def generate(self, requests: Sequence[Request], sampling: SamplingParams, adapter: str | None = None) -> list[Completion]:
        return self.engine.generate(requests, sampling, adapter)

    def score(self, prompts: Sequence[str], continuations: Sequence[str], adapter: str | None = None) -> list[list[float]]:
        return self.engine.score(prompts, continuations, adapter)

    def load_adapter(self, name: str, path: str) -> None:
        self.engine.load_adapter(name, path)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def apply_delta(self, name: str, delta: Mapping) -> None:
        self.engine.apply_delta(name, delta)

    def revert_delta(self, name: str) -> None:
        self.engine.revert_delta(name)

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)


ChatModelActor = ray.remote(ChatModel)


def start_chat_actor(config: EngineConfig, resources: ActorResources | None = None):
    """Start a `ChatModelActor` with the given resources (algorithm config and resources stay separate)."""
    resources = resources or ActorResources()
    return ChatModelActor.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus).remote(config)
