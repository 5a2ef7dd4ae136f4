"""Classifiers a weak or strong model becomes, and the one trainer they share.

- `LastTokenClassifier`: a Llama-shaped causal LM cut to its first `num_layers` decoder layers, whose last-token
  final state (after the model's last norm) goes into a zero-initialised linear head, as in openai/weak-to-strong's
  `TransformerWithHead`. The top `trainable_layers` blocks, the norm and the head train; the frozen layers
  below never change, so their output is computed once per example (`layer_inputs`) and the classifier reads those
  cached states: a step costs the trained blocks only, exactly as with the whole model. `num_layers` below the
  model's depth is the paper's smaller model of the same family (the weak supervisor); `trainable_layers=0` is a
  linear probe on the layer's states.
- `LinearHead`: a zero-initialised linear head on fixed feature vectors (sentence embeddings, reward-model
  features), standardised by the training set's mean and scale. Without a bias (`bias=False`) and on feature
  differences f(a) − f(b), its two logits give P(a ≻ b) = σ((w₀ − w₁)ᵀ(f(a) − f(b))): a Bradley–Terry reward model,
  antisymmetric in the pair.

`ClassifierTrainer` trains either with any loss of `trustray.core.w2s.losses` against soft targets. Each step's batch
and learning rate (a cosine schedule) follow from the step number and the seed alone, so a resumed run replays
the steps an uninterrupted one takes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from trustray.core.lm.prefix import _PassThrough, decoder_layers
from trustray.core.w2s.losses import Loss

OPTIMIZER_FILE = "optimizer.pt"
CLASSIFIER_FILE = "classifier.pt"


class TrainSettings(BaseModel):
    """How a classifier trains (the same for the weak model, the ceiling and the students, unless a preset says)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, description="Passes over the training examples (the paper's gt_epochs).")
    batch_size: int = Field(32, ge=2, description="Examples per optimizer step (logconf thresholds within a batch).")
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate, annealed by a cosine to 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")


def base_model(causal_lm: nn.Module) -> nn.Module:
    return causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm


@torch.no_grad()
def layer_inputs(causal_lm: nn.Module, token_ids: Sequence[Sequence[int]], layers: Sequence[int],
                 batch_size: int = 16) -> dict[int, list[Tensor]]:
    """Per requested layer index l, each example's hidden states [T, H] (float32, CPU) entering decoder layer l
    (l = the model's depth: the last layer's output, before the final norm). One forward pass serves all layers."""
    depth = len(decoder_layers(causal_lm))
    if not layers or any(not 0 <= layer <= depth for layer in layers):
        raise ValueError(f"layers must be in [0, {depth}], got {list(layers)}")
    decoder = base_model(causal_lm).model
    device = next(causal_lm.parameters()).device
    states: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    # hidden_states[l] is decoder layer l's input for l < depth; the last entry has the final norm applied, so the
    # last layer's raw output is captured with a hook instead.
    captured: list[Tensor] = []
    handle = decoder.layers[depth - 1].register_forward_hook(
        lambda _module, _args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    try:
        for start in range(0, len(token_ids), batch_size):
            chunk = token_ids[start : start + batch_size]
            ids, mask = pad_ids(chunk)
            captured.clear()
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                             use_cache=False).hidden_states
            for layer in layers:
                batch = (captured[0] if layer == depth else hidden[layer]).float().cpu()
                states[layer].extend(batch[row, : len(ids_row)].clone() for row, ids_row in enumerate(chunk))
    finally:
        handle.remove()
    return states


