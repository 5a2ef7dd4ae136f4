"""How good a proxy is a reduced LoRA gradient? Fidelity, LDS and data selection, measured.

    trustray eval influence --config configs/eval_influence/cpu.yaml [key=value ...]
    python -m trustray.pipelines.eval_influence --config configs/eval_influence/tiny.yaml

Steps; the heavy ones are Ray tasks with `resources`, and each finished one is reused from `output_dir`:
  1. data: a training pool, a disjoint fit sample (PCA-type reductions are fitted on it, so they are scored
     out of sample) and per-topic target tasks; all tokenized once. When LoRA adapts only the top decoder
     layers, the frozen layers below run once per example and their output is cached (core/lm/prefix).
  2. warmup: LoRA trained on a random fraction of the pool, with checkpoints and AdamW state (LESS step 1).
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
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from trustray.artifacts import (
    ArtifactMismatchError,
    atomic_folder,
    atomic_write_text,
    check_metadata,
    write_metadata,
)
from trustray.config import BaseConfig
from trustray.core.influence.warmup import LoraSettings, WarmupSettings
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import gather
from trustray.runtime import machine_info, save_figure

logger = logging.getLogger(__name__)

KIND = "influence_evaluation"
FEATURE_KINDS = ("sgd", "adam")
METRICS = ("cosine", "inner_product")
# What the pipeline's selection uses (LESS): preconditioned pool gradients, cosine.
LESS_SCORE = ("adam", "cosine")
DENSE = ("gaussian", "rademacher")


class EvalDataSettings(BaseConfig):
    """The pool scored and retrained on, the fit sample and the targets (from the bundled Wikipedia intros)."""

    n_pool: int = Field(256, ge=8, description="Training-pool examples scored, subsampled for LDS and selected from.")
    n_fit: int = Field(256, ge=2, description="Further pool-like examples that PCA-type reductions are fitted on.")
    n_target_per_topic: int = Field(4, ge=1, description="Held-out target examples per topic (one task per topic).")
    max_length: int = Field(64, ge=8, description="Tokens per example; longer ones lose their end.")
    max_chars: int | None = Field(200, ge=1, description="Intro characters kept per response (None: whole intro).")
    seed: int = Field(0, description="Seeds the pool, fit sample and targets.")


class ReductionSpec(BaseConfig):
    """One reduction of the comparison."""

    key: str = Field(description="Label in results and plots, e.g. kron-pca.")
    name: str = Field(description="A name from trustray.core.influence.reductions.REDUCTIONS.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the reduction, e.g. {init: pca}.")


def _default_reductions() -> list[ReductionSpec]:
    return [
        ReductionSpec(key="gaussian", name="gaussian"),
        ReductionSpec(key="rademacher", name="rademacher"),
        ReductionSpec(key="sjlt", name="sjlt"),
        ReductionSpec(key="pca", name="pca"),
        ReductionSpec(key="kron-random", name="kron", options={"init": "random"}),
        ReductionSpec(key="kron-pca", name="kron", options={"init": "pca"}),
    ]


class FeatureGrid(BaseConfig):
    """The reductions and dims compared against exact (unreduced) gradients."""

    reductions: list[ReductionSpec] = Field(default_factory=_default_reductions, description="Reductions compared.")
    dims: list[int] = Field(default_factory=lambda: [32, 128, 512, 2048, 8192], description="Feature dims.")
    include_full_dim: bool = Field(True, description="Also evaluate at the LoRA size itself.")
    dense_max_dim: int | None = Field(
        8192, ge=1, description="Dense random projections above this dim are skipped: they cost dim x LoRA size "
        "multiply-adds per example (None: no limit).",
    )
    seed: int = Field(0, description="Seed of the random projections.")
    batch_size: int = Field(8, ge=1, description="Examples per per-example-gradient pass.")
    kron_fit: int = Field(
        256, ge=1, description="Fit-sample examples whose layer factors fit kron-PCA (held in memory: tokens x "
        "layer widths per example, far more than the flat gradient)."
    )


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


class EvalResources(BaseConfig):
    """Resources of each Ray task (warmup, scoring, every retrain); kept apart from the algorithm settings."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task (1 on a GPU cluster).")
    torch_threads: int = Field(1, ge=1, description="torch threads per task.")


