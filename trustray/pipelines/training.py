"""The Ray Train worker loop every training pipeline runs, and its one checkpoint convention.

Checkpoints are folders `<checkpoint_dir>/step-<n>/`, each written into a temporary sibling and renamed whole;
`step.json` (`{"step", "total", "history"}`) is written last, so a `step-<n>` without it is unfinished and
ignored. A run resumes from the newest finished folder, keeps the `keep` newest (None: all of them), and
replays the same steps an uninterrupted run takes (a task draws each step's batch and seeds from the step
number, never from state it does not checkpoint).

A pipeline supplies a `TrainingTask` — what one step does, what a checkpoint holds, what is recorded at a
checkpoint — built inside each worker by a module-level builder (a class taking `(data, context)` will do), and
calls `run_training`. This module owns the rest: the TorchTrainer, thread pinning, logging on rank 0, the device,
the loop, checkpoint I/O, resume, pruning and reporting to Ray Train. `run_loop` is the loop without Ray, and
`run_in_process` the whole of `run_training` without it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trustray.artifacts import atomic_folder
from trustray.config import TrainWorkerResources

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STEP_FILE = "step.json"
# The usual name of a checkpoint's torch state (a task may write other files instead).
STATE_FILE = "state.pt"
# Ray Train's own run folder under the pipeline's output folder (its copies of step.json, logs).
RAY_RUN_NAME = "ray_train"


class TrainingTask(Protocol):
    """What a pipeline trains; the loop calls these on every worker."""

    def begin(self) -> list[dict[str, Any]]:
        """Work done once before step 1 of a fresh run (never on resume); returns the history entries it records."""

    def train_step(self, step: int) -> dict[str, float]:
        """Train step `step` (1-based); returns its metrics."""

    def checkpoint_metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        """The history entry of checkpoint `step` ("step" is added); `window` holds the `train_step` metrics since
        the previous checkpoint."""

    def save(self, folder: Path) -> None:
        """Write the state a resume needs into `folder` (rank 0 only)."""

    def load(self, folder: Path) -> None:
        """Restore the state `save` wrote into `folder`."""


class SteppedTrainerTask:
    """A `TrainingTask` around a trainer object with `step(step) -> metrics`, `save(folder)` and `load(folder)`
    (set as `self.trainer` by the subclass's constructor); a checkpoint records the mean of each metric since
    the previous one."""

    trainer: Any

    def begin(self) -> list[dict[str, Any]]:
        return []

    def train_step(self, step: int) -> dict[str, float]:
        return self.trainer.step(step)

    def checkpoint_metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        return {key: sum(metrics[key] for metrics in window) / len(window) for key in window[0]}

    def save(self, folder: Path) -> None:
        self.trainer.save(folder)

    def load(self, folder: Path) -> None:
        self.trainer.load(folder)


@dataclass(frozen=True)
class TrainingPlan:
    """How long to train, after which steps to checkpoint (the last one always), and where the checkpoints go."""

    checkpoint_dir: Path
    total_steps: int
    checkpoint_steps: frozenset[int]
    keep: int | None = None  # finished checkpoints kept on disk, newest first (None: all)

    def __post_init__(self) -> None:
        if self.total_steps not in self.checkpoint_steps:
            raise ValueError(f"the last step ({self.total_steps}) must be a checkpoint: the run's result is its state")

    @classmethod
    def every(cls, checkpoint_dir: Path, total_steps: int, checkpoint_every: int, keep: int | None = None
              ) -> TrainingPlan:
        """Checkpoints every `checkpoint_every` steps and at the last one."""
        steps = frozenset(range(checkpoint_every, total_steps + 1, checkpoint_every)) | {total_steps}
        return cls(checkpoint_dir, total_steps, steps, keep)

    def final_checkpoint(self) -> Path:
        return self.checkpoint_dir / f"step-{self.total_steps}"


@dataclass(frozen=True)
class WorkerContext:
    """What a task's builder learns about the worker it runs in."""

    plan: TrainingPlan
    device: torch.device
    rank: int = 0
    world_size: int = 1


TaskBuilder = Callable[[Any, WorkerContext], TrainingTask]
# report(history entry, the checkpoint folder written by this worker or None)
Reporter = Callable[[dict[str, Any], Path | None], None]


def step_number(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def is_finished(checkpoint: Path) -> bool:
    return (checkpoint / STEP_FILE).is_file()


def finished_checkpoints(folder: Path) -> list[Path]:
    """The finished `step-<n>` folders under `folder`, oldest first."""
    return sorted((path for path in folder.glob("step-*") if is_finished(path)), key=step_number)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest finished `step-<n>` checkpoint under `folder`, if any."""
    finished = finished_checkpoints(folder)
    return finished[-1] if finished else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` finished checkpoints."""
    for path in finished_checkpoints(folder)[:-keep]:
        shutil.rmtree(path)


def read_step(checkpoint: Path) -> dict[str, Any]:
    """A finished checkpoint's `step.json`: its step, the run's total steps then, and the history so far."""
    return json.loads((checkpoint / STEP_FILE).read_text())


def write_checkpoint(plan: TrainingPlan, step: int, history: list[dict[str, Any]],
                     save: Callable[[Path], None]) -> Path:
    """`step-<step>` with what `save` writes, then `step.json`; it appears whole or not at all."""
    folder = plan.checkpoint_dir / f"step-{step}"
    with atomic_folder(folder) as tmp:
        save(tmp)
        (tmp / STEP_FILE).write_text(json.dumps({"step": step, "total": plan.total_steps, "history": history},
                                                indent=2))
    return folder


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}


def run_loop(task: TrainingTask, context: WorkerContext, report: Reporter) -> None:
    """Train `task` from the newest finished checkpoint (or from `begin`) to the plan's last step."""
    plan = context.plan
    leader = context.rank == 0
    resume = latest_checkpoint(plan.checkpoint_dir)
    if resume is None:
        start, history = 0, task.begin()
    else:
        task.load(resume)
        info = read_step(resume)
        start, history = info["step"], info["history"]
        logger.info("resuming from %s (step %d of %d)", resume, start, plan.total_steps)
    window: list[dict[str, float]] = []
    for step in range(start + 1, plan.total_steps + 1):
        window.append(task.train_step(step))
        if leader:
            logger.info("step %d/%d: %s", step, plan.total_steps, _rounded(window[-1]))
        if step not in plan.checkpoint_steps:
            continue
        entry = {"step": step, **task.checkpoint_metrics(step, window)}
        history.append(entry)
        window = []
        written = None
        if leader:
            logger.info("checkpoint step-%d: %s", step, _rounded(entry))
            written = write_checkpoint(plan, step, history, task.save)
            if plan.keep is not None:
                prune_checkpoints(plan.checkpoint_dir, plan.keep)
        report(entry, written)


def _report_to_ray(metrics: dict[str, Any], checkpoint: Path | None) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches a copy of `step.json` only, so Ray Train's
    `Result.metrics` is set (Train V2 leaves it None without a checkpoint) while the state stays in the step folder."""
    import ray.train

    if checkpoint is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(checkpoint / STEP_FILE, tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: pin threads, log on rank 0, pick the device, build the task, run the loop."""
    import ray.train
    import ray.train.torch
    import torch

    from trustray.models.loading import gpu_or_cpu
    from trustray.runtime import setup_logging

    resources: TrainWorkerResources = loop_config["resources"]
    torch.set_num_threads(resources.torch_threads)
    train_context = ray.train.get_context()
    rank = train_context.get_world_rank()
    if rank == 0:
        setup_logging()
    device = gpu_or_cpu(resources.use_gpu)
    if device.type == "cuda":  # one GPU per worker: the one Ray Train assigned to this rank
        device = ray.train.torch.get_device()
    context = WorkerContext(plan=loop_config["plan"], device=device, rank=rank,
                            world_size=train_context.get_world_size())
    run_loop(loop_config["build_task"](loop_config["data"], context), context, _report_to_ray)


def _check_resumable(plan: TrainingPlan) -> None:
    newest = latest_checkpoint(plan.checkpoint_dir)
    if newest is not None and step_number(newest) > plan.total_steps:
        raise FileNotFoundError(f"{plan.final_checkpoint()} is missing and the checkpoints already go past step "
                                f"{plan.total_steps} (newest: {newest.name}): train to one of the finished steps or "
                                "beyond the newest")


def run_in_process(build_task: TaskBuilder, data: Any, plan: TrainingPlan, device: torch.device) -> Path:
    """`run_training` without Ray: the same task, checkpoints and resume, in this process on `device` (for many
    short trainings, where starting a Ray Train run would cost more than the training)."""
    final = plan.final_checkpoint()
    if is_finished(final):
        return final
    _check_resumable(plan)
    context = WorkerContext(plan=plan, device=device)
    run_loop(build_task(data, context), context, lambda _entry, _folder: None)
    return final


def run_training(build_task: TaskBuilder, data: Any, plan: TrainingPlan, resources: TrainWorkerResources,
                 storage_dir: Path, data_parallel: bool = False) -> Path:
    """Train on Ray Train up to `plan.total_steps` and return that step's finished checkpoint.

    `build_task(data, context)` runs in each worker (it must be importable: a module-level function or class).
    Nothing is started when the final checkpoint is already finished. `data_parallel=False` refuses more than
    one worker (a task that does not shard its batches would only train the same steps several times).
    The checkpoint folder must be reachable by every worker (shared storage on a multi-node cluster).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trustray.actors.cluster import init_ray

    if resources.num_workers > 1 and not data_parallel:
        raise ValueError(f"this pipeline trains on one worker; num_workers={resources.num_workers} would repeat "
                         "the same steps on each: set num_workers: 1")
    plan = replace(plan, checkpoint_dir=plan.checkpoint_dir.resolve())  # a worker's working directory is not ours
    final = plan.final_checkpoint()
    if is_finished(final):
        return final
    _check_resumable(plan)
    init_ray()
    TorchTrainer(
        _train_worker,
        train_loop_config={"build_task": build_task, "data": data, "plan": plan, "resources": resources},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.num_cpus,
                                                           **resources.custom_resources}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(storage_dir.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=plan.keep)),
    ).fit()
    if not is_finished(final):
        raise RuntimeError(f"training ended without a finished checkpoint {final}")
    return final