def pad_ids(token_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded [B, T] ids (padding 0, masked) and their attention mask."""
    if not token_ids or any(len(ids) == 0 for ids in token_ids):
        raise ValueError("every example needs at least one token")
    width = max(len(ids) for ids in token_ids)
    ids = torch.zeros(len(token_ids), width, dtype=torch.long)
    mask = torch.zeros(len(token_ids), width, dtype=torch.long)
    for row, example in enumerate(token_ids):
        ids[row, : len(example)] = torch.as_tensor(list(example), dtype=torch.long)
        mask[row, : len(example)] = 1
    return ids, mask


def pad_states(states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-padded [B, T, H] states and their attention mask."""
    width = max(state.shape[0] for state in states)
    batch = torch.zeros(len(states), width, states[0].shape[1], dtype=states[0].dtype)
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for row, state in enumerate(states):
        batch[row, : state.shape[0]] = state
        mask[row, : state.shape[0]] = 1
    return batch, mask


class LastTokenClassifier(nn.Module):
    """See the module docstring. Reads the states entering layer `num_layers − trainable_layers` (`input_layer`)."""

    def __init__(self, causal_lm: nn.Module, num_layers: int, trainable_layers: int, num_classes: int) -> None:
        super().__init__()
        decoder = base_model(causal_lm).model
        layers = decoder_layers(causal_lm)
        if not 1 <= num_layers <= len(layers) or not 0 <= trainable_layers <= num_layers or num_classes < 2:
            raise ValueError(f"need 1 <= num_layers <= {len(layers)}, 0 <= trainable_layers <= num_layers and "
                             f"num_classes >= 2; got {num_layers}, {trainable_layers}, {num_classes}")
        self.num_layers, self.trainable_layers = num_layers, trainable_layers
        self.input_layer = num_layers - trainable_layers
        # Copy only what runs: the embeddings and every layer below input_layer are replaced (the cached states
        # stand in for them), the layers above num_layers dropped.
        memo: dict[int, Any] = {id(decoder.embed_tokens): None}
        memo.update({id(layer): _PassThrough() for layer in layers[: self.input_layer]})
        memo.update({id(layer): None for layer in layers[num_layers:]})
        self.decoder = copy.deepcopy(decoder, memo)
        self.decoder.layers = nn.ModuleList(list(self.decoder.layers)[:num_layers])
        self.decoder.config.num_hidden_layers = num_layers
        self.decoder.requires_grad_(False)
        if trainable_layers:
            self.decoder.layers[self.input_layer :].requires_grad_(True)
            self.decoder.norm.requires_grad_(True)
        self.decoder.float()
        self.head = nn.Linear(self.decoder.config.hidden_size, num_classes, bias=False)
        nn.init.zeros_(self.head.weight)

    def collate(self, inputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return pad_states(inputs)

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        states, mask = batch
        hidden = self.decoder(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
        last = mask.sum(dim=1) - 1
        return self.head(hidden[torch.arange(len(last), device=hidden.device), last])


class LinearHead(nn.Module):
    """See the module docstring: a zero-initialised linear head on standardised feature vectors."""

    def __init__(self, dimension: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        if dimension < 1 or num_classes < 2:
            raise ValueError(f"need dimension >= 1 and num_classes >= 2; got {dimension}, {num_classes}")
        self.register_buffer("mean", torch.zeros(dimension))
        self.register_buffer("scale", torch.ones(dimension))
        self.head = nn.Linear(dimension, num_classes, bias=bias)
        nn.init.zeros_(self.head.weight)
        if bias:
            nn.init.zeros_(self.head.bias)

    def standardise_with(self, features: Tensor, centre: bool = True) -> LinearHead:
        """Fix the standardisation from training features (`centre=False` keeps 0 at 0: what pair differences need
        to stay antisymmetric)."""
        features = features.float()
        if centre:
            self.mean.copy_(features.mean(dim=0))
        self.scale.copy_(features.std(dim=0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.scale))
        return self

    def collate(self, inputs: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(inputs)).float()

    def forward(self, batch: Tensor) -> Tensor:
        return self.head((batch - self.mean) / self.scale)


class ClassifierTrainer:
    """Trains a classifier's trainable parameters on `inputs` against `targets` [n, C] (class probabilities) with
    `loss`; `seed` orders the epochs (the classifier's initialisation is the caller's)."""

    def __init__(self, classifier: nn.Module, inputs: Sequence[Tensor], targets: Tensor, loss: Loss,
                 settings: TrainSettings, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ValueError(f"need as many targets as inputs (at least one); got {len(inputs)} and {len(targets)}")
        if targets.dim() != 2 or not torch.allclose(targets.sum(dim=1), torch.ones(len(targets), dtype=targets.dtype),
                                                    atol=1e-4):
            raise ValueError("targets must be [n, classes] rows of class probabilities that sum to 1")
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device)
        self.inputs, self.targets, self.loss = list(inputs), targets.float(), loss
        self.settings, self.seed = settings, seed
        self.steps_per_epoch = math.ceil(len(self.inputs) / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.parameters = [parameter for parameter in classifier.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)

    def step_examples(self, step: int) -> list[int]:
        """The example indices of optimizer step `step` (1-based)."""
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(self.seed * 1_000 + epoch))
        size = self.settings.batch_size
        return order[index * size : (index + 1) * size].tolist()

    def learning_rate(self, step: int) -> float:
        return self.settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / self.total_steps))

    def step(self, step: int) -> dict[str, float]:
        """Take optimizer step `step`; returns its loss and the share of examples whose argmax matches the
        targets' argmax."""
        if not 1 <= step <= self.total_steps:
            raise ValueError(f"step must be in [1, {self.total_steps}], got {step}")
        indices = self.step_examples(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        self.classifier.train()
        logits = self.classifier(self.to_device(self.classifier.collate([self.inputs[i] for i in indices])))
        targets = self.targets[indices].to(self.device)
        loss = self.loss(logits, targets, (step - 1) / self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.classifier.eval()
        agreement = (logits.detach().argmax(dim=1) == targets.argmax(dim=1)).float().mean()
        return {"loss": float(loss.detach()), "agreement": float(agreement)}

    def to_device(self, batch: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        if isinstance(batch, tuple):
            return tuple(part.to(self.device) for part in batch)
        return batch.to(self.device)

    @torch.no_grad()
    def predict(self, inputs: Sequence[Tensor], batch_size: int = 64) -> Tensor:
        """[n, C] class probabilities (CPU) of `inputs`."""
        self.classifier.eval()
        probabilities = [torch.softmax(self.classifier(self.to_device(self.classifier.collate(inputs[start : start + batch_size]))).float(), dim=1).cpu()
                         for start in range(0, len(inputs), batch_size)]
        return torch.cat(probabilities)

    def save(self, folder: str | Path) -> None:
        """The trainable parameters and buffers (not the frozen copy they sit on) and the optimizer state."""
        folder = Path(folder)
        trained = {name for name, parameter in self.classifier.named_parameters() if parameter.requires_grad}
        state = {name: value for name, value in self.classifier.state_dict().items()
                 if name in trained or name in dict(self.classifier.named_buffers())}
        torch.save(state, folder / CLASSIFIER_FILE)
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load(self, folder: str | Path) -> None:
        folder = Path(folder)
        state = torch.load(folder / CLASSIFIER_FILE, map_location=self.device, weights_only=True)
        missing = set(state) - set(self.classifier.state_dict())
        if missing:
            raise ValueError(f"{folder} holds parameters this classifier does not have: {sorted(missing)[:5]}")
        self.classifier.load_state_dict(state, strict=False)
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
