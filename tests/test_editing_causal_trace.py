"""Causal tracing on the tiny Llama: checked against a plain per-row implementation, and the window choice."""

from __future__ import annotations

import pytest
import torch

from trustray.core.editing.causal_trace import best_window, trace_prompt

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def direct_trace(model, ids, subject, answer, noise, window, layer):
    """p(answer) with the subject's embeddings plus `noise`, layer `layer`'s window of MLP outputs at the subject's
    last token set to their clean values (None: nothing restored): one row, inputs_embeds, no batching."""
    layers = model.model.layers
    last = max(subject)
    clean = {}
    handles = [block.mlp.register_forward_hook(lambda m, a, out, i=i: clean.__setitem__(i, out[0, last].clone()))
               for i, block in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    embeds = model.get_input_embeddings()(torch.tensor([ids])).clone()
    embeds[0, subject] += noise
    patched = [] if layer is None else [i for i in range(len(layers)) if abs(i - layer) <= window // 2]

    def patch(i):
        def hook(module, args, out):
            out = out.clone()
            out[0, last] = clean[i]
            return out
        return hook

    handles = [layers[i].mlp.register_forward_hook(patch(i)) for i in patched]
    with torch.no_grad():
        probs = model(inputs_embeds=embeds).logits[0, -1].softmax(-1)
    for handle in handles:
        handle.remove()
    return float(probs[answer])


def test_trace_equals_a_per_row_computation(model):
    ids, subject, answer = [5, 17, 23, 42, 8, 9, 11], [2, 3], 31
    trace = trace_prompt(model, ids, subject, answer, noise_scale=3.0, samples=2, window=1,
                         generator=torch.Generator().manual_seed(0))
    sigma = 3.0 * float(model.get_input_embeddings().weight.detach().std())
    noise = torch.randn(2, len(subject), model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * sigma
    with torch.no_grad():
        clean = float(model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)[answer])
    assert trace["clean"] == pytest.approx(clean, rel=1e-5)
    assert trace["corrupted"] == pytest.approx(
        sum(direct_trace(model, ids, subject, answer, n, 1, None) for n in noise) / 2, rel=1e-4)
    for layer in range(model.config.num_hidden_layers):
        expected = sum(direct_trace(model, ids, subject, answer, n, 1, layer) for n in noise) / 2
        assert float(trace["restored"][layer]) == pytest.approx(expected, rel=1e-4)
    assert trace["restored"][0] != pytest.approx(trace["corrupted"])  # restoring a layer changes the answer
    # A window of 3 restores the layer and its neighbours.
    wide = trace_prompt(model, ids, subject, answer, noise_scale=3.0, samples=2, window=3,
                        generator=torch.Generator().manual_seed(0))
    expected = sum(direct_trace(model, ids, subject, answer, n, 3, 0) for n in noise) / 2
    assert float(wide["restored"][0]) == pytest.approx(expected, rel=1e-4)
    still = trace_prompt(model, ids, subject, answer, noise_scale=0.0, samples=1)
    assert still["corrupted"] == pytest.approx(clean, rel=1e-5)  # no noise, no effect
    with pytest.raises(ValueError, match="subject"):
        trace_prompt(model, ids, [], answer)


def test_best_window_takes_the_largest_run():
    effects = torch.tensor([0.0, 0.1, 0.5, 0.4, 0.05, 0.3])
    assert best_window(effects, 2) == [2, 3] and best_window(effects, 1) == [2] and best_window(effects, 6) == list(range(6))
    with pytest.raises(ValueError, match="window"):
        best_window(effects, 7)
