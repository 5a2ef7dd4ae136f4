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
the trained tensors, the optimizer and the step, written atomically every `checkpoint_every` steps; a rerun
resumes from the newest one and replays the same batches. `output_dir/summarizer/` is the finished model
(`load_summarizer`) with `metadata.json`: base model, teacher signal, target statistics, history, and on the dev
questions how often the generated summary is empty when the target is (and vice versa) and contains the target.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from trustray.artifacts import atomic_folder, check_metadata, read_metadata, write_metadata
from trustray.config import BaseConfig, TrainWorkerResources
from trustray.core.rag.abstractive import KIND as SUMMARIZER_KIND
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import STEP_FILE, latest_checkpoint, prune_checkpoints
from trustray.pipelines.compressor_train import (
    SIGNAL_KIND,
    read_signal,
    split_dev,
    step_batch,
    steps_per_epoch,
)

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


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


class AbstractiveTrainConfig(BaseConfig):
    name: str = Field("default", description="Run name; the default output folder is outputs/abstractive_train/<name>.")
    signal_dir: str = Field("outputs/compressor_train/cpu/signal", description="A compressor_train run's `signal/` folder.")
    model: str = Field(DEFAULT_CHAT_MODEL, description="The summarizer's base model: built-in name, local folder or HF id (seq2seq or causal).")
    train: SummarizerTrainSettings = Field(default_factory=SummarizerTrainSettings, description="Fine-tuning.")
    resources: TrainWorkerResources = Field(default_factory=TrainWorkerResources, description="The worker.")
    output_dir: str | None = Field(None, description="Artifacts (default outputs/abstractive_train/<name>).")

    def output_path(self) -> Path:
        return Path(self.output_dir or f"outputs/abstractive_train/{self.name}")


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


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: fine-tune from the newest checkpoint (if any), checkpoint, report dev loss."""
    import ray.train
    import torch
    from tqdm.auto import tqdm

    from trustray.models.loading import gpu_or_cpu
    from trustray.runtime import setup_logging

    setup_logging()
    config = AbstractiveTrainConfig.model_validate(loop_config["config"])
    settings = config.train
    torch.set_num_threads(config.resources.torch_threads)
    device = gpu_or_cpu(config.resources.use_gpu)
    train, dev = loop_config["train"], loop_config["dev"]
    total = settings.epochs * steps_per_epoch(len(train), settings.batch_size)
    summarizer = load_base(config, device)
    params = [param for param in summarizer.model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, settings.warmup_steps)))
    folder = Path(loop_config["checkpoint_dir"])
    resume = latest_checkpoint(folder)
    start, history = 0, []
    if resume is not None:
        state = torch.load(resume / STATE_FILE, map_location=device, weights_only=True)
        summarizer.model.load_state_dict(state["trained"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        info = json.loads((resume / STEP_FILE).read_text())
        start, history = info["step"], info["history"]
        logger.info("resuming from %s (step %d of %d)", resume, start, total)
    losses: list[float] = []
    summarizer.model.train()
    for step in tqdm(range(start + 1, total + 1), initial=start, total=total, desc="summarizer training"):
        batch = step_batch(train, settings.batch_size, settings.seed, step)
        loss = summarizer.loss(summarizer.examples([p["question"] for p in batch], [p["passages"] for p in batch],
                                                   [p["target"] for p in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % settings.checkpoint_every == 0 or step == total:
            summarizer.model.eval()
            metrics = {"step": step, "train_loss": sum(losses) / len(losses),
                       **dev_report(summarizer, dev, settings.dev_generate if step == total else 0, settings.batch_size)}
            summarizer.model.train()
            history.append(metrics)
            losses = []
            logger.info("step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
            with atomic_folder(folder / f"step-{step}") as tmp:
                torch.save({"trained": trainable_state(summarizer.model), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict()}, tmp / STATE_FILE)
                (tmp / STEP_FILE).write_text(json.dumps({"step": step, "total": total, "history": history}, indent=2))
            prune_checkpoints(folder, keep=2)
            ray.train.report(metrics)


def identity(config: AbstractiveTrainConfig, signal: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "summarizer_training", "method": "abstractive-feedback", "model": config.model,
            "model_fingerprint": model_fingerprint(config.model), "signal": signal,
            "train": config.train.model_dump(mode="json", exclude={"checkpoint_every", "dev_generate"})}


def run(config: AbstractiveTrainConfig) -> Path:
    """Train (or reuse) the summarizer; returns its folder."""
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trustray.actors.cluster import init_ray
    from trustray.core.rag.abstractive import save_summarizer

    out = config.output_path().resolve()
    signal = read_metadata(config.signal_dir)
    if signal is None or signal.get("kind") != SIGNAL_KIND:
        raise FileNotFoundError(f"{config.signal_dir} holds no teacher signal: run compressor_train first")
    expected = identity(config, signal)
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
    init_ray()
    began = time.perf_counter()
    resources = config.resources
    TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "train": train, "dev": dev,
                           "checkpoint_dir": str(out / "checkpoints")},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.num_cpus}),
        run_config=RunConfig(name="ray_train", storage_path=str(out)),
    ).fit()
    final = latest_checkpoint(out / "checkpoints")
    info = json.loads((final / STEP_FILE).read_text()) if final else {}
    if not final or info["step"] != info["total"]:
        raise RuntimeError(f"training ended without a final checkpoint in {out / 'checkpoints'}")
    summarizer = load_base(config, "cpu")
    state = torch.load(final / STATE_FILE, map_location="cpu", weights_only=True)
    summarizer.model.load_state_dict(state["trained"], strict=False)
    save_summarizer(out / "summarizer", summarizer, {
        **expected, "train_questions": len(train), "dev_questions": len(dev),
        "empty_target_fraction": empty_targets, "steps": info["total"], "history": info["history"],
        "seconds": round(time.perf_counter() - began, 1), "config": config.model_dump(mode="json")})
    logger.info("trained summarizer: %s (%s)", out / "summarizer", info["history"][-1])
    return out / "summarizer"


PIPELINE = {"config": AbstractiveTrainConfig, "run": run}


def main(argv: list[str] | None = None) -> Path:
    from trustray.pipelines import pipeline_main

    return pipeline_main(PIPELINE, argv, prog="python -m trustray.pipelines.abstractive_train")


if __name__ == "__main__":
    from trustray.pipelines.abstractive_train import main as module_main

    module_main()
