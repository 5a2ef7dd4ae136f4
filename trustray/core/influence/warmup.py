"""LoRA warmup training (LESS step 1) in plain torch: the adapters whose gradients later describe examples.

LESS trains LoRA for a few epochs on a small random subset of the pool and keeps one checkpoint per epoch,
each with the AdamW state (its second moments precondition the training-example gradient features) and
the learning rate at that point (checkpoints are weighted by it when scores are summed).

`LoraTrainer` takes one optimizer step at a time and saves and restores its whole state, so the shared Ray Train
loop (`trustray.pipelines.training`, via the influence pipeline's warmup task) can checkpoint and resume it;
`train_lora` runs every step in this process (the influence evaluation's retrains). Both are framework-free.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from trustray.config import BaseConfig
from trustray.core.lm.batching import collate

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
CHECKPOINT_FILE = "checkpoint.json"
# Right padding with attention_mask 0 and label -100 hides the pad positions, so the id itself is irrelevant.
_PAD_ID = 0


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


def steps_per_epoch(num_examples: int, settings: WarmupSettings, world_size: int = 1) -> int:
    """Optimizer steps per epoch when `world_size` workers share `num_examples` (the remainder is dropped)."""
    per_rank = num_examples // world_size
    if per_rank == 0:
        raise ValueError(f"{num_examples} examples cannot be shared by {world_size} workers")
    return math.ceil(per_rank / (settings.batch_size * settings.grad_accumulation))


def checkpoint_steps(epoch_steps: int, settings: WarmupSettings) -> frozenset[int]:
    """The steps checkpointed when an epoch has `epoch_steps`: `checkpoints_per_epoch` evenly spaced in every
    epoch, each epoch's end among them."""
    marks: set[int] = set()
    per_epoch = settings.checkpoints_per_epoch
    for epoch in range(settings.epochs):
        base = epoch * epoch_steps
        marks.update(base + math.ceil(epoch_steps * (k + 1) / per_epoch) for k in range(per_epoch))
    return frozenset(marks)


class LoraTrainer:
    """Trains the trainable (LoRA) parameters of `model` on encoded examples, one AdamW step at a time.

    `model` is a PeftModel, or one wrapped in DistributedDataParallel when `world_size > 1`; each rank takes
    an equal share of every epoch's shuffle (the remainder is dropped so all ranks step together). Step `s`
    (1-based) draws its examples from epoch `(s - 1) // steps_per_epoch`'s order, a permutation seeded
    `seed + epoch`: a step's batch depends on its number alone, so a run resumed from `load` replays exactly
    the steps an uninterrupted one takes.
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[Mapping[str, Any]], settings: WarmupSettings,
                 rank: int = 0, world_size: int = 1) -> None:
        from transformers import get_linear_schedule_with_warmup

        self.model, self.examples, self.settings = model, examples, settings
        self.rank, self.world_size = rank, world_size
        self.ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.peft_model = model.module if self.ddp else model
        self.steps_per_epoch = steps_per_epoch(len(examples), settings, world_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not parameters:
            raise ValueError("the model has no trainable parameters; call add_lora first")
        self.optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, math.ceil(settings.warmup_ratio * self.total_steps), self.total_steps
        )
        self.device = next(model.parameters()).device
        # What `save` records of the last step taken: {step, learning_rate, epoch}.
        self.last_step: dict[str, float] | None = None
        model.train()

    def _step_examples(self, step: int) -> list[int]:
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.settings.seed + epoch)
        per_rank = len(self.examples) // self.world_size
        order = torch.randperm(len(self.examples), generator=generator)[: per_rank * self.world_size]
        size = self.settings.batch_size * self.settings.grad_accumulation
        return order[self.rank :: self.world_size][index * size : (index + 1) * size].tolist()

    def step(self, step: int) -> dict[str, float]:
        """Take optimizer step `step`; returns its loss, the learning rate it ran at and the epochs done after it."""
        chunk = self._step_examples(step)
        size = self.settings.batch_size
        micro = [chunk[i : i + size] for i in range(0, len(chunk), size)]
        step_loss = 0.0
        for index, indices in enumerate(micro):
            batch = {key: value.to(self.device)
                     for key, value in collate([self.examples[i] for i in indices], _PAD_ID).items()}
            # Under DDP only the last micro-batch of a step synchronises gradients.
            sync = not self.ddp or index == len(micro) - 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss = self.model(**batch).loss / len(micro)
                loss.backward()
            step_loss += loss.item()
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        epoch = step / self.steps_per_epoch
        self.last_step = {"step": step, "learning_rate": learning_rate, "epoch": epoch}
        return {"loss": step_loss, "learning_rate": learning_rate, "epoch": epoch}

    def save(self, folder: str | Path) -> None:
        """A warmup checkpoint of the last step (`save_checkpoint`) plus the learning-rate schedule's state."""
        if self.last_step is None:
            raise ValueError("no step taken yet: nothing to checkpoint")
        folder = save_checkpoint(folder, self.peft_model, self.optimizer, **self.last_step)
        torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)

    def load(self, folder: str | Path) -> None:
        """Restore the adapter, optimizer and schedule that `save` wrote into `folder`."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        folder = Path(folder)
        info = json.loads((folder / CHECKPOINT_FILE).read_text())
        set_peft_model_state_dict(self.peft_model, load_peft_weights(str(folder), device=str(self.device)))
        # Loaded on the CPU: AdamW keeps its step counts there and moves the moments to their parameters itself.
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
        self.last_step = {key: info[key] for key in ("step", "learning_rate", "epoch")}


def train_lora(model: torch.nn.Module, examples: Sequence[Mapping[str, Sequence[int]]], settings: WarmupSettings,
               progress_bar: bool = True) -> list[dict[str, float]]:
    """Every step of a `LoraTrainer` on a PeftModel in this process; returns the step log.

    `progress_bar=False` keeps many short trainings (the influence evaluation's retrains) from flooding the log.
    """
    trainer = LoraTrainer(model, examples, settings)
    log = []
    for step in tqdm(range(1, trainer.total_steps + 1), desc="LoRA training", disable=not progress_bar):
        log.append({"step": step, **trainer.step(step)})
    return log


def save_checkpoint(
    folder: str | Path, model: Any, optimizer: torch.optim.Optimizer, step: int, learning_rate: float, epoch: float
) -> Path:
    """Write adapter, AdamW state and `checkpoint.json` into `folder` (created if missing; the training loop makes
    the write atomic by writing into a temporary folder it renames).

    `checkpoint.json` also lists the trainable parameter names in optimizer order, so later stages can match
    the optimizer's per-parameter moments to LoRA modules.
    """
    folder = Path(folder)
    param_names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    info = {"step": step, "learning_rate": learning_rate, "epoch": epoch, "param_names": param_names}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / CHECKPOINT_FILE).write_text(json.dumps(info, indent=2))
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
