"""`EditSetMaker`: one loaded base model and its editor, turning edit records into weight changes and scoring them.

The plain worker behind the Serve editor deployment, `edit_apply`'s task and `eval_edit`'s rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from trustray.core.editing.base import EditRecord
from trustray.core.editing.editset import AppliedEdit, EditSet
from trustray.core.editing.evaluation import PrefixCache, locality_reference, teacher_forced_scores
from trustray.core.editing.factory import build_editor, registered_editor
from trustray.core.editing.locality import LocalityCheck, greedy_answers


@dataclass
class MadeEdits:
    """What `EditSetMaker.edit` returns."""

    edit_set: EditSet  # the deltas and their scope, without metadata
    seconds: float  # computing the deltas only
    scores: dict[str, float]  # teacher-forced ES / GS / LS with the deltas applied
    before: dict[str, float] | None  # the same on the unedited model, when asked for
    reference: list[Tensor]  # the unedited model's locality predictions (what LS agrees with)


class EditSetMaker:
    """An editor on `model`: `general_text` goes to an editor that takes general text (`ft_kl`, `memit`) unless its
    settings name their own; an editor held to locality probes (`ft_kl`) is given `anchors_per_edit` of
    `default_anchors` for every record that brings no probes of its own (each record the next ones, cyclically);
    an editor with preserved keys (`memit`) gets the first `preserved_chats` default anchors as preserved
    conversations unless its settings name their own."""

    def __init__(self, model: Any, tokenizer: Any, fingerprint: str, editor: str, editor_dir: str | None = None,
                 editor_settings: Mapping[str, Any] | None = None, general_text: list[str] | None = None,
                 default_anchors: Sequence[Mapping[str, str]] = (), anchors_per_edit: int = 0,
                 preserved_chats: int = 0, untrained: bool = False):
        self.model, self.tokenizer, self.fingerprint = model, tokenizer, fingerprint
        settings = dict(editor_settings or {})
        fields = registered_editor(editor).Settings.model_fields
        if general_text is not None and "general_text" in fields and not settings.get("general_text"):
            settings["general_text"] = general_text
        if "preserved_chats" in fields and not settings.get("preserved_chats"):
            settings["preserved_chats"] = [dict(anchor) for anchor in default_anchors[:preserved_chats]]
        self.default_anchors = [dict(anchor) for anchor in default_anchors] if "loc_coef" in fields else []
        self.anchors_per_edit = anchors_per_edit
        self.editor = build_editor(editor, model, tokenizer, fingerprint, editor_dir, settings, untrained)

    @classmethod
    def load(cls, source: str, fingerprint: str, editor: str, editor_dir: str | None = None,
             editor_settings: Mapping[str, Any] | None = None, device: str | torch.device | None = None, *,
             general_text: list[str] | None = None, default_anchors: Sequence[Mapping[str, str]] = (),
             anchors_per_edit: int = 0, preserved_chats: int = 0) -> EditSetMaker:
        """Load the model `source` (weights `fingerprint`) and its tokenizer, then build the editor on them."""
        from trustray.models.loading import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(source, device), load_tokenizer(source), fingerprint, editor, editor_dir,
                   editor_settings, general_text, default_anchors, anchors_per_edit, preserved_chats)

    def locality_check(self, questions: Sequence[str], max_new_tokens: int = 16) -> LocalityCheck:
        """A locality check on `questions`, its reference answers taken now: build it before any edit is applied."""
        return LocalityCheck(partial(greedy_answers, self.model, self.tokenizer, max_new_tokens=max_new_tokens),
                             questions)

    def anchored(self, records: Sequence[EditRecord]) -> list[EditRecord]:
        """`records`, those without locality probes given default anchors (unchanged when there are none)."""
        if not self.default_anchors or self.anchors_per_edit == 0:
            return list(records)
        anchored, cursor = [], 0
        for record in records:
            if record.get("locality"):
                anchored.append(record)
                continue
            picked = [self.default_anchors[(cursor + i) % len(self.default_anchors)]
                      for i in range(self.anchors_per_edit)]
            cursor += self.anchors_per_edit
            anchored.append({**record, "locality": picked})
        return anchored

    def compute_deltas(self, records: Sequence[EditRecord]) -> tuple[EditSet, float]:
        """The editor's weight changes writing `records` at once (with their scope, for a scoped editor), and the
        seconds they took (work taken from the editor's `work_cache` counted at what it took when it was done)."""
        began = time.perf_counter()
        deltas = self.editor.compute_deltas(records)
        if next(self.model.parameters()).is_cuda:
            torch.cuda.synchronize()  # the clock stops when the GPU has done the work, not when it was queued
        seconds = time.perf_counter() - began + self.editor.reused_seconds
        return EditSet(deltas, scope=self.editor.edit_scope()), seconds

    def locality_reference(self, records: Sequence[EditRecord], batch_size: int = 16,
                           prefix: PrefixCache | None = None) -> list[Tensor]:
        """The current model's predictions on the records' locality probes: take them before applying an edit."""
        return locality_reference(self.model, self.tokenizer, records, batch_size, prefix=prefix)

    def scores(self, records: Sequence[EditRecord], reference: Sequence[Tensor], batch_size: int = 16,
               prefix: PrefixCache | None = None) -> dict[str, float]:
        """Teacher-forced ES / GS / LS of the model's current weights (LS as agreement with `reference`)."""
        return teacher_forced_scores(self.model, self.tokenizer, records, reference, batch_size, prefix=prefix)

    def applied(self, edit: EditSet | dict[str, Tensor]) -> AppliedEdit:
        """An edit set (or plain deltas) applied to the model (a context manager that reverts them bit for bit)."""
        return (edit if isinstance(edit, EditSet) else EditSet(edit)).apply(self.model)

    def edit(self, records: Sequence[EditRecord], score_before: bool = False,
             check: LocalityCheck | None = None) -> MadeEdits:
        """The weight changes writing `records`, the seconds they took and the edited model's scores (with
        `score_before`, the unedited model's too; with `check`, its `locality_kept` and probe count).

        The editor sees the records with default anchors; the scores are of the records as given, so LS never
        counts an anchor the editor was held to."""
        reference = self.locality_reference(records)
        before = self.scores(records, reference) if score_before else None
        edit_set, seconds = self.compute_deltas(self.anchored(records))
        with self.applied(edit_set):
            scores = self.scores(records, reference)
            if check is not None:
                scores.update(check.measure())
        return MadeEdits(edit_set, seconds, scores, before, reference)
