"""Training-pool gradient features on a Ray Data actor pool, written shard by shard into a `FeatureStore`.

The algorithms live in `trustray.core.influence`; this module only places them on Ray. One Ray Data row is one
store shard, so a shard is computed by exactly one actor and written atomically by it: a killed actor loses at
most the shard it was working on, and a rerun skips every shard the store already has.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch

from trustray.config import PoolResources
from trustray.core.influence.checkpoint import CheckpointGradients, check_preconditionable
from trustray.core.influence.reductions import Reduction
from trustray.core.influence.store import FeatureStore
from trustray.core.lm.batching import encode_chat

logger = logging.getLogger(__name__)


class GradientFeatureWorker:
    """Ray Data callable class: loads model, adapter, optimizer state and reduction once per actor, then turns
    each shard row `{shard_index, ids, messages_json}` into features written to the store."""

    def __init__(
        self,
        model_source: str,
        checkpoint_dir: str,
        reduction_dir: str,
        store_dir: str,
        store_metadata: dict[str, Any],
        dim: int,
        dtype: str,
        max_length: int,
        micro_batch_size: int,
        precondition: bool,
        torch_threads: int | None,
    ) -> None:
        from trustray.models.loading import load_causal_lm, load_tokenizer, resolve_device

        if torch_threads is not None:
            # Actors share the machine's cores; oversubscribed torch threads run many times slower.
            torch.set_num_threads(torch_threads)
        self.reduction = Reduction.load(reduction_dir)
        self.precondition = precondition
        check_preconditionable(self.reduction, precondition)
        self.tokenizer = load_tokenizer(model_source)
        # Right padding is masked out (attention 0, label -100), so the pad id only has to be a valid token.
        pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        base = load_causal_lm(model_source, resolve_device(), "auto")
        self.gradients = CheckpointGradients.load(checkpoint_dir, base, precondition, micro_batch_size, pad_token_id)
        self.store = FeatureStore.create_or_open(store_dir, store_metadata, dim, dtype)
        self.max_length = max_length

    def features(self, conversations: list[list[dict[str, str]]]) -> np.ndarray:
        """`[len(conversations), dim]` float32 features, computed micro-batch by micro-batch."""
        encoded = [encode_chat(self.tokenizer, messages, self.max_length) for messages in conversations]
        return self.gradients.features(encoded, self.reduction, self.precondition).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, counts, seconds = [], [], []
        for shard_index, ids, messages_json in zip(batch["shard_index"], batch["ids"], batch["messages_json"], strict=True):
            start = time.perf_counter()
            shard_index = int(shard_index)
            ids = [str(value) for value in ids]
            # A retried or duplicated task finds its shard done: skip the work, not just the write.
            if not self.store.is_finished(shard_index):
                self.store.write_shard(shard_index, ids, self.features(json.loads(str(messages_json))))
            shards.append(shard_index)
            counts.append(len(ids))
            seconds.append(time.perf_counter() - start)
        return {"shard_index": np.asarray(shards), "num_examples": np.asarray(counts), "seconds": np.asarray(seconds)}


def extract_features(
    rows: list[dict[str, Any]],
    *,
    store_dir: str,
    store_metadata: dict[str, Any],
    dim: int,
    dtype: str,
    model_source: str,
    checkpoint_dir: str,
    reduction_dir: str,
    max_length: int,
    shard_size: int,
    micro_batch_size: int,
    precondition: bool,
    resources: PoolResources,
) -> FeatureStore:
    """Features of `rows` (`{id, messages}`, each encodable by `encode_chat` within `max_length`) into the store
    at `store_dir`, resuming it; returns the finalized store. Shard i holds rows `[i*shard_size, (i+1)*shard_size)`,
    so the same rows always map to the same shards and a rerun recomputes only the unfinished ones."""
    import ray

    from trustray.actors.cluster import init_ray

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    # Checked before Ray starts, so bad settings or a store made with other ones are refused before any work.
    check_preconditionable(Reduction.load(reduction_dir), precondition)
    store = FeatureStore.create_or_open(store_dir, store_metadata, dim, dtype)
    done = store.finished_shards()
    items = [
        {
            "shard_index": shard_index,
            "ids": [str(row["id"]) for row in chunk],
            "messages_json": json.dumps([row["messages"] for row in chunk]),
        }
        for shard_index, chunk in enumerate(rows[i : i + shard_size] for i in range(0, len(rows), shard_size))
        if shard_index not in done
    ]
    todo = sum(len(item["ids"]) for item in items)
    logger.info("features: %d examples in %d shards to compute, %d shards already finished in %s",
                todo, len(items), len(done), store_dir)
    if items:
        init_ray()
        start = time.perf_counter()
        results = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                GradientFeatureWorker,
                fn_constructor_kwargs={
                    "model_source": model_source,
                    "checkpoint_dir": checkpoint_dir,
                    "reduction_dir": reduction_dir,
                    "store_dir": store_dir,
                    "store_metadata": store_metadata,
                    "dim": dim,
                    "dtype": dtype,
                    "max_length": max_length,
                    "micro_batch_size": micro_batch_size,
                    "precondition": precondition,
                    "torch_threads": resources.torch_threads,
                },
                # No more actors than shards: each one loads the whole model.
                compute=ray.data.ActorPoolStrategy(size=min(resources.size, len(items))),
                **resources.ray_options(),
                batch_size=1,
                batch_format="numpy",
            )
            .take_all()
        )
        elapsed = time.perf_counter() - start
        computed = sum(int(result["num_examples"]) for result in results)
        logger.info("features: %d examples in %.1f s (%.2f examples/s, actor startup included)",
                    computed, elapsed, computed / elapsed)
    store.finalize(len(rows), [str(row["id"]) for row in rows])
    return store
