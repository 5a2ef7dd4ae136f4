"""On a tiny model that learned two facts, an edit changes one answer and leaves the other alone."""

from __future__ import annotations

import torch

from trustray.core.editing.base import batches, encode_pairs
from trustray.core.editing.editset import EditSet
from trustray.core.editing.factory import build_untrained_editor
from trustray.core.editing.metrics import answer_predictions, exact_match

torch.set_num_threads(1)
FACT = ("What colour is the sky of Zork?", "green")
OTHER = ("What is the capital of Blipland?", "Blop")


def _exact(model, tokenizer, prompt: str, answer: str) -> float:
    """1.0 when greedy next-token predictions reproduce every token of `answer` after the chat prompt."""
    batch = batches(encode_pairs(tokenizer, [prompt], [answer]), 1, "cpu")[0]
    return float(exact_match(*answer_predictions(model, batch))[0])


def _teach(model, tokenizer, facts: list[tuple[str, str]]) -> None:
    """Fine-tune the whole model on the facts until it reproduces them (a model that 'knows' them)."""
    batch = batches(encode_pairs(tokenizer, *map(list, zip(*facts, strict=True))), len(facts), "cpu")[0]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()


def test_an_edit_changes_the_learned_answer_and_leaves_the_other(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    _teach(model, tokenizer, [FACT, OTHER])
    assert _exact(model, tokenizer, *FACT) == 1.0 and _exact(model, tokenizer, *OTHER) == 1.0

    # "red" is two tokens of the tiny BPE vocabulary; longer answers are more than one tiny layer can write.
    record = {"prompt": FACT[0], "target_new": "red", "paraphrases": [FACT[0]],
              "locality": [{"prompt": OTHER[0], "answer": OTHER[1]}]}
    editor = build_untrained_editor("ft_kl", model, tokenizer, {"modules": {"layers": [-1]}, "steps": 60, "lr": 2e-2, "early_stop_loss": 1e-4,
                                                     "norm_bound": 3.0, "loc_coef": 10.0})
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with EditSet(editor.compute_deltas([record])).apply(model):
        assert _exact(model, tokenizer, FACT[0], "red") == 1.0
        assert _exact(model, tokenizer, FACT[0], FACT[1]) == 0.0
        assert _exact(model, tokenizer, *OTHER) == 1.0
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert _exact(model, tokenizer, *FACT) == 1.0
