"""Train the extractive compressor's sentence scorer from the chat model's own feedback (LSR), on Ray.

    trustray run compressor_train --config configs/compressor_train/<tiny|cpu|gpu>.yaml [key=value ...]
    python -m trustray.pipelines.compressor_train --config ...

Three stages under `output_dir`, each kept as it finishes; a rerun with the same settings reuses what is there,
and a folder made with other settings is refused (`ArtifactMismatchError` naming the settings that differ):

1. `questions/` — cloze questions made from the corpus itself (`trustray.data.cloze`; FanOutQA evidence pages,
   dev split included, and the RAG evaluation's pages, `trustray.data.rag_eval`, are never used).
2. `signal/` — Ray Data: an actor retrieves the top-k passages of each question and splits them into candidate
   sentences (`lsr_candidates`); a pool of chat-model actors scores the gold answer after every candidate and
   closed book (`teacher_logprobs_batch`, the engine's `score`, batched across questions). Each finished batch
   is one Parquet shard written atomically, so a crash loses only the batches in flight and a rerun scores only
   the questions no shard holds. The stored log-probabilities are β-free.
3. `checkpoints/` then `compressor/` — Ray Train (one worker, `trustray.pipelines.training`) trains
   `SentenceScorer` with the LSR loss; checkpoints (scorer, optimizer, schedule) every few steps, a rerun resumes
   from the newest one and replays the same batches. `compressor/` is the finished scorer (`SentenceScorer.load`, then
   `build_compressor("extractive", scorer=scorer.score, ...)`) with `metadata.json`: embedder fingerprint,
   teacher model, signal statistics and the training history (dev loss and agreement with the teacher).

To train again with other training settings (or β) on the same signal, delete `compressor/` and `checkpoints/`;
`force=true` deletes the whole `output_dir` (the signal too) and starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from trustray.artifacts import atomic_folder, check_metadata, read_metadata, write_metadata
from trustray.config import ActorResources, BaseConfig, PipelineConfig, PoolResources, TrainWorkerResources
from trustray.core.rag.lsr import teacher_requests, teacher_summary
from trustray.data.io import read_jsonl, write_jsonl
from trustray.models.embedders import EmbedderConfig
from trustray.models.engines import EngineConfig
from trustray.models.sources import model_fingerprint
from trustray.pipelines import prepare_output
from trustray.pipelines.training import STATE_FILE, TrainingPlan, WorkerContext, read_step, run_training

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "questions.jsonl"
SIGNAL_KIND = "lsr_teacher_signal"


class QuestionSettings(BaseConfig):
    """Training questions: cloze questions from the corpus, never from FanOutQA."""

    count: int = Field(1000, ge=1, description="Cloze questions (one per Wikipedia page, evidence pages excluded).")
    seed: int = Field(0, description="Seeds the choice of pages and blanked spans.")
    max_sentence_words: int = Field(40, ge=6, description="Longest sentence a question is made from, in words.")


class RetrievalSettings(BaseConfig):
    """Where the candidate sentences come from."""

    index_dir: str = Field("outputs/index/wiki-minilm", description="Passage index written by build_index.")
    embedder: EmbedderConfig = Field(
        default_factory=EmbedderConfig,
        description="Query embedder (must be the index's) and the weights the scorer starts from.",
    )
    top_k: int = Field(3, ge=1, le=50, description="Passages retrieved per question.")
    max_candidates: int = Field(12, ge=1, description="Most candidate sentences per question (EMPTY not counted).")
    drop_source_fraction: float = Field(
        0.3, ge=0, le=1,
        description="Share of questions whose source sentence is removed from the candidates, so other sentences "
        "or EMPTY must carry the answer (otherwise the scorer learns word overlap with the cloze).",
    )


class TeacherSettings(BaseConfig):
    """The chat model whose answer likelihoods are the training target."""

    chat: EngineConfig = Field(default_factory=EngineConfig, description="The teacher (the chat model served).")
    beta: float = Field(
        0.5, gt=0,
        description="Temperature of the target softmax(ℓ / β) over mean per-token log-probs; used by training "
        "only (the stored signal is β-free, changing β reuses it).",
    )
    questions_per_batch: int = Field(8, ge=1, description="Questions per Ray Data batch, i.e. per signal shard.")


class ScorerTrainSettings(BaseConfig):
    """LSR training of the bi-encoder sentence scorer."""

    epochs: int = Field(2, ge=1, description="Passes over the training questions.")
    batch_size: int = Field(16, ge=1, description="Questions per optimizer step (all their candidates at once).")
    lr: float = Field(2e-5, gt=0, description="AdamW peak learning rate (RECOMP and REPLUG use 2e-5).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with a linear warmup; linear decay after.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    gamma: float = Field(0.05, gt=0, description="Initial temperature: sentence logit = cosine / gamma (then learned).")
    calibration_steps: int = Field(300, ge=0, description="Full-batch steps fitting the logit scale and the EMPTY head with the encoder frozen, before training the encoder (0: off).")
    head_lr: float = Field(1e-2, gt=0, description="AdamW peak learning rate of the logit scale and the EMPTY head (no weight decay); the encoder uses `lr`.")
    max_seq_length: int = Field(128, ge=8, description="Embedder tokens read per question or sentence.")
    dev_questions: int = Field(64, ge=1, description="Questions held out to report dev loss and teacher agreement.")
    checkpoint_every: int = Field(20, ge=1, description="Steps between checkpoints (the unit of resume).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    seed: int = Field(0, description="Seeds the held-out split, the batch order and dropout.")


class CompressorTrainResources(BaseConfig):
    retriever: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=0.5), description="The retrieval actor.")
    teacher: PoolResources = Field(default_factory=PoolResources, description="Teacher actor pool.")
    train: TrainWorkerResources = Field(default_factory=TrainWorkerResources, description="The training worker.")


class CompressorTrainConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/compressor_train"

    questions: QuestionSettings = Field(default_factory=QuestionSettings, description="Training questions.")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings, description="Candidate sentences.")
    teacher: TeacherSettings = Field(default_factory=TeacherSettings, description="The LSR target.")
    train: ScorerTrainSettings = Field(default_factory=ScorerTrainSettings, description="Scorer training.")
    resources: CompressorTrainResources = Field(default_factory=CompressorTrainResources, description="Ray resources.")


# -- what each stage must agree on to be reused ------------------------------------------------------------------

def prompt_fingerprint() -> str:
    """Names the teacher's prompt templates: a signal scored with other prompts is not reused."""
    sample = teacher_requests("QUESTION", [("TITLE", "SENTENCE")])
    return hashlib.sha256(json.dumps(sample, sort_keys=True).encode()).hexdigest()[:12]


