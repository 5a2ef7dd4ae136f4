"""`HFEngine`: the transformers backend of the `Engine` protocol (the embedded default on CPU)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch.utils.hooks import RemovableHandle

from trustray.core.editing.scope import EditScope
from trustray.models.engines import (
    Completion,
    EngineConfig,
    Request,
    SamplingParams,
    cut_at_stop,
    hf_parameter_name,
    render_request,
    tokenize_pairs,
)
from trustray.models.loading import load_causal_lm, load_tokenizer, resolve_device

logger = logging.getLogger(__name__)


class _StopOnStrings:
    """Stopping criterion (transformers' `StoppingCriteria` interface): a row is done once its generated text
    holds a stop string. transformers' own `stop_strings` also match across the end of the prompt, which would
    end a completion early without any stop string in it."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len
        # A stop string completed by the newest token lies within its last 4 bytes per character (UTF-8), and
        # every token holds at least one byte; two more tokens absorb a character cut at the window's start.
        self.window = 4 * max(len(s) for s in self.stop) + 2

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        return torch.tensor([cut_at_stop(text, self.stop)[1] for text in texts], device=input_ids.device)


class HFEngine:
    """transformers backend: batched generation, per-token scoring, peft LoRA adapters and weight deltas."""

    concurrent = False  # one model call at a time (its lock)

    def __init__(self, config: EngineConfig | None = None, device: str | None = None):
        self.config = config or EngineConfig()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.device = resolve_device(device)
        self.model_name = self.config.model
        self.tokenizer = load_tokenizer(self.config.model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(self.config.model, self.device, self.config.dtype)
        self.adapters: set[str] = set()
        self._saved_weights: dict[str, dict[str, torch.Tensor]] = {}
        self._scope_hooks: dict[str, list[RemovableHandle]] = {}  # scoped edit sets, applied as forward hooks
        # One model, many callers (Serve runs requests concurrently): forward passes are serialised.
        self._lock = threading.RLock()

    # -- prompts -----------------------------------------------------------------------------------
    def render(self, request: Request) -> str:
        return render_request(self.tokenizer, request)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        if batch["input_ids"].shape[1] >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {batch['input_ids'].shape[1]} tokens does not fit max_model_len={self.config.max_model_len}"
            )
        return {key: value.to(self.device) for key, value in batch.items()}

    def _generate_kwargs(self, sampling: SamplingParams, prompt_len: int) -> dict:
        max_new = min(sampling.max_tokens, self.config.max_model_len - prompt_len)
        kwargs = {
            "max_new_tokens": max_new,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        }
        if not sampling.greedy:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopOnStrings(self.tokenizer, sampling.stop, prompt_len)]
            )
        return kwargs

    # -- adapters ----------------------------------------------------------------------------------
    def _use_adapter(self, adapter: str | None):
        """Context manager running the model with `adapter` active, or the base model when None."""
        from contextlib import nullcontext

        if adapter is None:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        if adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters)})")
        self.model.set_adapter(adapter)
        return nullcontext()

    @contextmanager
    def running(self, adapter: str | None) -> Iterator[torch.nn.Module]:
        """The model, held for the block by this caller alone, with `adapter` active (None: the base model): for
        callers that run the model themselves (the preference loop scores through its frozen-prefix cache)."""
        with self._lock, self._use_adapter(adapter):
            yield self.model

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self.adapters:
                self.model.delete_adapter(name)
                self.adapters.discard(name)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self.adapters.add(name)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.adapters:
                raise KeyError(f"adapter {name!r} is not loaded")
            if len(self.adapters) == 1:
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            self.adapters.discard(name)

    def apply_delta(self, name: str, delta: Mapping[str, torch.Tensor], scope: EditScope | None = None) -> None:
        """Add `delta` (parameter name → tensor) to the weights in place; `revert_delta(name)` undoes it exactly.
        With a `scope` the weights are left alone: each changed module gets a forward hook adding its delta at the
        positions in scope (`trustray.core.editing.scope`)."""
        with self._lock:
            if name in self._saved_weights or name in self._scope_hooks:
                raise ValueError(f"a delta named {name!r} is already applied; revert it first")
            params = self._parameters()
            missing = sorted(set(delta) - set(params))
            if missing:
                raise KeyError(f"delta names parameters the model lacks: {missing[:5]}")
            # Check every shape before touching any weight, so a bad delta leaves the model as it was.
            for key, change in delta.items():
                if change.shape != params[key].shape:
                    raise ValueError(
                        f"delta for {key} has shape {tuple(change.shape)}, weight has {tuple(params[key].shape)}"
                    )
            if scope is not None:
                self._scope_hooks[name] = self._hook_scoped(delta, scope)
                return
            saved = {}
            for key, change in delta.items():
                saved[key] = params[key].detach().clone()
                params[key].data.add_(change.to(params[key].device, params[key].dtype))
            self._saved_weights[name] = saved

    def _hook_scoped(self, delta: Mapping[str, torch.Tensor], scope: EditScope) -> list[RemovableHandle]:
        """The scope's hooks on the modules owning `delta`'s weights, found by their HF names under any peft
        wrapping."""
        modules = {hf_parameter_name(f"{module_name}.weight").removesuffix(".weight"): module
                   for module_name, module in self.model.named_modules()
                   if "lora_" not in module_name and isinstance(getattr(module, "weight", None), torch.nn.Parameter)}
        device = next(self.model.parameters()).device
        return scope.attach(modules, {key.removesuffix(".weight"): change.to(device) for key, change in delta.items()})

    def revert_delta(self, name: str) -> None:
        with self._lock:
            if name in self._scope_hooks:
                for hook in self._scope_hooks.pop(name):
                    hook.remove()
                return
            if name not in self._saved_weights:
                raise KeyError(f"no delta named {name!r} is applied")
            params = self._parameters()
            for key, original in self._saved_weights.pop(name).items():
                params[key].data.copy_(original)

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        """Base-model parameters by their Hugging Face names, whether or not peft adapters wrap them."""
        return {hf_parameter_name(key): param for key, param in self.model.named_parameters() if "lora_" not in key}

    # -- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, requests: Sequence[Request], sampling: SamplingParams, adapter: str | None = None
    ) -> list[Completion]:
        prompts = [self.render(request) for request in requests]
        results: list[Completion] = []
        with self._lock, self._use_adapter(adapter):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompts), self.config.max_batch_size):
                results.extend(self._generate_batch(prompts[start : start + self.config.max_batch_size], sampling))
        return results

    def _generate_batch(self, prompts: Sequence[str], sampling: SamplingParams) -> list[Completion]:
        batch = self._encode(prompts)
        prompt_len = batch["input_ids"].shape[1]
        output = self.model.generate(**batch, **self._generate_kwargs(sampling, prompt_len))
        return [self._completion(row.tolist(), int(mask.sum()), sampling)
                for row, mask in zip(output[:, prompt_len:], batch["attention_mask"], strict=True)]

    def _completion(self, new_ids: list[int], prompt_tokens: int, sampling: SamplingParams) -> Completion:
        """A row's generated token ids as a completion (`trustray.models.engines.Completion` defines the counts)."""
        eos_ids = self._eos_ids()
        ended = next((i for i, token in enumerate(new_ids) if token in eos_ids), None)
        ids = new_ids if ended is None else new_ids[:ended]
        text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)
        return Completion(text=text, prompt_tokens=prompt_tokens,
                          completion_tokens=self.count_tokens(text) if stopped else len(ids),
                          finish_reason="stop" if (ended is not None or stopped) else "length")

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def stream(self, request: Request, sampling: SamplingParams,
               adapter: str | None = None) -> Iterator[str | Completion]:
        """Yield text pieces as they are generated (the stop strings are honoured across pieces), then the
        whole `Completion`."""
        from transformers import TextIteratorStreamer

        prompt = self.render(request)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        finished: list[Completion] = []

        def run() -> None:
            try:
                with torch.inference_mode(), self._lock, self._use_adapter(adapter):
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    batch = self._encode([prompt])
                    prompt_len = batch["input_ids"].shape[1]
                    kwargs = self._generate_kwargs(sampling, prompt_len)
                    output = self.model.generate(**batch, **kwargs, streamer=streamer)
                    finished.append(self._completion(output[0, prompt_len:].tolist(), prompt_len, sampling))
            except BaseException as error:  # re-raised in the caller's thread below
                errors.append(error)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        received, emitted = "", 0
        # Hold back a tail that could be the start of a stop string split across pieces.
        holdback = max((len(s) for s in sampling.stop), default=1) - 1
        for piece in streamer:
            received += piece
            text, stopped = cut_at_stop(received, sampling.stop)
            if stopped:
                if len(text) > emitted:
                    yield text[emitted:]
                emitted = len(received)
                break
            if len(received) - holdback > emitted:
                yield received[emitted : len(received) - holdback]
                emitted = len(received) - holdback
        if emitted < len(received):
            yield received[emitted:]
        worker.join()
        if errors:
            raise errors[0]
        yield finished[0]

    # -- scoring -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self, prompts: Sequence[str], continuations: Sequence[str], adapter: str | None = None
    ) -> list[list[float]]:
        """Per-token log-probabilities of each continuation given its prompt (prompt and continuation are
        tokenized separately and concatenated, so the continuation's tokens do not depend on the prompt)."""
        pairs = tokenize_pairs(self.tokenizer, prompts, continuations, self.config.max_model_len)
        results: list[list[float]] = []
        pad = self.tokenizer.pad_token_id
        with self._lock, self._use_adapter(adapter):
            for start in range(0, len(pairs), self.config.max_batch_size):
                chunk = pairs[start : start + self.config.max_batch_size]
                length = max(len(p) + len(c) for p, c in chunk)
                ids = torch.full((len(chunk), length), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), length), dtype=torch.long)
                for row, (p, c) in enumerate(chunk):  # right padding keeps positions aligned with a single run
                    ids[row, : len(p) + len(c)] = torch.tensor(p + c)
                    mask[row, : len(p) + len(c)] = 1
                # Vocabulary logits only from the first position any row scores: over every prompt position they
                # were ~30% of a 135M model's scoring time on CPU (and most of its memory).
                first = min(len(p) for p, _ in chunk) - 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    logits_to_keep=length - first).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                for row, (p, c) in enumerate(chunk):
                    positions = torch.arange(len(p) - 1 - first, len(p) + len(c) - 1 - first, device=self.device)
                    targets = torch.tensor(c, device=self.device)
                    results.append(logprobs[row, positions, targets].tolist())
        return results
