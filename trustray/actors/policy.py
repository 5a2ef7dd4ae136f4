"""`PolicyWorker`: the chat model of the preference loop, as a plain class; `PolicyWorkerActor` is its Ray actor.

It samples candidate responses and evaluation answers from the current policy, scores responses under the
policy and under the reference (the same model with its adapters off) through the frozen-prefix cache, computes
the frozen features the reward model reads, and swaps in each new policy adapter in place. It always runs
transformers, whatever engine the chat config names: scoring runs the model's top layers itself. With vLLM the
preference loop samples on a `GenerationPool` instead and leaves only scoring to this worker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from trustray.config import ActorResources
from trustray.core.align.dpo import conversation_logprobs, encode_conversations
from trustray.core.align.features import response_features, response_features_at
from trustray.core.influence.warmup import LoraSettings
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.models.hf_engine import HFEngine

POLICY = "policy"
Conversation = tuple[Sequence[Mapping[str, str]], str]  # (prompt messages, response)


def lora_prefix_length(num_layers: int, lora: LoraSettings) -> int:
    """How many bottom decoder layers the adapters of `lora` leave untouched (0: they cover the first layer)."""
    if lora.layers is None:
        return 0
    return min(index % num_layers for index in lora.layers)


class PolicyWorker:
    """See the module docstring. Encodings, prefix states, features and reference log-probs are cached per
    conversation."""

    def __init__(self, engine: EngineConfig, lora: LoraSettings, max_length: int, pooling: str) -> None:
        self.engine = HFEngine(engine.model_copy(update={"engine": "hf"}))
        self.max_length, self.pooling = max_length, pooling
        self.prefix = lora_prefix_length(self.engine.model.config.num_hidden_layers, lora)
        tokenizer = self.engine.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.policy: str | None = None  # None until the first adapter is loaded: the policy is the reference
        self._encoded: dict[tuple, dict[str, Any]] = {}
        self._features: dict[tuple, torch.Tensor] = {}
        self._reference: dict[tuple, float] = {}  # reference log-probs (the model with its adapters off)

    @staticmethod
    def _key(conversation: Conversation) -> tuple:
        prompt, response = conversation
        return (tuple((message["role"], message["content"]) for message in prompt), response)

    def sample(self, prompts: Sequence[Sequence[Mapping[str, str]]], samples: int, max_tokens: int,
               temperature: float, seed: int) -> list[list[dict[str, Any]]]:
        """Per prompt, `samples` responses of the current policy: `{"text", "tokens"}` (sample s is seeded seed + s;
        temperature 0 decodes greedily)."""
        per_sample = []
        for sample in range(samples):
            sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + sample)
            per_sample.append(self.engine.generate(list(prompts), sampling, adapter=self.policy))
        return [[{"text": completions[row].text, "tokens": completions[row].completion_tokens}
                 for completions in per_sample] for row in range(len(prompts))]

    def load_policy(self, path: str) -> float:
        """Swap in the adapter at `path` as the policy (replacing the previous one); returns the seconds it took."""
        began = time.perf_counter()
        self.engine.load_adapter(POLICY, path)
        self.policy = POLICY
        return time.perf_counter() - began

    def _examples(self, conversations: Sequence[Conversation]) -> list[dict[str, Any]]:
        missing = list({self._key(c): c for c in conversations if self._key(c) not in self._encoded}.values())
        if missing:
            with self.engine.running(None) as model:
                encoded = encode_conversations(model, self.engine.tokenizer, missing, self.max_length, self.prefix)
            self._encoded.update(zip((self._key(c) for c in missing), encoded, strict=True))
        return [self._encoded[self._key(c)] for c in conversations]

    def logprobs(self, conversations: Sequence[Conversation], policy: bool) -> dict[str, list[float]]:
        """Summed response log-probs under the policy (or the reference) and the response lengths in tokens. The
        reference never changes, so its values are computed once per conversation."""
        examples = self._examples(conversations)
        lengths = [sum(label != -100 for label in example["labels"]) for example in examples]
        adapter = self.policy if policy else None
        if adapter is not None:
            with self.engine.running(adapter) as model:
                return {"logprobs": conversation_logprobs(model, examples, self.prefix, self.pad).tolist(),
                        "lengths": lengths}
        keys = [self._key(c) for c in conversations]
        missing = [i for i, key in enumerate(keys) if key not in self._reference]
        if missing:
            with self.engine.running(None) as model:
                values = conversation_logprobs(model, [examples[i] for i in missing], self.prefix, self.pad)
            self._reference.update({keys[i]: value for i, value in zip(missing, values.tolist(), strict=True)})
        return {"logprobs": [self._reference[key] for key in keys], "lengths": lengths}

    def features(self, conversations: Sequence[Conversation]) -> torch.Tensor:
        """[n, hidden] frozen features (the reference model's; `trustray.core.align.features`)."""
        missing = list({self._key(c): c for c in conversations if self._key(c) not in self._features}.values())
        if missing:
            with self.engine.running(None) as model:
                values = response_features(model, self.engine.tokenizer, [p for p, _ in missing],
                                           [r for _, r in missing], max_length=self.max_length, pooling=self.pooling)
            self._features.update(zip((self._key(c) for c in missing), values, strict=True))
        return torch.stack([self._features[self._key(c)] for c in conversations])

    def layer_features(self, conversations: Sequence[Conversation], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{layer: [n, hidden]} features after each of `layers` decoder layers, the reference model's, from one pass
        (`response_features_at`; not cached: weak-to-strong reads them once)."""
        with self.engine.running(None) as model:
            return response_features_at(model, self.engine.tokenizer, [p for p, _ in conversations],
                                        [r for _, r in conversations], layers, max_length=self.max_length,
                                        pooling=self.pooling)


PolicyWorkerActor = ray.remote(PolicyWorker)


def start_policy_worker(engine: EngineConfig, lora: LoraSettings, max_length: int, pooling: str,
                        resources: ActorResources):
    return PolicyWorkerActor.options(**resources.ray_options()).remote(
        engine, lora, max_length, pooling)
