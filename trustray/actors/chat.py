"""`ChatModel`: one engine (transformers or vLLM) with its prompt checks and served edit sets.

`ChatModelActor` is its Ray actor; the Serve chat deployment wraps it too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import ray

from trustray.config import ActorResources
from trustray.core.editing.scope import EditScope
from trustray.models.engine_factory import build_engine
from trustray.models.engines import Completion, EngineConfig, Request, SamplingParams
from trustray.models.sources import model_fingerprint

# An edit set ready to apply: its id, its weight changes keyed by parameter name and its scope (None: everywhere).
EditWeights = tuple[str, dict[str, Any], EditScope | None]


class PromptRejected(ValueError):
    """A request the model cannot answer as sent (the caller's to fix): `param` names the field at fault."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class SharedOrExclusive:
    """A readers-writer lock: any number of `shared` holders, or one `exclusive` holder. Neither side starves the
    other: a waiting exclusive holder keeps new shared holders out, and when an exclusive block ends, as many
    shared holders as were waiting for it go in before the next exclusive block."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting
        self._shared_waiting = 0
        self._admit = 0  # shared holders let in ahead of waiting exclusive ones

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._shared_waiting += 1
            self._condition.wait_for(lambda: not self._exclusive and (self._admit > 0 or not self._waiting))
            self._shared_waiting -= 1
            self._admit = max(0, self._admit - 1)
            self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._waiting += 1
            self._condition.wait_for(lambda: not self._exclusive and not self._shared and not self._admit)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._admit = self._shared_waiting
                self._condition.notify_all()


class ChatModel:
    """Plain class around an engine; `ChatModelActor` is its Ray actor. With a concurrent engine (vLLM), any number
    of threads may call it at once; a block run with an edit set's weight changes holds every other call back
    (the changes are to the weights every request shares)."""

    def __init__(self, config: EngineConfig):
        self.engine = build_engine(config)
        self.model_source = config.model
        self.max_model_len = config.max_model_len
        self._weights_gate = SharedOrExclusive()

    @property
    def concurrent(self) -> bool:
        """Whether calls from several threads run at once (the engine's continuous batching)."""
        return self.engine.concurrent

    @cached_property
    def fingerprint(self) -> str:
        """The base model's fingerprint, which every edit set applied to it must carry."""
        return model_fingerprint(self.model_source)

    def generate(self, requests: Sequence[Request], sampling: SamplingParams, adapter: str | None = None) -> list[Completion]:
        with self.edited(None):
            return self.engine.generate(requests, sampling, adapter)

    def score(self, prompts: Sequence[str], continuations: Sequence[str], adapter: str | None = None) -> list[list[float]]:
        with self.edited(None):
            return self.engine.score(prompts, continuations, adapter)

    def load_adapter(self, name: str, path: str) -> None:
        self.engine.load_adapter(name, path)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def apply_delta(self, name: str, delta: Mapping, scope: EditScope | None = None) -> None:
        self.engine.apply_delta(name, delta, scope)

    def revert_delta(self, name: str) -> None:
        self.engine.revert_delta(name)

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def prompt_tokens(self, request: Request) -> int:
        """The prompt's length in tokens; `PromptRejected` when it cannot be rendered or leaves no room to generate."""
        from jinja2 import TemplateError

        param = "prompt" if isinstance(request, str) else "messages"
        try:
            prompt_tokens = self.engine.count_tokens(self.engine.render(request))
        except (TemplateError, ValueError) as error:
            raise PromptRejected(f"the messages cannot be rendered with the model's chat template: {error}",
                                 param) from None
        if prompt_tokens == 0:
            raise PromptRejected(f"the {param} is empty: it has no tokens to continue", param)
        if prompt_tokens >= self.max_model_len:
            raise PromptRejected(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens. Shorten the {param}.",
                param,
                code="context_length_exceeded",
            )
        return prompt_tokens

    def edit_weights(self, folder: str | Path) -> tuple[dict[str, Any], EditScope | None]:
        """The weight changes of the edit set in `folder`, keyed by parameter name, and its scope; an edit set made
        for another base model is refused."""
        from trustray.core.editing.editset import FINGERPRINT_KEY, load

        edit_set = load(folder, {FINGERPRINT_KEY: self.fingerprint})
        return {f"{module}.weight": delta for module, delta in edit_set.deltas.items()}, edit_set.scope

    @contextlib.contextmanager
    def edited(self, edit: EditWeights | None) -> Iterator[None]:
        """The edit set's weights for the block only; reverting restores the base weights bit for bit. No other
        block runs meanwhile, so no other request ever sees them."""
        if edit is None:
            with self._weights_gate.shared():
                yield
            return
        with self._weights_gate.exclusive():
            self.engine.apply_delta(*edit)
            try:
                yield
            finally:
                self.engine.revert_delta(edit[0])

    def generate_each(
        self, requests: Sequence[Request], samplings: Sequence[SamplingParams], edits: Sequence[EditWeights | None],
        adapters: Sequence[str | None] | None = None,
    ) -> list[Completion | PromptRejected]:
        """Completions of requests that each bring their own sampling settings, edit set and LoRA adapter (one
        engine call per distinct triple); a rejected prompt gets its `PromptRejected` in its place."""
        adapters = adapters or [None] * len(requests)
        results: list[Completion | PromptRejected | None] = [None] * len(requests)
        groups: dict[tuple[str, str | None, str | None], list[int]] = {}
        for row, (request, sampling, edit, adapter) in enumerate(zip(requests, samplings, edits, adapters,
                                                                     strict=True)):
            try:
                self.prompt_tokens(request)
            except PromptRejected as rejected:
                results[row] = rejected
                continue
            groups.setdefault((sampling.model_dump_json(), edit[0] if edit else None, adapter), []).append(row)
        for (_, _, adapter), rows in groups.items():
            with self.edited(edits[rows[0]]):
                completions = self.engine.generate([requests[row] for row in rows], samplings[rows[0]], adapter)
            for row, completion in zip(rows, completions, strict=True):
                results[row] = completion
        return results

    def stream_events(self, request: Request, sampling: SamplingParams, edit: EditWeights | None = None,
                      adapter: str | None = None) -> Iterator[dict[str, Any] | str]:
        """`{"prompt_tokens"}` first (or `PromptRejected`, raised before anything is yielded), then text pieces, then
        `{"completion_tokens", "finish_reason"}` (the engine's own counts). Read it to the end unless the engine is
        concurrent (closing a vLLM stream aborts its request): transformers' generation thread uses the tokenizer
        until it finishes."""
        yield {"prompt_tokens": self.prompt_tokens(request)}
        with self.edited(edit):
            for piece in self.engine.stream(request, sampling, adapter):
                if isinstance(piece, Completion):
                    yield {"completion_tokens": piece.completion_tokens, "finish_reason": piece.finish_reason}
                else:
                    yield piece


ChatModelActor = ray.remote(ChatModel)


def start_chat_actor(config: EngineConfig, resources: ActorResources | None = None):
    """Start a `ChatModelActor` with the given resources (algorithm config and resources stay separate)."""
    resources = resources or ActorResources()
    return ChatModelActor.options(**resources.ray_options()).remote(config)