def index_expected_metadata(index_dir: str) -> dict[str, Any]:
    """The passage index's metadata the signal depends on."""
    metadata = read_metadata(index_dir)
    if metadata is None:
        raise FileNotFoundError(f"{index_dir} holds no passage index; build it with `trustray run build_index`")
    return {key: metadata.get(key) for key in ("corpus_fingerprint", "embedder_fingerprint", "passage_tokens",
                                                "num_passages")}


def expected_metadata(config: CompressorTrainConfig) -> dict[str, dict[str, Any]]:
    """The metadata each stage folder must hold to be reused: questions ⊂ signal ⊂ training ⊂ compressor."""
    questions = {"kind": "cloze_questions", "pages": "train", **config.questions.model_dump(mode="json")}
    retrieval = config.retrieval
    embedder = {"embedder": retrieval.embedder.model, "embedder_fingerprint": model_fingerprint(retrieval.embedder.model)}
    teacher = {"teacher_model": config.teacher.chat.model,
               "teacher_fingerprint": model_fingerprint(config.teacher.chat.model)}
    signal = {
        "kind": SIGNAL_KIND, "questions": questions, "index": index_expected_metadata(retrieval.index_dir), **embedder,
        **teacher, "prompt_fingerprint": prompt_fingerprint(),
        "candidates": retrieval.model_dump(mode="json", include={"top_k", "max_candidates", "drop_source_fraction"}),
    }
    training = {"kind": "lsr_scorer_checkpoints", "signal": signal, "beta": config.teacher.beta,
                "train": config.train.model_dump(mode="json", exclude={"keep_checkpoints"})}
    compressor = {"kind": "sentence_scorer", **embedder, **teacher, "method": "extractive-lsr",
                  "signal": signal, "beta": config.teacher.beta, "train": training["train"]}
    return {"questions": questions, "signal": signal, "training": training, "compressor": compressor}


# -- stage 1: questions --------------------------------------------------------------------------------------------