class EvalInfluenceConfig(BaseConfig):
    name: str = Field("default", description="Run name; the default output folder is outputs/eval_influence/<name>.")
    model: str = Field(DEFAULT_CHAT_MODEL, description="Base chat model: built-in name, local folder or HF id.")
    data: EvalDataSettings = Field(default_factory=EvalDataSettings, description="Pool, fit sample, targets.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters (warmup and retrains).")
    warmup: WarmupSettings = Field(default_factory=WarmupSettings, description="The warmup the scores come from.")
    warmup_fraction: float = Field(0.25, gt=0, le=1, description="Fraction of the pool the warmup trains on.")
    features: FeatureGrid = Field(default_factory=FeatureGrid, description="Reductions and dims.")
    lds: LdsSettings = Field(default_factory=LdsSettings, description="Linear datamodeling score.")
    selection: SelectionSettings = Field(default_factory=SelectionSettings, description="Selection fine-tunes.")
    resources: EvalResources = Field(default_factory=EvalResources, description="Per-task resources.")
    output_dir: str | None = Field(
        None, description="Artifacts (default outputs/eval_influence/<name>); tasks write checkpoints here, so on a "
        "multi-node cluster it must be storage every node mounts.",
    )
    results_dir: str | None = Field(None, description="Also copy the report's JSON and PNG files here.")
    force: bool = Field(False, description="Delete an output_dir made with other settings instead of refusing it.")

    def output_path(self) -> Path:
        return Path(self.output_dir or f"outputs/eval_influence/{self.name}")


# -- 1. data -------------------------------------------------------------------------------------------
def build_examples(config: EvalInfluenceConfig) -> dict[str, Any]:
    """Rows and token ids of pool, fit sample and targets; rows whose response is truncated away are dropped."""
    import random

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


# -- Ray task bodies (each loads the model itself: on a cluster it runs where its GPU is) ----------------
def _load_base(config: EvalInfluenceConfig) -> tuple[Any, Any]:
    import torch

    from trustray.models.loading import gpu_or_cpu, load_causal_lm

    torch.set_num_threads(config.resources.torch_threads)
    device = gpu_or_cpu(config.resources.num_gpus > 0)
    return load_causal_lm(config.model, device), device.type


def _fresh_lora(config: EvalInfluenceConfig, seed: int) -> Any:
    import torch

    from trustray.core.influence.warmup import add_lora

    base, _ = _load_base(config)
    torch.manual_seed(seed)  # every retrain starts from the same adapter initialisation
    return add_lora(base, config.lora)


def cache_prefix(config: EvalInfluenceConfig, groups: dict[str, list[dict]]) -> tuple[int, dict[str, list[Any]]]:
    """(frozen layers skipped, each group's cached prefix output per example; empty lists when nothing is frozen)."""
    from trustray.core.lm.prefix import frozen_prefix_length, prefix_states

    model = _fresh_lora(config, 0).eval()
    layers = frozen_prefix_length(model)
    if layers == 0:
        return 0, {name: [] for name in groups}
    return layers, {
        name: prefix_states(model, examples, layers, config.features.batch_size) for name, examples in groups.items()
    }


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


def warmup_task(config: EvalInfluenceConfig, examples: list[dict], prefix: int, folder: str) -> list[dict]:
    """Train the warmup adapters; save every checkpoint under `folder`; returns `[{path, step, learning_rate}]`."""
    from trustray.core.influence.warmup import save_checkpoint, train_lora
    from trustray.core.lm.prefix import skipped_prefix

    model = _fresh_lora(config, config.warmup.seed)
    saved: list[dict] = []

    def on_checkpoint(step: int, learning_rate: float, peft_model: Any, optimizer: Any, epoch: float) -> None:
        save_checkpoint(Path(folder) / f"checkpoint-{step}", peft_model, optimizer, step, learning_rate, epoch)
        saved.append({"path": f"checkpoint-{step}", "step": step, "learning_rate": learning_rate})

    with skipped_prefix(model, prefix):
        train_lora(model, examples, config.warmup, on_checkpoint)
    return saved


