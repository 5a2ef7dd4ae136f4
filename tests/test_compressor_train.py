"""compressor_train end to end on tiny models with Ray: the artifact works, the signal is the teacher's own numbers,
reruns reuse, a crash resumes, other settings are refused; plus the LSR data helpers by hand."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from trustray.artifacts import ArtifactMismatchError, read_metadata
from trustray.config import load_config
from trustray.core.rag.lsr import lsr_candidates, teacher_logprobs, teacher_logprobs_batch, teacher_summary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_candidates_keep_retrieval_order_the_cap_and_the_source():
    passages = [("A", "One is here. Two is here. Three is here."), ("B", "Two is here. Four is here.")]
    assert lsr_candidates(passages, 10) == [("A", "One is here."), ("A", "Two is here."), ("A", "Three is here."),
                                            ("B", "Four is here.")]
    assert lsr_candidates(passages, 2) == [("A", "One is here."), ("A", "Two is here.")]
    # The source sentence is always offered (in the last slot when the cap is reached) unless it is dropped.
    assert lsr_candidates(passages, 2, source=("C", "Five is here.")) == [("A", "One is here."), ("C", "Five is here.")]
    assert lsr_candidates(passages, 2, source=("A", "Two is here.")) == [("A", "One is here."), ("A", "Two is here.")]
    dropped = lsr_candidates(passages, 10, source=("A", "Two is here."), drop_source=True)
    assert dropped == [("A", "One is here."), ("A", "Three is here."), ("B", "Four is here.")]


def test_teacher_summary_by_hand():
    # beta 1: row 1 -> Q = [.5, .5] (EMPTY ties, argmax takes EMPTY), row 2 -> Q one-hot-ish on a sentence.
    summary = teacher_summary([[-1.0, -1.0], [-50.0, -1.0, -50.0]], beta=1.0)
    assert summary["empty_best_fraction"] == 0.5 and summary["mean_candidates"] == 1.5
    assert summary["mean_teacher_entropy"] == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert summary["mean_uniform_entropy"] == pytest.approx((math.log(2) + math.log(3)) / 2)


def test_batched_teacher_equals_one_question_at_a_time(tiny_llama_dir):
    from trustray.models.engines import EngineConfig
    from trustray.models.hf_engine import HFEngine

    engine = HFEngine(EngineConfig(model=tiny_llama_dir, engine="hf", max_batch_size=3, torch_threads=1), device="cpu")
    examples = [("Where is the tower?", "Paris", [("Paris", "The tower is in Paris."), ("Rome", "Rome is old.")]),
                ("Who founded Rome?", "Romulus", [("Rome", "Rome was founded on seven hills by Romulus, they say.")])]
    batched = teacher_logprobs_batch(engine, examples)
    assert [len(row) for row in batched] == [3, 2]
    for row, (question, answer, candidates) in zip(batched, examples, strict=True):
        assert row == pytest.approx(teacher_logprobs(engine, question, answer, candidates), rel=1e-5)


def test_scorer_embeds_in_length_chunks_without_reordering(tiny_embedder_dir):
    from sentence_transformers import SentenceTransformer

    from trustray.core.rag.scorer import EMBED_CHUNK, SentenceScorer

    scorer = SentenceScorer(SentenceTransformer(tiny_embedder_dir, device="cpu")).eval()
    texts = [" ".join(["word"] * (1 + (7 * i) % 23)) + f" {i}" for i in range(EMBED_CHUNK + 9)]
    with torch.no_grad():
        together = scorer.embed(texts)
        one_by_one = torch.cat([scorer.embed([text]) for text in texts])
    assert torch.allclose(together, one_by_one, atol=1e-5)


def _config(tiny_llama_dir: str, tiny_embedder_dir: str, index_dir: Path, out: Path, *overrides: str):
    from trustray.pipelines.compressor_train import CompressorTrainConfig

    return load_config(CompressorTrainConfig, CONFIGS / "compressor_train" / "tiny.yaml",
                       [f"teacher.chat.model={tiny_llama_dir}", f"retrieval.embedder.model={tiny_embedder_dir}",
                        f"retrieval.index_dir={index_dir}", f"output_dir={out}", *overrides])


def _tiny_index(folder: Path, embedder_dir: str) -> Path:
    """One passage per intro: the pages the tiny preset's questions come from, plus ten others."""
    from trustray.artifacts import write_metadata
    from trustray.core.rag.index import PassageIndex
    from trustray.data.cloze import build_cloze_questions
    from trustray.data.corpus import load_wiki_corpus
    from trustray.models.embedders import Embedder, EmbedderConfig

    pages = {q["doc_id"] for q in build_cloze_questions(12, seed=0, pages="train")}
    docs = [doc for doc in load_wiki_corpus() if doc["id"] in pages] + load_wiki_corpus(10)
    embedder = Embedder(EmbedderConfig(model=embedder_dir), device="cpu")
    PassageIndex(embedder.encode([doc["text"] for doc in docs]), [f"{doc['id']}#0" for doc in docs],
                 [doc["title"] for doc in docs], [doc["text"] for doc in docs]).save(folder)
    write_metadata(folder, {"embedder": embedder_dir, "embedder_fingerprint": embedder.fingerprint, "normalize": True})
    return folder


