"""Per-example LoRA gradients at one warmup checkpoint, plain or Adam-preconditioned (LESS's training features).

`CheckpointGradients` holds a peft model with its adapter loaded (trainable) and, optionally, the AdamW state
saved with the checkpoint. It turns encoded examples into gradient batches micro-batch by micro-batch; the
feature actor, the pipeline's reduction fit and the influence evaluation all get their gradients from it. The
caller loads the base model (on the device it wants) and hands it in, so this module loads no model source.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.influence.gradients import (
    GradientBatch,
    adam_preconditioned,
    flatten_optimizer_state,
    per_example_gradients,
)
from trustray.core.influence.reductions import Reduction
from trustray.core.influence.warmup import load_checkpoint
from trustray.core.lm.batching import collate

Examples = Sequence[Mapping[str, Any]]


def check_preconditionable(reduction: Reduction, precondition: bool) -> None:
    """Adam preconditioning acts on each weight's gradient, so it needs a reduction of the flat gradient."""
    if precondition and reduction.name == "kron":
        raise ValueError(
            "precondition=true needs the flat gradient (Adam's moments are per weight), but 'kron' projects "
            "layer factors before the outer product; use another reduction or precondition=false"
        )


class CheckpointGradients:
    """Per-example gradients of a LoRA model at one checkpoint.

    `model` is a peft model whose LoRA weights require grad; `optimizer_state` the torch AdamW `state_dict()`
    of its warmup (needed only for `precondition`). Examples are encoded by `encode_chat` (optionally carrying
    cached `inputs_embeds`) and right-padded with `pad_token_id`, `micro_batch_size` per forward/backward pass.
    """

    def __init__(
        self, model: nn.Module, optimizer_state: dict[str, Any] | None = None, micro_batch_size: int = 8,
        pad_token_id: int = 0,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self._adam: tuple[Tensor, Tensor, int, tuple[float, float], float] | None = None
        if optimizer_state is not None:
            exp_avg, exp_avg_sq, step = flatten_optimizer_state(model, optimizer_state)
            group = optimizer_state["param_groups"][0]
            betas = (float(group["betas"][0]), float(group["betas"][1]))
            # Kept where the gradients are computed: preconditioning runs once per micro-batch.
            self._adam = (exp_avg.to(self.device), exp_avg_sq.to(self.device), step, betas, float(group["eps"]))

    @classmethod
    def load(
        cls, folder: str | Path, base_model: nn.Module, precondition: bool, micro_batch_size: int = 8,
        pad_token_id: int = 0,
    ) -> CheckpointGradients:
        """The adapter of warmup checkpoint `folder` on `base_model`, with its AdamW state when `precondition`."""
        model, optimizer_state, _ = load_checkpoint(folder, base_model)
        return cls(model, optimizer_state if precondition else None, micro_batch_size, pad_token_id)

    def batches(self, examples: Examples) -> Iterator[GradientBatch]:
        """Plain per-example gradients of `examples`, one `GradientBatch` per micro-batch, in order."""
        for start in range(0, len(examples), self.micro_batch_size):
            batch = collate(examples[start : start + self.micro_batch_size], self.pad_token_id)
            yield per_example_gradients(self.model, {key: value.to(self.device) for key, value in batch.items()})

    def precondition(self, flat: Tensor) -> Tensor:
        """The Adam update direction of flat gradients `[B, D]` given the checkpoint's optimizer moments."""
        if self._adam is None:
            raise ValueError("preconditioning needs the checkpoint's optimizer state (load with precondition=True)")
        exp_avg, exp_avg_sq, step, betas, eps = self._adam
        return adam_preconditioned(flat, exp_avg.to(flat.device), exp_avg_sq.to(flat.device), step, betas, eps)

    def flat(self, examples: Examples, precondition: bool = False) -> Tensor:
        """Per-example flat gradients `[N, D]` of `examples`, Adam-preconditioned when asked."""
        parts = [batch.flat() for batch in self.batches(examples)]
        flat = torch.cat(parts)
        return self.precondition(flat) if precondition else flat

    def features(self, examples: Examples, reduction: Reduction, precondition: bool = False) -> Tensor:
        """`[N, dim]` float32 CPU features: each micro-batch's gradients (preconditioned when asked) reduced."""
        check_preconditionable(reduction, precondition)
        parts = []
        for batch in self.batches(examples):
            reduced = reduction.transform(self.precondition(batch.flat()) if precondition else batch)
            parts.append(reduced.detach().float().cpu())
        return torch.cat(parts)
