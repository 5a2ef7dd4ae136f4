"""`GenerationPool`: chat-model actors that sample a policy's responses together (the preference loop's candidate
generation on vLLM).

Prompts are dealt out to the actors in turn; every shard's samples are in flight at once, one thread
per sample inside its actor, so vLLM batches them all. Sample s of every prompt is seeded `seed + s` per request,
so the responses do not depend on how many actors there are or how the prompts were dealt.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from trustray.actors.chat import ChatModel, ChatModelActor
from trustray.config import PoolResources
from trustray.models.engines import EngineConfig, SamplingParams

# Threads per actor: calls beyond this queue in Ray until one finishes (vLLM batches the ones running).
MAX_CONCURRENT_CALLS = 16


class GenerationPool:
    """See the module docstring. `in_process`: one `ChatModel` in this process instead of `resources.size` actors."""

    def __init__(self, engine: EngineConfig, resources: PoolResources, in_process: bool = False) -> None:
        if in_process and resources.size != 1:
            raise ValueError(f"a generation pool in this process holds one model, not {resources.size}")
        self.in_process = in_process
        if in_process:
            self.models: list[Any] = [ChatModel(engine)]
        else:
            options = ChatModelActor.options(**resources.ray_options(), max_concurrency=MAX_CONCURRENT_CALLS)
            self.models = [options.remote(engine) for _ in range(resources.size)]

    def sample(self, prompts: Sequence[Sequence[Mapping[str, str]]], samples: int, max_tokens: int,
               temperature: float, seed: int, adapter: str | None) -> list[list[dict[str, Any]]]:
        """Per prompt, `samples` responses `{"text", "tokens"}` under `adapter` (None: the base model); temperature
        0 decodes greedily."""
        shards = [list(prompts[start::len(self.models)]) for start in range(len(self.models))]
        samplings = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + s)
                     for s in range(samples)]
        if self.in_process:
            results = [[self.models[0].generate(shards[0], sampling, adapter) for sampling in samplings]]
        else:
            pending = [[model.generate.remote(shard, sampling, adapter) for sampling in samplings]
                       for model, shard in zip(self.models, shards, strict=True) if shard]
            results = [ray.get(calls) for calls in pending]
        rows: list[list[dict[str, Any]]] = [[] for _ in prompts]
        for start, per_sample in enumerate(results):
            for completions in per_sample:
                for offset, completion in enumerate(completions):
                    rows[start + offset * len(self.models)].append(
                        {"text": completion.text, "tokens": completion.completion_tokens})
        return rows

    def load_adapter(self, name: str, path: str) -> float:
        """Load the adapter at `path` as `name` into every model (replacing one of that name); returns the seconds
        the slowest took."""
        began = time.perf_counter()
        if self.in_process:
            self.models[0].load_adapter(name, path)
        else:
            ray.get([model.load_adapter.remote(name, path) for model in self.models])
        return time.perf_counter() - began

    def close(self) -> None:
        """Stop the actors (their CPUs go back to Ray at once) or the in-process engine."""
        if self.in_process:
            self.models[0].engine.close()
            return
        for model in self.models:
            ray.kill(model)
