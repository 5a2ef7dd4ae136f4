"""The shared training loop (trustray.pipelines.training): atomic step folders, resume from the newest finished
one, pruning, and a run killed part-way that ends exactly where an uninterrupted run ends (in-process and on a
real one-worker TorchTrainer)."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from trustray.pipelines.training import (
    STATE_FILE,
    STEP_FILE,
    TrainingPlan,
    WorkerContext,
    finished_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    read_step,
    run_loop,
    run_training,
    write_checkpoint,
)


class Killed(RuntimeError):
    """Stands for a worker dying in the middle of a step."""


class TinyRegression:
    """A training task on a 4 -> 1 linear model with dropout: seeded per step, so a resumed run replays exactly."""

    def __init__(self, data: dict[str, Any], context: WorkerContext):
        self.data, self.plan = data, context.plan
        self.begun = 0
        generator = torch.Generator().manual_seed(data["seed"])
        self.inputs = torch.randn(32, 4, generator=generator)
        self.targets = self.inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(32, generator=generator)
        torch.manual_seed(data["seed"])
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        total = context.plan.total_steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: (total - step) / total)

    def begin(self) -> list[dict[str, Any]]:
        self.begun += 1
        return [{"step": 0, "untrained_loss": self.loss()}]

    def loss(self) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(self.model[1](self.inputs).squeeze(1), self.targets))

    def train_step(self, step: int) -> dict[str, float]:
        if step == self.data.get("kill_at"):
            raise Killed(f"killed at step {step}")
        torch.manual_seed(self.data["seed"] * 1_000_003 + step)
        rows = random.Random(f"{self.data['seed']}-{step}").sample(range(len(self.inputs)), 8)
        self.model.train()
        loss = torch.nn.functional.mse_loss(self.model(self.inputs[rows]).squeeze(1), self.targets[rows])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return {"train_loss": float(loss.detach())}

    def checkpoint_metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        return {"steps_in_window": len(window), "train_loss": sum(m["train_loss"] for m in window) / len(window),
                "loss": self.loss(), "lr": self.schedule.get_last_lr()[0]}

    def save(self, folder: Path) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict()}, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        state = torch.load(folder / STATE_FILE, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


def _train(folder: Path, total: int = 7, keep: int | None = 2, **data: Any) -> tuple[TinyRegression, list]:
    context = WorkerContext(plan=TrainingPlan.every(folder, total, 2, keep=keep), device=torch.device("cpu"))
    task = TinyRegression({"seed": 3, **data}, context)
    reports: list[tuple[dict, Path | None]] = []
    run_loop(task, context, lambda metrics, checkpoint: reports.append((metrics, checkpoint)))
    return task, reports


def _finish(folder: Path, step: int, history: list[dict] | None = None) -> Path:
    plan = TrainingPlan.every(folder, 10, 1)
    return write_checkpoint(plan, step, history or [{"step": step}], lambda tmp: (tmp / "state.txt").write_text("x"))


def _assert_same_state(state: Any, other: Any) -> None:
    """Equal nested state dicts: tensors bit for bit, everything else by value."""
    if isinstance(state, torch.Tensor):
        assert torch.equal(state, other)
    elif isinstance(state, dict):
        assert state.keys() == other.keys()
        for key, value in state.items():
            _assert_same_state(value, other[key])
    elif isinstance(state, list | tuple):
        assert len(state) == len(other)
        for value, other_value in zip(state, other, strict=True):
            _assert_same_state(value, other_value)
    else:
        assert state == other


def test_unfinished_step_folders_are_ignored_and_pruning_keeps_the_newest(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for step in (1, 2, 3, 10):
        _finish(tmp_path, step)
    (tmp_path / "step-12").mkdir()  # a folder without step.json is not a checkpoint
    (tmp_path / "step-12" / STATE_FILE).write_text("partial")
    assert latest_checkpoint(tmp_path).name == "step-10"
    assert [path.name for path in finished_checkpoints(tmp_path)] == ["step-1", "step-2", "step-3", "step-10"]
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-10", "step-12", "step-3"]
    assert read_step(tmp_path / "step-10") == {"step": 10, "total": 10, "history": [{"step": 10}]}


def test_a_checkpoint_appears_whole_or_not_at_all(tmp_path):
    def broken_save(folder: Path) -> None:
        (folder / STATE_FILE).write_text("half")
        raise Killed("died while saving")

    with pytest.raises(Killed):
        write_checkpoint(TrainingPlan.every(tmp_path, 4, 1), 4, [], broken_save)
    assert list(tmp_path.iterdir()) == []
    # A rewrite of an unfinished folder replaces it; step.json is written after the task's files.
    (tmp_path / "step-4").mkdir()
    written = write_checkpoint(TrainingPlan.every(tmp_path, 4, 1), 4, [{"step": 4}],
                               lambda folder: (folder / STATE_FILE).write_text("whole"))
    assert (written / STATE_FILE).read_text() == "whole" and read_step(written)["total"] == 4


def test_the_loop_checkpoints_prunes_and_reports(tmp_path):
    task, reports = _train(tmp_path)
    assert task.begun == 1
    assert [metrics["step"] for metrics, _ in reports] == [2, 4, 6, 7]
    assert [checkpoint.name for _, checkpoint in reports] == ["step-2", "step-4", "step-6", "step-7"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-6", "step-7"]
    info = read_step(tmp_path / "step-7")
    assert info["step"] == info["total"] == 7
    assert [entry["step"] for entry in info["history"]] == [0, 2, 4, 6, 7]
    assert [entry.get("steps_in_window") for entry in info["history"]] == [None, 2, 2, 2, 1]
    assert info["history"][-1]["loss"] < info["history"][0]["untrained_loss"]
    # Finished: a rerun trains nothing and reports nothing.
    again, reports = _train(tmp_path)
    assert again.begun == 0 and reports == []


def test_a_killed_loop_resumes_to_the_same_state_as_an_uninterrupted_one(tmp_path):
    straight, _ = _train(tmp_path / "straight")
    with pytest.raises(Killed):
        _train(tmp_path / "resumed", kill_at=6)  # after the step-4 checkpoint and step 5
    assert latest_checkpoint(tmp_path / "resumed").name == "step-4"
    resumed, reports = _train(tmp_path / "resumed")
    assert resumed.begun == 0 and [metrics["step"] for metrics, _ in reports] == [6, 7]
    _assert_same_state(torch.load(tmp_path / "straight" / "step-7" / STATE_FILE, weights_only=True),
                       torch.load(tmp_path / "resumed" / "step-7" / STATE_FILE, weights_only=True))
    assert read_step(tmp_path / "straight" / "step-7") == read_step(tmp_path / "resumed" / "step-7")
    _assert_same_state(straight.model.state_dict(), resumed.model.state_dict())


def test_keep_none_keeps_every_checkpoint_and_a_shorter_plan_ends_at_one_of_them(tmp_path):
    from trustray.config import TrainWorkerResources

    _train(tmp_path, keep=None)
    assert [path.name for path in finished_checkpoints(tmp_path)] == ["step-2", "step-4", "step-6", "step-7"]
    assert [entry["step"] for entry in read_step(tmp_path / "step-4")["history"]] == [0, 2, 4]
    # run_training starts nothing when the plan's last step is already finished (no Ray here) ...
    shorter = TrainingPlan.every(tmp_path, 4, 2)
    assert run_training(TinyRegression, {"seed": 3}, shorter, TrainWorkerResources(), tmp_path) == tmp_path / "step-4"
    # ... and refuses a plan that ends between checkpoints it has already gone past.
    with pytest.raises(FileNotFoundError, match="past step 5"):
        run_training(TinyRegression, {"seed": 3}, TrainingPlan.every(tmp_path, 5, 2),
                     TrainWorkerResources(), tmp_path)


def test_checkpoints_at_chosen_steps_and_always_at_the_last(tmp_path):
    assert TrainingPlan.every(tmp_path, 7, 3).checkpoint_steps == {3, 6, 7}
    with pytest.raises(ValueError, match="last step"):
        TrainingPlan(tmp_path, 7, frozenset({3, 5}))
    context = WorkerContext(plan=TrainingPlan(tmp_path, 7, frozenset({3, 5, 7})), device=torch.device("cpu"))
    reports: list[dict] = []
    run_loop(TinyRegression({"seed": 3}, context), context, lambda metrics, checkpoint: reports.append(metrics))
    assert [(metrics["step"], metrics["steps_in_window"]) for metrics in reports] == [(3, 3), (5, 2), (7, 2)]


def test_on_ray_train_a_killed_run_resumes_to_the_in_process_result(tmp_path, ray_local):
    import ray.cloudpickle

    from trustray.config import TrainWorkerResources

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import a test module
    _train(tmp_path / "in-process", total=5)
    resources = TrainWorkerResources(num_cpus=1)
    plan = TrainingPlan.every(tmp_path / "ray" / "checkpoints", 5, 2, keep=2)
    with pytest.raises(Exception, match="killed at step 4"):
        run_training(TinyRegression, {"seed": 3, "kill_at": 4}, plan, resources, tmp_path / "ray")
    assert latest_checkpoint(plan.checkpoint_dir).name == "step-2"
    final = run_training(TinyRegression, {"seed": 3}, plan, resources, tmp_path / "ray")
    assert final == (plan.checkpoint_dir / "step-5").resolve()
    assert [entry["step"] for entry in read_step(final)["history"]] == [0, 2, 4, 5]
    _assert_same_state(torch.load(tmp_path / "in-process" / "step-5" / STATE_FILE, weights_only=True),
                       torch.load(final / STATE_FILE, weights_only=True))
    assert read_step(tmp_path / "in-process" / "step-5") == read_step(final)
    # Ray Train got the metrics with copies of step.json, not the state.
    assert list((tmp_path / "ray" / "ray_train").rglob(STEP_FILE))
    assert not list((tmp_path / "ray" / "ray_train").rglob(STATE_FILE))
    with pytest.raises(ValueError, match="num_workers"):
        run_training(TinyRegression, {"seed": 3}, plan, TrainWorkerResources(num_workers=2), tmp_path / "ray")
