"""How good a proxy is a reduced LoRA gradient? Fidelity, LDS and data selection, measured.

    trustray eval influence --config configs/eval_influence/cpu.yaml [key=value ...]
    python -m trustray.pipelines.eval_influence --config configs/eval_influence/tiny.yaml

Steps; the heavy ones run on Ray with `resources` (task bodies in `eval_influence_tasks`, algorithms in
`trustray.core.influence`), and each finished one is reused from `output_dir`:
  1. data: a training pool, a disjoint fit sample (PCA-type reductions are fitted on it, so they are scored
     out of sample) and per-topic target tasks; all tokenized once. When LoRA adapts only the top decoder
     layers, the frozen layers below run once per example and their output is cached (core/lm/prefix).
  2. warmup: LoRA trained on a random fraction of the pool, with checkpoints and AdamW state (LESS step 1),
     by the influence pipeline's Ray Train warmup.
  3. scores: per checkpoint, exact per-example LoRA gradients of fit sample, pool and targets; every reduction
     at every dim; score matrices [pool x target] for two feature kinds, `sgd` (plain gradients) and `adam`
     (pool gradients Adam-preconditioned, LESS), and two metrics (cosine, inner product). Checkpoints are
     combined weighted by their learning rate.
  4. fidelity: Spearman and top-1% / top-5% overlap of each reduced LESS score with the exact one.
  5. LDS: `lds.n_subsets` fresh LoRA trainings on random subsets; every target's loss against the summed
     scores of the subset, per reduction and dim.
  6. selection: fresh LoRA trained on the top fraction by each method, on random fractions and on the whole
     pool; mean target loss.
  7. report: JSON and PNG plots under `output_dir/report` (and copied to `results_dir` when set).

Tasks write checkpoints under `output_dir`, so on a multi-node cluster it must be storage every node mounts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from trustray.artifacts import ArtifactMismatchError, atomic_write_text, check_metadata, write_metadata
from trustray.config import ActorResources, BaseConfig, PipelineConfig, TrainWorkerResources
from trustray.core.influence.comparison import FeatureGrid
from trustray.core.influence.evaluation import (
    fidelity_report,
    lds_report,
    selection_methods,
    selection_report,
)
from trustray.core.influence.warmup import LoraSettings, WarmupSettings
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import gather, prepare_output
from trustray.pipelines.eval_influence_report import format_table, write_report
from trustray.pipelines.eval_influence_tasks import base_losses_task, cache_prefix, retrain_task, score_task
from trustray.pipelines.influence import checkpoint_name, train_lora_warmup
from trustray.runtime import machine_info

logger = logging.getLogger(__name__)

KIND = "influence_evaluation"


class EvalDataSettings(BaseConfig):
    """The pool scored and retrained on, the fit sample and the targets (from the bundled Wikipedia intros)."""

    n_pool: int = Field(256, ge=8, description="Training-pool examples scored, subsampled for LDS and selected from.")
    n_fit: int = Field(256, ge=2, description="Further pool-like examples that PCA-type reductions are fitted on.")
    n_target_per_topic: int = Field(4, ge=1, description="Held-out target examples per topic (one task per topic).")
    max_length: int = Field(64, ge=8, description="Tokens per example; longer ones lose their end.")
    max_chars: int | None = Field(200, ge=1, description="Intro characters kept per response (None: whole intro).")
    seed: int = Field(0, description="Seeds the pool, fit sample and targets.")


class LdsSettings(BaseConfig):
    """Retrains on random subsets for the linear datamodeling score."""

    n_subsets: int = Field(50, ge=2, description="LoRA models trained, each on its own random subset.")
    subset_fraction: float = Field(0.5, gt=0, lt=1, description="Fraction of the pool each model trains on.")
    seed: int = Field(0, description="Seeds the subsets.")
    train: WarmupSettings = Field(default_factory=WarmupSettings, description="Optimisation of every retrain.")


class SelectionSettings(BaseConfig):
    """Fine-tuning on selected subsets (LESS step 4) against random subsets and the whole pool."""

    top_fraction: float = Field(0.05, gt=0, lt=1, description="Fraction of the pool selected.")
    dim: int = Field(
        2048, ge=1, description="Each reduction selects with its largest evaluated dim up to this one."
    )
    random_seeds: int = Field(3, ge=1, description="Random selections of the same size trained on.")
    train: WarmupSettings = Field(default_factory=WarmupSettings, description="Optimisation of every fine-tune.")


class EvalInfluenceConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/eval_influence"

    model: str = Field(DEFAULT_CHAT_MODEL, description="Base chat model: built-in name, local folder or HF id.")
    data: EvalDataSettings = Field(default_factory=EvalDataSettings, description="Pool, fit sample, targets.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters (warmup and retrains).")
    warmup: WarmupSettings = Field(default_factory=WarmupSettings, description="The warmup the scores come from.")
    warmup_fraction: float = Field(0.25, gt=0, le=1, description="Fraction of the pool the warmup trains on.")
    features: FeatureGrid = Field(default_factory=FeatureGrid, description="Reductions and dims.")
    lds: LdsSettings = Field(default_factory=LdsSettings, description="Linear datamodeling score.")
    selection: SelectionSettings = Field(default_factory=SelectionSettings, description="Selection fine-tunes.")
    resources: ActorResources = Field(
        default_factory=lambda: ActorResources(torch_threads=1),
        description="Resources of each Ray task and of the warmup's one Ray Train worker.",
    )
    results_dir: str | None = Field(None, description="Also copy the report's JSON and PNG files here.")


def expected_metadata(config: EvalInfluenceConfig) -> dict[str, Any]:
    return {
        "kind": KIND,
        "model": config.model,
        "model_fingerprint": model_fingerprint(config.model),
        "settings": config.model_dump(mode="json", include={"data", "lora", "warmup", "warmup_fraction", "features"}),
    }


def open_output(config: EvalInfluenceConfig) -> Path:
    """The output folder (emptied first with force=true); one made with other settings is refused."""
    folder = prepare_output(config)
    expected = expected_metadata(config)
    if not check_metadata(folder, expected, kind="influence evaluation"):
        folder.mkdir(parents=True, exist_ok=True)
        write_metadata(folder, expected)
    return folder


def reset_if_changed(folder: Path, expected: dict[str, Any], what: str) -> None:
    """Start `folder` afresh when its results were made with other settings (they would not apply)."""
    try:
        if check_metadata(folder, expected, kind=what):
            return
    except ArtifactMismatchError:
        logger.warning("%s settings changed: discarding the results in %s", what, folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_metadata(folder, expected)


def _sha(value: np.ndarray | str) -> str:
    data = value.encode() if isinstance(value, str) else np.ascontiguousarray(value).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _remote(function: Any, config: EvalInfluenceConfig) -> Any:
    import ray

    return ray.remote(**config.resources.ray_options(), max_retries=1)(function)


# -- 1. data ----------------------------------------------------------------------------------------
def build_examples(config: EvalInfluenceConfig) -> dict[str, Any]:
    """Rows and token ids of pool, fit sample and targets; rows whose response is truncated away are dropped."""
    from trustray.core.lm.batching import ResponseTruncatedError, encode_chat
    from trustray.data.instructions import build_instruction_pool
    from trustray.models.loading import load_tokenizer

    data = config.data
    rows, targets = build_instruction_pool(
        data.n_pool + data.n_fit, data.n_target_per_topic, data.seed, max_chars=data.max_chars
    )
    if len(rows) < data.n_pool + data.n_fit:
        raise ValueError(f"the corpus has {len(rows)} pool examples, fewer than n_pool + n_fit")
    random.Random(data.seed).shuffle(rows)
    tokenizer = load_tokenizer(config.model)

    def encode(group: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        kept, encoded = [], []
        for row in group:
            try:
                encoded.append(encode_chat(tokenizer, row["messages"], data.max_length))
            except ResponseTruncatedError:
                continue
            kept.append(row)
        return kept, encoded

    split = {"pool": rows[: data.n_pool], "fit": rows[data.n_pool :], "targets": targets}
    out: dict[str, Any] = {}
    for name, group in split.items():
        out[f"{name}_rows"], out[name] = encode(group)
    out["tasks"] = [row["task"] for row in out["targets_rows"]]
    return out


def run_prefix_cache(config: EvalInfluenceConfig, folder: Path, data: dict[str, Any]) -> tuple[int, dict[str, list]]:
    """Groups whose examples carry their cached prefix output; computed once, then read from `prefix.pt`."""
    import os

    import ray
    import torch

    from trustray.core.lm.prefix import with_states

    names = ("pool", "fit", "targets")
    path = folder / "prefix.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        layers, states = saved["layers"], saved["states"]
    else:
        layers, states = ray.get(_remote(cache_prefix, config).remote(config, {name: data[name] for name in names}))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"layers": layers, "states": states}, tmp)
        os.replace(tmp, path)
    if layers == 0:
        return 0, {name: data[name] for name in names}
    return layers, {name: with_states(data[name], states[name]) for name in names}


def run_warmup(config: EvalInfluenceConfig, folder: Path, pool: list[dict], prefix: int) -> list[dict]:
    """The warmup's checkpoints `[{path, step, learning_rate}]`; trained once, then read from `checkpoints.json`."""
    warmup_dir = folder / "warmup"
    done = warmup_dir / "checkpoints.json"
    if done.is_file():
        return json.loads(done.read_text())
    # No checkpoints.json: a warmup that did not finish resumes from its checkpoints (`open_output` refused the
    # folder if its settings differ).
    count = max(1, round(config.warmup_fraction * len(pool)))
    subset = [pool[i] for i in sorted(random.Random(config.warmup.seed).sample(range(len(pool)), count))]
    logger.info("warmup: LoRA on %d of %d pool examples", count, len(pool))
    # One Ray Train worker with a task's resources (threads: the worker's default unless set).
    resources = config.resources
    threads = {} if resources.torch_threads is None else {"torch_threads": resources.torch_threads}
    worker = TrainWorkerResources(num_workers=1, num_cpus=resources.num_cpus, use_gpu=resources.num_gpus > 0,
                                  custom_resources=resources.custom_resources, **threads)
    trained = train_lora_warmup(warmup_dir, subset, model=config.model, dtype="float32", lora=config.lora,
                                warmup=config.warmup, resources=worker, frozen_prefix=prefix)
    checkpoints = [{"path": c["path"], "step": c["step"], "learning_rate": c["learning_rate"]} for c in trained]
    atomic_write_text(done, json.dumps(checkpoints, indent=2))
    return checkpoints


