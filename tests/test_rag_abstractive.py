"""The abstractive compressor: feedback targets, labels, a tiny causal and seq2seq summarizer, the compressor."""

from __future__ import annotations

import pytest
import torch

from trustray.core.rag.abstractive import (
    IGNORE_INDEX,
    Summarizer,
    feedback_target,
    passages_from_candidates,
    save_summarizer,
)
from trustray.core.rag.compress import build_compressor
from trustray.core.rag.prompting import format_passages
from trustray.models.loading import load_summarizer

torch.set_num_threads(1)
PASSAGES = [("Eiffel Tower", "The tower was built in 1889. It is made of iron."), ("Paris", "Paris is a city.")]


def test_feedback_target_and_passages():
    assert feedback_target(["a", "b"], [-1.0, -3.0, -2.0]) == ""  # closed book is best: the empty summary
    assert feedback_target(["a", "b"], [-5.0, -3.0, -2.0]) == "b"
    with pytest.raises(ValueError, match="EMPTY"):
        feedback_target(["a"], [-1.0])
    assert passages_from_candidates(["A", "A", "B", "A"], ["s1", "s2", "s3", "s4"]) == [
        ("A", "s1 s2"), ("B", "s3"), ("A", "s4")]


def _summarizer(folder: str, seq2seq: bool) -> Summarizer:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch.manual_seed(0)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return Summarizer(auto.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder),
                      max_input_tokens=256, max_new_tokens=40)


@pytest.mark.parametrize("seq2seq", [False, True])
def test_only_the_target_and_its_end_are_labelled_and_training_writes_the_target(seq2seq, tiny_llama_dir, tiny_t5_dir, tmp_path):
    summarizer = _summarizer(tiny_t5_dir if seq2seq else tiny_llama_dir, seq2seq)
    eos = summarizer.tokenizer.eos_token_id
    target = "The tower was built in 1889."
    [example, empty] = summarizer.examples(["When was it built?"] * 2, [PASSAGES] * 2, [target, ""])
    labelled = [token for token in example["labels"] if token != IGNORE_INDEX]
    assert labelled[-1] == eos and summarizer.tokenizer.decode(labelled[:-1]).strip() == target
    assert [token for token in empty["labels"] if token != IGNORE_INDEX] == [eos]
    assert len(summarizer.prompt_ids("q", [("T", "word " * 500)])) == 256  # long passages are cut to fit
    # A few steps on one (question, target) pair and one empty pair: greedy decoding then writes each.
    optimizer = torch.optim.Adam(summarizer.model.parameters(), lr=3e-3)
    questions, passages = ["When was it built?", "Who painted it?"], [PASSAGES, PASSAGES[1:]]
    batch = summarizer.examples(questions, passages, [target, ""])
    for _ in range(60):
        loss = summarizer.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert summarizer.summarize(questions, passages) == [target, ""]
    save_summarizer(tmp_path / "summarizer", summarizer, {"method": "test"})
    loaded = load_summarizer(tmp_path / "summarizer")
    assert loaded.encoder_decoder == seq2seq and loaded.summarize(questions, passages) == [target, ""]


def test_the_compressor_keeps_the_summary_within_budget_or_nothing():
    def count(text: str) -> int:
        return len(text.split())

    summaries = {"long": "one two three four five six seven eight nine ten", "none": ""}
    calls = []

    def summarize(questions, passage_lists):
        calls.append(list(questions))
        return [summaries[q] for q in questions]

    compressor = build_compressor("abstractive", count_tokens=count, summarize=summarize)
    kept = compressor.compress("long", PASSAGES, budget=6)
    assert kept.passages == [("Summary", "one two three four five")] and kept.context_tokens == 6
    assert kept.source_tokens == count(format_passages(PASSAGES))
    nothing = compressor.compress("none", PASSAGES, budget=6)
    assert nothing.empty and nothing.context_tokens == 0
    assert compressor.compress("long", PASSAGES, budget=1).empty  # not even the title fits
    assert compressor.compress("long", [], budget=6).empty
    calls.clear()
    batch = compressor.compress_batch(["long", "none", "long"], [PASSAGES, PASSAGES, []], budget=6)
    assert calls == [["long", "none"]]  # one generation call; a question without passages is not summarized
    assert [c.passages for c in batch] == [kept.passages, [], []]


@pytest.mark.parametrize("seq2seq", [False, True])
def test_only_the_top_decoder_blocks_and_the_final_norm_are_trained(seq2seq, tiny_llama_dir, tiny_t5_dir):
    from trustray.pipelines.abstractive_train import AbstractiveTrainConfig, load_base

    config = AbstractiveTrainConfig(model=tiny_t5_dir if seq2seq else tiny_llama_dir, train={"trainable_layers": 1})
    trained = [name for name, param in load_base(config, "cpu").model.named_parameters() if param.requires_grad]
    top, norm = ("decoder.block.1.", "decoder.final_layer_norm.") if seq2seq else ("model.layers.1.", "model.norm.")
    assert trained and all(name.startswith((top, norm)) for name in trained)
    assert any(name.startswith(norm) for name in trained)