def build_questions(config: CompressorTrainConfig, folder: Path, expected: dict[str, Any]) -> list[dict[str, Any]]:
    """The cloze questions, made once and read back afterwards."""
    from trustray.data.cloze import build_cloze_questions

    if check_metadata(folder, expected, kind="training questions"):
        return read_jsonl(folder / QUESTIONS_FILE)
    settings = config.questions
    questions = build_cloze_questions(settings.count, seed=settings.seed, max_sentence_words=settings.max_sentence_words,
                                      pages="train")
    with atomic_folder(folder) as tmp:
        write_jsonl(questions, tmp / QUESTIONS_FILE)
        write_metadata(tmp, {**expected, "rows": len(questions)})
    logger.info("made %d cloze questions in %s", len(questions), folder)
    return questions


# -- stage 2: the teacher signal on Ray Data -----------------------------------------------------------------------

def drops_source(question_id: str, fraction: float, seed: int) -> bool:
    """Whether this question's source sentence is left out of its candidates (seeded per question)."""
    return random.Random(f"{seed}-{question_id}").random() < fraction


class RetrieveCandidates:
    """Ray Data callable class: top-k passages per question, split into the question's candidate sentences."""

    def __init__(self, index_dir: str, embedder: EmbedderConfig, top_k: int, max_candidates: int,
                 drop_source_fraction: float, seed: int):
        from trustray.actors.retriever import Retriever

        self.retriever = Retriever(index_dir, embedder)
        self.top_k, self.max_candidates = top_k, max_candidates
        self.drop_source_fraction, self.seed = drop_source_fraction, seed

    def __call__(self, batch):
        import pyarrow as pa

        from trustray.core.rag.lsr import lsr_candidates

        rows = batch.to_pylist()
        hits = self.retriever.retrieve([row["question"] for row in rows], self.top_k)
        columns: dict[str, list] = {"candidate_titles": [], "candidates": [], "source_dropped": [], "passage_ids": []}
        for row, passages in zip(rows, hits, strict=True):
            dropped = drops_source(row["id"], self.drop_source_fraction, self.seed)
            candidates = lsr_candidates([(p.title, p.text) for p in passages], self.max_candidates,
                                        source=(row["title"], row["sentence"]), drop_source=dropped)
            columns["candidate_titles"].append([title for title, _ in candidates])
            columns["candidates"].append([sentence for _, sentence in candidates])
            columns["source_dropped"].append(dropped)
            columns["passage_ids"].append([p.id for p in passages])
        for name, values in columns.items():
            batch = batch.append_column(name, pa.array(values))
        return batch


class TeacherScores:
    """Ray Data callable class: one chat model per actor; adds `teacher_logprobs` (EMPTY first, then each
    candidate) and the actor seconds spent on each question."""

    def __init__(self, chat: EngineConfig):
        from trustray.actors.chat import ChatModel

        self.chat = ChatModel(chat)

    def __call__(self, batch):
        import pyarrow as pa

        from trustray.core.rag.lsr import teacher_logprobs_batch

        rows = batch.to_pylist()
        examples = [(row["question"], row["answer"], list(zip(row["candidate_titles"], row["candidates"], strict=True)))
                    for row in rows]
        began = time.perf_counter()
        values = teacher_logprobs_batch(self.chat.engine, examples)
        seconds = time.perf_counter() - began
        scorings = sum(len(row) for row in values)
        batch = batch.append_column("teacher_logprobs", pa.array(values, type=pa.list_(pa.float64())))
        return batch.append_column("teacher_seconds", pa.array([seconds * len(row) / scorings for row in values]))


def signal_dataset(config: CompressorTrainConfig, questions: list[dict[str, Any]]):
    """The lazy Ray Data plan: questions -> candidate sentences (retrieval actor) -> teacher log-probs (pool)."""
    import ray

    items = [{"id": q["id"], "question": q["question"], "answer": q["golden_answers"][0], "title": q["title"],
              "sentence": q["sentence"]} for q in questions]
    per_batch = config.teacher.questions_per_batch
    pool = config.resources.teacher
    retriever = config.resources.retriever
    return (
        ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_batch)))
        .map_batches(
            RetrieveCandidates,
            fn_constructor_kwargs={
                "index_dir": str(Path(config.retrieval.index_dir).resolve()),
                "embedder": config.retrieval.embedder,
                "top_k": config.retrieval.top_k,
                "max_candidates": config.retrieval.max_candidates,
                "drop_source_fraction": config.retrieval.drop_source_fraction,
                "seed": config.questions.seed,
            },
            compute=ray.data.ActorPoolStrategy(size=1),
            **retriever.ray_options(),
            batch_size=per_batch,
            batch_format="pyarrow",
        )
        .map_batches(
            TeacherScores,
            fn_constructor_kwargs={"chat": config.teacher.chat},
            compute=ray.data.ActorPoolStrategy(size=pool.size),
            **pool.ray_options(),
            batch_size=per_batch,
            batch_format="pyarrow",
        )
    )


