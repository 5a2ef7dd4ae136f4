"""Several Ray nodes on 127.0.0.1 (`ray.cluster_utils.Cluster`: a head and two worker nodes that declare a `pool_node`
resource): the gradient-feature stage and the index build spread their actor pools over the workers, the Serve
app's chat and retriever deployments run on different nodes (custom resources) and answer together, and a worker
node removed in the middle of the feature stage loses nothing (every example's features present once, equal to an
uninterrupted run)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from multinode import ROWS, features, make_checkpoint, remove_node_mid_stage, start_cluster
from ray.data import DataContext

from trustray.config import load_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    """The cluster, this process connected to it; the tests' own local cluster is restarted afterwards."""
    from trustray.actors.cluster import init_ray

    was_running = ray.is_initialized()
    nodes, workers = start_cluster()
    # Actor pools start their actors asynchronously: on a slow machine a small job can finish on the first actor
    # before the second is placed, and an actor never placed has no node. Waiting for the whole pool makes the
    # placement these tests check deterministic.
    context = DataContext.get_current()
    default_wait = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = 120
    yield nodes, workers
    context.wait_for_min_actors_s = default_wait
    ray.shutdown()
    nodes.shutdown()
    if was_running:
        init_ray(num_cpus=2)


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    return make_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("multinode"))


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
    report = remove_node_mid_stage(nodes, workers, checkpoint, tmp_path)
    assert report["finished"], report["error"]
    # The removal happened mid-stage: some shards were done, most were not.
    assert 0 < report["shards_done_at_removal"] < report["shards"] // 2
    assert report["missing"] == report["duplicated"] == 0 and report["identical"], report
