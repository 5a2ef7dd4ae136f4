"""Distil the abstractive compressor (RECOMP) from the chat model's feedback, on Ray Train.

    trustray run abstractive_train --config configs/abstractive_train/<tiny|cpu>.yaml [key=value ...]
    python -m trustray.pipelines.abstractive_train --config ...

Reads the teacher signal of a finished `compressor_train` run (`signal_dir`: per training question, the retrieved
candidate sentences and the chat model's log p(answer | question, candidate) for EMPTY and each one). For every
question the target summary is the candidate that makes the gold answer most likely, the empty one included
(`feedback_target`); the input is the question with the retrieved sentences as passages. The dev questions are
the LSR scorer's (same seed and count), so neither compressor has trained on them.

A `Summarizer` (any seq2seq or causal LM; by default the chat model itself) is fine-tuned on those pairs by one Ray
Train worker. Only the top `trainable_layers` decoder blocks and the final norm are trained (the rest and the
embeddings stay frozen), which keeps a CPU step affordable and the checkpoints small: a checkpoint holds just
the trained tensors, the optimizer and the step, written atomically every `checkpoint_every` steps
(`trustray.pipelines.training`); a rerun resumes from the newest one and replays the same batches, and
`force=true` deletes `output_dir` and starts over. `output_dir/summarizer/` is the finished model
(`load_summarizer`) with `metadata.json`: base model, teacher signal, target statistics, history, and on the dev
questions how often the generated summary is empty when the target is (and vice versa) and contains the target.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from trustray.artifacts import check_metadata, read_artifact, write_metadata
from trustray.config import BaseConfig, PipelineConfig, TrainWorkerResources
from trustray.core.rag.abstractive import KIND as SUMMARIZER_KIND
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import prepare_output
from trustray.pipelines.compressor_train import (
    SIGNAL_KIND,
    read_signal,
    split_dev,
    step_batch,
    steps_per_epoch,
)
from trustray.pipelines.training import STATE_FILE, TrainingPlan, WorkerContext, read_step, run_training

logger = logging.getLogger(__name__)

# Checkpoints kept on disk (each holds the trained blocks and their AdamW moments).
KEEP_CHECKPOINTS = 2


class SummarizerTrainSettings(BaseConfig):
    """Fine-tuning of the summarizer on the feedback-chosen targets."""

    max_questions: int | None = Field(None, ge=1, description="Training questions used (None: all but the dev ones).")
    epochs: int = Field(1, ge=1, description="Passes over the training questions.")
    batch_size: int = Field(4, ge=1, description="Questions per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate (constant after a linear warmup).")
    warmup_steps: int = Field(5, ge=0, description="Steps of linear warmup.")
    trainable_layers: int = Field(4, ge=1, description="Top decoder blocks trained (plus the final norm).")
    max_input_tokens: int = Field(384, ge=16, description="Prompt tokens (passages cut at the end to fit).")
    max_new_tokens: int = Field(48, ge=1, description="Longest summary written.")
    dev_questions: int = Field(64, ge=1, description="Held-out questions (must equal compressor_train's train.dev_questions to share its split).")
    dev_generate: int = Field(32, ge=0, description="Dev questions summarised by generation at the end (0: none).")
    checkpoint_every: int = Field(20, ge=1, description="Steps between checkpoints (the unit of resume).")
    seed: int = Field(0, description="Seeds the dev split (as compressor_train's train.seed) and the batch order.")


class AbstractiveTrainConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/abstractive_train"

    signal_dir: str = Field("outputs/compressor_train/cpu/signal", description="A compressor_train run's `signal/` folder.")
    model: str = Field(DEFAULT_CHAT_MODEL, description="The summarizer's base model: built-in name, local folder or HF id (seq2seq or causal).")
    train: SummarizerTrainSettings = Field(default_factory=SummarizerTrainSettings, description="Fine-tuning.")
    resources: TrainWorkerResources = Field(default_factory=TrainWorkerResources, description="The worker.")


def training_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per signal row: the question, its candidates as passages, and the feedback-chosen target ("" = EMPTY)."""
    from trustray.core.rag.abstractive import feedback_target, passages_from_candidates

    return [{"id": row["id"], "question": row["question"], "answer": row["answer"],
             "passages": passages_from_candidates(row["candidate_titles"], row["candidates"]),
             "target": feedback_target(row["candidates"], row["teacher_logprobs"])} for row in rows]


