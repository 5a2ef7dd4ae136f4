"""Causal tracing of MLP layers (Meng et al. 2022, ROME §2.1): where does the model recall a subject's fact?

For a prompt whose answer the model knows, three runs of the chat prompt:

- clean: p(first answer token), and every layer's MLP output at the subject's last token is recorded;
- corrupted: Gaussian noise (`noise_scale` × the standard deviation of the embedding matrix, ROME's 3σ) is added
  to the subject tokens' embeddings, so the model no longer knows whom the question is about;
- corrupted with restoration: as corrupted, but the MLP outputs of a window of `window` layers centred on layer
  ℓ are set back to their clean values at the subject's last token.

The indirect effect of layer ℓ is p(restored at ℓ) − p(corrupted), averaged over `samples` noise draws. MEMIT
edits the MLPs of the layers where that effect is large, ending at its peak; `best_window` picks the run of
consecutive layers with the largest summed effect. All runs of one prompt (every layer, every draw) go through the
model as one batch, and the model is never changed (hooks only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trustray.core.lm.prefix import decoder_layers


def _embeddings(model: nn.Module) -> nn.Embedding:
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"causal tracing needs an nn.Embedding input layer, got {type(embedding).__name__}")
    return embedding


@torch.no_grad()
def trace_prompt(model: nn.Module, ids: Sequence[int], subject_tokens: Sequence[int], answer_token: int,
                 noise_scale: float = 3.0, samples: int = 5, window: int = 5,
                 generator: torch.Generator | None = None) -> dict[str, Any]:
    """`{clean, corrupted, restored [layers]}`: p(answer_token) at the last position of `ids` clean, with the
    subject (`subject_tokens`, positions in `ids`) corrupted, and corrupted with layer ℓ's window of MLP outputs
    restored at the subject's last token (mean over `samples` noise draws)."""
    if not subject_tokens:
        raise ValueError("causal tracing needs the subject's token positions")
    layers = decoder_layers(model)
    n_layers = len(layers)
    device = next(model.parameters()).device
    embedding = _embeddings(model)
    sigma = float(embedding.weight.float().std()) * noise_scale
    last = max(subject_tokens)
    input_ids = torch.tensor([list(ids)], device=device)

    clean_mlp: dict[int, Tensor] = {}
    handles = [layer.mlp.register_forward_hook(
        lambda module, args, output, index=index: clean_mlp.__setitem__(index, output[0, last].clone()))
        for index, layer in enumerate(layers)]
    try:
        clean = model(input_ids=input_ids, logits_to_keep=1).logits[0, -1].float().softmax(-1)[answer_token]
    finally:
        for handle in handles:
            handle.remove()

    # Rows: sample s, restored layer ℓ (ℓ = n_layers: nothing restored) -> row s·(n_layers + 1) + ℓ.
    rows = samples * (n_layers + 1)
    noise = torch.randn(samples, len(subject_tokens), embedding.embedding_dim, generator=generator) * sigma
    noise = noise.repeat_interleave(n_layers + 1, dim=0).to(device=device, dtype=embedding.weight.dtype)
    subject = torch.tensor(list(subject_tokens), device=device)
    restored_layer = torch.arange(rows, device=device) % (n_layers + 1)

    def corrupt(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        output = output.clone()
        output[:, subject] += noise
        return output

    def restore(index: int):
        centre = restored_layer
        chosen = (centre < n_layers) & ((index - centre).abs() <= window // 2)

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if not chosen.any():
                return output
            output = output.clone()
            output[chosen, last] = clean_mlp[index].to(output.dtype)
            return output

        return hook

    handles = [embedding.register_forward_hook(corrupt)]
    handles += [layer.mlp.register_forward_hook(restore(index)) for index, layer in enumerate(layers)]
    try:
        probs = model(input_ids=input_ids.expand(rows, -1), logits_to_keep=1).logits[:, -1].float().softmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    answer = probs[:, answer_token].view(samples, n_layers + 1).mean(dim=0)
    return {"clean": float(clean), "corrupted": float(answer[n_layers]), "restored": answer[:n_layers].cpu()}


def best_window(effects: Tensor, size: int) -> list[int]:
    """The `size` consecutive layers with the largest summed effect (ties: the lowest), as a list of indices."""
    if not 1 <= size <= len(effects):
        raise ValueError(f"window size must be in 1..{len(effects)}, got {size}")
    sums = effects.unfold(0, size, 1).sum(dim=1)
    start = int(torch.argmax(sums))
    return list(range(start, start + size))
