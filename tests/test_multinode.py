"""Several Ray nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`: a head and two worker nodes that declare a `pool_node`
resource): the gradient-feature stage and the index build spread their actor pools over the workers, the Serve
app's chat and retriever deployments run on different nodes (custom resources) and answer together, and a worker
node removed in the middle of the feature stage loses nothing (every example's features present once, equal to an
uninterrupted run)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray

from trustray.config import PoolResources, load_config

pytestmark = pytest.mark.timeout(300)

ROWS = [
    {"id": f"ex-{i}", "messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                                   {"role": "assistant", "content": "It is a thing " * (1 + i % 4) + f"number {i}."}]}
    for i in range(48)
]
# One actor per worker node: each declares one `pool_node`, each actor needs one. The head's CPU runs Ray Data's
# other tasks (a 1-CPU task cannot start beside a pool actor on a 1-CPU node).
SPREAD_POOL = PoolResources(size=2, num_cpus=0.5, num_gpus=0, torch_threads=1, custom_resources={"pool_node": 1})


@pytest.fixture(scope="module")
def cluster():
    """The cluster, this process connected to it; the tests' own local cluster is restarted afterwards."""
    from ray.cluster_utils import Cluster

    from trustray.actors.cluster import init_ray, worker_env

    was_running = ray.is_initialized()
    ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    workers = [nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"pool_node": 1, f"serve_{name}": 1})
               for name in ("a", "b")]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, runtime_env={"env_vars": worker_env()})
    yield nodes, workers
    ray.shutdown()
    nodes.shutdown()
    if was_running:
        init_ray(num_cpus=2)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    """A LoRA checkpoint of the tiny Llama after one AdamW step and a gaussian reduction."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trustray.core.influence.reductions import build_reduction
    from trustray.core.influence.warmup import save_checkpoint
    from trustray.core.lm.batching import collate, encode_chat

    root = tmp_path_factory.mktemp("multinode")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model(**collate([encode_chat(tokenizer, row["messages"], 64) for row in ROWS[:4]], 0)).loss.backward()
    optimizer.step()
    path = save_checkpoint(root / "checkpoint", model, optimizer, step=1, learning_rate=1e-3, epoch=1.0)
    build_reduction("gaussian", 16, seed=0).save(root / "reduction")
    return {"model": tiny_llama_dir, "checkpoint": str(path), "reduction": str(root / "reduction")}


def features(checkpoint: dict[str, str], store_dir, shard_size: int = 4):
    from trustray.actors.influence import extract_features

    return extract_features(
        ROWS, store_dir=str(store_dir), store_metadata={"kind": "multinode"}, dim=16, dtype="float32",
        model_source=checkpoint["model"], checkpoint_dir=checkpoint["checkpoint"],
        reduction_dir=checkpoint["reduction"], max_length=64, shard_size=shard_size, micro_batch_size=4,
        precondition=True, resources=SPREAD_POOL,
    )


def finished_shards(store_dir) -> int:
    return len(list(store_dir.glob("shard-*.ids.parquet")))


def nodes_of_actors(class_name: str) -> set[str]:
    from ray.util.state import list_actors

    # An actor Ray Data asked for but never needed has no node.
    return {actor.node_id for actor in list_actors(limit=10_000, detail=True)
            if class_name in actor.class_name and actor.node_id is not None}


def test_feature_stage_runs_on_both_worker_nodes(cluster, checkpoint, tmp_path):
    _, workers = cluster
    store = features(checkpoint, tmp_path / "store")
    ids, values = store.load()
    assert ids == [row["id"] for row in ROWS] and np.isfinite(values).all()
    assert nodes_of_actors("GradientFeatureWorker") == {worker.node_id for worker in workers}


def test_index_build_runs_on_both_worker_nodes(cluster, tiny_embedder_dir, tmp_path):
    from trustray.pipelines import build_index

    config = load_config(build_index.BuildIndexConfig, "configs/build_index/tiny.yaml", [
        f"embedder.model={tiny_embedder_dir}", "limit=12", f"output_dir={tmp_path / 'index'}",
        "resources.size=2", "resources.num_cpus=0.5", "resources.custom_resources.pool_node=1"])
    build_index.run(config)
    _, workers = cluster
    assert nodes_of_actors("EmbedBatch") == {worker.node_id for worker in workers}


def test_serve_deployments_on_different_nodes_answer_together(cluster, tiny_llama_dir, tiny_embedder_dir,
                                                            tiny_index_dir, free_port):
    import openai

    from trustray.serve_apps.config import ServeConfig
    from trustray.serve_apps.openai_app import run_app, shutdown

    config = load_config(ServeConfig, "configs/serve/tiny.yaml", [
        f"port={free_port}", f"chat.model={tiny_llama_dir}", f"rag.index_dir={tiny_index_dir}",
        f"rag.embedder.model={tiny_embedder_dir}", "deployments.chat.resources.custom_resources.serve_a=0.1",
        "deployments.retriever.resources.custom_resources.serve_b=0.1"])
    url = run_app(config)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="rag", messages=[{"role": "user", "content": "Paris?"}],
                                                max_tokens=4)
        assert answer.choices[0].message.content is not None and answer.model_extra["sources"]
        _, workers = cluster
        assert nodes_of_actors("ServeReplica:trustray:ChatDeployment") == {workers[0].node_id}
        assert nodes_of_actors("ServeReplica:trustray:RetrieverDeployment") == {workers[1].node_id}
    finally:
        shutdown()


def test_a_worker_node_removed_mid_stage_loses_nothing(cluster, checkpoint, tmp_path):
    nodes, workers = cluster
    reference = features(checkpoint, tmp_path / "uninterrupted", shard_size=2).load()
    store_dir = tmp_path / "interrupted"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["store"] = features(checkpoint, store_dir, shard_size=2)
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    job = threading.Thread(target=run)
    job.start()
    deadline = time.monotonic() + 300
    while not finished_shards(store_dir) and time.monotonic() < deadline and job.is_alive():
        time.sleep(0.05)
    finished_at_removal = finished_shards(store_dir)
    victim = workers[1]
    nodes.remove_node(victim, allow_graceful=False)
    job.join(timeout=400)
    assert not job.is_alive() and "error" not in outcome, outcome.get("error")
    # The removal happened mid-stage: some shards were done, most were not.
    assert 0 < finished_at_removal < len(ROWS) // 2 // 2
    ids, values = outcome["store"].load()
    assert ids == reference[0] and len(set(ids)) == len(ROWS)
    np.testing.assert_allclose(values, reference[1], rtol=1e-5, atol=1e-6)
    # Replace the node so later tests see two workers again.
    workers[1] = nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"pool_node": 1, "serve_b": 1})
    nodes.wait_for_nodes()
