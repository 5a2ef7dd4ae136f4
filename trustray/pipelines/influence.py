"""Data influence à la LESS on Ray: warm up LoRA adapters, then (later stages) score training examples by
their gradient features against target tasks.

    python -m trustray.pipelines.influence --config configs/influence/cpu.yaml [key=value ...]

Stages, each reusing its finished artifact under `output_dir` when the settings match:
  (a) warmup: LoRA training on a random subset of the pool with Ray Train (the shared loop of
      trustray.pipelines.training); checkpoints with AdamW state; a killed warmup resumes.
  (b) reduction: fitted on per-example gradients of a pool sample at the last checkpoint (PCA on the
      Adam-preconditioned ones when the training features are preconditioned; kron-PCA on the layer factors)
      or built from its seed (random projections), saved with its basis hash.
  (c) training features: per checkpoint, Adam-preconditioned (LESS) per-example LoRA gradients of the whole pool,
      reduced, on a Ray Data actor pool, into a resumable sharded feature store.
  (d) target features: per checkpoint, plain per-example gradients of the target examples.
  (e) scores and selection: cosine (or inner product) per checkpoint, weighted by the checkpoint's learning
      rate, max over target tasks of the mean over each task's examples; the top fraction written as a
      selection file (id, score, rank) and as a training subset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

import trustray
from trustray.artifacts import atomic_folder, check_metadata, read_metadata, write_metadata
from trustray.config import BaseConfig, PipelineConfig, PoolResources, TrainWorkerResources
from trustray.core.influence.warmup import LoraSettings, WarmupSettings
from trustray.core.lm.batching import ResponseTruncatedError, encode_chat
from trustray.core.lm.prefix import skipped_prefix
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import prepare_output
from trustray.pipelines.training import TrainingPlan, WorkerContext, read_step, run_training

logger = logging.getLogger(__name__)

WARMUP_KIND = "influence_warmup"
WARMUP_DIR = "warmup"
CHECKPOINTS_DIR = "checkpoints"  # the warmup's, under its folder


class InfluenceDataSettings(BaseConfig):
    """Which examples form the training pool and the warmup subset, and how they are tokenized."""

    pool: str = Field(
        "wiki",
        description="'wiki' (chat examples built from the bundled Wikipedia intros), a JSONL/Parquet file of rows "
        "{id, messages: [{role, content}, ...], topic}, or a Hugging Face dataset (hf:<name> or a saved folder).",
    )
    n_train: int | None = Field(None, ge=1, description="Training-pool size (None: every example available).")
    n_target_per_topic: int = Field(8, ge=1, description="Held-out target examples per topic (wiki pool only).")
    warmup_fraction: float = Field(
        0.05, gt=0, le=1, description="Fraction of the pool the LoRA warmup trains on (LESS uses 5%)."
    )
    max_length: int = Field(256, ge=8, description="Tokens per example; longer ones lose their end.")
    seed: int = Field(0, description="Seeds the pool construction and the choice of the warmup subset.")


class FeatureSettings(BaseConfig):
    """How gradients become features (stages b-d)."""

    reduction: str = Field("sjlt", description="A name from trustray.core.influence.reductions.REDUCTIONS.")
    dim: int | None = Field(8192, ge=1, description="Feature dimension (None with `none`: the LoRA size).")
    seed: int = Field(0, description="Seed of random projections (identical on every worker).")
    options: dict[str, Any] = Field(default_factory=dict, description="Reduction options, e.g. {init: pca} for kron.")
    fit_sample: int = Field(64, ge=2, description="Pool examples whose gradients fit PCA-type reductions.")
    checkpoints: Literal["all", "last"] = Field("all", description="Warmup checkpoints to compute features at.")
    precondition: bool = Field(True, description="Adam-preconditioned training features (LESS); targets stay SGD.")
    shard_size: int = Field(256, ge=1, description="Examples per feature-store shard (the unit of resume).")
    micro_batch_size: int = Field(8, ge=1, description="Examples per forward/backward pass in a worker.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored feature precision.")


class ScoringSettings(BaseConfig):
    """How features become scores and a selection (stage e)."""

    metric: Literal["cosine", "inner_product"] = Field("cosine", description="LESS uses cosine.")
    top_fraction: float = Field(0.05, gt=0, le=1, description="Fraction of the pool selected.")
    targets: str | None = Field(
        None,
        description="JSONL/Parquet of target rows {id, messages, task}; None with the wiki pool: held-out intros, "
        "one task per topic.",
    )


class InfluenceConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/influence"

    model: str = Field(DEFAULT_CHAT_MODEL, description="Base chat model: built-in name, local folder or HF id.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Base model weights during training.")
    data: InfluenceDataSettings = Field(default_factory=InfluenceDataSettings, description="Pool and warmup subset.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters.")
    warmup: WarmupSettings = Field(default_factory=WarmupSettings, description="Warmup optimisation.")
    train_resources: TrainWorkerResources = Field(default_factory=TrainWorkerResources, description="Warmup workers.")
    features: FeatureSettings = Field(default_factory=FeatureSettings, description="Gradient features.")
    scoring: ScoringSettings = Field(default_factory=ScoringSettings, description="Scores and selection.")
    feature_resources: PoolResources = Field(
        default_factory=lambda: PoolResources(torch_threads=1), description="Feature actors (each holds the model)."
    )


def load_pool(data: InfluenceDataSettings) -> list[dict[str, Any]]:
    """The training pool as validated chat rows `{id, messages, topic, ...}` (wiki pool: targets held out)."""
    # Imported here: the instruction-data module is only needed when a run starts, not to build a config.
    from trustray.data.instructions import load_instruction_dataset

    return load_instruction_dataset(
        data.pool, n_train=data.n_train, n_target_per_topic=data.n_target_per_topic, seed=data.seed,
        limit=data.n_train,
    )


def warmup_subset(pool: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """A seeded random `fraction` of the pool (at least one example), in pool order."""
    count = max(1, round(fraction * len(pool)))
    chosen = sorted(random.Random(seed).sample(range(len(pool)), count))
    return [pool[i] for i in chosen]


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """Hash of the ids and conversations, so an edited pool file with the same ids is not taken as unchanged."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(str(row["id"]).encode("utf-8") + b"\0")
        digest.update(json.dumps(row["messages"], sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def warmup_expected_metadata(config: InfluenceConfig, subset: list[dict[str, Any]]) -> dict[str, Any]:
    """What a finished warmup must agree on to be reused (resources count: workers change the batch)."""
    data = config.data
    return {
        "kind": WARMUP_KIND,
        "model": config.model,
        "model_fingerprint": model_fingerprint(config.model),
        "dtype": config.dtype,
        "lora": config.lora.model_dump(mode="json"),
        "warmup": config.warmup.model_dump(mode="json"),
        "data": {
            "pool": data.pool,
            "n_train": data.n_train,
            "warmup_fraction": data.warmup_fraction,
            "max_length": data.max_length,
            "seed": data.seed,
        },
        "warmup_rows_fingerprint": rows_fingerprint(subset),
        "num_workers": config.train_resources.num_workers,
        "trustray_version": trustray.__version__,
    }


def encode_subset(model: str, subset: list[dict[str, Any]], max_length: int) -> tuple[list[dict], list[str]]:
    """Encode the warmup rows; rows whose response is cut off entirely are skipped and returned by id."""
    from trustray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    encoded: list[dict] = []
    skipped: list[str] = []
    for row in subset:
        try:
            encoded.append(encode_chat(tokenizer, row["messages"], max_length))
        except ResponseTruncatedError:
            skipped.append(str(row["id"]))
    if skipped:
        logger.warning("skipped %d warmup examples whose response does not fit max_length=%d",
                       len(skipped), max_length)
    if not encoded:
        raise ValueError(f"no warmup example fits max_length={max_length}")
    return encoded, skipped


class LoraWarmupTraining:
    """The warmup task (`trustray.pipelines.training`): one `LoraTrainer` step per step; each checkpoint holds
    the adapter, AdamW state and schedule (the folders `CheckpointGradients` reads), its history entry the step's
    loss, learning rate and epoch. `data` (see `train_lora_warmup`): model, dtype, lora, warmup, examples,
    frozen_prefix."""

    def __init__(self, data: dict[str, Any], context: WorkerContext):
        import torch

        from trustray.core.influence.warmup import LoraTrainer, add_lora
        from trustray.models.loading import load_causal_lm

        settings: WarmupSettings = data["warmup"]
        # Built on the CPU and moved afterwards, so the LoRA initialisation does not depend on the device.
        model = load_causal_lm(data["model"], "cpu", data["dtype"])
        # Same seed on every rank: identical LoRA initialisation (DDP also broadcasts rank 0's weights).
        torch.manual_seed(settings.seed)
        model = add_lora(model, data["lora"])
        if context.world_size > 1:
            import ray.train.torch

            model = ray.train.torch.prepare_model(model, move_to_device=context.device)  # wraps it in DDP
        else:  # nothing to wrap: the task then needs no Ray Train session (tests run it in-process)
            model = model.to(context.device)
        self.trainer = LoraTrainer(model, data["examples"], settings, context.rank, context.world_size)
        self.frozen_prefix = data["frozen_prefix"]

    def begin(self) -> list[dict[str, Any]]:
        return []

    def train_step(self, step: int) -> dict[str, float]:
        # Examples that carry the frozen layers' cached output bypass those layers (Llama-shaped models only,
        # hence no context at all without a prefix).
        prefix = self.frozen_prefix
        with skipped_prefix(self.trainer.peft_model, prefix) if prefix else contextlib.nullcontext():
            return self.trainer.step(step)

    def checkpoint_metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        return window[-1]  # the checkpoint step's own: its learning rate weights the checkpoint's scores

    def save(self, folder: Path) -> None:
        self.trainer.save(folder)

    def load(self, folder: Path) -> None:
        self.trainer.load(folder)


def train_lora_warmup(
    folder: Path, examples: list[dict[str, Any]], *, model: str, dtype: str, lora: LoraSettings,
    warmup: WarmupSettings, resources: TrainWorkerResources, frozen_prefix: int = 0,
) -> list[dict[str, Any]]:
    """Train LoRA on encoded `examples` with Ray Train: the warmup of both influence pipelines.

    Checkpoints (adapter, AdamW state, schedule, `checkpoint.json`; see `core.influence.warmup.LoraTrainer.save`)
    land in `folder/checkpoints/step-<n>`; returns `[{step, epoch, learning_rate, path}]` in step order, `path`
    relative to `folder`. A warmup killed part-way resumes from its newest checkpoint, so the caller must make
    sure `folder` holds no warmup made with other settings. Examples may carry the cached output of the
    `frozen_prefix` lowest decoder layers, which training then bypasses.
    """
    from trustray.core.influence.warmup import checkpoint_steps, steps_per_epoch

    epoch_steps = steps_per_epoch(len(examples), warmup, resources.num_workers)
    plan = TrainingPlan(folder / CHECKPOINTS_DIR, epoch_steps * warmup.epochs, checkpoint_steps(epoch_steps, warmup))
    data = {"model": model, "dtype": dtype, "lora": lora, "warmup": warmup, "examples": examples,
            "frozen_prefix": frozen_prefix}
    final = run_training(LoraWarmupTraining, data, plan, resources, folder, data_parallel=True)
    return [
        {"step": entry["step"], "epoch": entry["epoch"], "learning_rate": entry["learning_rate"],
         "path": f"{CHECKPOINTS_DIR}/step-{entry['step']}"}
        for entry in read_step(final)["history"]
    ]


def checkpoint_name(checkpoint: dict[str, Any]) -> str:
    """The name of what is computed at a warmup checkpoint (feature stores, scores): its folder's, `step-<n>`."""
    return Path(checkpoint["path"]).name


def run_warmup(config: InfluenceConfig, pool: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage (a): train (or reuse) the warmup LoRA checkpoints; returns the warmup metadata."""
    warmup_dir = config.output_path() / WARMUP_DIR
    subset = warmup_subset(pool, config.data.warmup_fraction, config.data.seed)
    expected = warmup_expected_metadata(config, subset)
    if check_metadata(warmup_dir, expected, kind="influence warmup"):
        logger.info("reusing the finished warmup at %s", warmup_dir)
        return read_warmup_metadata(warmup_dir)
    # An unfinished warmup resumes from its checkpoints, but only one made with the same settings.
    if not check_metadata(warmup_dir / CHECKPOINTS_DIR, expected, kind="influence warmup checkpoints"):
        write_metadata(warmup_dir / CHECKPOINTS_DIR, expected)
    examples, skipped = encode_subset(config.model, subset, config.data.max_length)
    logger.info("warmup: %d of %d pool examples, %d epochs, into %s",
                len(examples), len(pool), config.warmup.epochs, warmup_dir)
    start = time.perf_counter()
    checkpoints = train_lora_warmup(
        warmup_dir, examples, model=config.model, dtype=config.dtype, lora=config.lora, warmup=config.warmup,
        resources=config.train_resources,
    )
    seconds = time.perf_counter() - start
    metadata = write_metadata(
        warmup_dir,
        {
            **expected,
            "checkpoints": checkpoints,
            "num_examples": len(examples),
            "skipped_ids": skipped,
            "pool_size": len(pool),
            "train_seconds": round(seconds, 2),
        },
    )
    logger.info("warmup finished in %.1f s: %d checkpoints in %s", seconds, len(checkpoints), warmup_dir)
    return metadata


def read_warmup_metadata(warmup_dir: Path) -> dict[str, Any]:
    metadata = read_metadata(warmup_dir)
    if metadata is None:
        raise FileNotFoundError(f"no finished warmup at {warmup_dir}")
    return metadata


# -- stage (b): the reduction ---------------------------------------------------------------------------
def load_targets(config: InfluenceConfig) -> list[dict[str, Any]]:
    """Target rows `{id, messages, task}`: the wiki pool's held-out intros (one task per topic) or a file."""
    if config.scoring.targets is None:
        if config.data.pool != "wiki":
            raise ValueError("scoring.targets is required when the pool is not 'wiki'")
        from trustray.data.instructions import build_instruction_pool

        _, targets = build_instruction_pool(config.data.n_train, config.data.n_target_per_topic, config.data.seed)
        return targets
    from trustray.data.instructions import load_instruction_dataset

    rows = load_instruction_dataset(config.scoring.targets)
    return [{**row, "task": str(row.get("task") or "target")} for row in rows]


def encodable(model: str, rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """The rows whose response survives truncation to `max_length` (the others have no loss tokens)."""
    _, skipped = encode_subset(model, rows, max_length)
    dropped = set(skipped)
    return [row for row in rows if str(row["id"]) not in dropped]


def checkpoint_dirs(config: InfluenceConfig, warmup: dict[str, Any]) -> list[dict[str, Any]]:
    """The warmup checkpoints features are computed at (all, or the last), each with its absolute path."""
    chosen = warmup["checkpoints"] if config.features.checkpoints == "all" else warmup["checkpoints"][-1:]
    folder = config.output_path().resolve() / WARMUP_DIR
    return [{**item, "dir": str(folder / item["path"])} for item in chosen]


def sample_gradients(config: InfluenceConfig, checkpoint_dir: str, rows: list[dict[str, Any]], precondition: bool) -> Any:
    """Per-example gradients of `rows` at one checkpoint, in this process (to fit the reduction).

    With `precondition`, the flat Adam-preconditioned gradients `[n, D]`: a fitted basis must describe the
    features it will reduce, and training features are preconditioned. Otherwise the gradient batches (kron
    needs their layer factors).
    """
    from trustray.core.influence.checkpoint import CheckpointGradients
    from trustray.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    gradients = CheckpointGradients.load(
        checkpoint_dir, load_causal_lm(config.model, "cpu", config.dtype), precondition,
        config.features.micro_batch_size, tokenizer.pad_token_id,
    )
    encoded = [encode_chat(tokenizer, row["messages"], config.data.max_length) for row in rows]
    return gradients.flat(encoded, precondition=True) if precondition else list(gradients.batches(encoded))


def run_reduction(config: InfluenceConfig, pool: list[dict[str, Any]], warmup: dict[str, Any]) -> Path:
    """Stage (b): build the reduction, fit it when it learns from data, save it; returns its folder."""
    from trustray.core.influence.checkpoint import check_preconditionable
    from trustray.core.influence.reductions import build_reduction

    settings = config.features
    folder = config.output_path() / "reduction"
    last = checkpoint_dirs(config, warmup)[-1]
    expected = {
        "kind": "influence_reduction",
        "features": settings.model_dump(
            mode="json", include={"reduction", "dim", "seed", "options", "fit_sample", "precondition"}
        ),
        "warmup_rows_fingerprint": warmup["warmup_rows_fingerprint"],
        "fitted_at_step": last["step"],
    }
    if check_metadata(folder, expected, kind="influence reduction"):
        return folder
    reduction = build_reduction(settings.reduction, settings.dim, settings.seed, **settings.options)
    check_preconditionable(reduction, settings.precondition)
    # Random projections only need the gradient size; fitted ones get the whole sample.
    count = settings.fit_sample if reduction.fitted else 2
    sample = [pool[i] for i in sorted(random.Random(settings.seed).sample(range(len(pool)), min(count, len(pool))))]
    start = time.perf_counter()
    reduction.fit(sample_gradients(config, last["dir"], sample, settings.precondition and reduction.fitted))
    with atomic_folder(folder) as tmp:
        reduction.save(tmp)
        write_metadata(tmp, {**expected, "state": reduction.state(), "fit_seconds": round(time.perf_counter() - start, 2)})
    logger.info("reduction %s: %s -> %s dims, saved in %s", reduction.name, reduction.input_dim, reduction.dim, folder)
    return folder


# -- stages (c) and (d): training and target features ---------------------------------------------------
def run_features(
    config: InfluenceConfig, rows: list[dict[str, Any]], role: Literal["train", "target"],
    warmup: dict[str, Any], reduction_dir: Path,
) -> list[Any]:
    """Feature stores of `rows` at every chosen checkpoint (Adam-preconditioned training rows when configured)."""
    from trustray.actors.influence import extract_features
    from trustray.core.influence.reductions import Reduction

    settings = config.features
    reduction = Reduction.load(reduction_dir)
    precondition = settings.precondition and role == "train"
    fingerprint = rows_fingerprint(rows)  # hashed once: the pool can be millions of rows
    stores = []
    for checkpoint in checkpoint_dirs(config, warmup):
        folder = config.output_path() / "features" / role / checkpoint_name(checkpoint)
        metadata = {
            "kind": "influence_features",
            "role": role,
            "model": config.model,
            "model_fingerprint": warmup["model_fingerprint"],
            "lora": warmup["lora"],
            "checkpoint_step": checkpoint["step"],
            "checkpoint_learning_rate": checkpoint["learning_rate"],
            "reduction": reduction.state(),
            "precondition": precondition,
            "max_length": config.data.max_length,
            "rows_fingerprint": fingerprint,
        }
        store = extract_features(
            rows, store_dir=str(folder), store_metadata=metadata, dim=int(reduction.dim), dtype=settings.dtype,
            model_source=config.model, checkpoint_dir=checkpoint["dir"], reduction_dir=str(reduction_dir),
            max_length=config.data.max_length, shard_size=settings.shard_size,
            micro_batch_size=settings.micro_batch_size, precondition=precondition, resources=config.feature_resources,
        )
        stores.append(store)
    return stores


# -- stage (e): scores and selection --------------------------------------------------------------------
def run_selection(
    config: InfluenceConfig, pool: list[dict[str, Any]], targets: list[dict[str, Any]],
    warmup: dict[str, Any], train_stores: list[Any], target_stores: list[Any],
) -> Path:
    """LESS scores over checkpoints and target tasks, the top fraction as selection and subset files."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trustray.core.influence.scoring import (
        aggregate_targets,
        combine_checkpoints,
        export_subset,
        influence_scores,
        select_top_fraction,
        write_selection,
    )

    metric = config.scoring.metric
    checkpoints = checkpoint_dirs(config, warmup)
    per_checkpoint, rates = [], []
    ids: list[str] = []
    target_ids: list[str] = []
    for checkpoint, train_store, target_store in zip(checkpoints, train_stores, target_stores, strict=True):
        ids, train_blocks = train_store.load_blocks()
        target_ids, target_features = target_store.load()
        per_checkpoint.append(influence_scores(train_blocks, np.asarray(target_features, np.float32), metric))
        rates.append(checkpoint["learning_rate"])
    task_of = {str(row["id"]): row["task"] for row in targets}
    scores = aggregate_targets(combine_checkpoints(per_checkpoint, rates), [task_of[i] for i in target_ids])
    selection = select_top_fraction(scores, ids, config.scoring.top_fraction)

    folder = config.output_path() / "selection"
    with atomic_folder(folder) as tmp:
        pq.write_table(pa.table({"id": ids, "score": scores.astype(np.float32)}), tmp / "scores.parquet")
        write_selection(selection, tmp / "selection.jsonl")
        export_subset(selection, pool, tmp / "subset.jsonl")
        write_metadata(tmp, {
            "kind": "influence_selection", "metric": metric, "top_fraction": config.scoring.top_fraction,
            "checkpoints": [c["step"] for c in checkpoints], "learning_rates": rates,
            "num_pool": len(ids), "num_targets": len(target_ids), "num_selected": len(selection),
            "tasks": sorted(set(task_of.values())),
        })
    logger.info("selected %d of %d examples into %s", len(selection), len(ids), folder)
    return folder


def run(config: InfluenceConfig) -> Path:
    """Run the influence pipeline described by `config` (stages a-e); returns its output folder."""
    folder = prepare_output(config)
    pool = load_pool(config.data)
    if not pool:
        raise ValueError(f"the training pool {config.data.pool!r} is empty")
    warmup = run_warmup(config, pool)
    pool = encodable(config.model, pool, config.data.max_length)
    targets = encodable(config.model, load_targets(config), config.data.max_length)
    reduction_dir = run_reduction(config, pool, warmup)
    train_stores = run_features(config, pool, "train", warmup, reduction_dir)
    target_stores = run_features(config, targets, "target", warmup, reduction_dir)
    run_selection(config, pool, targets, warmup, train_stores, target_stores)
    return folder


PIPELINE = {"config": InfluenceConfig, "run": run}


if __name__ == "__main__":
    # Run through the importable module, not `__main__`: Ray pickles functions defined in `__main__` by value,
    # and workers cannot resolve their module-level helpers.
    from trustray.pipelines import run_module

    run_module("influence")
