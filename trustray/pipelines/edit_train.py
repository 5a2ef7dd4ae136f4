"""Meta-train a learned editor (MALMEN or MEND) with Ray Train; checkpoints and resume.

    trustray run edit_train --config configs/edit_train/<tiny|cpu|gpu>.yaml [key=value ...]
    python -m trustray.pipelines.edit_train --config ...

Each meta-training step draws `edits_per_step` records of the training split (seeded by the step number, so a
resumed run sees the same batches), edits the model with them, and trains the editor on the paraphrase and
locality losses (`Editor.meta_step`). Every `eval_every` steps the editor edits a fixed dev sample at once and
reports teacher-forced ES / GS / LS. Every `checkpoint_every` steps rank 0 writes the editor's state (networks,
normalisers, optimizer) to `output_dir/checkpoints/step-<n>` atomically (`trustray.pipelines.training`); a rerun
continues from the newest one, and `force=true` deletes `output_dir` and starts over.
The finished editor is `output_dir/editor/` (`editor.pt` + `metadata.json`), which `edit_apply`,
`trustray eval edit` and the Serve app load (`trustray.core.editing.base.load_trained_editor`).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from trustray.artifacts import (
    ArtifactMismatchError,
    atomic_folder,
    check_metadata,
    read_metadata,
    write_metadata,
)
from trustray.config import BaseConfig, PipelineConfig, TrainWorkerResources
from trustray.core.editing.base import EDITOR_FILE, TRAINED_EDITOR_KIND
from trustray.data.corpus import edit_train_texts
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import prepare_output
from trustray.pipelines.training import TrainingPlan, WorkerContext, read_step, run_training

logger = logging.getLogger(__name__)


class EditDataSettings(BaseConfig):
    """Where the edit records come from."""

    source: str = Field("wiki", description="'wiki' (the bundled dataset), or a zsRE / CounterFact JSON(L) file.")
    format: Literal["wiki", "zsre", "counterfact"] = Field("wiki", description="Record format of `source`.")
    seed: int = Field(0, description="Seed of the bundled dataset's construction.")


class EditTrainConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/edit_train"

    model: str = Field(DEFAULT_CHAT_MODEL, description="The chat model to edit: built-in name, local folder or HF id.")
    editor: Literal["malmen", "mend"] = Field("malmen", description="The meta-learned editor.")
    editor_settings: dict[str, Any] = Field(
        default_factory=dict, description="The editor's settings (validated by its Settings class)."
    )
    data: EditDataSettings = Field(default_factory=EditDataSettings, description="Edit records.")
    steps: int = Field(100, ge=1, description="Meta-training steps.")
    edits_per_step: int = Field(64, ge=1, description="Records edited at once in each step (MALMEN: 512 on GPUs).")
    eval_every: int = Field(25, ge=1, description="Steps between dev evaluations.")
    eval_edits: int = Field(64, ge=1, description="Dev records edited at once in each evaluation.")
    checkpoint_every: int = Field(25, ge=1, description="Steps between checkpoints (the unit of resume).")
    keep_checkpoints: int | None = Field(
        None, ge=1, description="Newest checkpoints kept on disk (None: all). A run cut short (a smaller `steps`) "
        "can end only at a kept one.",
    )
    seed: int = Field(0, description="Seeds the batches and the editor's initialisation.")
    preserve_records: int = Field(0, ge=0, description="MALMEN's preserved keys: the last N training records are kept out of the meta-training batches and their (prompt, true answer) pairs give E[k₀k₀ᵀ] (`fit_preservation`), weighted by the editor setting `preserve_weight`.")
    preserve_texts: int = Field(0, ge=0, description="MALMEN's preserved general-text keys: this many Wikipedia intros (none from eval_edit's held-out pool) give E[ttᵀ] over every position (`fit_text_preservation`), weighted by the editor setting `preserve_text_weight`.")
    retention_texts: int = Field(0, ge=0, description="Further intros (outside the eval pool and the preserved ones) for the retention KL on general text, weighted by the editor setting `retention_coef`.")
    retention_per_step: int = Field(8, ge=1, description="Retention texts drawn (seeded by step) for each meta step.")
    init_from: str | None = Field(None, description="A finished edit_train editor folder (same model, same shapes) whose networks, normalisers and optimizer state this run starts from.")
    resources: TrainWorkerResources = Field(default_factory=TrainWorkerResources, description="The worker.")

    @model_validator(mode="after")
    def _preservation_has_keys(self) -> EditTrainConfig:
        if self.editor_settings.get("preserve_weight", 0) > 0 and self.preserve_records == 0:
            raise ValueError("editor_settings.preserve_weight > 0 needs preserve_records > 0 (the keys to preserve)")
        if self.editor_settings.get("preserve_text_weight", 0) > 0 and self.preserve_texts == 0:
            raise ValueError("editor_settings.preserve_text_weight > 0 needs preserve_texts > 0 (the texts to preserve)")
        if self.editor_settings.get("retention_coef", 0) > 0 and self.retention_texts == 0:
            raise ValueError("editor_settings.retention_coef > 0 needs retention_texts > 0 (the general text)")
        return self


def load_records(data: EditDataSettings, split: str) -> list[dict[str, Any]]:
    """Edit records of one split: the bundled dataset, or a user's zsRE / CounterFact file."""
    from trustray.data import edit_files, edits

    if data.format == "wiki":
        if data.source != "wiki":
            raise ValueError("format 'wiki' reads the bundled dataset: set source: wiki")
        return edits.load_edit_split(split, seed=data.seed)
    loader = edit_files.load_zsre if data.format == "zsre" else edit_files.load_counterfact
    return loader(data.source, split=split)