def write_shard(folder: Path, table) -> Path:
    """One finished batch as `shard-<hash of its ids>.parquet`, appearing whole or not at all."""
    import pyarrow.parquet as pq

    ids = sorted(table.column("id").to_pylist())
    path = folder / f"shard-{hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}.parquet"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_signal(folder: Path) -> list[dict[str, Any]]:
    """Every question the shards hold, sorted by id (one row per question)."""
    import pyarrow.parquet as pq

    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("shard-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows.setdefault(row["id"], row)
    return [rows[key] for key in sorted(rows)]


def build_signal(config: CompressorTrainConfig, questions: list[dict[str, Any]], folder: Path,
                 expected: dict[str, Any]) -> list[dict[str, Any]]:
    """Score the questions no shard holds yet; returns the whole signal (sorted by id, as `read_signal`)."""
    from tqdm.auto import tqdm

    if not check_metadata(folder, expected, kind="teacher signal"):
        folder.mkdir(parents=True, exist_ok=True)
        write_metadata(folder, expected)
    done = {row["id"] for row in read_signal(folder)}
    pending = [q for q in questions if q["id"] not in done]
    if pending:
        logger.info("teacher signal: %d of %d questions to score into %s", len(pending), len(questions), folder)
        began = time.perf_counter()
        with tqdm(total=len(questions), initial=len(questions) - len(pending), desc="teacher signal") as progress:
            for table in signal_dataset(config, pending).iter_batches(batch_size=None, batch_format="pyarrow"):
                write_shard(folder, table)
                progress.update(table.num_rows)
        logger.info("teacher signal scored in %.0f s", time.perf_counter() - began)
    rows = read_signal(folder)
    missing = sorted({q["id"] for q in questions} - {row["id"] for row in rows})
    if missing:
        raise RuntimeError(f"the teacher signal lacks {len(missing)} questions (e.g. {missing[:3]}); rerun to score them")
    if not pending and "rows" in (read_metadata(folder) or {}):
        return rows
    scorings = sum(len(row["teacher_logprobs"]) for row in rows)
    write_metadata(folder, {
        **expected, "rows": len(rows), "scorings": scorings,
        "teacher_seconds_per_scoring": round(sum(row["teacher_seconds"] for row in rows) / scorings, 4),
        # β does not move the argmax: this fraction belongs to the β-free signal.
        "empty_best_fraction": teacher_summary([row["teacher_logprobs"] for row in rows], 1.0)["empty_best_fraction"],
    })
    return rows


def signal_stats(rows: list[dict[str, Any]], beta: float) -> dict[str, Any]:
    """The teacher's targets at `beta`, plus how often the sentence a cloze came from is the teacher's best
    sentence (where it was kept)."""
    summary = teacher_summary([row["teacher_logprobs"] for row in rows], beta)
    with_source = [row for row in rows if not row["source_dropped"]]
    source_best = sum(
        1 for row in with_source
        if row["candidates"][max(range(len(row["candidates"])), key=lambda i: row["teacher_logprobs"][1 + i])]
        == row["sentence"]
    )
    return {**summary, "beta": beta, "source_dropped_fraction": 1 - len(with_source) / len(rows),
            "source_best_fraction": source_best / max(1, len(with_source))}


# -- stage 3: the scorer on Ray Train -------------------------------------------------------------------------------

def split_dev(rows: list[dict[str, Any]], dev_questions: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, dev): a seeded sample of `dev_questions` held out, both in their original order."""
    if dev_questions >= len(rows):
        raise ValueError(f"dev_questions={dev_questions} leaves no training question of {len(rows)}")
    held_out = set(random.Random(f"dev-{seed}").sample(range(len(rows)), dev_questions))
    return ([row for i, row in enumerate(rows) if i not in held_out], [row for i, row in enumerate(rows) if i in held_out])


def steps_per_epoch(train_rows: int, batch_size: int) -> int:
    return math.ceil(train_rows / batch_size)


def step_batch(rows: list[dict[str, Any]], batch_size: int, seed: int, step: int) -> list[dict[str, Any]]:
    """The questions of training step `step` (1-based): epochs are seeded shuffles, so a resumed run replays them."""
    per_epoch = steps_per_epoch(len(rows), batch_size)
    epoch, position = divmod(step - 1, per_epoch)
    order = list(range(len(rows)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return [rows[i] for i in order[position * batch_size : (position + 1) * batch_size]]


def lm_targets(rows: list[dict[str, Any]]):
    """Teacher log-probs `[B, 1 + C]` padded with 0 (the padding is masked by the scorer's mask)."""
    import torch

    width = max(len(row["teacher_logprobs"]) for row in rows)
    return torch.tensor([row["teacher_logprobs"] + [0.0] * (width - len(row["teacher_logprobs"])) for row in rows])


def new_scorer(config: CompressorTrainConfig, device: str):
    """The untrained scorer: the configured embedder plus a fresh EMPTY head."""
    from sentence_transformers import SentenceTransformer

    from trustray.core.rag.scorer import SentenceScorer
    from trustray.models.sources import resolve_model_source

    encoder = SentenceTransformer(resolve_model_source(config.retrieval.embedder.model), device=device)
    encoder.max_seq_length = config.train.max_seq_length
    return SentenceScorer(encoder, gamma=config.train.gamma).to(device)


def evaluate(scorer, rows: list[dict[str, Any]], beta: float, batch_size: int) -> dict[str, float]:
    """Dev metrics: LSR loss, how often the scorer's top choice is the teacher's, how often it picks EMPTY, and the
    regret (teacher's best ℓ minus ℓ of the scorer's choice, nats per answer token; 0 is perfect)."""
    import torch

    from trustray.core.rag.lsr import lsr_loss

    scorer.eval()
    loss = agree = empty = regret = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            logits, mask = scorer([row["question"] for row in chunk], [row["candidates"] for row in chunk])
            lm = lm_targets(chunk).to(logits.device)
            loss += lsr_loss(logits, lm, mask, beta).item() * len(chunk)
            choice = logits.argmax(dim=1)
            best = lm.masked_fill(~mask, float("-inf")).argmax(dim=1)
            agree += (choice == best).sum().item()
            empty += (choice == 0).sum().item()
            regret += (lm.gather(1, best[:, None]) - lm.gather(1, choice[:, None])).sum().item()
    count = len(rows)
    return {"dev_loss": loss / count, "dev_top1_agreement": agree / count, "dev_empty_rate": empty / count,
            "dev_regret": regret / count}


class ScorerTraining:
    """The LSR training task (`trustray.pipelines.training`): one optimizer step per batch of questions, the
    scorer, optimizer and schedule in each checkpoint, dev metrics at each checkpoint."""

    def __init__(self, data: dict[str, Any], context: WorkerContext):
        import torch

        self.config: CompressorTrainConfig = data["config"]
        self.device = context.device
        settings = self.settings = self.config.train
        self.train, self.dev = split_dev(read_signal(data["signal_dir"]), settings.dev_questions, settings.seed)
        total = context.plan.total_steps
        warmup = max(1, round(settings.warmup_ratio * total))
        torch.manual_seed(settings.seed)
        self.scorer = new_scorer(self.config, context.device)
        head = {id(param) for param in self.scorer.head_parameters()}
        self.optimizer = torch.optim.AdamW([
            {"params": [param for param in self.scorer.parameters() if id(param) not in head], "lr": settings.lr},
            {"params": self.scorer.head_parameters(), "lr": settings.head_lr, "weight_decay": 0.0},
        ], weight_decay=settings.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))

    def dev_metrics(self) -> dict[str, float]:
        return evaluate(self.scorer, self.dev, self.config.teacher.beta, self.settings.batch_size)

    def begin(self) -> list[dict[str, Any]]:
        """The untrained scorer's dev metrics, then (when configured) the calibration of scale and EMPTY head."""
        history = [{"step": 0, **self.dev_metrics()}]
        logger.info("untrained scorer: %s", history[0])
        if self.settings.calibration_steps:
            train_loss = self.scorer.calibrate(
                [row["question"] for row in self.train], [row["candidates"] for row in self.train],
                lm_targets(self.train), self.config.teacher.beta, self.settings.calibration_steps)
            history.append({"step": 0, "calibrated": True, "train_loss": train_loss, "gamma": self.scorer.gamma,
                            **self.dev_metrics()})
            logger.info("calibrated scale and EMPTY head: %s", history[-1])
        return history

    def train_step(self, step: int) -> dict[str, float]:
        import torch

        torch.manual_seed(self.settings.seed * 1_000_003 + step)  # dropout replays exactly after a resume
        self.scorer.train()
        rows = step_batch(self.train, self.settings.batch_size, self.settings.seed, step)
        loss = self.scorer.lsr_step(self.optimizer, [row["question"] for row in rows],
                                    [row["candidates"] for row in rows], lm_targets(rows), self.config.teacher.beta)
        self.schedule.step()
        return {"train_loss": loss}

    def checkpoint_metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        losses = [metrics["train_loss"] for metrics in window]
        return {"epoch": (step - 1) // steps_per_epoch(len(self.train), self.settings.batch_size) + 1,
                "train_loss": sum(losses) / len(losses), "lr": self.schedule.get_last_lr()[0],
                "gamma": self.scorer.gamma, **self.dev_metrics()}

    def save(self, folder: Path) -> None:
        import torch

        torch.save({"scorer": self.scorer.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict()}, folder / STATE_FILE)

    def load(self, folder: Path) -> None:
        import torch

        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        self.scorer.load_state_dict(state["scorer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


def run(config: CompressorTrainConfig) -> Path:
    """Make (or reuse) the training questions, the teacher signal and the trained scorer; returns its folder."""
    import torch

    from trustray.actors.cluster import init_ray

    out = prepare_output(config)
    expected = expected_metadata(config)
    compressor_dir = out / "compressor"
    if check_metadata(compressor_dir, expected["compressor"], kind="trained compressor"):
        logger.info("reusing the trained compressor in %s", compressor_dir)
        return compressor_dir
    # Refuse a folder of other settings before spending anything on it.
    resuming = check_metadata(out / "checkpoints", expected["training"], kind="scorer training checkpoints")
    check_metadata(out / "signal", expected["signal"], kind="teacher signal")
    began = time.perf_counter()
    questions = build_questions(config, out / "questions", expected["questions"])
    init_ray()
    rows = build_signal(config, questions, out / "signal", expected["signal"])
    stats = signal_stats(rows, config.teacher.beta)
    logger.info("teacher signal: %d questions, %.1f candidates each; EMPTY is the teacher's best for %.1f%%, the "
                "source sentence for %.1f%% (where kept); mean entropy of the target %.3f nats (uniform %.3f)",
                stats["questions"], stats["mean_candidates"], 100 * stats["empty_best_fraction"],
                100 * stats["source_best_fraction"], stats["mean_teacher_entropy"], stats["mean_uniform_entropy"])
    signal_seconds = time.perf_counter() - began
    if not resuming:
        write_metadata(out / "checkpoints", expected["training"])
    settings = config.train
    train_rows, dev_rows = split_dev(rows, settings.dev_questions, settings.seed)
    plan = TrainingPlan.every(out / "checkpoints", settings.epochs * steps_per_epoch(len(train_rows), settings.batch_size),
                              settings.checkpoint_every, keep=settings.keep_checkpoints)
    final = run_training(ScorerTraining, {"config": config, "signal_dir": (out / "signal").resolve()}, plan,
                         config.resources.train, out)
    info = read_step(final)
    scorer = new_scorer(config, "cpu")
    scorer.load_state_dict(torch.load(final / STATE_FILE, map_location="cpu", weights_only=True)["scorer"])
    signal_metadata = read_metadata(out / "signal") or {}
    scorer.save(compressor_dir, {
        **expected["compressor"], "signal_stats": stats,
        "signal_cost": {key: signal_metadata.get(key) for key in ("rows", "scorings", "teacher_seconds_per_scoring")},
        "train_questions": len(train_rows),
        "dev_questions": len(dev_rows), "dev_question_ids": [row["id"] for row in dev_rows],
        "steps": info["total"], "history": info["history"],
        "seconds": {"questions_and_signal": round(signal_seconds, 1),
                    "training": round(time.perf_counter() - began - signal_seconds, 1)},
        # `force` is how this run was started, not a setting of the artifact.
        "config": config.model_dump(mode="json", exclude={"force"}),
    })
    logger.info("trained compressor: %s (dev agreement with the teacher %.3f -> %.3f)", compressor_dir,
                info["history"][0]["dev_top1_agreement"], info["history"][-1]["dev_top1_agreement"])
    return compressor_dir


PIPELINE = {"config": CompressorTrainConfig, "run": run}


if __name__ == "__main__":
    # Run through the importable module, not `__main__`: Ray pickles functions defined in `__main__` by value,
    # and workers cannot resolve their module-level helpers.
    from trustray.pipelines import run_module

    run_module("compressor_train")
