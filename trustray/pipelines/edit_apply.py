"""Apply N edits to a model at once and write the edit set.

    trustray run edit_apply --config configs/edit_apply/<tiny|cpu|gpu>.yaml [key=value ...]
    python -m trustray.pipelines.edit_apply --config ...

The editor (`malmen` / `mend` meta-trained by `edit_train`, or the `ft` / `ft_kl` baselines) turns the records into
one weight change per edited module (with `lora_ranks`, also how much of it survives as a LoRA adapter of each
rank). The result is an edit set (`deltas.safetensors` + `metadata.json` with the
edits, the base model's fingerprint, the editor and its teacher-forced ES / GS / LS on the edited records) that
`EditSet.apply` / `revert` / `compose` and the Serve app use. The work runs as one Ray task with `resources`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from trustray.config import ActorResources, PipelineConfig
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import prepare_output
from trustray.pipelines.edit_train import EditDataSettings, load_records

logger = logging.getLogger(__name__)


class EditApplyConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/edit_sets"

    model: str = Field(DEFAULT_CHAT_MODEL, description="The chat model to edit.")
    editor: str = Field("malmen", description="A name from trustray.core.editing.registry.EDITORS.")
    editor_dir: str | None = Field(None, description="Meta-trained editor folder (edit_train output); malmen / mend.")
    editor_settings: dict[str, Any] = Field(default_factory=dict, description="Settings of ft / ft_kl.")
    data: EditDataSettings = Field(default_factory=EditDataSettings, description="Where the records come from.")
    split: str = Field("test", description="Split of the records.")
    n_edits: int = Field(16, ge=1, description="Records edited at once (the first N of the split).")
    lora_ranks: list[int] = Field(
        default_factory=list,
        description="Also export the edit set as LoRA adapters of these ranks (truncated SVD, for vLLM multi-LoRA) "
        "and report each one's reconstruction error and how much of the edit success survives.",
    )
    resources: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=1), description="The editing task.")


def edit_task(config: EditApplyConfig, records: list[dict[str, Any]], fingerprint: str) -> dict[str, Any]:
    """Load the model, compute the deltas, score them; returns deltas (CPU) and metrics."""
    import torch

    from trustray.actors.editor import EditSetMaker
    from trustray.core.editing.editset import EditSet, to_lora
    from trustray.models.loading import gpu_or_cpu
    from trustray.runtime import setup_logging

    setup_logging()  # a Ray worker has no log handler: the editor's progress lines would be dropped
    if config.resources.torch_threads is not None:
        torch.set_num_threads(config.resources.torch_threads)
    maker = EditSetMaker.load(config.model, fingerprint, config.editor, config.editor_dir, config.editor_settings,
                              gpu_or_cpu(config.resources.num_gpus > 0))
    made = maker.edit(records, score_before=True)
    deltas = {name: delta.detach().cpu() for name, delta in made.edit_set.deltas.items()}
    lora = []
    for rank in config.lora_ranks:
        factors, report = to_lora(EditSet(deltas, scope=made.edit_set.scope), rank)
        with maker.applied({name: b @ a for name, (a, b) in factors.items()}):
            scores = maker.scores(records, made.reference)
        lora.append({"rank": rank, "relative_error": report["relative_error"], **scores})
    metrics = {"before": made.before, "after": made.scores, "edit_seconds": round(made.seconds, 2), "lora": lora}
    return {"deltas": deltas, "scope": made.edit_set.scope, "metrics": metrics}


def run(config: EditApplyConfig) -> Path:
    """Compute and save the edit set; returns its folder."""
    import ray

    from trustray.core.editing.editset import FINGERPRINT_KEY, EditSet

    folder = prepare_output(config)
    records = load_records(config.data, config.split)[: config.n_edits]
    if len(records) < config.n_edits:
        raise ValueError(f"split {config.split!r} has {len(records)} records, fewer than n_edits={config.n_edits}")
    fingerprint = model_fingerprint(config.model)
    task = ray.remote(**config.resources.ray_options())(edit_task)
    result = ray.get(task.remote(config, records, fingerprint))
    edits = [{key: record[key] for key in ("id", "subject", "prompt", "target_true", "target_new") if key in record}
             for record in records]
    metadata = {FINGERPRINT_KEY: fingerprint, "model": config.model, "editor": config.editor,
                "editor_dir": config.editor_dir, "n_edits": len(records), "edits": edits, "metrics": result["metrics"]}
    EditSet(result["deltas"], metadata, scope=result["scope"]).save(folder)
    after = result["metrics"]["after"]
    logger.info("edit set of %d edits (%s) in %s: ES %.3f GS %.3f LS %.3f", len(records), config.editor, folder,
                after["es"], after["gs"], after["ls"])
    return folder


PIPELINE = {"config": EditApplyConfig, "run": run}


if __name__ == "__main__":
    from trustray.pipelines import run_module

    run_module("edit_apply")