def step_batch(records: list[dict[str, Any]], size: int, seed: int, step: int) -> list[dict[str, Any]]:
    """The records of one meta-training step: a seeded sample, the same for a step however often it is run."""
    if size > len(records):
        raise ValueError(f"edits_per_step={size} exceeds the {len(records)} training records")
    return random.Random(f"{seed}-{step}").sample(records, size)


def retention_batch(texts: list[str], size: int, seed: int, step: int) -> list[str]:
    """The step's retention texts: a draw that depends only on the seed and the step (resume repeats it)."""
    return random.Random(f"{seed}:retention:{step}").sample(texts, min(size, len(texts))) if texts else []


def evaluate_editor(editor: Any, model: Any, tokenizer: Any, records: list[dict], reference: list) -> dict[str, float]:
    """Edit `records` at once, score them teacher-forced, revert (the model is restored bit for bit)."""
    from trustray.core.editing.editset import EditSet
    from trustray.core.editing.evaluation import teacher_forced_scores

    deltas = editor.compute_deltas(records)
    with EditSet(deltas).apply(model):
        return teacher_forced_scores(model, tokenizer, records, reference)


class EditorTraining:
    """The meta-training task (`trustray.pipelines.training`): one `Editor.meta_step` per step, the editor's state
    (networks, normalisers, optimizer) in each checkpoint, dev ES / GS / LS every `eval_every` steps."""

    def __init__(self, data: dict[str, Any], context: WorkerContext):
        import torch

        from trustray.core.editing.evaluation import locality_reference
        from trustray.core.editing.factory import build_untrained_editor
        from trustray.models.loading import load_causal_lm, load_tokenizer

        self.config: EditTrainConfig = data["config"]
        self.data, self.device, self.total = data, context.device, context.plan.total_steps
        torch.manual_seed(self.config.seed)
        self.model = load_causal_lm(self.config.model, context.device)
        self.tokenizer = load_tokenizer(self.config.model)
        self.editor = build_untrained_editor(self.config.editor, self.model, self.tokenizer,
                                             self.config.editor_settings)
        self.reference = locality_reference(self.model, self.tokenizer, data["dev"])

    def begin(self) -> list[dict[str, Any]]:
        """Start from `init_from`'s editor (when given), then fit the preserved keys."""
        import torch

        data = self.data
        if data["init_from"]:
            self.editor.load_state_dict(torch.load(Path(data["init_from"]) / EDITOR_FILE, map_location=self.device,
                                                   weights_only=True))
            logger.info("starting from the editor in %s", data["init_from"])
        preserved = data["preserved"]
        if preserved:
            count = self.editor.fit_preservation([r["prompt"] for r in preserved], [r["target_true"] for r in preserved],
                                                 [r.get("subject") for r in preserved])
            logger.info("preserved keys: %d %s positions of %d held-out training records", count,
                        self.editor.settings.key_position, len(preserved))
        if data["preserved_texts"]:
            count = self.editor.fit_text_preservation(data["preserved_texts"])
            logger.info("preserved text keys: %d positions of %d Wikipedia intros", count, len(data["preserved_texts"]))
        return []

    def train_step(self, step: int) -> dict[str, float]:
        config = self.config
        began = time.perf_counter()
        general = retention_batch(self.data["retention_texts"], config.retention_per_step, config.seed, step)
        metrics = dict(self.editor.meta_step(step_batch(self.data["train"], config.edits_per_step, config.seed, step),
                                             general))
        metrics["step_seconds"] = time.perf_counter() - began
        if step % config.eval_every == 0 or step == self.total:
            dev = evaluate_editor(self.editor, self.model, self.tokenizer, self.data["dev"], self.reference)
            metrics.update({f"dev_{k}": v for k, v in dev.items()})
        return metrics

    def checkpoint_metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        return window[-1]  # the checkpoint step's own metrics (a meta step is not averaged over a window)

    def save(self, folder: Path) -> None:
        import torch

        torch.save(self.editor.state_dict(), folder / EDITOR_FILE)

    def load(self, folder: Path) -> None:
        import torch

        self.editor.load_state_dict(torch.load(folder / EDITOR_FILE, map_location=self.device, weights_only=True))