def skip_reason(spec: ReductionSpec, dim: int, total: int, fit_size: int, modules: int, dense_max: int | None) -> str | None:
    """Why a (reduction, dim) pair is not evaluated, or None."""
    if dim > total:
        return f"dim exceeds the LoRA size {total}"
    if spec.name == "none" and dim != total:
        return "none keeps the whole LoRA gradient: only evaluated at the LoRA size"
    if spec.name == "pca" and dim > fit_size:
        return f"PCA rank is bounded by the {fit_size} examples it is fitted on"
    if spec.name == "kron" and dim < modules:
        return f"kron needs at least one feature per LoRA module ({modules})"
    if spec.name in DENSE and dense_max is not None and dim > dense_max:
        return f"dense projection above features.dense_max_dim={dense_max} (cost dim x {total} per example)"
    return None


def score_task(config: EvalInfluenceConfig, checkpoint_dir: str, groups: dict[str, list[dict]], prefix: int) -> dict:
    """Score matrices `[pool, target]` at one checkpoint for every feature kind, metric, reduction and dim.

    Flat gradients of every example are kept (the exact scores need them); layer factors, which are far larger,
    only for the first `features.kron_fit` fit examples: kron reductions are fitted on those, then applied to
    each pool and target batch as it is computed.
    """
    import torch

    from trustray.core.influence.gradients import (
        adam_preconditioned,
        flatten_optimizer_state,
        per_example_gradients,
    )
    from trustray.core.influence.reductions import build_reduction
    from trustray.core.influence.scoring import influence_scores
    from trustray.core.influence.warmup import load_checkpoint
    from trustray.core.lm.batching import collate
    from trustray.core.lm.prefix import skipped_prefix

    base, device = _load_base(config)
    model, optimizer_state, _ = load_checkpoint(checkpoint_dir, base)
    model.eval()
    exp_avg, exp_avg_sq, step = flatten_optimizer_state(model, optimizer_state)
    group0 = optimizer_state["param_groups"][0]
    settings = config.features
    info: dict[str, Any] = {"skipped": [], "actual_dims": {}, "seconds": {}}

    def gradient_batches(examples: list[dict]) -> Iterator[Any]:
        for start in range(0, len(examples), settings.batch_size):
            chunk = examples[start : start + settings.batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, 0).items()}
            grads = per_example_gradients(model, batch)
            grads.factors = {k: (a.cpu(), g.cpu()) for k, (a, g) in grads.factors.items()}
            yield grads

    def precondition(x: torch.Tensor) -> torch.Tensor:
        return adam_preconditioned(x, exp_avg, exp_avg_sq, step, tuple(group0["betas"]), group0["eps"])

    with skipped_prefix(model, prefix):
        fit_flat, kron_sample = [], []
        for grads in gradient_batches(groups["fit"]):
            fit_flat.append(grads.flat())
            if sum(b.batch_size for b in kron_sample) < settings.kron_fit:
                kron_sample.append(grads)
        fit_flat = torch.cat(fit_flat)
        total, modules = fit_flat.shape[1], len(kron_sample[0].factors)
        dims = sorted({*settings.dims, *([total] if settings.include_full_dim else [])})
        chosen = []
        for spec in settings.reductions:
            for dim in dims:
                reason = skip_reason(spec, dim, total, len(fit_flat), modules, settings.dense_max_dim)
                if reason:
                    info["skipped"].append({"reduction": spec.key, "dim": dim, "reason": reason})
                else:
                    chosen.append((spec, dim))
        # kron projects layer factors before the outer product, so it only sees plain gradients.
        krons = {}
        for spec, dim in chosen:
            if spec.name == "kron":
                started = time.perf_counter()
                krons[(spec.key, dim)] = build_reduction(spec.name, dim, settings.seed, **spec.options).fit(kron_sample)
                info["seconds"][f"{spec.key}/{dim}"] = time.perf_counter() - started
        del kron_sample
        flat: dict[str, torch.Tensor] = {}
        kron_features: dict[tuple[str, int, str], list[torch.Tensor]] = {}
        for role in ("pool", "targets"):
            rows = []
            for grads in gradient_batches(groups[role]):
                rows.append(grads.flat())
                for key, reduction in krons.items():
                    started = time.perf_counter()
                    kron_features.setdefault((*key, role), []).append(reduction.transform(grads))
                    info["seconds"][f"{key[0]}/{key[1]}"] += time.perf_counter() - started
            flat[role] = torch.cat(rows)
    info.update(lora_size=total, modules=modules)

    # Targets stay plain gradients in both kinds (LESS preconditions only the training side).
    train_of = {"sgd": (flat["pool"], fit_flat), "adam": (precondition(flat["pool"]), precondition(fit_flat))}
    n_pool = len(flat["pool"])
    scores: dict[str, np.ndarray] = {}

    def add(kind: str, key: str, dim: int, train: torch.Tensor, targets: torch.Tensor) -> None:
        for metric in METRICS:
            scores[f"{kind}/{metric}/{key}/{dim}"] = influence_scores(train.numpy(), targets.numpy(), metric)

    for kind in FEATURE_KINDS:
        add(kind, "exact", total, train_of[kind][0], flat["targets"])
    for spec, dim in chosen:
        started = time.perf_counter()
        if spec.name == "kron":
            add("sgd", spec.key, dim, torch.cat(kron_features[(spec.key, dim, "pool")]),
                torch.cat(kron_features[(spec.key, dim, "targets")]))
            info["actual_dims"][f"{spec.key}/{dim}"] = int(krons[(spec.key, dim)].dim)
            started -= info["seconds"].pop(f"{spec.key}/{dim}")  # fit and per-batch transforms count too
        else:
            reduction = build_reduction(spec.name, dim, settings.seed, **spec.options)
            if not reduction.fitted:
                # One transform for both kinds: each random block is generated once per dim.
                reduction.fit(fit_flat[:2])
                both = reduction.transform(torch.cat([train_of["sgd"][0], train_of["adam"][0], flat["targets"]]))
                add("sgd", spec.key, dim, both[:n_pool], both[2 * n_pool :])
                add("adam", spec.key, dim, both[n_pool : 2 * n_pool], both[2 * n_pool :])
            else:
                for kind in FEATURE_KINDS:
                    fitted = build_reduction(spec.name, dim, settings.seed, **spec.options).fit(train_of[kind][1])
                    add(kind, spec.key, dim, fitted.transform(train_of[kind][0]), fitted.transform(flat["targets"]))
        info["seconds"][f"{spec.key}/{dim}"] = round(time.perf_counter() - started, 2)
    return {"scores": scores, "info": info}