def run_scores(config: EvalInfluenceConfig, folder: Path, groups_ref: Any, prefix: int,
               checkpoints: list[dict]) -> tuple[dict[str, np.ndarray], dict]:
    """Learning-rate-weighted score matrices over the checkpoints (each checkpoint's scores saved as it ends)."""
    from trustray.core.influence.scoring import combine_checkpoints

    score_dir = folder / "scores"
    score_dir.mkdir(exist_ok=True)
    names = [checkpoint_name(checkpoint) for checkpoint in checkpoints]
    refs = {}
    for name, checkpoint in zip(names, checkpoints, strict=True):
        if not (score_dir / f"{name}.json").is_file():
            refs[name] = _remote(score_task, config).remote(
                config, str(folder / "warmup" / checkpoint["path"]), groups_ref, prefix
            )

    def save(name: str, result: dict) -> None:
        np.savez(score_dir / f"{name}.npz", **result["scores"])
        atomic_write_text(score_dir / f"{name}.json", json.dumps(result["info"], indent=2))

    gather(refs, "scores per checkpoint", save)
    per_checkpoint = [np.load(score_dir / f"{name}.npz") for name in names]
    rates = [c["learning_rate"] for c in checkpoints]
    combined = {key: combine_checkpoints([s[key] for s in per_checkpoint], rates) for key in per_checkpoint[0].files}
    return combined, json.loads((score_dir / f"{names[-1]}.json").read_text())


