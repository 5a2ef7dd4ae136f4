"""`trustray eval rag`: no retrieval vs retrieval-augmented answers on the RAG dev split.

Reads top to bottom: load questions → retrieve top-k passages (RetrieverActor) → answer closed book and with
the passages (ChatModelActor, greedy) → exact match, token F1, answer-contained accuracy → JSON + per-question
JSONL. The prompt is `trustray.core.rag.prompting`, the same one the service uses.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

import ray
from pydantic import Field

from trustray.actors.chat import start_chat_actor
from trustray.actors.cluster import init_ray
from trustray.actors.retriever import RetrieverActor
from trustray.artifacts import atomic_write_text
from trustray.config import BaseConfig, Resources
from trustray.core.rag.metrics import answer_contained, exact_match, score_answers, token_f1
from trustray.core.rag.prompting import closed_book_messages, rag_messages
from trustray.data.io import write_jsonl
from trustray.data.qa import load_qa
from trustray.models.embedders import EmbedderConfig
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.runtime import machine_info

logger = logging.getLogger(__name__)

Mode = Literal["closed_book", "rag"]


class EvalRagConfig(BaseConfig):
    qa: str = Field("rag_dev", description="`rag_dev` (the bundled dev split) or a FlashRAG-style JSONL/Parquet file.")
    index_dir: str = Field("outputs/index/wiki-minilm", description="Index folder written by build_index.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="Query embedder (must match the index).")
    chat: EngineConfig = Field(default_factory=EngineConfig, description="The chat model answering the questions.")
    modes: list[Mode] = Field(["closed_book", "rag"], min_length=1, description="Conditions to evaluate.")
    top_k: int = Field(3, ge=1, le=50, description="Passages retrieved per question.")
    max_tokens: int = Field(24, ge=1, le=512, description="Most answer tokens (greedy decoding).")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N questions (smoke runs).")
    output: str = Field("outputs/eval/rag_eval_dev.json", description="Summary JSON; per-question rows go beside it.")
    chat_resources: Resources = Field(default_factory=lambda: Resources(num_cpus=1), description="Chat actor resources.")
    retriever_resources: Resources = Field(
        default_factory=lambda: Resources(num_cpus=0.5), description="Retriever actor resources."
    )


def run(config: EvalRagConfig) -> dict:
    questions = load_qa(config.qa)
    if config.limit:
        questions = questions[: config.limit]
    logger.info("evaluating %d questions, modes %s", len(questions), config.modes)
    init_ray()

    passages: list[list] = [[] for _ in questions]
    if "rag" in config.modes:
        retriever = RetrieverActor.options(
            num_cpus=config.retriever_resources.num_cpus, num_gpus=config.retriever_resources.num_gpus
        ).remote(config.index_dir, config.embedder)
        passages = ray.get(retriever.retrieve.remote([q["question"] for q in questions], config.top_k))
        ray.kill(retriever)

    chat = start_chat_actor(config.chat, config.chat_resources)
    sampling = SamplingParams(max_tokens=config.max_tokens, temperature=0.0)
    goldens = [q["golden_answers"] for q in questions]
    summary: dict = {"n_questions": len(questions), "qa": config.qa, "top_k": config.top_k}
    rows = [{"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"]} for q in questions]
    for mode in config.modes:
        if mode == "rag":
            requests = [rag_messages(q["question"], [(p.title, p.text) for p in ps]) for q, ps in zip(questions, passages, strict=True)]
        else:
            requests = [closed_book_messages(q["question"]) for q in questions]
        started = time.perf_counter()
        completions = ray.get(chat.generate.remote(requests, sampling))
        seconds = time.perf_counter() - started
        answers = [c.text.strip() for c in completions]
        summary[mode] = {
            **score_answers(answers, goldens),
            "prompt_tokens_mean": sum(c.prompt_tokens for c in completions) / len(completions),
            "seconds_per_question": seconds / len(questions),
        }
        for row, answer, golden, found in zip(rows, answers, goldens, passages, strict=True):
            row[mode] = {
                "answer": answer,
                "em": exact_match(answer, golden),
                "f1": token_f1(answer, golden),
                "contains": answer_contained(answer, golden),
            }
            if mode == "rag":
                row[mode]["sources"] = [{"id": p.id, "title": p.title, "score": p.score} for p in found]
        logger.info("%s: %s", mode, summary[mode])
    ray.kill(chat)

    summary.update(
        chat_model=config.chat.model, embedder=config.embedder.model, index_dir=config.index_dir,
        max_tokens=config.max_tokens, machine=machine_info(), config=config.model_dump(mode="json"),
    )
    output = Path(config.output)
    atomic_write_text(output, json.dumps(summary, indent=2))
    write_jsonl(rows, output.with_suffix(".questions.jsonl"))
    return summary


def format_table(summary: dict) -> str:
    """A small fixed-width table of the metrics, one row per mode, in percent."""
    lines = [f"{'mode':<12} {'EM':>6} {'F1':>6} {'contains':>9} {'prompt tok':>11}"]
    for mode in ("closed_book", "rag"):
        if mode in summary:
            m = summary[mode]
            lines.append(
                f"{mode:<12} {100 * m['em']:6.1f} {100 * m['f1']:6.1f} {100 * m['contains']:9.1f} "
                f"{m['prompt_tokens_mean']:11.0f}"
            )
    lines.append(f"written: {summary['config']['output']}")
    return "\n".join(lines)


PIPELINE = {"config": EvalRagConfig, "run": run}


def main(argv: list[str] | None = None) -> dict:
    from trustray.pipelines import pipeline_main

    summary = pipeline_main(PIPELINE, argv, prog="python -m trustray.pipelines.eval_rag")
    logger.info("results:\n%s", format_table(summary))
    return summary


if __name__ == "__main__":
    from trustray.pipelines.eval_rag import main as module_main

    module_main()