@pytest.fixture(scope="module")
def trained(ray_local, tiny_llama_dir, tiny_embedder_dir, tmp_path_factory):
    """The tiny preset run once from the command line."""
    from trustray import cli

    root = tmp_path_factory.mktemp("compressor")
    index_dir = _tiny_index(root / "index", tiny_embedder_dir)
    out = root / "run"
    assert cli.main(["run", "compressor_train", "--config", str(CONFIGS / "compressor_train" / "tiny.yaml"),
                     f"teacher.chat.model={tiny_llama_dir}", f"retrieval.embedder.model={tiny_embedder_dir}",
                     f"retrieval.index_dir={index_dir}", f"output_dir={out}"]) == 0
    return _config(tiny_llama_dir, tiny_embedder_dir, index_dir, out), out


def _file_times(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file() and "ray_train" not in path.parts}


def test_the_artifact_loads_and_compresses(trained, tiny_embedder_dir):
    from trustray.core.rag.compress import build_compressor
    from trustray.core.rag.scorer import SentenceScorer
    from trustray.models.sources import model_fingerprint

    config, out = trained
    scorer = SentenceScorer.load(out / "compressor", model_fingerprint(tiny_embedder_dir))
    compressor = build_compressor("extractive", count_tokens=lambda text: len(text.split()), scorer=scorer.score)
    kept = compressor.compress("When was the tower built?", [("Tower", "It was built in 1889. It is made of iron.")], 8)
    assert kept.context_tokens <= 8 and kept.source_tokens > 8

    metadata = read_metadata(out / "compressor")
    assert metadata["teacher_model"] == config.teacher.chat.model and metadata["kind"] == "sentence_scorer"
    stats = metadata["signal_stats"]
    assert stats["questions"] == 12 and 0 <= stats["empty_best_fraction"] <= 1
    assert 0 < stats["mean_teacher_entropy"] <= stats["mean_uniform_entropy"]
    assert [entry["step"] for entry in metadata["history"]] == [0, 0, 2, 4]  # untrained, calibrated, steps
    assert metadata["history"][1]["calibrated"] and metadata["history"][1]["dev_loss"] <= metadata["history"][0]["dev_loss"]
    assert metadata["train_questions"] == 8 and metadata["dev_questions"] == len(metadata["dev_question_ids"]) == 4
    assert {"dev_loss", "dev_top1_agreement", "dev_regret"} <= metadata["history"][-1].keys()
    assert len(list((out / "signal").glob("shard-*.parquet"))) == 3


def test_the_signal_is_the_teachers_own_log_probabilities(trained):
    from trustray.models.hf_engine import HFEngine
    from trustray.pipelines.compressor_train import read_signal

    config, out = trained
    rows = read_signal(out / "signal")
    assert len(rows) == 12 and all(1 <= len(row["teacher_logprobs"]) <= 5 for row in rows)
    for row in rows:
        assert (row["sentence"] in row["candidates"]) != row["source_dropped"]
    assert read_metadata(out / "signal")["scorings"] == sum(len(row["teacher_logprobs"]) for row in rows)
    engine = HFEngine(config.teacher.chat, device="cpu")
    row = rows[0]
    direct = teacher_logprobs(engine, row["question"], row["answer"],
                              list(zip(row["candidate_titles"], row["candidates"], strict=True)))
    assert row["teacher_logprobs"] == pytest.approx(direct, rel=1e-5)


