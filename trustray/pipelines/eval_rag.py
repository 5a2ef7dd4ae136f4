"""`trustray eval rag`: no retrieval vs retrieval-augmented answers at several depths, with or without a compressor.

    trustray eval rag --config configs/eval_rag/cpu.yaml [--compressor truncate --compressor extractive] [key=value ...]

Reads top to bottom: load questions → retrieve the deepest top-k any condition reads, once (RetrieverActor; with
`irrelevant` > 0, random passages of the index are mixed into every condition's passages, the robustness run) →
recall@k of the gold page where the questions name one → the quality pass: every condition (closed book, `rag` or
`rag@K` uncompressed, each compressor over its own top-k) answers all questions in batches (ChatModelActor,
greedy; compressors in their own actors; each condition's answers are kept as it finishes, and a rerun with the
same settings reuses them) → the latency pass: the first `latency_questions` questions answered one
at a time, conditions taking turns, each timed end to end (its own retrieval, the compressor, generation) → exact
match, token F1, answer-contained accuracy with a 95% bootstrap interval, the paired difference from the reference
condition, generator prompt tokens, context tokens, p50/p95 latency → `output_dir/summary.json` + per-question
`questions.jsonl`. The prompt is `trustray.core.rag.prompting`, the same one the service uses; an empty
compression asks closed book.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import ray
from pydantic import Field, field_validator, model_validator

from trustray.actors.chat import start_chat_actor
from trustray.actors.cluster import init_ray
from trustray.actors.compressor import CompressorConfig, start_compressor_actor
from trustray.actors.retriever import RetrieverActor
from trustray.artifacts import atomic_write_text
from trustray.config import ActorResources, PipelineConfig
from trustray.core.rag.compress import context_tokens
from trustray.core.rag.index import Passage
from trustray.core.rag.metrics import answer_contained, exact_match, token_f1
from trustray.core.rag.prompting import closed_book_messages, rag_messages
from trustray.core.stats import bootstrap_ci, paired_difference
from trustray.data.io import read_jsonl, write_jsonl
from trustray.data.qa import load_qa
from trustray.models.embedders import EmbedderConfig
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.pipelines import prepare_output
from trustray.runtime import machine_info

logger = logging.getLogger(__name__)

# Written into output_dir: the summary (what `format_table` shows) and one row per question.
SUMMARY_FILE = "summary.json"
QUESTIONS_FILE = "questions.jsonl"
# One JSONL file per finished condition (answers of the batched pass): what a rerun after a crash reuses.
ANSWERS_DIR = "answers"
MODE = re.compile(r"^(closed_book|rag)(@([1-9][0-9]?))?$")
RECALL_AT = (1, 3, 5, 10)
MAX_TOP_K = 50


class EvalCompressorConfig(CompressorConfig):
    """A compressor condition: the compressor and how many retrieved passages it reads."""

    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K,
                              description="Passages this compressor reads (None: the evaluation's top_k).")


class EvalRagConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/eval_rag"

    qa: str = Field("rag_dev", description="`rag_eval_tune` / `rag_eval_report` (the evaluation set's tuning and "
                    "reporting parts), `rag_dev` (46 FanOutQA questions), or a FlashRAG-style JSONL/Parquet file.")
    index_dir: str = Field("outputs/index/wiki-minilm", description="Index folder written by build_index.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="Query embedder (must match the index).")
    chat: EngineConfig = Field(default_factory=EngineConfig, description="The chat model answering the questions.")
    modes: list[str] = Field(
        ["closed_book", "rag"], description="Conditions without a compressor: `closed_book`, `rag` (the top_k "
        "passages, uncompressed) or `rag@K` (the top K).",
    )
    compressors: list[EvalCompressorConfig] = Field(
        default_factory=list, description="One more condition per compressor (retrieve → compress → generate).",
    )
    top_k: int = Field(3, ge=1, le=MAX_TOP_K, description="Passages retrieved per question for `rag` and for "
                       "compressors without their own top_k.")
    irrelevant: int = Field(
        0, ge=0, description="Robustness run: random passages of the index (seeded per question) mixed into each "
        "condition's passages at random positions.",
    )
    max_tokens: int = Field(24, ge=1, le=512, description="Most answer tokens (greedy decoding).")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N questions (smoke runs).")
    batch_size: int = Field(16, ge=1, description="Questions per compressor and generation call in the quality pass.")
    latency_questions: int = Field(
        32, ge=0, description="The first N questions are answered again one at a time, conditions taking turns, for "
        "p50/p95 latency (0: no latency; answers that differ from the batched pass are counted).",
    )
    reference: str | None = Field(
        None, description="Condition the others are compared with (paired bootstrap of answer-contained); None: "
        "`rag@1` if evaluated, else `rag`, else none.",
    )
    seed: int = Field(0, description="Seed of the irrelevant passages and of the bootstrap.")
    chat_resources: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=1), description="Chat actor resources.")
    retriever_resources: ActorResources = Field(
        default_factory=lambda: ActorResources(num_cpus=0.5), description="Retriever actor resources."
    )
    compressor_resources: ActorResources = Field(
        default_factory=lambda: ActorResources(num_cpus=0.5), description="Resources of each compressor's actor."
    )

    @field_validator("modes")
    @classmethod
    def _modes(cls, modes: list[str]) -> list[str]:
        for mode in modes:
            match = MODE.match(mode)
            if not match or (match.group(1) == "closed_book" and match.group(2)):
                raise ValueError(f"unknown mode {mode!r}: use closed_book, rag or rag@K (K from 1 to {MAX_TOP_K})")
        return modes

    @model_validator(mode="after")
    def _conditions(self) -> EvalRagConfig:
        labels = list(self.modes) + [label(c) for c in self.compressors]
        if not labels:
            raise ValueError("nothing to evaluate: give modes and/or compressors")
        if len(set(labels)) != len(labels):
            raise ValueError(f"conditions must have distinct labels (set compressors[].label): {labels}")
        if self.reference is not None and self.reference not in labels:
            raise ValueError(f"reference {self.reference!r} is not one of the conditions {labels}")
        return self


def label(compressor: CompressorConfig) -> str:
    """The condition's name (`CompressorConfig.display_name`)."""
    return compressor.display_name()


