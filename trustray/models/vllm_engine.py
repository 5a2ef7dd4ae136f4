"""vLLM backend of the `Engine` protocol (offline `vllm.LLM`); imported only by `build_engine`.

Requests are sent as token ids tokenized here (no special tokens added), so prompts, lengths and scores match
`HFEngine`. Adapters are vLLM LoRA requests. Weight deltas run inside the worker through a worker extension
called with `collective_rpc`; vLLM fuses q/k/v and gate/up projections, so only unfused weights take deltas.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from trustray.core.editing.scope import EditScope, check_unscoped
from trustray.models.engines import (
    Completion,
    EngineConfig,
    Request,
    SamplingParams,
    hf_parameter_name,
    render_request,
    tokenize_pairs,
)
from trustray.models.sources import resolve_model_source

# HF projections that vLLM stores fused (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
_FUSED = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")
# vLLM pads embedding rows (vocabulary) to a multiple of 64; a delta covers the first vocab_size rows.
_ROW_PADDED = ("embed_tokens.weight", "lm_head.weight")


def _parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {hf_parameter_name(key): param for key, param in model.named_parameters()}


def _rows(param: torch.Tensor, rows: int) -> torch.Tensor:
    """The part of `param` a delta of `rows` rows applies to (all of it unless the rows are padded)."""
    return param.data if param.shape[0] == rows else param.data[:rows]


class DeltaWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `collective_rpc` runs these in every worker.
    Originals are kept in the worker, so reverting copies them back bit for bit without a round trip."""

    def trustray_parameter_shapes(self) -> dict[str, list[int]]:
        return {key: list(param.shape) for key, param in _parameters(self.get_model()).items()}

    def trustray_apply_delta(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        params = _parameters(self.get_model())
        originals = {}
        for key, change in delta.items():
            target = _rows(params[key], change.shape[0])
            originals[key] = target.clone()
            target.add_(change.to(target.device, target.dtype))
        self.__dict__.setdefault("trustray_saved", {})[name] = originals

    def trustray_revert_delta(self, name: str) -> None:
        params = _parameters(self.get_model())
        for key, original in self.trustray_saved.pop(name).items():
            _rows(params[key], original.shape[0]).copy_(original)


class VLLMEngine:
    """vLLM backend: batched generation, prompt-logprob scoring, LoRA adapters and weight deltas.

    `stream` yields the whole completion as one piece: the offline `vllm.LLM` has no token stream.
    """

    def __init__(self, config: EngineConfig):
        from vllm import LLM

        self.config = config
        self.model_name = config.model
        self.llm = LLM(
            model=resolve_model_source(config.model),
            dtype="bfloat16" if config.dtype == "auto" else config.dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_batch_size,
            enable_lora=config.enable_lora,
            max_lora_rank=config.max_lora_rank,
            worker_extension_cls=f"{__name__}.DeltaWorkerExtension",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self._adapters: dict[str, object] = {}  # name -> vllm LoRARequest
        self._adapter_ids = itertools.count(1)  # vLLM caches adapters by int id: never reuse one
        self._deltas: set[str] = set()
        self._shapes: dict[str, list[int]] | None = None
        # vllm.LLM is not thread-safe; Serve calls the engine concurrently.
        self._lock = threading.RLock()

    # -- prompts -----------------------------------------------------------------------------------
    def render(self, request: Request) -> str:
        return render_request(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _prompt_ids(self, request: Request) -> list[int]:
        ids = self.tokenizer.encode(self.render(request), add_special_tokens=False)
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len={self.config.max_model_len}")
        return ids

    # -- adapters ----------------------------------------------------------------------------------
    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        if adapter not in self._adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self._adapters)})")
        return self._adapters[adapter]

    def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        folder = Path(path).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {folder}")
        with self._lock:
            if name in self._adapters:
                self.remove_adapter(name)
            request = LoRARequest(name, next(self._adapter_ids), str(folder))
            # Loading now (not on first use) makes a bad adapter fail here rather than in a later request.
            self.llm.llm_engine.add_lora(request)
            self._adapters[name] = request

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            self.llm.llm_engine.remove_lora(self._adapters.pop(name).lora_int_id)

    # -- weight deltas -----------------------------------------------------------------------------
    def apply_delta(self, name: str, delta: Mapping[str, torch.Tensor], scope: EditScope | None = None) -> None:
        """Add `delta` (HF parameter name -> tensor) to the worker's weights; `revert_delta(name)` undoes it. A
        scoped edit set is refused: vLLM's fused layers take no per-position hooks."""
        check_unscoped(scope, "apply it on the vLLM engine, whose fused layers take no per-position hooks")
        with self._lock:
            if name in self._deltas:
                raise ValueError(f"a delta named {name!r} is already applied; revert it first")
            if self._shapes is None:
                self._shapes = self.llm.collective_rpc("trustray_parameter_shapes")[0]
            self._check_delta(delta)
            # Messages to the worker carry CPU tensors only.
            payload = {key: change.detach().cpu() for key, change in delta.items()}
            self.llm.collective_rpc("trustray_apply_delta", args=(name, payload))
            self._deltas.add(name)
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def revert_delta(self, name: str) -> None:
        with self._lock:
            if name not in self._deltas:
                raise KeyError(f"no delta named {name!r} is applied")
            self.llm.collective_rpc("trustray_revert_delta", args=(name,))
            self._deltas.discard(name)
            self.llm.reset_prefix_cache()

    def _check_delta(self, delta: Mapping[str, torch.Tensor]) -> None:
        """Validate in this process: errors raised inside the worker reach the caller without their type."""
        for key, change in delta.items():
            if key not in self._shapes:
                if _FUSED.search(key):
                    raise ValueError(
                        f"vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj, so {key} cannot take a "
                        "delta here; export the edit as a LoRA adapter (load_adapter) or use engine: hf"
                    )
                raise KeyError(f"delta names a parameter the model lacks: {key}")
            shape, got = self._shapes[key], list(change.shape)
            padded = key.endswith(_ROW_PADDED) and got[1:] == shape[1:] and got[0] <= shape[0]
            if got != shape and not padded:
                raise ValueError(f"delta for {key} has shape {tuple(got)}, weight has {tuple(shape)}")

    # -- generation --------------------------------------------------------------------------------
    def _vllm_sampling(self, sampling: SamplingParams, prompt_len: int):
        import vllm

        return vllm.SamplingParams(
            max_tokens=min(sampling.max_tokens, self.config.max_model_len - prompt_len),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
        )

    def generate(
        self, requests: Sequence[Request], sampling: SamplingParams, adapter: str | None = None
    ) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        prompts = [self._prompt_ids(request) for request in requests]
        if not prompts:
            return []
        with self._lock:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                [self._vllm_sampling(sampling, len(ids)) for ids in prompts],
                lora_request=self._lora(adapter),
                use_tqdm=False,
            )
        completions = []
        for ids, output in zip(prompts, outputs, strict=True):
            result = output.outputs[0]
            completions.append(
                Completion(
                    text=result.text,
                    prompt_tokens=len(ids),
                    completion_tokens=len(result.token_ids),
                    finish_reason="length" if result.finish_reason == "length" else "stop",
                )
            )
        return completions

    def stream(self, request: Request, sampling: SamplingParams, adapter: str | None = None) -> Iterator[str]:
        """Yields the finished completion as one piece (the offline `vllm.LLM` has no token stream)."""
        text = self.generate([request], sampling, adapter)[0].text
        if text:
            yield text

    # -- scoring -----------------------------------------------------------------------------------
    def score(
        self, prompts: Sequence[str], continuations: Sequence[str], adapter: str | None = None
    ) -> list[list[float]]:
        """Per-token log-probabilities of each continuation given its prompt, from vLLM's prompt logprobs
        (entry i is log p(token i | tokens before i), computed from the raw logits)."""
        import vllm
        from vllm.inputs import TokensPrompt

        # One token is generated per scoring request, so leave room for it.
        pairs = tokenize_pairs(self.tokenizer, prompts, continuations, self.config.max_model_len - 1)
        if not pairs:
            return []
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        with self._lock:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p + c) for p, c in pairs],
                params,
                lora_request=self._lora(adapter),
                use_tqdm=False,
            )
        return [
            [output.prompt_logprobs[len(p) + j][token].logprob for j, token in enumerate(c)]
            for (p, c), output in zip(pairs, outputs, strict=True)
        ]
