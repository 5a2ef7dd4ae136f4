"""Generation engines behind one protocol.

This module holds the protocol, the configs and the helpers both backends share; `HFEngine`
(`trustray.models.hf_engine`, transformers, the embedded default on CPU) and `VLLMEngine`
(`trustray.models.vllm_engine`, imported only when chosen) implement it, and `trustray.models.engine_factory`
builds the configured one. Everything above `trustray.models` talks to the `Engine` protocol, never to a backend.

A request is either a list of chat messages (`[{"role": ..., "content": ...}]`, rendered with the model's chat
template) or a plain string prompt (sent as is, for `/v1/completions` and scoring).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, field_validator, model_validator

from trustray.config import BaseConfig
from trustray.core.editing.scope import EditScope
from trustray.models.sources import DEFAULT_CHAT_MODEL

Message = Mapping[str, str]
Request = str | Sequence[Message]
# The LoRA ranks vLLM can be configured for (`max_lora_rank`).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# Temperatures below this decode greedily in every engine, as in vLLM (dividing logits by 1e-300 overflows).
GREEDY_BELOW = 1e-5


class SamplingParams(BaseConfig):
    """Decoding settings shared by every engine (OpenAI semantics: temperature 0 means greedy)."""

    max_tokens: int = Field(64, ge=1, le=4096, description="Most new tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 decodes greedily; above 0 samples.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] = Field(default_factory=list, description="Generation ends before the first of these strings.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63,
                             description="Seed for sampling (a 64-bit integer); None leaves the generator as it is.")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class EngineConfig(BaseConfig):
    """Which model to load and with which backend; resources are given to the actor, not here."""

    model: str = Field(DEFAULT_CHAT_MODEL, description="Built-in name, local folder or Hugging Face id.")
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="`auto` picks vLLM only when it imports and a GPU is visible, else transformers."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto` is bfloat16 on GPU and float32 on CPU."
    )
    max_batch_size: int = Field(16, ge=1, description="Most sequences run through the model at once.")
    max_model_len: int = Field(2048, ge=16, description="Longest prompt plus completion, in tokens.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU (None: torch's default).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM on GPU: share of GPU memory to use.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="vLLM on CPU: memory for the KV cache, in GiB.")
    cpu_reserved_cores: int = Field(0, ge=0, description="vLLM on CPU: cores kept free of its compute threads "
                                    "(vLLM's own default is one; on 2 cores none was faster).")
    enforce_eager: bool = Field(False, description="vLLM: no CUDA graphs or torch.compile (always so on CPU).")
    enable_lora: bool = Field(True, description="vLLM only: reserve LoRA slots so adapters can be loaded.")
    max_lora_rank: int = Field(64, description=f"vLLM only: largest LoRA rank that can be loaded (one of "
                               f"{', '.join(map(str, VLLM_LORA_RANKS))}).")
    lora_target_modules: list[str] | None = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="vLLM only: modules adapters may target (None: every module vLLM supports, lm_head included; "
        "vLLM 0.32's CPU build then fails on prompt log-probabilities, so scoring with adapters enabled breaks).")
    max_loras: int = Field(4, ge=1, description="vLLM only: adapters used in one batch at once.")
    max_cpu_loras: int | None = Field(None, ge=1, description="vLLM only: adapters kept resident in host memory "
                                      "(None: max_loras); more lets several adapters stay loaded between batches.")

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of the ranks vLLM accepts: {VLLM_LORA_RANKS}")
        return rank

    @model_validator(mode="after")
    def _cpu_loras_hold_a_batch(self) -> EngineConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        return self


@dataclass
class Completion:
    """A finished completion. `completion_tokens` counts the tokens generated, without the end-of-sequence token;
    when a stop string ended it, the tokens of the text kept. Every engine counts the same way."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@runtime_checkable
class Engine(Protocol):
    model_name: str
    # True when calls from several threads run at once (vLLM's continuous batching); False: they take turns.
    concurrent: bool

    def generate(
        self, requests: Sequence[Request], sampling: SamplingParams, adapter: str | None = None
    ) -> list[Completion]: ...

    def stream(
        self, request: Request, sampling: SamplingParams, adapter: str | None = None
    ) -> Iterator[str | Completion]:
        """Text pieces as they are generated, then the whole `Completion` (its text is the pieces joined)."""
        ...

    def score(
        self, prompts: Sequence[str], continuations: Sequence[str], adapter: str | None = None
    ) -> list[list[float]]: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def apply_delta(self, name: str, delta: Mapping[str, torch.Tensor], scope: EditScope | None = None) -> None: ...

    def revert_delta(self, name: str) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def render(self, request: Request) -> str: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string; report whether one was found."""
    cut = min((index for s in stop if s and (index := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def render_request(tokenizer, request: Request) -> str:
    """Prompt text for a request: chat messages go through the tokenizer's chat template, strings pass as is."""
    if isinstance(request, str):
        return request
    messages = [dict(message) for message in request]
    if not messages:
        raise ValueError("a chat request needs at least one message")
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_pairs(
    tokenizer, prompts: Sequence[str], continuations: Sequence[str], max_model_len: int
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (prompt, continuation) for scoring, tokenized separately so the continuation's tokens
    do not depend on the prompt; an empty prompt becomes one BOS (or EOS) token to condition on."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    pairs = []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        if not prompt_ids:
            bos = tokenizer.bos_token_id
            prompt_ids = [bos if bos is not None else tokenizer.eos_token_id]
        cont_ids = tokenizer.encode(continuation, add_special_tokens=False)
        if len(prompt_ids) + len(cont_ids) > max_model_len:
            raise ValueError(
                f"prompt plus continuation of {len(prompt_ids) + len(cont_ids)} tokens does not fit "
                f"max_model_len={max_model_len}"
            )
        pairs.append((prompt_ids, cont_ids))
    return pairs


def hf_parameter_name(name: str) -> str:
    """A parameter's plain Hugging Face name: drops the prefix and `.base_layer` that LoRA wrapping adds
    (peft here, vLLM's LoRA layers there), so deltas keep naming the same weights with adapters loaded."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