def target_losses(config: EvalInfluenceConfig, model: Any, targets: list[dict], prefix: int) -> list[float]:
    """Each target's mean response loss under `model` (its frozen prefix bypassed)."""
    import torch

    from trustray.core.lm.batching import collate
    from trustray.core.lm.losses import example_losses
    from trustray.core.lm.prefix import skipped_prefix

    device = next(model.parameters()).device
    size = config.features.batch_size
    model.eval()
    with skipped_prefix(model, prefix):
        losses = [example_losses(model, {k: v.to(device) for k, v in collate(targets[i : i + size], 0).items()})
                  for i in range(0, len(targets), size)]
    return torch.cat(losses).cpu().tolist()


def retrain_task(config: EvalInfluenceConfig, train: list[dict], targets: list[dict], prefix: int,
                 settings: WarmupSettings) -> list[float]:
    """Fresh LoRA trained on `train`; returns each target's mean response loss afterwards."""
    from trustray.core.influence.warmup import train_lora
    from trustray.core.lm.prefix import skipped_prefix

    model = _fresh_lora(config, settings.seed)
    with skipped_prefix(model, prefix):
        train_lora(model, train, settings, on_checkpoint=lambda *args: None, progress_bar=False)
    return target_losses(config, model, targets, prefix)


# -- the driver --------------------------------------------------------------------------------------
def _remote(function: Any, config: EvalInfluenceConfig) -> Any:
    import ray

    return ray.remote(num_cpus=config.resources.num_cpus, num_gpus=config.resources.num_gpus, max_retries=1)(function)


def expected_metadata(config: EvalInfluenceConfig) -> dict[str, Any]:
    return {
        "kind": KIND,
        "model": config.model,
        "model_fingerprint": model_fingerprint(config.model),
        "settings": config.model_dump(mode="json", include={"data", "lora", "warmup", "warmup_fraction", "features"}),
    }


