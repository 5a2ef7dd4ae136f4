"""Feature extraction on a Ray Data actor pool equals the in-process computation; resume; metadata refusal."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from trustray.actors.influence import extract_features
from trustray.artifacts import ArtifactMismatchError
from trustray.config import PoolResources
from trustray.core.influence.gradients import (
    adam_preconditioned,
    flatten_optimizer_state,
    per_example_gradients,
)
from trustray.core.influence.reductions import Reduction, build_reduction
from trustray.core.influence.store import FeatureStore
from trustray.core.influence.warmup import save_checkpoint
from trustray.core.lm.batching import collate, encode_chat

torch.set_num_threads(1)

DIM = 16
METADATA = {"kind": "test_features", "reduction": "gaussian", "seed": 0}
ROWS = [
    {
        "id": f"ex-{i}",
        "messages": [
            {"role": "user", "content": f"Tell me about topic {i}."},
            {"role": "assistant", "content": "It is a thing " * (1 + i % 4) + f"number {i}."},
        ],
    }
    for i in range(10)
]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir: str, tmp_path_factory) -> dict[str, str]:
    """A LoRA checkpoint after one AdamW step (so the moments are non-zero) and a saved gaussian reduction."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    batch = collate([encode_chat(tokenizer, row["messages"], 64) for row in ROWS[:4]], 0)
    model(**batch).loss.backward()
    optimizer.step()
    checkpoint = save_checkpoint(root / "checkpoint", model, optimizer, step=1, learning_rate=1e-3, epoch=1.0)
    build_reduction("gaussian", DIM, seed=0).save(root / "reduction")
    return {"model": tiny_llama_dir, "checkpoint": str(checkpoint), "reduction": str(root / "reduction"),
            "root": str(root)}


def reference(setup: dict[str, str], precondition: bool) -> np.ndarray:
    """The same features computed directly in this process, all ten examples in one batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, setup["checkpoint"], is_trainable=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    batch = collate([encode_chat(tokenizer, row["messages"], 64) for row in ROWS], 0)
    flat = per_example_gradients(model, batch).flat()
    if precondition:
        state = torch.load(Path(setup["checkpoint"]) / "optimizer.pt", weights_only=True)
        exp_avg, exp_avg_sq, step = flatten_optimizer_state(model, state)
        flat = adam_preconditioned(flat, exp_avg, exp_avg_sq, step)
    return Reduction.load(setup["reduction"]).transform(flat).numpy()


def run(setup: dict[str, str], store_dir: Path, precondition: bool = False, metadata: dict | None = None) -> FeatureStore:
    return extract_features(
        ROWS, store_dir=str(store_dir), store_metadata=metadata or METADATA, dim=DIM, dtype="float32",
        model_source=setup["model"], checkpoint_dir=setup["checkpoint"], reduction_dir=setup["reduction"],
        max_length=64, shard_size=4, micro_batch_size=3, precondition=precondition,
        resources=PoolResources(size=2, num_cpus=0.5, num_gpus=0, torch_threads=1),
    )


def test_features_match_in_process_and_resume(setup, ray_local, tmp_path, caplog):
    store = run(setup, tmp_path / "full")
    ids, features = store.load()
    assert ids == [row["id"] for row in ROWS]
    assert sorted(store.finished_shards()) == [0, 1, 2]
    np.testing.assert_allclose(features, reference(setup, precondition=False), rtol=1e-5, atol=1e-5)

    # A store interrupted after shards 0 and 2: the rerun must compute shard 1 only and leave the others alone.
    partial = FeatureStore.create_or_open(tmp_path / "partial", METADATA, DIM, "float32")
    for shard in (0, 2):
        partial.write_shard(shard, store.shard_ids(shard), store.shard_features(shard, mmap=False))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "partial").glob("shard-*")}
    with caplog.at_level(logging.INFO, logger="trustray.actors.influence"):
        resumed = run(setup, tmp_path / "partial")
    assert "4 examples in 1 shards to compute, 2 shards already finished" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "partial").glob("shard-*") if p.name in before} == before
    assert resumed.ids() == ids
    np.testing.assert_array_equal(resumed.load()[1], features)


def test_other_metadata_is_refused_before_ray(setup, tmp_path, monkeypatch):
    FeatureStore.create_or_open(tmp_path / "store", {**METADATA, "seed": 1}, DIM, "float32")
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not be used when the store is refused")

    monkeypatch.setattr(ray.data, "from_items", no_ray)
    with pytest.raises(ArtifactMismatchError, match="seed"):
        run(setup, tmp_path / "store")


def test_preconditioned_features_match_in_process(setup, ray_local, tmp_path):
    store = run(setup, tmp_path / "adam", precondition=True, metadata={**METADATA, "precondition": True})
    np.testing.assert_allclose(store.load()[1], reference(setup, precondition=True), rtol=1e-5, atol=1e-5)


def test_kron_with_preconditioning_is_refused(setup, tmp_path):
    build_reduction("kron", DIM, seed=0).save(tmp_path / "kron")
    with pytest.raises(ValueError, match="flat gradient"):
        run({**setup, "reduction": str(tmp_path / "kron")}, tmp_path / "store", precondition=True)
    assert not (tmp_path / "store").exists()