def test_a_rerun_reuses_and_other_settings_are_refused(trained, tiny_llama_dir, tiny_embedder_dir):
    from trustray.pipelines.compressor_train import run

    config, out = trained
    before = _file_times(out)
    assert run(config) == out / "compressor"
    assert _file_times(out) == before
    index_dir = Path(config.retrieval.index_dir)
    with pytest.raises(ArtifactMismatchError, match="train"):
        run(_config(tiny_llama_dir, tiny_embedder_dir, index_dir, out, "train.lr=0.5"))
    with pytest.raises(ArtifactMismatchError, match="signal"):
        run(_config(tiny_llama_dir, tiny_embedder_dir, index_dir, out, "questions.count=13"))
    assert _file_times(out) == before


def _scores(folder: Path, embedder_dir: str) -> tuple[list[float], float]:
    from trustray.core.rag.scorer import SentenceScorer
    from trustray.models.sources import model_fingerprint

    scorer = SentenceScorer.load(folder, model_fingerprint(embedder_dir))
    return scorer.score("When was the tower built?", ["It was built in 1889.", "It is made of iron."])


def test_a_crash_loses_nothing_finished(trained, tiny_embedder_dir):
    from trustray.pipelines.compressor_train import run

    config, out = trained
    scores, empty = _scores(out / "compressor", tiny_embedder_dir)
    shards = sorted((out / "signal").glob("shard-*.parquet"))
    kept_files = {path: path.stat().st_mtime_ns for path in [*shards[1:], *(out / "checkpoints" / "step-2").iterdir()]}
    shutil.rmtree(out / "compressor")
    shutil.rmtree(out / "checkpoints" / "step-4")
    shards[0].unlink()

    run(config)
    # Only the lost shard is scored again, training resumes from step 2 and ends where it ended before.
    assert {path: path.stat().st_mtime_ns for path in kept_files} == kept_files
    assert shards[0].is_file() and (out / "checkpoints" / "step-4").is_dir()
    resumed_scores, resumed_empty = _scores(out / "compressor", tiny_embedder_dir)
    assert resumed_scores == pytest.approx(scores, rel=1e-5) and resumed_empty == pytest.approx(empty, abs=1e-6)


def test_the_abstractive_compressor_distils_the_signal_and_serves(trained, tiny_llama_dir, ray_local):
    """abstractive_train on the tiny run's signal: a summarizer artifact, reused on a rerun, that the compressor
    actor class loads and keeps within budget."""
    from trustray.actors.compressor import CompressorConfig, PassageCompressor
    from trustray.pipelines.abstractive_train import AbstractiveTrainConfig, run

    _, out = trained
    config = load_config(AbstractiveTrainConfig, CONFIGS / "abstractive_train" / "tiny.yaml",
                         [f"model={tiny_llama_dir}", f"signal_dir={out / 'signal'}", f"output_dir={out / 'abstractive'}"])
    folder = run(config)
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["kind"] == "summarizer" and metadata["train_questions"] == 8 and metadata["dev_questions"] == 4
    assert [entry["step"] for entry in metadata["history"]] == [1, 2]
    assert 0 <= metadata["history"][-1]["dev_empty_agreement"] <= 1
    before = _file_times(folder)
    assert run(config) == folder and _file_times(folder) == before
    compressor = PassageCompressor(CompressorConfig(name="abstractive", budget=12, summarizer_dir=str(folder)),
                                   tiny_llama_dir)
    kept = compressor.compress("When was the tower built?", [("Tower", "It was built in 1889. It is made of iron.")])
    assert kept.context_tokens <= 12
    with pytest.raises(ValueError, match="summarizer_dir"):
        PassageCompressor(CompressorConfig(name="truncate", summarizer_dir=str(folder)), tiny_llama_dir)