def prepare_output(config: EvalInfluenceConfig) -> Path:
    """The output folder, refused (or wiped with force=true) when it was made with other settings."""
    folder = config.output_path()
    expected = expected_metadata(config)
    try:
        reuse = check_metadata(folder, expected, kind="influence evaluation")
    except ArtifactMismatchError:
        if not config.force:
            raise
        logger.warning("force=true: deleting %s, made with other settings", folder)
        shutil.rmtree(folder)
        reuse = False
    if not reuse:
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


def run_warmup(config: EvalInfluenceConfig, folder: Path, pool: list[dict], prefix: int) -> list[dict]:
    import random

    import ray

    done = folder / "warmup" / "checkpoints.json"
    if done.is_file():
        return json.loads(done.read_text())
    count = max(1, round(config.warmup_fraction * len(pool)))
    subset = [pool[i] for i in sorted(random.Random(config.warmup.seed).sample(range(len(pool)), count))]
    logger.info("warmup: LoRA on %d of %d pool examples", count, len(pool))
    with atomic_folder(folder / "warmup") as tmp:
        checkpoints = ray.get(_remote(warmup_task, config).remote(config, subset, prefix, str(tmp)))
        (tmp / "checkpoints.json").write_text(json.dumps(checkpoints, indent=2))
    return checkpoints


def run_scores(config: EvalInfluenceConfig, folder: Path, groups_ref: Any, prefix: int,
               checkpoints: list[dict]) -> tuple[dict[str, np.ndarray], dict]:
    """Learning-rate-weighted score matrices over the checkpoints (each checkpoint's scores saved as it ends)."""
    from trustray.core.influence.scoring import combine_checkpoints

    score_dir = folder / "scores"
    score_dir.mkdir(exist_ok=True)
    refs = {}
    for checkpoint in checkpoints:
        if not (score_dir / f"{checkpoint['path']}.json").is_file():
            refs[checkpoint["path"]] = _remote(score_task, config).remote(
                config, str(folder / "warmup" / checkpoint["path"]), groups_ref, prefix
            )

    def save(path: str, result: dict) -> None:
        np.savez(score_dir / f"{path}.npz", **result["scores"])
        atomic_write_text(score_dir / f"{path}.json", json.dumps(result["info"], indent=2))

    gather(refs, "scores per checkpoint", save)
    per_checkpoint = [np.load(score_dir / f"{c['path']}.npz") for c in checkpoints]
    rates = [c["learning_rate"] for c in checkpoints]
    combined = {key: combine_checkpoints([s[key] for s in per_checkpoint], rates) for key in per_checkpoint[0].files}
    return combined, json.loads((score_dir / f"{checkpoints[-1]['path']}.json").read_text())


def fidelity_report(scores: dict[str, np.ndarray], tasks: list[str]) -> dict[str, list[dict]]:
    """Per reduction, rows `{dim, features, spearman, top1_overlap, top5_overlap}` against exact LESS scores."""
    from trustray.core.influence.fidelity import fidelity_row
    from trustray.core.influence.scoring import aggregate_targets

    results: dict[str, list[dict]] = {}
    for kind in FEATURE_KINDS:
        exact_key = next(k for k in scores if k.startswith(f"{kind}/cosine/exact/"))
        exact = aggregate_targets(scores[exact_key], tasks)
        for key, matrix in scores.items():
            score_kind, metric, reduction, dim = key.split("/")
            if score_kind != kind or metric != "cosine" or reduction == "exact":
                continue
            row = {"dim": int(dim), "features": kind, **fidelity_row(exact, aggregate_targets(matrix, tasks))}
            results.setdefault(reduction, []).append(row)
    for rows in results.values():
        rows.sort(key=lambda row: (row["features"], row["dim"]))
    return results