def expected_metadata(config: EditTrainConfig) -> dict[str, Any]:
    return {
        "kind": TRAINED_EDITOR_KIND,
        "editor": config.editor,
        "model": config.model,
        "model_fingerprint": model_fingerprint(config.model),
        "settings": config.model_dump(mode="json", include={"editor_settings", "data", "steps", "edits_per_step", "seed",
                                                            "preserve_records", "preserve_texts", "retention_texts",
                                                            "retention_per_step", "init_from"}),
    }


def run(config: EditTrainConfig) -> Path:
    """Meta-train (or reuse) the editor; returns the folder of the finished editor."""
    out = prepare_output(config).resolve()
    editor_dir = out / "editor"
    expected = expected_metadata(config)
    finished = read_metadata(editor_dir) or {}
    finished_steps = finished.get("settings", {}).get("steps", config.steps)
    if finished_steps != config.steps:  # the same run, shorter or longer: train on (or cut back) from its checkpoints
        check_metadata(editor_dir, {**expected, "settings": {**expected["settings"], "steps": finished_steps}},
                       kind="meta-trained editor")
        logger.info("the editor in %s has %d steps; this run asks for %d", editor_dir, finished_steps, config.steps)
    elif check_metadata(editor_dir, expected, kind="meta-trained editor"):
        logger.info("reusing the editor in %s", editor_dir)
        return editor_dir
    # Checkpoints resume only the same run: a folder made with other settings is refused, not continued.
    # The run's length is not part of it (no schedule depends on it), so a run can be extended or cut short.
    checkpoints_expected = {**expected, "settings": {k: v for k, v in expected["settings"].items() if k != "steps"}}
    if not check_metadata(out / "checkpoints", checkpoints_expected, kind="meta-training checkpoints"):
        write_metadata(out / "checkpoints", checkpoints_expected)
    train = load_records(config.data, "train")
    if config.preserve_records >= len(train):
        raise ValueError(f"preserve_records={config.preserve_records} leaves none of the {len(train)} training records")
    preserved = train[len(train) - config.preserve_records :]
    train = train[: len(train) - config.preserve_records]
    dev = load_records(config.data, "dev")[: config.eval_edits]
    general_count = config.preserve_texts + config.retention_texts
    general = edit_train_texts(general_count) if general_count else []
    if config.init_from:
        init = read_metadata(config.init_from) or {}
        if init.get("kind") != TRAINED_EDITOR_KIND or init.get("editor") != config.editor:
            raise FileNotFoundError(f"init_from={config.init_from} holds no finished {config.editor} editor")
        if init["model_fingerprint"] != expected["model_fingerprint"]:
            raise ArtifactMismatchError(f"init_from={config.init_from} was trained on {init['model']}, not {config.model}")
    data = {"config": config, "train": train, "dev": dev, "preserved": preserved,
            "preserved_texts": general[: config.preserve_texts], "retention_texts": general[config.preserve_texts :],
            # the worker's working directory is not the caller's
            "init_from": str(Path(config.init_from).resolve()) if config.init_from else None}
    # A shorter run of the same settings ends at one of the kept checkpoints.
    plan = TrainingPlan.every(out / "checkpoints", config.steps, config.checkpoint_every, config.keep_checkpoints)
    began = time.perf_counter()
    final = run_training(EditorTraining, data, plan, config.resources, out)
    history = read_step(final)["history"]
    with atomic_folder(editor_dir) as tmp:
        (tmp / EDITOR_FILE).write_bytes((final / EDITOR_FILE).read_bytes())
        write_metadata(tmp, {**expected, "history": history, "train_records": len(train), "dev_records": len(dev),
                             "preserved_records": len(preserved),
                             "seconds": round(time.perf_counter() - began, 1)})
    logger.info("editor %s meta-trained: %s", config.editor, editor_dir)
    return editor_dir


PIPELINE = {"config": EditTrainConfig, "run": run}


if __name__ == "__main__":
    # Run through the importable module, not `__main__`: Ray pickles functions defined in `__main__` by value,
    # and workers cannot resolve their module-level helpers.
    from trustray.pipelines import run_module

    run_module("edit_train")
