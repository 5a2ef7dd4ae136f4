"""Reductions: batch invariance, seed determinism across instances, JL, PCA, kron, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from trustray.core.influence.gradients import GradientBatch, lora_modules, per_example_gradients
from trustray.core.influence.reductions import REDUCTIONS, Reduction, build_reduction, kron_split

torch.set_num_threads(1)

# Small blocks so the tiny model's gradient (D = 1792) spans several generated blocks.
OPTIONS = {
    "none": {},
    "gaussian": {"block_rows": 256},
    "rademacher": {"block_rows": 256},
    "sjlt": {"block_rows": 256, "s": 2},
    "pca": {},
    "kron": {},
    "kron-pca": {"init": "pca"},
}


def _build(key: str, dim: int = 16, seed: int = 0, **extra) -> Reduction:
    options = dict(OPTIONS[key], **extra)
    return build_reduction(key.split("-")[0], dim, seed, **options)


@pytest.fixture(scope="module")
def batches(tiny_llama_dir) -> list[GradientBatch]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    assert len(lora_modules(model)) == 8
    return [
        per_example_gradients(model, _batch(lengths=(12, 8, 5, 10, 7, 11), prompts=(3, 2, 1, 4, 2, 0), seed=seed))
        for seed in range(4)
    ]


def _batch(lengths: tuple[int, ...], prompts: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded examples whose first `prompt` tokens carry no loss."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 200, (len(lengths), max(lengths)), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    labels = input_ids.clone()
    for i, (length, prompt) in enumerate(zip(lengths, prompts, strict=True)):
        attention_mask[i, :length] = 1
        labels[i, length:] = -100
        labels[i, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _rows(batch: GradientBatch, rows: slice) -> GradientBatch:
    factors = {name: (x[rows], g[rows]) for name, (x, g) in batch.factors.items()}
    return GradientBatch(factors=factors, loss=batch.loss[rows], mask=batch.mask[rows])


def _fitted(key: str, batches: list[GradientBatch], **extra) -> Reduction:
    return _build(key, **extra).fit(batches)


@pytest.mark.parametrize("key", list(OPTIONS))
def test_batch_invariant_and_deterministic_across_instances(key, batches):
    batch = batches[0]
    first = _fitted(key, batches)
    whole = first.transform(batch)
    assert whole.dtype == torch.float32 and whole.shape == (batch.batch_size, first.dim)
    parts = torch.cat([first.transform(_rows(batch, slice(0, 2))), first.transform(_rows(batch, slice(2, None)))])
    assert torch.allclose(whole, parts, rtol=1e-5, atol=1e-6)
    # A second actor builds its own instance from the same seed (and fits on the same sample).
    second = _fitted(key, batches)
    assert torch.equal(second.transform(batch), whole)
    assert second.state() == first.state()
    if key in ("gaussian", "rademacher", "sjlt", "kron"):
        other = _fitted(key, batches, seed=1)
        assert not torch.allclose(other.transform(batch), whole)


@pytest.mark.parametrize("key", list(OPTIONS))
def test_save_load_round_trip(key, batches, tmp_path):
    reduction = _fitted(key, batches)
    expected = reduction.transform(batches[1])
    reduction.save(tmp_path)
    loaded = Reduction.load(tmp_path)
    assert type(loaded) is type(reduction)
    assert loaded.state() == reduction.state()
    assert torch.equal(loaded.transform(batches[1]), expected)
    assert any(tmp_path.glob("*.npy")) == reduction.fitted


def test_none_is_the_flat_gradient(batches):
    reduction = build_reduction("none", None)
    assert torch.equal(reduction.transform(batches[0]), batches[0].flat())
    assert reduction.dim == batches[0].dim


def test_random_blocks_cached_or_regenerated_are_identical(batches):
    flat = batches[0].flat()
    cached = build_reduction("gaussian", 32, 5, block_rows=256)
    uncached = build_reduction("gaussian", 32, 5, block_rows=256, max_cache_bytes=0)
    assert torch.equal(cached.transform(flat), uncached.transform(flat))
    assert torch.equal(cached.transform(flat), uncached.transform(flat))
    dense = torch.cat([uncached.block(i) for i in range(math.ceil(flat.shape[1] / 256))])
    assert dense.shape == (flat.shape[1], 32)
    assert torch.allclose(cached.transform(flat), flat @ dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gaussian", "rademacher", "sjlt"])
def test_random_projections_preserve_inner_products_on_average(name):
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(24, 3000, generator=generator)
    gram = data @ data.T
    grams = []
    for seed in range(4):
        projected = build_reduction(name, 1024, seed, block_rows=512).transform(data)
        grams.append(projected @ projected.T)
        norms = projected.norm(dim=1) / data.norm(dim=1)
        assert 0.9 < float(norms.mean()) < 1.1
    # Each entry errs by about |x||y|/sqrt(k) (relative Gram error ~0.15 here); the estimate is unbiased, so
    # averaging independent seeds shrinks the error (by 1/2 for four seeds).
    errors = [float((g - gram).norm() / gram.norm()) for g in grams]
    averaged = float((torch.stack(grams).mean(0) - gram).norm() / gram.norm())
    assert max(errors) < 0.25
    assert averaged < 0.7 * sum(errors) / len(errors)


def test_pca_basis_orthonormal_and_beats_random_on_low_rank_data():
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(300, 6, generator=generator) @ torch.randn(6, 400, generator=generator)
    data = low_rank + 0.01 * torch.randn(300, 400, generator=generator)
    pca = build_reduction("pca", 6, 0).fit(data)
    assert torch.allclose(pca.basis.T @ pca.basis, torch.eye(6), atol=1e-5)
    random_basis, _ = torch.linalg.qr(torch.randn(400, 6, generator=generator))
    captured = pca.transform(data).square().sum() / data.square().sum()
    captured_random = (data @ random_basis).square().sum() / data.square().sum()
    assert captured > 0.99 and captured > 5 * captured_random
    centred = build_reduction("pca", 6, 0, center=True).fit(data)
    assert torch.allclose(centred.transform(data[:3]), (data[:3] - data.mean(0)) @ centred.basis, atol=1e-4)
    with pytest.raises(ValueError):
        build_reduction("pca", 500, 0).fit(data)


def test_kron_matches_the_explicit_formula_for_one_module(batches):
    batch = batches[0]
    reduction = build_reduction("kron", 80, 3)
    features = reduction.transform(batch)
    x, g = next(iter(batch.factors.values()))
    size_in, size_out = x.shape[-1], g.shape[-1]
    k_in, k_out = reduction.split[0]
    p_in, p_out = reduction.projections[0]
    weight_grads = batch.flat()[:, : size_in * size_out].view(-1, size_out, size_in)
    expected = torch.stack([p_out.T @ weight_grads[i] @ p_in for i in range(batch.batch_size)]).flatten(1)
    assert torch.allclose(features[:, : k_in * k_out], expected, rtol=1e-4, atol=1e-6)
    assert features.shape[1] == reduction.dim <= 80


def test_kron_keeping_every_module_whole_is_the_flat_gradient(batches):
    batch = batches[0]
    reduction = build_reduction("kron", 10 * batch.dim, 0)
    assert reduction.transform(batch).shape[1] == batch.dim
    assert torch.allclose(reduction.transform(batch), batch.flat(), rtol=1e-5, atol=1e-7)


def test_kron_split_rule():
    shapes = [(64, 4), (4, 64)] * 4
    split = kron_split(128, shapes)
    assert sum(a * b for a, b in split) == 128
    assert split[0] == (4, 4) and split[1] == (4, 4)
    assert kron_split(1000, [(64, 4)]) == [(64, 4)]
    assert sum(a * b for a, b in kron_split(100, [(64, 4), (4, 64), (10, 10)])) <= 100
    with pytest.raises(ValueError):
        kron_split(3, shapes)


def test_kron_pca_projections_are_orthonormal(batches):
    reduction = _fitted("kron-pca", batches)
    for p_in, p_out in reduction.projections:
        assert torch.allclose(p_in.T @ p_in, torch.eye(p_in.shape[1]), atol=1e-5)
        assert torch.allclose(p_out.T @ p_out, torch.eye(p_out.shape[1]), atol=1e-5)
    with pytest.raises(RuntimeError):
        build_reduction("kron", 16, 0, init="pca").transform(batches[0])


def test_registry():
    assert set(REDUCTIONS) == {"none", "gaussian", "rademacher", "sjlt", "pca", "kron"}
    with pytest.raises(ValueError):
        build_reduction("umap", 8, 0)
