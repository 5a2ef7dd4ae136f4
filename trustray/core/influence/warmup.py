"""LoRA warmup training (LESS step 1) in plain torch: the adapters whose gradients later describe examples.

LESS trains LoRA for a few epochs on a small random subset of the pool and keeps one checkpoint per epoch,
each with the AdamW state (its second moments precondition the training-example gradient features) and
the learning rate at that point (checkpoints are weighted by it when scores are summed).

`train_lora` is framework-free: the Ray Train worker (trustray.pipelines.influence) calls it with its rank
and world size and a model that may be wrapped in DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from trustray.artifacts import atomic_folder
from trustray.config import BaseConfig
from trustray.core.lm.batching import collate

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_FILE = "checkpoint.json"
# Right padding with attention_mask 0 and label -100 hides the pad positions, so the id itself is irrelevant.
_PAD_ID = 0

CheckpointCallback = Callable[[int, float, Any, torch.optim.Optimizer, float], None]


class LoraSettings(BaseConfig):
    """The LoRA adapters trained in the warmup and differentiated later."""

    r: int = Field(8, ge=1, description="LoRA rank (LESS uses 128 on 7B models).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="LoRA dropout. Keep 0: dropout makes each forward pass random, so per-example gradients "
        "computed later would not be reproducible or comparable (LESS trains with 0.1).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Names of the linear modules that get adapters (Llama attention projections by default).",
    )
    layers: list[int] | None = Field(
        None,
        description="Decoder layers that get adapters (negative indices count from the top: [-2, -1] = the last "
        "two); None: every layer. Adapting only top layers lets the influence evaluation cache the frozen rest.",
    )


class WarmupSettings(BaseConfig):
    """Optimisation of the warmup (LESS: lr 2e-5, 4 epochs, effective batch 32, linear schedule, 3% warmup)."""

    learning_rate: float = Field(2e-5, gt=0, description="Peak AdamW learning rate.")
    epochs: int = Field(4, ge=1, description="Passes over the warmup subset.")
    batch_size: int = Field(4, ge=1, description="Examples per forward/backward pass, per worker.")
    grad_accumulation: int = Field(8, ge=1, description="Micro-batches accumulated per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps with a linear learning-rate ramp.")
    seed: int = Field(0, description="Seeds the LoRA initialisation and the shuffling of every epoch.")
    checkpoints_per_epoch: int = Field(
        1, ge=1, description="Checkpoints saved per epoch, evenly spaced; 1 = at each epoch's end like LESS."
    )


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> Any:
    """Wrap a causal LM in fresh LoRA adapters; only the adapters are trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    layers = None
    if settings.layers is not None:
        count = model.config.num_hidden_layers
        layers = sorted({index % count for index in settings.layers})
        if any(not -count <= index < count for index in settings.layers):
            raise ValueError(f"lora.layers {settings.layers} out of range for a model with {count} layers")
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        layers_to_transform=layers,
        bias="none",
    )
    return get_peft_model(model, config)


def _checkpoint_steps(steps_per_epoch: int, epochs: int, per_epoch: int) -> set[int]:
    marks: set[int] = set()
    for epoch in range(epochs):
        base = epoch * steps_per_epoch
        marks.update(base + math.ceil(steps_per_epoch * (k + 1) / per_epoch) for k in range(per_epoch))
    return marks


def train_lora(
    model: torch.nn.Module,
    examples: Sequence[Mapping[str, Sequence[int]]],
    settings: WarmupSettings,
    on_checkpoint: CheckpointCallback,
    rank: int = 0,
    world_size: int = 1,
    progress_bar: bool = True,
) -> list[dict[str, float]]:
    """Train the trainable (LoRA) parameters of `model` on encoded examples; returns this rank's step log.

    `model` is a PeftModel, or one wrapped in DistributedDataParallel when `world_size > 1`; each rank takes
    an equal share of every epoch's shuffle (the remainder is dropped so all ranks step together).
    `on_checkpoint(step, learning_rate, peft_model, optimizer, epoch)` is called on every rank at each
    checkpoint; `learning_rate` is the rate of the optimizer step just taken. `progress_bar=False` keeps many
    short trainings (the influence evaluation's retrains) from flooding the log.
    """
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    peft_model = model.module if ddp else model
    per_rank = len(examples) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(examples)} examples cannot be shared by {world_size} workers")
    examples_per_step = settings.batch_size * settings.grad_accumulation
    steps_per_epoch = math.ceil(per_rank / examples_per_step)
    total_steps = steps_per_epoch * settings.epochs
    checkpoint_steps = _checkpoint_steps(steps_per_epoch, settings.epochs, settings.checkpoints_per_epoch)

    from transformers import get_linear_schedule_with_warmup

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters; call add_lora first")
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(settings.warmup_ratio * total_steps), total_steps
    )
    device = next(model.parameters()).device
    model.train()
    log: list[dict[str, float]] = []
    step = 0
    progress = tqdm(total=total_steps, desc="warmup", disable=rank != 0 or not progress_bar)
    for epoch in range(settings.epochs):
        generator = torch.Generator().manual_seed(settings.seed + epoch)
        order = torch.randperm(len(examples), generator=generator)[: per_rank * world_size]
        local = order[rank::world_size].tolist()
        for start in range(0, per_rank, examples_per_step):
            chunk = local[start : start + examples_per_step]
            micro = [chunk[i : i + settings.batch_size] for i in range(0, len(chunk), settings.batch_size)]
            step_loss = 0.0
            for index, indices in enumerate(micro):
                batch = {
                    key: value.to(device) for key, value in collate([examples[i] for i in indices], _PAD_ID).items()
                }
                # Under DDP only the last micro-batch of a step synchronises gradients.
                sync = not ddp or index == len(micro) - 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    loss = model(**batch).loss / len(micro)
                    loss.backward()
                step_loss += loss.item()
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_float = step / steps_per_epoch
            log.append({"step": step, "epoch": epoch_float, "loss": step_loss, "learning_rate": learning_rate})
            if rank == 0:
                logger.info("step %d/%d epoch %.2f loss %.4f lr %.3g", step, total_steps, epoch_float,
                            step_loss, learning_rate)
                progress.set_postfix(loss=f"{step_loss:.4f}")
            progress.update(1)
            if step in checkpoint_steps:
                on_checkpoint(step, learning_rate, peft_model, optimizer, epoch_float)
    progress.close()
    return log


def save_checkpoint(
    folder: str | Path, model: Any, optimizer: torch.optim.Optimizer, step: int, learning_rate: float, epoch: float
) -> Path:
    """Write adapter, AdamW state and `checkpoint.json` into `folder`; the folder appears whole or not at all.

    `checkpoint.json` also lists the trainable parameter names in optimizer order, so later stages can match
    the optimizer's per-parameter moments to LoRA modules.
    """
    folder = Path(folder)
    param_names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    info = {"step": step, "learning_rate": learning_rate, "epoch": epoch, "param_names": param_names}
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(info, indent=2))
    return folder


def load_checkpoint(folder: str | Path, base_model: torch.nn.Module) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(PeftModel with trainable adapters on `base_model`, AdamW state_dict, checkpoint info) from `folder`."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a warmup checkpoint (no {CHECKPOINT_FILE})")
    info = json.loads((folder / CHECKPOINT_FILE).read_text())
    model = PeftModel.from_pretrained(base_model, folder, is_trainable=True)
    optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return model, optimizer_state, info