def load_base(config: AbstractiveTrainConfig, device: str):
    """The base summarizer, with everything frozen except the top `trainable_layers` blocks and the final norm."""
    import torch

    from trustray.core.rag.abstractive import Summarizer
    from trustray.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(config.model, device, seq2seq_ok=True)
    settings = config.train
    summarizer = Summarizer(model, load_tokenizer(config.model), settings.max_input_tokens, settings.max_new_tokens)
    decoder = model.get_decoder()  # a causal model's body, or a seq2seq model's decoder stack
    lists = [child for child in decoder.children() if isinstance(child, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{config.model} has no list of decoder blocks to train")
    blocks = max(lists, key=len)
    if settings.trainable_layers > len(blocks):
        raise ValueError(f"trainable_layers={settings.trainable_layers} but the model has {len(blocks)} decoder blocks")
    for param in model.parameters():
        param.requires_grad_(False)
    trained = [*blocks[-settings.trainable_layers :]]
    final_norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layer_norm", None)
    if final_norm is not None:
        trained.append(final_norm)
    for module in trained:
        for param in module.parameters():
            param.requires_grad_(True)
    return summarizer


def trainable_state(model) -> dict[str, Any]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def dev_report(summarizer, dev: list[dict[str, Any]], count: int, batch_size: int) -> dict[str, float]:
    """Teacher-forced dev loss; for the first `count` questions, generated summaries against their targets."""
    import torch

    with torch.no_grad():
        losses = [float(summarizer.loss(summarizer.examples([p["question"] for p in chunk], [p["passages"] for p in chunk],
                                                             [p["target"] for p in chunk])))
                  for chunk in (dev[i : i + batch_size] for i in range(0, len(dev), batch_size))]
    report = {"dev_loss": sum(losses) / len(losses)}
    if count:
        sample = dev[:count]
        summaries = summarizer.summarize([p["question"] for p in sample], [p["passages"] for p in sample])
        empty_agree = [(not summary) == (not pair["target"]) for summary, pair in zip(summaries, sample, strict=True)]
        contains = [pair["target"].lower() in summary.lower() for summary, pair in zip(summaries, sample, strict=True)
                    if pair["target"]]
        report.update(dev_empty_agreement=sum(empty_agree) / len(sample),
                      dev_empty_rate=sum(not s for s in summaries) / len(sample),
                      dev_contains_target=sum(contains) / max(1, len(contains)),
                      dev_answer_kept=sum(pair["answer"].lower() in summary.lower()
                                          for summary, pair in zip(summaries, sample, strict=True)) / len(sample))
    return report


class SummarizerTraining:
    """The fine-tuning task (`trustray.pipelines.training`): one AdamW step per batch of questions, the trained
    tensors, optimizer and schedule in each checkpoint, dev loss at each checkpoint (and generation at the last)."""

    def __init__(self, data: dict[str, Any], context: WorkerContext):
        import torch

        config: AbstractiveTrainConfig = data["config"]
        self.settings = config.train
        self.train, self.dev = data["train"], data["dev"]
        self.device, self.total = context.device, context.plan.total_steps
        self.summarizer = load_base(config, context.device)
        params = [param for param in self.summarizer.model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / max(1, self.settings.warmup_steps)))
        self.summarizer.model.train()

    def begin(self) -> list[dict[str, Any]]:
        return []

    def train_step(self, step: int) -> dict[str, float]:
        batch = step_batch(self.train, self.settings.batch_size, self.settings.seed, step)
        loss = self.summarizer.loss(self.summarizer.examples(
            [p["question"] for p in batch], [p["passages"] for p in batch], [p["target"] for p in batch]))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return {"train_loss": float(loss.detach())}

    def checkpoint_metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        losses = [metrics["train_loss"] for metrics in window]
        self.summarizer.model.eval()
        generate = self.settings.dev_generate if step == self.total else 0
        metrics = {"train_loss": sum(losses) / len(losses),
                   **dev_report(self.summarizer, self.dev, generate, self.settings.batch_size)}
        self.summarizer.model.train()
        return metrics

    def save(self, folder: Path) -> None:
        import torch

        torch.save({"trained": trainable_state(self.summarizer.model), "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict()}, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        import torch

        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        self.summarizer.model.load_state_dict(state["trained"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


def expected_metadata(config: AbstractiveTrainConfig, signal: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoints (and, with the summarizer's kind, the finished summarizer) must agree on."""
    return {"kind": "summarizer_training", "method": "abstractive-feedback", "model": config.model,
            "model_fingerprint": model_fingerprint(config.model), "signal": signal,
            "train": config.train.model_dump(mode="json", exclude={"checkpoint_every", "dev_generate"})}


def run(config: AbstractiveTrainConfig) -> Path:
    """Train (or reuse) the summarizer; returns its folder."""
    import torch

    from trustray.core.rag.abstractive import save_summarizer

    out = prepare_output(config).resolve()
    signal = read_artifact(config.signal_dir, SIGNAL_KIND, "teacher signal", ": run compressor_train first")
    expected = expected_metadata(config, signal)
    if check_metadata(out / "summarizer", {**expected, "kind": SUMMARIZER_KIND}, kind="trained summarizer"):
        logger.info("reusing the summarizer in %s", out / "summarizer")
        return out / "summarizer"
    if not check_metadata(out / "checkpoints", expected, kind="summarizer checkpoints"):
        write_metadata(out / "checkpoints", expected)
    rows = read_signal(Path(config.signal_dir))
    train_rows, dev_rows = split_dev(rows, config.train.dev_questions, config.train.seed)
    train, dev = training_pairs(train_rows[: config.train.max_questions]), training_pairs(dev_rows)
    empty_targets = sum(not pair["target"] for pair in train) / len(train)
    logger.info("%d training questions (%.1f%% with the empty target), %d dev", len(train), 100 * empty_targets, len(dev))
    began = time.perf_counter()
    settings = config.train
    plan = TrainingPlan.every(out / "checkpoints", settings.epochs * steps_per_epoch(len(train), settings.batch_size),
                              settings.checkpoint_every, keep=KEEP_CHECKPOINTS)
    final = run_training(SummarizerTraining, {"config": config, "train": train, "dev": dev}, plan, config.resources,
                         out)
    info = read_step(final)
    summarizer = load_base(config, "cpu")
    state = torch.load(final / STATE_FILE, map_location="cpu", weights_only=True)
    summarizer.model.load_state_dict(state["trained"], strict=False)
    save_summarizer(out / "summarizer", summarizer, {
        **expected, "train_questions": len(train), "dev_questions": len(dev),
        "empty_target_fraction": empty_targets, "steps": info["total"], "history": info["history"],
        "seconds": round(time.perf_counter() - began, 1),
        # `force` is how this run was started, not a setting of the artifact.
        "config": config.model_dump(mode="json", exclude={"force"})})
    logger.info("trained summarizer: %s (%s)", out / "summarizer", info["history"][-1])
    return out / "summarizer"


PIPELINE = {"config": AbstractiveTrainConfig, "run": run}


if __name__ == "__main__":
    # Run through the importable module, not `__main__`: Ray pickles functions defined in `__main__` by value,
    # and workers cannot resolve their module-level helpers.
    from trustray.pipelines import run_module

    run_module("abstractive_train")
