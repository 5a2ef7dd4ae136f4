"""`trustray eval rag`: no retrieval vs retrieval-augmented answers, with or without a passage compressor.

    trustray eval rag --config configs/eval_rag/cpu.yaml [--compressor truncate --compressor extractive] [key=value ...]

Reads top to bottom: load questions → retrieve top-k passages once (RetrieverActor; with `irrelevant` > 0, random
passages from the index are mixed in, the robustness run) → for every condition (closed book, full top-k, each
compressor) answer the questions one at a time (ChatModelActor, greedy), timing each end to end: retrieval, then
the compressor (its own actor), then generation → exact match, token F1, answer-contained accuracy, generator
prompt tokens, compression, p50/p95 latency → `output_dir/summary.json` + per-question `questions.jsonl`. The prompt is
`trustray.core.rag.prompting`, the same one the service uses; an empty compression asks closed book.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, ClassVar, Literal

import numpy as np
import ray
from pydantic import Field, model_validator

from trustray.actors.chat import start_chat_actor
from trustray.actors.cluster import init_ray
from trustray.actors.compressor import CompressorConfig, start_compressor_actor
from trustray.actors.retriever import RetrieverActor
from trustray.artifacts import atomic_write_text
from trustray.config import ActorResources, PipelineConfig
from trustray.core.rag.index import Passage
from trustray.core.rag.metrics import answer_contained, exact_match, score_answers, token_f1
from trustray.core.rag.prompting import closed_book_messages, rag_messages
from trustray.data.io import write_jsonl
from trustray.data.qa import load_qa
from trustray.models.embedders import EmbedderConfig
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.pipelines import prepare_output
from trustray.runtime import machine_info

logger = logging.getLogger(__name__)

Mode = Literal["closed_book", "rag"]
# Written into output_dir: the summary (what `format_table` shows) and one row per question.
SUMMARY_FILE = "summary.json"
QUESTIONS_FILE = "questions.jsonl"


class EvalRagConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/eval_rag"

    qa: str = Field("rag_dev", description="`rag_dev` (the bundled dev split) or a FlashRAG-style JSONL/Parquet file.")
    index_dir: str = Field("outputs/index/wiki-minilm", description="Index folder written by build_index.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="Query embedder (must match the index).")
    chat: EngineConfig = Field(default_factory=EngineConfig, description="The chat model answering the questions.")
    modes: list[Mode] = Field(["closed_book", "rag"], description="Conditions without a compressor.")
    compressors: list[CompressorConfig] = Field(
        default_factory=list, description="One more condition per compressor (retrieve → compress → generate).",
    )
    top_k: int = Field(3, ge=1, le=50, description="Passages retrieved per question.")
    irrelevant: int = Field(
        0, ge=0, description="Robustness run: random passages of the index (seeded per question) mixed into each "
        "question's top-k at random positions.",
    )
    max_tokens: int = Field(24, ge=1, le=512, description="Most answer tokens (greedy decoding).")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N questions (smoke runs).")
    seed: int = Field(0, description="Seed of the irrelevant passages.")
    chat_resources: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=1), description="Chat actor resources.")
    retriever_resources: ActorResources = Field(
        default_factory=lambda: ActorResources(num_cpus=0.5), description="Retriever actor resources."
    )
    compressor_resources: ActorResources = Field(
        default_factory=lambda: ActorResources(num_cpus=0.5), description="Resources of each compressor's actor."
    )

    @model_validator(mode="after")
    def _conditions(self) -> EvalRagConfig:
        labels = list(self.modes) + [label(c) for c in self.compressors]
        if not labels:
            raise ValueError("nothing to evaluate: give modes and/or compressors")
        if len(set(labels)) != len(labels):
            raise ValueError(f"conditions must have distinct labels (set compressors[].label): {labels}")
        return self


def label(compressor: CompressorConfig) -> str:
    """The condition's name: the compressor's label, else its name (+lsr for a trained scorer, +distilled for a
    trained summarizer)."""
    if compressor.label:
        return compressor.label
    if compressor.scorer_dir:
        return f"{compressor.name}+lsr"
    return f"{compressor.name}+distilled" if compressor.summarizer_dir else compressor.name


def with_irrelevant(passages: list[Passage], pool: list[Passage], count: int, rng: random.Random) -> list[Passage]:
    """`passages` with `count` passages of `pool` not among them inserted at random positions."""
    retrieved = {p.id for p in passages}
    mixed = list(passages)
    for extra in rng.sample([p for p in pool if p.id not in retrieved], count):
        mixed.insert(rng.randrange(len(mixed) + 1), extra)
    return mixed


def answer_one(question: str, passages: list[Passage] | None, chat: Any, compressor: Any,
               sampling: SamplingParams) -> dict[str, Any]:
    """Compress (when a compressor is given), build the prompt, generate: the answer, its costs and latency.

    Retrieval ran once beforehand, so its measured per-question time is added by the caller.
    """
    began = time.perf_counter()
    row: dict[str, Any] = {}
    if passages is None:
        messages = closed_book_messages(question)
    else:
        pairs = [(p.title, p.text) for p in passages]
        if compressor is not None:
            compressed = ray.get(compressor.compress.remote(question, pairs))
            pairs = compressed.passages
            row.update(context_tokens=compressed.context_tokens, source_tokens=compressed.source_tokens,
                       empty=compressed.empty, context=pairs)
        messages = rag_messages(question, pairs)
    completion = ray.get(chat.generate.remote([messages], sampling))[0]
    row.update(answer=completion.text.strip(), prompt_tokens=completion.prompt_tokens,
               seconds=time.perf_counter() - began)
    return row


def summarize(rows: list[dict[str, Any]], goldens: list[list[str]], retrieval_seconds: float) -> dict[str, Any]:
    """Quality, generator tokens and latency (ms, retrieval included when the condition retrieves) of one condition."""
    latencies = np.array([row["seconds"] + retrieval_seconds for row in rows]) * 1000
    summary = {
        **score_answers([row["answer"] for row in rows], goldens),
        "tokens_in": float(np.mean([row["prompt_tokens"] for row in rows])),
        "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
    }
    if "context_tokens" in rows[0]:
        summary["context_kept"] = float(np.sum([r["context_tokens"] for r in rows]) /
                                        max(1, np.sum([r["source_tokens"] for r in rows])))
        summary["empty_rate"] = float(np.mean([r["empty"] for r in rows]))
    return summary


def check_resources(config: EvalRagConfig) -> None:
    """The chat actor and every compressor actor are alive at once: refuse a plan the cluster cannot place, which
    would otherwise wait forever for the last actor."""
    needed = {"CPU": config.chat_resources.num_cpus + len(config.compressors) * config.compressor_resources.num_cpus,
              "GPU": config.chat_resources.num_gpus + len(config.compressors) * config.compressor_resources.num_gpus}
    available = ray.cluster_resources()
    short = {kind: (amount, available.get(kind, 0.0)) for kind, amount in needed.items() if amount > available.get(kind, 0.0)}
    if short:
        detail = ", ".join(f"{amount:g} {kind} needed, {have:g} in the cluster" for kind, (amount, have) in short.items())
        raise ValueError(f"the chat model and {len(config.compressors)} compressor actors do not fit ({detail}): "
                         "lower chat_resources / compressor_resources or evaluate fewer compressors at once")


def run(config: EvalRagConfig) -> dict:
    """Every condition on the QA split; returns the summary (also written as JSON, rows as JSONL)."""
    from tqdm.auto import tqdm

    output_dir = prepare_output(config)
    questions = load_qa(config.qa)[: config.limit]
    conditions = list(config.modes) + [label(c) for c in config.compressors]
    logger.info("evaluating %d questions: %s", len(questions), conditions)
    init_ray()

    retrieved: list[list[Passage]] = [[] for _ in questions]
    retrieval_seconds = 0.0
    if any(condition != "closed_book" for condition in conditions):
        retriever = RetrieverActor.options(**config.retriever_resources.ray_options()).remote(
            config.index_dir, config.embedder)
        ray.get(retriever.retrieve.remote(["warm-up"], 1))
        began = time.perf_counter()
        retrieved = ray.get(retriever.retrieve.remote([q["question"] for q in questions], config.top_k))
        retrieval_seconds = (time.perf_counter() - began) / len(questions)
        if config.irrelevant:
            pool = ray.get(retriever.random_passages.remote(4 * config.irrelevant * len(questions), config.seed))
            retrieved = [with_irrelevant(found, pool, config.irrelevant, random.Random(f"{config.seed}:{q['id']}"))
                         for q, found in zip(questions, retrieved, strict=True)]
        ray.kill(retriever)

    check_resources(config)
    chat = start_chat_actor(config.chat, config.chat_resources)
    compressors = {label(c): start_compressor_actor(c, config.chat.model, config.compressor_resources)
                   for c in config.compressors}
    sampling = SamplingParams(max_tokens=config.max_tokens, temperature=0.0)
    goldens = [q["golden_answers"] for q in questions]
    summary: dict = {"n_questions": len(questions), "qa": config.qa, "top_k": config.top_k,
                     "irrelevant": config.irrelevant, "retrieval_ms": retrieval_seconds * 1000}
    rows = [{"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"],
             "sources": [{"id": p.id, "title": p.title, "score": p.score} for p in found]}
            for q, found in zip(questions, retrieved, strict=True)]
    # Conditions take turns on each question, so a change of load on the machine during the run shifts every
    # condition's latency alike instead of whichever condition was running then.
    answers_of: dict[str, list[dict[str, Any]]] = {condition: [] for condition in conditions}
    for question, found in tqdm(list(zip(questions, retrieved, strict=True)), desc="questions"):
        for condition in conditions:
            passages = None if condition == "closed_book" else found
            answers_of[condition].append(
                answer_one(question["question"], passages, chat, compressors.get(condition), sampling))
    for condition, answers in answers_of.items():
        summary[condition] = summarize(answers, goldens, 0.0 if condition == "closed_book" else retrieval_seconds)
        for row, answer, golden in zip(rows, answers, goldens, strict=True):
            row[condition] = {**answer, "em": exact_match(answer["answer"], golden),
                              "f1": token_f1(answer["answer"], golden),
                              "contains": answer_contained(answer["answer"], golden)}
        logger.info("%s: %s", condition, summary[condition])
    if "rag" in summary:
        for condition in conditions:
            summary[condition]["compression"] = summary[condition]["tokens_in"] / summary["rag"]["tokens_in"]
    for actor in [chat, *compressors.values()]:
        ray.kill(actor)

    summary.update(
        conditions=conditions, chat_model=config.chat.model, embedder=config.embedder.model,
        index_dir=config.index_dir, max_tokens=config.max_tokens, output_dir=str(output_dir), machine=machine_info(),
        config=config.model_dump(mode="json"),
    )
    atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    write_jsonl(rows, output_dir / QUESTIONS_FILE)
    return summary


def format_table(summary: dict) -> str:
    """A fixed-width table, one row per condition: quality in percent, generator tokens, latency."""
    lines = [f"{'condition':<16} {'EM':>6} {'F1':>6} {'contains':>9} {'tokens in':>10} {'x rag':>6} "
             f"{'p50 ms':>8} {'p95 ms':>8}"]
    for condition in summary["conditions"]:
        m = summary[condition]
        ratio = f"{m['compression']:6.2f}" if "compression" in m else f"{'':>6}"
        lines.append(
            f"{condition:<16} {100 * m['em']:6.1f} {100 * m['f1']:6.1f} {100 * m['contains']:9.1f} "
            f"{m['tokens_in']:10.0f} {ratio} {m['p50_ms']:8.0f} {m['p95_ms']:8.0f}"
        )
    lines.append(f"written: {summary['output_dir']}/{SUMMARY_FILE}")
    return "\n".join(lines)


def translate_flags(argv: list[str]) -> list[str]:
    """`--compressor NAME` (repeatable; NAME=DIR for a trained extractive scorer or abstractive summarizer) as one
    override."""
    rest, chosen = [], []
    items = iter(argv)
    for item in items:
        if item == "--compressor" or item.startswith("--compressor="):
            value = item.split("=", 1)[1] if "=" in item else next(items, None)
            if not value:
                raise ValueError("--compressor needs a name, e.g. --compressor extractive")
            name, _, folder = value.partition("=")
            field = "summarizer_dir" if name == "abstractive" else "scorer_dir"
            chosen.append(f"{{name: {name}, {field}: '{folder}'}}" if folder else f"{{name: {name}}}")
        else:
            rest.append(item)
    return rest + ([f"compressors=[{', '.join(chosen)}]"] if chosen else [])


PIPELINE = {"config": EvalRagConfig, "run": run, "table": format_table, "flags": translate_flags}


if __name__ == "__main__":
    from trustray.pipelines import run_module

    run_module("eval_rag")
