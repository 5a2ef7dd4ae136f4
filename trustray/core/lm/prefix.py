"""Skip the frozen decoder layers below the lowest LoRA layer by feeding their cached output.

When LoRA adapts only the top layers of a model, every layer underneath is frozen and its output for an
example never changes: it can be computed once (`prefix_states`) and fed back as `inputs_embeds` while those
layers are bypassed (`skipped_prefix`). Losses, gradients and training steps then cost only the adapted layers
and the head, and they are the same as with the full model (rotary positions and the causal mask are still
built from `attention_mask` by the model). This is what lets the influence evaluation retrain LoRA fifty
times on a CPU. Llama-shaped models (`<base>.model.layers`) are supported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.lm.batching import collate


class _PrefixCaptured(Exception):
    """Stops a forward pass once the cached layer's input is captured."""


class _PassThrough(nn.Module):
    """Stands in for a frozen decoder layer whose output is already the model's input."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a (peft-wrapped) Llama-shaped causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(base).__name__} has no `.model.layers` decoder list; only Llama-shaped models are supported")
    return layers


def frozen_prefix_length(model: nn.Module) -> int:
    """How many decoder layers, from the bottom, hold no trainable parameter (0: the first layer trains)."""
    for index, layer in enumerate(decoder_layers(model)):
        if any(parameter.requires_grad for parameter in layer.parameters()):
            return index
    raise ValueError("no decoder layer has trainable parameters (is the LoRA adapter frozen or missing?)")


@torch.no_grad()
def prefix_states(
    model: nn.Module, examples: Sequence[Mapping[str, Sequence[int]]], layers: int, batch_size: int = 8,
    pad_token_id: int = 0,
) -> list[Tensor]:
    """Each example's hidden states `[T, H]` (float32, CPU) at the input of decoder layer `layers`."""
    if layers == 0:
        raise ValueError("there is no frozen prefix to cache (layers=0): run the model on input_ids instead")
    target = decoder_layers(model)[layers]
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _PrefixCaptured  # the layers above and the vocabulary projection are not needed

    states: list[Tensor] = []
    device = next(model.parameters()).device
    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_token_id)
            captured.clear()
            with contextlib.suppress(_PrefixCaptured):
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            hidden = captured[0].float().cpu()
            states.extend(hidden[row, : len(example["input_ids"])].clone() for row, example in enumerate(chunk))
    finally:
        handle.remove()
    return states


def with_states(examples: Sequence[Mapping[str, Any]], states: Sequence[Tensor]) -> list[dict[str, Any]]:
    """Examples that carry their cached prefix output under `inputs_embeds` (what `collate` batches)."""
    if len(examples) != len(states):
        raise ValueError(f"{len(examples)} examples but {len(states)} cached states")
    return [{**example, "inputs_embeds": state} for example, state in zip(examples, states, strict=True)]


@contextlib.contextmanager
def skipped_prefix(model: nn.Module, layers: int, require_frozen: bool = True) -> Iterator[nn.Module]:
    """Within the block, the first `layers` decoder layers pass their input through unchanged.

    With `require_frozen` (for training), a bypassed layer holding a trainable parameter is an error; inference
    under `no_grad` may pass False. Parameter names are untouched (the layers are swapped back on exit), so adapters and optimizer states
    saved inside the block load into the full model.
    """
    decoder = decoder_layers(model)
    if not 0 <= layers < len(decoder):
        raise ValueError(f"cannot skip {layers} of {len(decoder)} decoder layers")
    trainable = [index for index in range(layers) if any(p.requires_grad for p in decoder[index].parameters())]
    if trainable and require_frozen:
        raise ValueError(f"decoder layers {trainable} have trainable parameters and cannot be skipped")
    originals = [decoder[index] for index in range(layers)]
    try:
        for index in range(layers):
            decoder[index] = _PassThrough()
        yield model
    finally:
        for index, layer in enumerate(originals):
            decoder[index] = layer