def run_lds(config: EvalInfluenceConfig, folder: Path, pool_ref: Any, targets_ref: Any, n_pool: int,
            prefix: int, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Retrain on random subsets (each result saved as it ends) and score every method by LDS."""
    from trustray.core.influence.lds import random_subsets

    settings = config.lds
    masks = random_subsets(n_pool, settings.n_subsets, settings.subset_fraction, settings.seed)
    lds_dir = folder / "lds"
    reset_if_changed(lds_dir, {"masks_sha": _sha(masks), "train": settings.train.model_dump(mode="json")},
                     "LDS retrains")
    retrain = _remote(retrain_task, config)
    refs = {m: retrain.remote(config, pool_ref, np.flatnonzero(masks[m]).tolist(), targets_ref, prefix, settings.train)
            for m in range(len(masks)) if not (lds_dir / f"subset-{m:03d}.json").is_file()}
    gather(refs, "LDS retrains", lambda m, losses: atomic_write_text(lds_dir / f"subset-{m:03d}.json", json.dumps(losses)))
    losses = np.array([json.loads((lds_dir / f"subset-{m:03d}.json").read_text()) for m in range(len(masks))])
    return lds_report(masks, scores, losses)


def run_selection(config: EvalInfluenceConfig, folder: Path, pool_ref: Any, targets_ref: Any, prefix: int,
                  methods: dict[str, list[int]], tasks: list[str]) -> dict[str, Any]:
    """Fine-tune on each method's selection (each result saved as it ends); target losses against the base's."""
    import ray

    base_losses = ray.get(_remote(base_losses_task, config).remote(config, targets_ref, prefix))
    sel_dir = folder / "selection"
    reset_if_changed(sel_dir, {"methods_sha": _sha(json.dumps(methods, sort_keys=True)),
                               "train": config.selection.train.model_dump(mode="json")}, "selection fine-tunes")
    retrain = _remote(retrain_task, config)
    settings = config.selection.train
    refs = {name: retrain.remote(config, pool_ref, indices, targets_ref, prefix, settings)
            for name, indices in methods.items() if not (sel_dir / f"{name}.json").is_file()}
    gather(refs, "selection fine-tunes", lambda name, losses: atomic_write_text(sel_dir / f"{name}.json", json.dumps(losses)))
    losses = {name: json.loads((sel_dir / f"{name}.json").read_text()) for name in methods}
    return selection_report(methods, losses, tasks, base_losses)


def run(config: EvalInfluenceConfig) -> dict[str, Any]:
    """Fidelity, LDS and selection of reduced LoRA-gradient influence; returns the summary (also as JSON)."""
    import ray

    started = time.perf_counter()
    folder = open_output(config)
    data = build_examples(config)
    logger.info("pool %d, fit sample %d, targets %d in %d tasks", len(data["pool"]), len(data["fit"]),
                len(data["targets"]), len(set(data["tasks"])))
    if len(data["pool"]) < 8 or len(data["targets"]) < 1:
        raise ValueError("too few examples survive tokenization; raise data.max_length or lower data.max_chars")
    prefix, groups = run_prefix_cache(config, folder, data)
    logger.info("frozen decoder layers cached and skipped: %d", prefix)
    groups_ref = ray.put(groups)
    pool_ref, targets_ref = ray.put(groups["pool"]), ray.put(groups["targets"])
    timings: dict[str, float] = {}

    mark = time.perf_counter()
    checkpoints = run_warmup(config, folder, groups["pool"], prefix)
    timings["warmup_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    scores, info = run_scores(config, folder, groups_ref, prefix, checkpoints)
    timings["scores_s"] = time.perf_counter() - mark
    fidelity = fidelity_report(scores, data["tasks"])
    mark = time.perf_counter()
    lds = run_lds(config, folder, pool_ref, targets_ref, len(groups["pool"]), prefix, scores)
    timings["lds_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    methods = selection_methods(
        scores, data["tasks"], len(groups["pool"]), info["lora_size"], config.features.reductions,
        config.selection.top_fraction, config.selection.dim, config.selection.random_seeds,
    )
    selection = run_selection(config, folder, pool_ref, targets_ref, prefix, methods, data["tasks"])
    timings["selection_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    report_dir = folder / "report"
    common = {
        "machine": machine_info(),
        "model": config.model,
        "lora": {**config.lora.model_dump(mode="json"), "size": info["lora_size"], "modules": info["modules"]},
        "frozen_layers_cached": prefix,
        "pool": len(groups["pool"]), "fit_sample": len(groups["fit"]), "targets": len(groups["targets"]),
        "target_tasks": sorted(set(data["tasks"])),
        "max_length": config.data.max_length,
        "checkpoints": checkpoints,
        "config": config.model_dump(mode="json"),
    }
    write_report(report_dir, common, fidelity, lds, selection, info, methods, config.results_dir)
    summary = {"fidelity": fidelity, "lds": lds, "selection": selection, "timings": timings,
               "written": str(report_dir), "config": config.model_dump(mode="json")}
    atomic_write_text(report_dir / "summary.json", json.dumps({**summary, "machine": machine_info()}, indent=2) + "\n")
    logger.info("influence evaluation finished in %.0f s: %s", timings["total_s"], report_dir)
    return summary


PIPELINE = {"config": EvalInfluenceConfig, "run": run, "table": format_table}


if __name__ == "__main__":
    from trustray.pipelines import run_module

    run_module("eval_influence")