def depths(config: EvalRagConfig) -> dict[str, int]:
    """Passages each condition reads (0: closed book)."""
    found = {}
    for mode in config.modes:
        base, _, k = mode.partition("@")
        found[mode] = 0 if base == "closed_book" else int(k or config.top_k)
    for compressor in config.compressors:
        found[label(compressor)] = compressor.top_k or config.top_k
    return found


def reference_condition(config: EvalRagConfig) -> str | None:
    conditions = depths(config)
    return config.reference or next((name for name in ("rag@1", "rag") if name in conditions), None)


def with_irrelevant(passages: list[Passage], pool: list[Passage], count: int, rng: random.Random) -> list[Passage]:
    """`passages` with `count` passages of `pool` not among them inserted at random positions."""
    retrieved = {p.id for p in passages}
    mixed = list(passages)
    for extra in rng.sample([p for p in pool if p.id not in retrieved], count):
        mixed.insert(rng.randrange(len(mixed) + 1), extra)
    return mixed


def doc_id(passage_id: str) -> str:
    """The corpus document a passage was cut from (passage ids are `<doc id>#<n>`)."""
    return passage_id.rsplit("#", 1)[0]


def recall_at(questions: list[dict[str, Any]], retrieved: list[list[Passage]]) -> dict[str, float] | None:
    """Share of questions whose gold page (`metadata.gold_doc_id`) is among the top-k passages' pages, per k."""
    gold = [(q.get("metadata") or {}).get("gold_doc_id") for q in questions]
    if not all(gold):
        return None
    deepest = min(len(found) for found in retrieved)
    return {f"recall@{k}": float(np.mean([g in {doc_id(p.id) for p in found[:k]}
                                          for g, found in zip(gold, retrieved, strict=True)]))
            for k in RECALL_AT if k <= deepest}


