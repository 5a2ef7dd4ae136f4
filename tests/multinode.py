"""A Ray cluster of several nodes on 127.0.0.1 and the gradient-feature stage on it (a helper of
tests/test_multinode.py and benchmarks/reliability.py, not a test).

`start_cluster()`: a head (one CPU, for Ray Data's other tasks) and two worker nodes that each declare one
`pool_node` and a `serve_a` / `serve_b` resource; this process connected to it. `remove_node_mid_stage()` runs the
feature stage while a worker node is removed and reports what survived.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import ray

from trustray.config import PoolResources

ROWS = [
    {"id": f"ex-{i}", "messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                                   {"role": "assistant", "content": "It is a thing " * (1 + i % 4) + f"number {i}."}]}
    for i in range(32)
]
# One actor per worker node: each declares one `pool_node`, each actor needs one. The head's CPU runs Ray Data's
# other tasks (a 1-CPU task cannot start beside a pool actor on a 1-CPU node).
SPREAD_POOL = PoolResources(size=2, num_cpus=0.5, num_gpus=0, torch_threads=1, custom_resources={"pool_node": 1})


def add_worker(nodes: Any, name: str) -> Any:
    return nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"pool_node": 1, f"serve_{name}": 1})


def start_cluster() -> tuple[Any, list[Any]]:
    """(the cluster, its two worker nodes), this process connected to it (any other Ray shut down first)."""
    from ray.cluster_utils import Cluster

    from trustray.actors.cluster import worker_env

    ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    workers = [add_worker(nodes, name) for name in ("a", "b")]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, runtime_env={"env_vars": worker_env()})
    return nodes, workers


def make_checkpoint(llama_dir: str, folder: Path) -> dict[str, str]:
    """A LoRA checkpoint of `llama_dir` after one AdamW step and a gaussian reduction, under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trustray.core.influence.reductions import build_reduction
    from trustray.core.influence.warmup import save_checkpoint
    from trustray.core.lm.batching import collate, encode_chat

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model(**collate([encode_chat(tokenizer, row["messages"], 64) for row in ROWS[:4]], 0)).loss.backward()
    optimizer.step()
    path = save_checkpoint(folder / "checkpoint", model, optimizer, step=1, learning_rate=1e-3, epoch=1.0)
    build_reduction("gaussian", 16, seed=0).save(folder / "reduction")
    return {"model": llama_dir, "checkpoint": str(path), "reduction": str(folder / "reduction")}


def features(checkpoint: dict[str, str], store_dir: Path, shard_size: int = 4):
    from trustray.actors.influence import extract_features

    return extract_features(
        ROWS, store_dir=str(store_dir), store_metadata={"kind": "multinode"}, dim=16, dtype="float32",
        model_source=checkpoint["model"], checkpoint_dir=checkpoint["checkpoint"],
        reduction_dir=checkpoint["reduction"], max_length=64, shard_size=shard_size, micro_batch_size=4,
        precondition=True, resources=SPREAD_POOL,
    )


def finished_shards(store_dir: Path) -> int:
    return len(list(store_dir.glob("shard-*.ids.parquet")))


def remove_node_mid_stage(nodes: Any, workers: list[Any], checkpoint: dict[str, str], folder: Path) -> dict:
    """Run the feature stage uninterrupted, then again while worker node 1 is removed as soon as its first shard is
    written (a new worker replaces it afterwards); what the interrupted run produced against the reference."""
    import numpy as np

    reference_ids, reference = features(checkpoint, folder / "uninterrupted", shard_size=2).load()
    store_dir = folder / "interrupted"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["store"] = features(checkpoint, store_dir, shard_size=2)
        except Exception as error:  # reported to the caller
            outcome["error"] = error

    job = threading.Thread(target=run)
    began = time.monotonic()
    job.start()
    while not finished_shards(store_dir) and time.monotonic() - began < 300 and job.is_alive():
        time.sleep(0.05)
    at_removal = finished_shards(store_dir)
    nodes.remove_node(workers[1], allow_graceful=False)
    job.join(timeout=400)
    workers[1] = add_worker(nodes, "b")
    nodes.wait_for_nodes()
    report = {"examples": len(ROWS), "shards": len(ROWS) // 2, "shards_done_at_removal": at_removal,
              "finished": "store" in outcome, "error": repr(outcome["error"]) if "error" in outcome else None,
              "seconds": round(time.monotonic() - began, 1)}
    if "store" in outcome:
        ids, values = outcome["store"].load()
        same_ids = ids == reference_ids
        report.update(missing=len(set(reference_ids) - set(ids)), duplicated=len(ids) - len(set(ids)),
                      identical=same_ids and bool(np.allclose(values, reference, rtol=1e-5, atol=1e-6)),
                      max_abs_difference=float(np.abs(values - reference).max()) if same_ids else None)
    return report
