"""Response-only labels from the chat template, right padding and truncation."""

from __future__ import annotations

import pytest
import torch

from trustray.core.lm.batching import (
    IGNORE_INDEX,
    ChatTemplateError,
    ResponseTruncatedError,
    collate,
    encode_chat,
)
from trustray.models.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("bpe")


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_labels_are_exactly_the_response_and_end_of_turn(tokenizer):
    messages = conversation("What is the capital of France?", "The capital of France is Paris.")
    encoded = encode_chat(tokenizer, messages, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    # Everything before the response is masked, everything after its start is a label equal to the input.
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert labels[first:] == ids[first:]
    assert tokenizer.decode(labels[first:]) == "The capital of France is Paris.<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[:first]) == prompt


def test_multi_turn_masks_earlier_turns(tokenizer):
    messages = [
        *conversation("Who founded Rome?", "Rome was founded on seven hills."),
        *conversation("Tell me about the ocean.", "The Pacific Ocean is the largest ocean."),
    ]
    encoded = encode_chat(tokenizer, messages, max_length=512)
    kept = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "The Pacific Ocean is the largest ocean.<|im_end|>"


def test_truncation_keeps_the_start_and_reports_a_lost_response(tokenizer):
    messages = conversation("What is the capital of Italy?", "The capital of Italy is Rome. " * 5)
    full = encode_chat(tokenizer, messages, max_length=10_000)
    prompt_len = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    cut = encode_chat(tokenizer, messages, max_length=prompt_len + 3)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 3]
    assert cut["labels"] == full["labels"][: prompt_len + 3]
    with pytest.raises(ResponseTruncatedError):
        encode_chat(tokenizer, messages, max_length=prompt_len)


def test_template_without_prefix_property_is_refused():
    tokenizer = train_tokenizer("bpe")
    # The prompt render adds a marker the full render does not contain.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT NOW:' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="prefix"):
        encode_chat(tokenizer, conversation("hi", "hello"), max_length=64)


def test_bad_conversations_are_refused(tokenizer):
    with pytest.raises(ValueError, match="assistant"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}], max_length=64)


def test_collate_right_pads_and_masks_padding():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(examples, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    with pytest.raises(ValueError):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)