def contexts_of(config: EvalRagConfig, questions: list[dict[str, Any]], retrieved: list[list[Passage]],
                pool: list[Passage]) -> dict[str, list[list[Passage] | None]]:
    """Each condition's passages per question (None: closed book); in the robustness run the same seeded
    distractors join every condition that reads the same depth."""
    contexts: dict[str, list[list[Passage] | None]] = {}
    for condition, depth in depths(config).items():
        if depth == 0:
            contexts[condition] = [None] * len(questions)
            continue
        contexts[condition] = [
            with_irrelevant(found[:depth], pool, config.irrelevant, random.Random(f"{config.seed}:{q['id']}:{depth}"))
            if config.irrelevant else found[:depth]
            for q, found in zip(questions, retrieved, strict=True)]
    return contexts


def answer_batch(questions: list[str], contexts: list[list[Passage] | None], chat: Any, compressor: Any,
                 sampling: SamplingParams) -> list[dict[str, Any]]:
    """Compress (when a compressor is given) and answer a batch of questions in one call each."""
    pairs = [None if found is None else [(p.title, p.text) for p in found] for found in contexts]
    rows: list[dict[str, Any]] = [{} if found is None else {"passage_ids": [p.id for p in found]} for found in contexts]
    if compressor is not None:
        compressed = ray.get(compressor.compress_batch.remote(questions, pairs))
        for row, item in zip(rows, compressed, strict=True):
            row.update(context_tokens=item.context_tokens, source_tokens=item.source_tokens, empty=item.empty,
                       context=item.passages)
        pairs = [item.passages for item in compressed]
    messages = [closed_book_messages(q) if found is None else rag_messages(q, found)
                for q, found in zip(questions, pairs, strict=True)]
    completions = ray.get(chat.generate.remote(messages, sampling))
    for row, completion in zip(rows, completions, strict=True):
        row.update(answer=completion.text.strip(), prompt_tokens=completion.prompt_tokens)
    return rows


def timed_answer(question: str, passages: list[Passage] | None, chat: Any, compressor: Any,
                 sampling: SamplingParams) -> tuple[str, float]:
    """One question alone: (answer, seconds for compression and generation)."""
    began = time.perf_counter()
    [row] = answer_batch([question], [passages], chat, compressor, sampling)
    return row["answer"], time.perf_counter() - began


def summarize(rows: list[dict[str, Any]], goldens: list[list[str]], sources: list[str], seed: int) -> dict[str, Any]:
    """Quality with a 95% interval, generator and context tokens of one condition (latency is added apart)."""
    scores = {"em": [exact_match(r["answer"], g) for r, g in zip(rows, goldens, strict=True)],
              "f1": [token_f1(r["answer"], g) for r, g in zip(rows, goldens, strict=True)],
              "contains": [answer_contained(r["answer"], g) for r, g in zip(rows, goldens, strict=True)]}
    summary: dict[str, Any] = {key: float(np.mean(values)) for key, values in scores.items()}
    summary["contains_ci"] = list(bootstrap_ci(scores["contains"], seed=seed))
    summary["tokens_in"] = float(np.mean([row["prompt_tokens"] for row in rows]))
    summary["context_tokens"] = float(np.mean([row["context_tokens"] for row in rows]))
    if "source_tokens" in rows[0]:
        summary["context_kept"] = float(np.sum([r["context_tokens"] for r in rows]) /
                                        max(1, np.sum([r["source_tokens"] for r in rows])))
        summary["empty_rate"] = float(np.mean([r["empty"] for r in rows]))
    if len(set(sources)) > 1:
        summary["by_source"] = {
            source: {"n_questions": len(picked), "contains": float(np.mean(picked)),
                     "contains_ci": list(bootstrap_ci(picked, seed=seed))}
            for source in sorted(set(sources))
            for picked in [[c for c, s in zip(scores["contains"], sources, strict=True) if s == source]]}
    return summary


# What a condition's batched answers depend on, besides the condition itself and the passages it reads.
ANSWER_SETTINGS = {"qa", "index_dir", "embedder", "chat", "irrelevant", "max_tokens", "limit", "batch_size", "seed"}


