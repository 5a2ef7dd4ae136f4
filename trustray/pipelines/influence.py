"""Data influence à la LESS on Ray: warm up LoRA adapters, then (later stages) score training examples by
their gradient features against target tasks.

    python -m trustray.pipelines.influence --config configs/influence/cpu.yaml [key=value ...]

Stages, each reusing its finished artifact under `output_dir` when the settings match:
  (a) warmup: LoRA training on a random subset of the pool with Ray Train; checkpoints with AdamW state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

import trustray
from trustray.artifacts import check_metadata, read_metadata, write_metadata
from trustray.config import BaseConfig
from trustray.core.influence.batching import ResponseTruncatedError, encode_chat
from trustray.core.influence.warmup import LoraSettings, WarmupSettings
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint, resolve_model_source

logger = logging.getLogger(__name__)

WARMUP_KIND = "influence_warmup"
WARMUP_DIR = "warmup"


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


class TrainResources(BaseConfig):
    """Ray Train workers for the warmup; kept apart from the algorithm settings."""

    num_workers: int = Field(1, ge=1, description="Data-parallel training workers (DDP when more than one).")
    num_cpus_per_worker: float = Field(1.0, ge=0, description="CPUs reserved per worker.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    torch_threads: int = Field(
        1, ge=1, description="torch threads per worker; more threads than free cores makes training much slower."
    )


class InfluenceConfig(BaseConfig):
    name: str = Field("default", description="Run name; the default output folder is outputs/influence/<name>.")
    model: str = Field(DEFAULT_CHAT_MODEL, description="Base chat model: built-in name, local folder or HF id.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Base model weights during training.")
    data: InfluenceDataSettings = Field(default_factory=InfluenceDataSettings, description="Pool and warmup subset.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters.")
    warmup: WarmupSettings = Field(default_factory=WarmupSettings, description="Warmup optimisation.")
    output_dir: str | None = Field(None, description="Artifact folder (default outputs/influence/<name>).")
    train_resources: TrainResources = Field(default_factory=TrainResources, description="Warmup workers.")

    def output_path(self) -> Path:
        return Path(self.output_dir or f"outputs/influence/{self.name}")


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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(model))
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


def warmup_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train loop: load the model, add LoRA, train; rank 0 writes and reports each checkpoint."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    from trustray.core.influence.warmup import add_lora, save_checkpoint, train_lora
    from trustray.runtime import setup_logging

    config = InfluenceConfig.model_validate(loop_config["config"])
    torch.set_num_threads(config.train_resources.torch_threads)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        setup_logging()
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_source(config.model), dtype=getattr(torch, config.dtype)
    )
    # Same seed on every rank: identical LoRA initialisation (DDP also broadcasts rank 0's weights).
    torch.manual_seed(config.warmup.seed)
    model = add_lora(model, config.lora)
    # Moves to this worker's device; wraps in DDP only when there is more than one worker.
    model = ray.train.torch.prepare_model(model)

    def on_checkpoint(step: int, learning_rate: float, peft_model: Any, optimizer: Any, epoch: float) -> None:
        metrics = {"step": step, "learning_rate": learning_rate, "epoch": epoch}
        if rank != 0:
            ray.train.report(metrics)  # every rank must report: it is a barrier
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_checkpoint(Path(tmp) / "checkpoint", peft_model, optimizer, step, learning_rate, epoch)
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=f"checkpoint-{step}"
            )

    train_lora(model, loop_config["examples"], config.warmup, on_checkpoint, rank=rank, world_size=world_size)


def run_warmup(config: InfluenceConfig, pool: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage (a): train (or reuse) the warmup LoRA checkpoints; returns the warmup metadata."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trustray.actors.cluster import init_ray

    warmup_dir = config.output_path() / WARMUP_DIR
    subset = warmup_subset(pool, config.data.warmup_fraction, config.data.seed)
    expected = warmup_expected_metadata(config, subset)
    if check_metadata(warmup_dir, expected, kind="influence warmup"):
        logger.info("reusing the finished warmup at %s", warmup_dir)
        return read_warmup_metadata(warmup_dir)
    if warmup_dir.exists():
        # No metadata: a run that did not finish. Its checkpoints may be partial; start over.
        logger.info("removing the unfinished warmup at %s", warmup_dir)
        shutil.rmtree(warmup_dir)
    examples, skipped = encode_subset(config.model, subset, config.data.max_length)
    logger.info("warmup: %d of %d pool examples, %d epochs, into %s",
                len(examples), len(pool), config.warmup.epochs, warmup_dir)

    init_ray()
    resources = config.train_resources
    trainer = TorchTrainer(
        warmup_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "examples": examples},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.num_cpus_per_worker},
        ),
        # Ray persists each reported checkpoint as <output_dir>/warmup/checkpoint-<step>.
        run_config=RunConfig(name=WARMUP_DIR, storage_path=str(config.output_path().resolve())),
    )
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    checkpoints = sorted(
        (
            {
                "step": int(metrics["step"]),
                "epoch": float(metrics["epoch"]),
                "learning_rate": float(metrics["learning_rate"]),
                "path": Path(checkpoint.path).name,
            }
            for checkpoint, metrics in (result.best_checkpoints or [])
        ),
        key=lambda item: item["step"],
    )
    if not checkpoints:
        raise RuntimeError(f"the warmup at {warmup_dir} reported no checkpoint")
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


def run(config: InfluenceConfig) -> Path:
    """Run the influence pipeline described by `config` (currently stage (a), the LoRA warmup); returns its
    output folder."""
    pool = load_pool(config.data)
    if not pool:
        raise ValueError(f"the training pool {config.data.pool!r} is empty")
    run_warmup(config, pool)
    return config.output_path()


PIPELINE = {"config": InfluenceConfig, "run": run}


def main(argv: list[str] | None = None) -> Path:
    from trustray.pipelines import pipeline_main

    return pipeline_main(PIPELINE, argv, prog="python -m trustray.pipelines.influence")


if __name__ == "__main__":
    # Run through the importable module, not `__main__`: Ray pickles functions defined in `__main__` by value,
    # and workers cannot resolve their module-level helpers.
    from trustray.pipelines.influence import main as module_main

    module_main()