def run_lds(config: EvalInfluenceConfig, folder: Path, pool_ref: Any, targets_ref: Any, n_pool: int,
            prefix: int, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Retrain on random subsets (each result saved as it ends) and score every method by LDS."""

    from trustray.core.influence.lds import linear_datamodeling_score, random_subsets

    settings = config.lds
    masks = random_subsets(n_pool, settings.n_subsets, settings.subset_fraction, settings.seed)
    lds_dir = folder / "lds"
    reset_if_changed(lds_dir, {"masks_sha": _sha(masks), "train": settings.train.model_dump(mode="json")},
                     "LDS retrains")
    retrain = _remote(_subset_retrain, config)
    refs = {m: retrain.remote(config, pool_ref, np.flatnonzero(masks[m]).tolist(), targets_ref, prefix, settings.train)
            for m in range(len(masks)) if not (lds_dir / f"subset-{m:03d}.json").is_file()}
    gather(refs, "LDS retrains", lambda m, losses: atomic_write_text(lds_dir / f"subset-{m:03d}.json", json.dumps(losses)))
    losses = np.array([json.loads((lds_dir / f"subset-{m:03d}.json").read_text()) for m in range(len(masks))])
    rows = []
    for key, matrix in scores.items():
        kind, metric, reduction, dim = key.split("/")
        result = linear_datamodeling_score(masks, matrix, losses)
        rows.append({"reduction": reduction, "dim": int(dim), "features": kind, "metric": metric,
                     "lds": result["lds"], "lds_sem": result["lds_sem"], "targets_used": result["targets_used"]})
    rows.sort(key=lambda row: (row["features"], row["metric"], row["reduction"], row["dim"]))
    return {"rows": rows, "subset_loss_mean": float(losses.mean()), "subset_loss_std_over_subsets":
            float(losses.mean(axis=1).std()), "n_subsets": len(masks), "subset_size": int(masks[0].sum())}


def _subset_retrain(config: EvalInfluenceConfig, pool: list[dict], indices: list[int], targets: list[dict],
                    prefix: int, settings: WarmupSettings) -> list[float]:
    return retrain_task(config, [pool[i] for i in indices], targets, prefix, settings)


def _sha(value: np.ndarray | str) -> str:
    import hashlib

    data = value.encode() if isinstance(value, str) else np.ascontiguousarray(value).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def selection_methods(config: EvalInfluenceConfig, scores: dict[str, np.ndarray], tasks: list[str],
                      n_pool: int, lora_size: int) -> dict[str, list[int]]:
    """Pool indices chosen by each method: exact and reduced LESS scores, random draws, the full pool."""
    from trustray.core.influence.scoring import aggregate_targets, fraction_count

    count = fraction_count(n_pool, config.selection.top_fraction)
    kind, metric = LESS_SCORE
    methods: dict[str, list[int]] = {}
    wanted = {f"{kind}/{metric}/exact/{lora_size}": "exact"}
    for spec in config.features.reductions:
        spec_kind = "sgd" if spec.name == "kron" else kind
        # The largest evaluated dim up to selection.dim (PCA's rank is bounded by its fit sample).
        dims = [int(key.split("/")[3]) for key in scores if key.startswith(f"{spec_kind}/{metric}/{spec.key}/")]
        dims = [dim for dim in dims if dim <= config.selection.dim]
        if dims:
            wanted[f"{spec_kind}/{metric}/{spec.key}/{max(dims)}"] = f"{spec.key}@{max(dims)}"
    for key, label in wanted.items():
        if key in scores:
            ranked = np.argsort(-aggregate_targets(scores[key], tasks), kind="stable")
            methods[label] = sorted(ranked[:count].tolist())
    for seed in range(config.selection.random_seeds):
        methods[f"random-{seed}"] = sorted(np.random.default_rng(1000 + seed).choice(n_pool, count, replace=False).tolist())
    methods["full"] = list(range(n_pool))
    return methods


def run_selection(config: EvalInfluenceConfig, folder: Path, pool_ref: Any, targets_ref: Any, prefix: int,
                  methods: dict[str, list[int]], tasks: list[str], base_losses: list[float]) -> dict[str, Any]:
    sel_dir = folder / "selection"
    reset_if_changed(sel_dir, {"methods_sha": _sha(json.dumps(methods, sort_keys=True)),
                               "train": config.selection.train.model_dump(mode="json")}, "selection fine-tunes")
    retrain = _remote(_subset_retrain, config)
    settings = config.selection.train
    refs = {name: retrain.remote(config, pool_ref, indices, targets_ref, prefix, settings)
            for name, indices in methods.items() if not (sel_dir / f"{name}.json").is_file()}
    gather(refs, "selection fine-tunes", lambda name, losses: atomic_write_text(sel_dir / f"{name}.json", json.dumps(losses)))
    rows = [{"method": "base (no fine-tune)", "examples": 0, "target_loss": float(np.mean(base_losses))}]
    for name, indices in methods.items():
        losses = json.loads((sel_dir / f"{name}.json").read_text())
        per_task = {task: float(np.mean([loss for loss, t in zip(losses, tasks, strict=True) if t == task]))
                    for task in sorted(set(tasks))}
        rows.append({"method": name, "examples": len(indices), "target_loss": float(np.mean(losses)),
                     "per_task_loss": per_task})
    randoms = [row["target_loss"] for row in rows if row["method"].startswith("random-")]
    return {"rows": rows, "random_mean_loss": float(np.mean(randoms)),
            "random_std_loss": float(np.std(randoms, ddof=1)) if len(randoms) > 1 else None}


def base_losses_task(config: EvalInfluenceConfig, targets: list[dict], prefix: int) -> list[float]:
    """Target losses before any fine-tuning (a fresh adapter's B is zero, so it changes nothing)."""
    return target_losses(config, _fresh_lora(config, 0), targets, prefix)


# -- 7. report ----------------------------------------------------------------------------------------
def write_plots(report_dir: Path, fidelity: dict[str, list[dict]], lds: dict[str, Any],
                selection: dict[str, Any], lora_size: int, machine: dict[str, Any]) -> list[Path]:
    """fidelity.png (Spearman and top-5% overlap vs dim), lds.png (LDS vs dim), selection.png (target loss)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    paths = []
    # One colour per reduction in every panel, so lines can be compared across panels and figures.
    names = sorted({*fidelity, *(row["reduction"] for row in lds["rows"])})
    colour = {name: f"C{index % 10}" for index, name in enumerate(names)}
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for column, kind in enumerate(FEATURE_KINDS):
        for reduction, rows in sorted(fidelity.items()):
            chosen = [row for row in rows if row["features"] == kind]
            if not chosen:
                continue
            dims = [row["dim"] for row in chosen]
            for axis, key in ((axes[0][column], "spearman"), (axes[1][column], "top5_overlap")):
                axis.plot(dims, [row[key] for row in chosen], marker="o", label=reduction, color=colour[reduction])
        axes[0][column].set_title(f"{kind} features, cosine (LoRA size {lora_size:,})")
        axes[0][column].set_ylabel("Spearman vs exact")
        axes[1][column].set_ylabel("top-5% overlap with exact")
        axes[1][column].set_xlabel("feature dim")
        for row in axes:
            row[column].set_xscale("log")
            row[column].grid(alpha=0.3)
            row[column].legend(fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(report_dir / "fidelity.png")
    save_figure(figure, paths[-1], machine)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for column, (kind, metric) in enumerate([LESS_SCORE, ("sgd", "inner_product")]):
        by_reduction: dict[str, list[dict]] = {}
        for row in lds["rows"]:
            if row["features"] == kind and row["metric"] == metric:
                by_reduction.setdefault(row["reduction"], []).append(row)
        for reduction, rows in sorted(by_reduction.items()):
            rows.sort(key=lambda row: row["dim"])
            axes[column].errorbar([r["dim"] for r in rows], [r["lds"] for r in rows], yerr=[r["lds_sem"] for r in rows],
                                  marker="o", capsize=2, label=reduction, color=colour[reduction])
        axes[column].set_title(f"LDS, {kind} features, {metric} ({lds['n_subsets']} retrains)")
        axes[column].set_xscale("log")
        axes[column].set_xlabel("feature dim")
        axes[column].grid(alpha=0.3)
        axes[column].legend(fontsize=7)
    axes[0].set_ylabel("LDS (mean Spearman over targets)")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(report_dir / "lds.png")
    save_figure(figure, paths[-1], machine)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(9, 4))
    rows = selection["rows"]
    axis.barh([f"{row['method']} ({row['examples']})" for row in rows], [row["target_loss"] for row in rows])
    axis.set_xlabel("mean target loss (lower is better)")
    low = min(row["target_loss"] for row in rows)
    axis.set_xlim(left=low - 0.05 * abs(low))
    axis.invert_yaxis()
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(report_dir / "selection.png")
    save_figure(figure, paths[-1], machine)
    plt.close(figure)
    return paths


def format_table(summary: dict[str, Any]) -> str:
    """Fidelity of LESS scores (adam, cosine) per reduction and dim, the best LDS rows, and selection losses."""
    lines = ["fidelity (adam features, cosine): Spearman / top-5% overlap vs exact"]
    for reduction, rows in sorted(summary["fidelity"].items()):
        cells = [f"{r['dim']}: {r['spearman']:.3f}/{r['top5_overlap']:.2f}" for r in rows if r["features"] == "adam"]
        cells = cells or [f"{r['dim']}: {r['spearman']:.3f}/{r['top5_overlap']:.2f} (sgd)" for r in rows]
        lines.append(f"  {reduction:<12} " + "  ".join(cells))
    kind, metric = LESS_SCORE
    lines.append(f"LDS ({kind} features, {metric}; {summary['lds']['n_subsets']} retrains)")
    for row in summary["lds"]["rows"]:
        if row["features"] == kind and row["metric"] == metric:
            lines.append(f"  {row['reduction']:<12} dim {row['dim']:>7}: {row['lds']:+.3f} ± {row['lds_sem']:.3f}")
    lines.append("selection: mean target loss")
    for row in summary["selection"]["rows"]:
        lines.append(f"  {row['method']:<22} {row['examples']:>5} examples  {row['target_loss']:.4f}")
    lines.append(f"written: {summary['written']}")
    return "\n".join(lines)


def run(config: EvalInfluenceConfig) -> dict[str, Any]:
    """Fidelity, LDS and selection of reduced LoRA-gradient influence; returns the summary (also as JSON)."""
    import ray

    started = time.perf_counter()
    folder = prepare_output(config)
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
    methods = selection_methods(config, scores, data["tasks"], len(groups["pool"]), info["lora_size"])
    base = ray.get(_remote(base_losses_task, config).remote(config, targets_ref, prefix))
    selection = run_selection(config, folder, pool_ref, targets_ref, prefix, methods, data["tasks"], base)
    timings["selection_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    report_dir = folder / "report"
    report_dir.mkdir(exist_ok=True)
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
    files = {
        "influence_fidelity.json": {
            **common,
            "exact": "unreduced per-example LoRA gradients, cosine, combined over checkpoints by learning rate",
            "aggregation": "max over target tasks of the mean over the task's targets (LESS)",
            "features": "adam: pool gradients Adam-preconditioned with the checkpoint's AdamW state (LESS); "
            "sgd: plain gradients (kron is only defined on these); targets are plain in both",
            "fitted_on": f"pca and kron-pca are fitted on {len(groups['fit'])} other pool-like examples (out of sample)",
            "results": fidelity,
            "skipped": info["skipped"],
            "reduction_seconds_last_checkpoint": info["seconds"],
            "kron_actual_dims": info["actual_dims"],
        },
        "influence_lds.json": {**common, **lds},
        "influence_selection.json": {**common, **selection, "methods": {k: len(v) for k, v in methods.items()}},
    }
    for name, content in files.items():
        atomic_write_text(report_dir / name, json.dumps(content, indent=2) + "\n")
    plots = write_plots(report_dir, fidelity, lds, selection, info["lora_size"], common["machine"])
    if config.results_dir:
        Path(config.results_dir).mkdir(parents=True, exist_ok=True)
        for path in [*(report_dir / name for name in files), *plots]:
            shutil.copy2(path, Path(config.results_dir) / (path.name if path.suffix == ".json" else f"influence_{path.name}"))
    summary = {"fidelity": fidelity, "lds": lds, "selection": selection, "timings": timings,
               "written": str(report_dir), "config": config.model_dump(mode="json")}
    atomic_write_text(report_dir / "summary.json", json.dumps({**summary, "machine": machine_info()}, indent=2) + "\n")
    logger.info("influence evaluation finished in %.0f s: %s", timings["total_s"], report_dir)
    return summary


PIPELINE = {"config": EvalInfluenceConfig, "run": run}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from trustray.pipelines import pipeline_main

    summary = pipeline_main(PIPELINE, argv, prog="python -m trustray.pipelines.eval_influence")
    logger.info("results:\n%s", format_table(summary))
    return summary


if __name__ == "__main__":
    from trustray.pipelines.eval_influence import main as module_main

    module_main()