def answers_file(output_dir: Path, config: EvalRagConfig, condition: str) -> Path:
    """Where one condition's batched answers are kept as soon as they are done: named by what they depend on, so
    a rerun after a crash (or with other conditions beside it) reuses them and other settings never do."""
    spec = next((c.model_dump(mode="json") for c in config.compressors if label(c) == condition), condition)
    settings = {**config.model_dump(mode="json", include=ANSWER_SETTINGS), "condition": spec,
                "depth": depths(config)[condition]}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return output_dir / ANSWERS_DIR / f"{digest}.jsonl"


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

    from trustray.models.loading import load_tokenizer

    output_dir = prepare_output(config)
    questions = load_qa(config.qa)[: config.limit]
    depth_of = depths(config)
    conditions = list(depth_of)
    deepest = max(depth_of.values())
    latency_count = min(config.latency_questions, len(questions))
    logger.info("evaluating %d questions (%d also timed alone): %s", len(questions), latency_count, conditions)
    init_ray()

    retrieved: list[list[Passage]] = [[] for _ in questions]
    pool: list[Passage] = []
    retrieval_seconds: list[float] = []
    if deepest:
        retriever = RetrieverActor.options(**config.retriever_resources.ray_options()).remote(
            config.index_dir, config.embedder)
        ray.get(retriever.retrieve.remote(["warm-up"], 1))
        retrieved = ray.get(retriever.retrieve.remote([q["question"] for q in questions], max(deepest, *RECALL_AT)))
        for question in questions[:latency_count]:
            began = time.perf_counter()
            ray.get(retriever.retrieve.remote([question["question"]], deepest))
            retrieval_seconds.append(time.perf_counter() - began)
        if config.irrelevant:
            pool = ray.get(retriever.random_passages.remote(4 * config.irrelevant * len(questions), config.seed))
        ray.kill(retriever)
    recall = recall_at(questions, retrieved) if deepest else None
    contexts = contexts_of(config, questions, retrieved, pool)

    check_resources(config)
    chat = start_chat_actor(config.chat, config.chat_resources)
    compressor_configs = {label(c): c for c in config.compressors}
    compressors = {name: start_compressor_actor(c, config.chat.model, config.compressor_resources)
                   for name, c in compressor_configs.items()}
    sampling = SamplingParams(max_tokens=config.max_tokens, temperature=0.0)
    tokenizer = load_tokenizer(config.chat.model)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    texts = [q["question"] for q in questions]
    answers_of: dict[str, list[dict[str, Any]]] = {}
    batches = [range(start, min(start + config.batch_size, len(questions)))
               for start in range(0, len(questions), config.batch_size)]
    with tqdm(total=len(conditions) * len(batches), desc="answer batches") as progress:
        for condition in conditions:
            saved = answers_file(output_dir, config, condition)
            if saved.is_file():
                logger.info("%s: reusing the answers in %s (same settings)", condition, saved)
                answers_of[condition] = read_jsonl(saved)
                progress.update(len(batches))
                continue
            answers_of[condition] = []
            for rows in batches:
                answered = answer_batch([texts[i] for i in rows], [contexts[condition][i] for i in rows], chat,
                                        compressors.get(condition), sampling)
                for i, row in zip(rows, answered, strict=True):
                    if "context_tokens" not in row:
                        found = contexts[condition][i]
                        row["context_tokens"] = context_tokens(count_tokens, [(p.title, p.text) for p in found or []])
                answers_of[condition].extend(answered)
                progress.update()
            write_jsonl(answers_of[condition], saved)

    # Latency: conditions take turns on each question, so a change of load on the machine during the run shifts
    # every condition's latency alike instead of whichever condition was running then.
    seconds_of: dict[str, list[float]] = {condition: [] for condition in conditions}
    differs = {condition: 0 for condition in conditions}
    for i in tqdm(range(latency_count), desc="latency (one at a time)"):
        for condition in conditions:
            answer, seconds = timed_answer(texts[i], contexts[condition][i], chat, compressors.get(condition), sampling)
            seconds_of[condition].append(seconds + (retrieval_seconds[i] if depth_of[condition] else 0.0))
            differs[condition] += answer != answers_of[condition][i]["answer"]
    for actor in [chat, *compressors.values()]:
        ray.kill(actor)

    goldens = [q["golden_answers"] for q in questions]
    sources = [(q.get("metadata") or {}).get("source", "") for q in questions]
    reference = reference_condition(config)
    summary: dict[str, Any] = {
        "n_questions": len(questions), "qa": config.qa, "top_k": config.top_k, "depths": depth_of,
        "irrelevant": config.irrelevant, "reference": reference, "latency_questions": latency_count,
        "retrieval_ms": float(np.mean(retrieval_seconds) * 1000) if retrieval_seconds else None,
        "recall": recall,
    }
    for condition in conditions:
        summary[condition] = {"top_k": depth_of[condition],
                              **summarize(answers_of[condition], goldens, sources, config.seed)}
        latencies = np.array(seconds_of[condition]) * 1000
        summary[condition].update(
            p50_ms=float(np.percentile(latencies, 50)) if latency_count else None,
            p95_ms=float(np.percentile(latencies, 95)) if latency_count else None,
            batched_answers_differing=differs[condition] if latency_count else None)
        if differs[condition]:
            logger.warning("%s: %d of %d answers given alone differ from the batched ones (padding changes the "
                           "floating-point sums)", condition, differs[condition], latency_count)
    contained = {c: [answer_contained(r["answer"], g) for r, g in zip(answers_of[c], goldens, strict=True)]
                 for c in conditions}
    if reference is not None:
        for condition in conditions:
            summary[condition]["compression"] = summary[condition]["tokens_in"] / summary[reference]["tokens_in"]
            if condition != reference:
                summary[condition]["contains_minus_reference"] = paired_difference(
                    contained[condition], contained[reference], seed=config.seed)
    for condition in conditions:
        logger.info("%s: %s", condition, summary[condition])

    rows = [{"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"], "source": source,
             "sources": [{"id": p.id, "title": p.title, "score": p.score} for p in found[:deepest]]}
            for q, found, source in zip(questions, retrieved, sources, strict=True)]
    for condition in conditions:
        for row, answer, golden in zip(rows, answers_of[condition], goldens, strict=True):
            row[condition] = {**answer, "em": exact_match(answer["answer"], golden),
                              "f1": token_f1(answer["answer"], golden),
                              "contains": answer_contained(answer["answer"], golden)}
    summary.update(
        conditions=conditions, chat_model=config.chat.model, embedder=config.embedder.model,
        index_dir=config.index_dir, max_tokens=config.max_tokens, output_dir=str(output_dir), machine=machine_info(),
        config=config.model_dump(mode="json"),
    )
    atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    write_jsonl(rows, output_dir / QUESTIONS_FILE)
    return summary


