"""The editor interface: edit records in, one weight change per edited Linear module out.

An edit record is the dict `trustray.data.edits` produces: `prompt`, `target_new`, `paraphrases` and
`locality` (`[{prompt, answer}]`). Editors see conversations in chat format (user: prompt, assistant: answer),
because that is how the deployed chat model is asked; the loss covers the answer tokens only
(`trustray.core.lm.batching.encode_chat`). An editor never changes the model it is given: it returns
`deltas` (`{module name: tensor shaped like weight}`), which `trustray.core.editing.editset.EditSet` applies,
reverts, composes and exports.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from trustray.config import BaseConfig
from trustray.core.editing.scope import EditScope
from trustray.core.lm.batching import ResponseTruncatedError, collate, encode_chat

LOG = logging.getLogger(__name__)

EditRecord = Mapping[str, Any]
# A meta-trained editor folder (written by trustray.pipelines.edit_train): weights + metadata.json of this kind.
TRAINED_EDITOR_KIND = "editor"
EDITOR_FILE = "editor.pt"


class EditModules(BaseConfig):
    """Which Linear layers an editor changes: `model.layers.{i}.{module}` for each i in `layers`."""

    layers: list[int] = Field(
        default_factory=lambda: [-6, -5, -4, -3, -2, -1],
        description="Decoder layers edited (negative indices count from the top; MALMEN edits the last six).",
    )
    module: str = Field("mlp.down_proj", description="The Linear module inside each layer (MLP output projection).")

    def names(self, num_layers: int) -> list[str]:
        if any(not -num_layers <= index < num_layers for index in self.layers):
            raise ValueError(f"edit layers {self.layers} out of range for a model with {num_layers} layers")
        return [f"model.layers.{index % num_layers}.{self.module}" for index in sorted({i % num_layers for i in self.layers})]


def check_prefix_layers(model: nn.Module, modules: EditModules, prefix_layers: int) -> None:
    """Refuse to bypass (run once and cache) a decoder layer the editor changes."""
    num_layers = model.config.num_hidden_layers
    lowest = min(index % num_layers for index in modules.layers)
    if prefix_layers > lowest:
        raise ValueError(f"prefix_layers={prefix_layers} would bypass edited layer {lowest}; use at most {lowest}")


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], max_length: int = 128
) -> list[dict[str, list[int]]]:
    """Chat-format token ids with labels on the answer only; a pair whose answer is cut away is an error."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    encoded = []
    for prompt, answer in zip(prompts, answers, strict=True):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        try:
            encoded.append(encode_chat(tokenizer, messages, max_length))
        except ResponseTruncatedError as error:
            raise ValueError(f"edit prompt too long for max_length={max_length}: {prompt[:80]!r}") from error
    return encoded


def batches(examples: Sequence[Mapping[str, Any]], size: int, device: torch.device | str) -> list[dict[str, Tensor]]:
    """Right-padded batches of `size` encoded examples, on `device`."""
    return [
        {key: value.to(device) for key, value in collate(examples[start : start + size], 0).items()}
        for start in range(0, len(examples), size)
    ]


PROGRESS_SECONDS = 30.0
"""Seconds between two progress lines of a long edit."""


class ProgressLog:
    """Logs `what: done / total unit` at most every `PROGRESS_SECONDS`, and once more at the end when it logged
    before. Edits of thousands of facts take minutes to hours inside a Ray task or a Serve replica, whose output
    is read line by line: a tqdm bar's carriage returns would show nothing until it closes."""

    def __init__(self, what: str, total: int, unit: str = "edits") -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.logged = False
        self.began = self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        finished = self.done >= self.total
        if now - self.last < PROGRESS_SECONDS and not (finished and self.logged):
            return
        self.last, self.logged = now, True
        elapsed = now - self.began
        left = elapsed / self.done * (self.total - self.done)
        LOG.info("%s: %d / %d %s (%.0f s, about %.0f s left)", self.what, self.done, self.total, self.unit, elapsed, left)


class EditorSettings(BaseConfig):
    """Settings every editor has; each editor extends this with its own (its `Settings` class)."""

    modules: EditModules = Field(default_factory=EditModules, description="The Linear layers the editor changes.")
    max_length: int = Field(128, ge=8, description="Tokens per (prompt, answer) conversation.")
    batch_size: int = Field(16, ge=1, description="Conversations per forward/backward pass.")


class Editor(ABC):
    """Turns a batch of edit records into weight changes of the chosen modules of `model`.

    Subclasses set `name` (the registry key), `Settings` (their pydantic settings, extending EditorSettings) and
    `meta_learned` (True when the editor has parameters trained by `edit_train`, saved with `state_dict`).
    """

    name: ClassVar[str]
    Settings: ClassVar[type[EditorSettings]] = EditorSettings
    meta_learned: ClassVar[bool] = False
    # True when `compute_deltas` begins with per-record work that it keeps in `work_cache` (MEMIT's target search).
    keeps_work: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer: Any, settings: EditorSettings | Mapping[str, Any] | None = None) -> None:
        self.settings = settings if isinstance(settings, self.Settings) else self.Settings.model_validate(settings or {})
        self.model = model
        self.tokenizer = tokenizer
        self.module_names = self.settings.modules.names(model.config.num_hidden_layers)
        # Per-record work an editor may keep between calls (MEMIT's targets): a mapping the caller owns, valid only
        # for the weights that work was done on. None: nothing is kept.
        self.work_cache: MutableMapping[str, Any] | None = None
        self.reused_seconds = 0.0  # seconds of the last compute_deltas' work taken from `work_cache`, not redone

    @abstractmethod
    def compute_deltas(self, records: Sequence[EditRecord]) -> dict[str, Tensor]:
        """`{module name: delta shaped like its weight}` writing every record's `target_new` at once."""

    def edit_scope(self) -> EditScope | None:
        """The scope of the deltas the last `compute_deltas` returned; None (most editors): they are plain weight
        changes that apply everywhere."""
        return None

    def do_work(self, records: Sequence[EditRecord]) -> None:
        """Do the per-record part of `compute_deltas(records)` into `work_cache`, and nothing else. Parts of a large
        edit, split at multiples of `settings.batch_size` (the work is done a batch at a time), can so be worked on
        in parallel processes sharing one cache; `compute_deltas` on all the records then finds every record's work
        there, as one process would have done it."""
        raise ValueError(f"editor {self.name!r} does no per-record work to keep")

    def prepare(self) -> None:
        """Compute once what every edit needs (e.g. memit's preserved-key statistics), so a server can pay for it
        at start-up instead of in its first edit request. Most editors need nothing."""
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(f"editor {self.name!r} has no trained parameters, got {len(state)} tensors")
