"""Building editors by name: the one module that imports every editor implementation (filling the registry)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustray.artifacts import ArtifactMismatchError, read_artifact
from trustray.core.editing import finetune, malmen, memit, mend  # noqa: F401  (importing them fills the registry)
from trustray.core.editing.base import EDITOR_FILE, TRAINED_EDITOR_KIND, Editor, EditorSettings
from trustray.core.editing.registry import EDITORS


def registered_editor(name: str) -> type[Editor]:
    """The registered editor class called `name`, readable error if unknown."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; available: {', '.join(sorted(EDITORS))}")
    return EDITORS[name]


def build_untrained_editor(
    name: str, model: nn.Module, tokenizer: Any, settings: EditorSettings | Mapping[str, Any] | None = None
) -> Editor:
    """An editor from the registry by name with fresh parameters (settings validated by its `Settings`): a
    baseline ready to use, or a meta-learned editor ready to be meta-trained."""
    return registered_editor(name)(model, tokenizer, settings)


def load_trained_editor(editor_dir: str | Path, model: nn.Module, tokenizer: Any, fingerprint: str,
                        overrides: Mapping[str, Any] | None = None) -> Editor:
    """A meta-trained editor folder's editor on `model`, refusing one trained for another base model.

    `overrides` replace settings it was trained with (inference ones, e.g. MALMEN's `rounds`); a setting that
    changes the networks' shapes makes loading the state fail.
    """
    metadata = read_artifact(editor_dir, TRAINED_EDITOR_KIND, "meta-trained editor")
    if metadata["model_fingerprint"] != fingerprint:
        raise ArtifactMismatchError(
            f"the editor in {editor_dir} was meta-trained on {metadata['model']} (fingerprint "
            f"{metadata['model_fingerprint']}), not on this model ({fingerprint}): its networks would not fit"
        )
    editor = build_untrained_editor(metadata["editor"], model, tokenizer,
                                    {**metadata["settings"]["editor_settings"], **(overrides or {})})
    device = next(model.parameters()).device
    editor.load_state_dict(torch.load(Path(editor_dir) / EDITOR_FILE, map_location=device, weights_only=True))
    return editor


def build_editor(name: str, model: nn.Module, tokenizer: Any, fingerprint: str, editor_dir: str | None = None,
                 settings: Mapping[str, Any] | None = None, untrained: bool = False) -> Editor:
    """A meta-trained editor from `editor_dir` (`settings` override its own), or one that needs no meta-training
    (ft, ft_kl, memit) built from `settings`. `untrained`: a meta-learned editor with fresh networks (MALMEN's are
    the identity), the baseline that shows what meta-training buys."""
    if untrained:
        if editor_dir:
            raise ValueError("an untrained editor takes no editor_dir")
        return build_untrained_editor(name, model, tokenizer, settings)
    if editor_dir:
        editor = load_trained_editor(editor_dir, model, tokenizer, fingerprint, settings)
        if editor.name != name:
            raise ValueError(f"{editor_dir} holds a {editor.name!r} editor, not {name!r}")
        return editor
    editor = build_untrained_editor(name, model, tokenizer, settings)
    if editor.meta_learned:
        raise ValueError(f"editor {name!r} is meta-learned: give editor_dir (an edit_train output)")
    return editor