def format_table(summary: dict) -> str:
    """A fixed-width table, one row per condition: quality in percent with its interval, tokens, latency."""
    reference = summary.get("reference")
    lines = [f"{'condition':<22} {'k':>3} {'EM':>6} {'F1':>6} {'contains [95% CI]':>20} {'vs ' + str(reference):>16} "
             f"{'tokens in':>10} {'context':>8} {'p50 ms':>8} {'p95 ms':>8}"]
    for condition in summary["conditions"]:
        m = summary[condition]
        low, high = m["contains_ci"]
        versus = m.get("contains_minus_reference")
        gain = f"{100 * versus['mean']:+5.1f} [{100 * versus['ci'][0]:+.1f},{100 * versus['ci'][1]:+.1f}]" if versus else ""
        latency = (f"{m['p50_ms']:8.0f} {m['p95_ms']:8.0f}" if m["p50_ms"] is not None else f"{'-':>8} {'-':>8}")
        contains = f"{100 * m['contains']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
        lines.append(
            f"{condition:<22} {m['top_k']:>3} {100 * m['em']:6.1f} {100 * m['f1']:6.1f} {contains:>20} {gain:>16} "
            f"{m['tokens_in']:10.0f} {m['context_tokens']:8.0f} {latency}"
        )
    if summary.get("recall"):
        lines.append("retrieval: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["recall"].items()))
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
