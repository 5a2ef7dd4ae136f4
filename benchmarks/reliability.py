"""Reliability of the Serve app on this machine, all over loopback, with the tiny random models of the tests (the
numbers are about Serve's and the app's behaviour, not the model's speed):
- fuzz: schemathesis cases from the app's OpenAPI document (valid and invalid), answers >= 500 and answers that do
  not match the declared schema (tests/fuzzing.py);
- faults under a bounded load (tests/faults.py): a chat replica killed (requests answered 200 or a retryable 503,
  none lost; seconds until the app answers again), the Serve controller killed, an edit job whose editor replica is
  killed (reported failed, nothing applied, the base model's answer unchanged);
- autoscaling: the chat deployment with min 1 / max 2 replicas under a bounded load from async `openai` clients:
  seconds until the second replica runs, seconds until it is removed once the load stops, failed requests.
- a worker node removed in the middle of the gradient-feature stage on a 3-node cluster on 127.0.0.1
  (tests/multinode.py): examples missing or duplicated, and whether the features equal an uninterrupted run.

Run: .venv/bin/python benchmarks/reliability.py [--fuzz-cases 200] [--load-seconds 40]
Writes benchmarks/results/reliability.json and benchmarks/results/autoscaling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from faults import BODY, load_with_fault, replica_name, seconds_until_answered, summary  # noqa: E402
from fuzzing import fuzz  # noqa: E402
from multinode import make_checkpoint, remove_node_mid_stage, start_cluster  # noqa: E402

from trustray.artifacts import atomic_write_text  # noqa: E402
from trustray.config import load_config  # noqa: E402
from trustray.runtime import apply_offline_defaults, machine_info, setup_logging  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TINY_CONFIG = ROOT / "configs" / "serve" / "tiny.yaml"
KEY = "reliability-key"
EDITOR = "editor: ft, editor_settings: {modules: {layers: [-1]}, max_length: 96, steps: 20, lr: 0.05, norm_bound: 3.0}"
EDITS = [{"prompt": "What is the colour of the tower?", "target_new": "bright purple"}] * 24
logger = logging.getLogger("reliability")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_models(folder: Path) -> dict[str, str]:
    """The tests' tiny Llama, tiny embedder and a 10-passage index (tests/conftest.py)."""
    from trustray.artifacts import write_metadata
    from trustray.core.rag.index import PassageIndex
    from trustray.models.embedders import Embedder, EmbedderConfig
    from trustray.models.tiny import TINY_CORPUS, build_tiny_bert_embedder, build_tiny_llama

    llama = str(build_tiny_llama(folder / "llama"))
    embedder_dir = str(build_tiny_bert_embedder(folder / "bert"))
    embedder = Embedder(EmbedderConfig(model=embedder_dir, torch_threads=1))
    texts = TINY_CORPUS[:10]
    PassageIndex(embedder.encode(texts), [f"p{i}" for i in range(10)], [t.split(" is ")[0] for t in texts],
                 texts).save(folder / "index")
    write_metadata(folder / "index", {"embedder_model": embedder_dir, "embedder_fingerprint": embedder.fingerprint})
    return {"llama": llama, "embedder": embedder_dir, "index": str(folder / "index")}


def serve_config(models: dict[str, str], folder: Path, extra: list[str]):
    from trustray.serve_apps.config import ServeConfig

    return load_config(ServeConfig, TINY_CONFIG, [
        f"port={free_port()}", f"chat.model={models['llama']}", f"rag.index_dir={models['index']}",
        f"rag.embedder.model={models['embedder']}",
        f"edits={{store_dir: '{folder / 'edit-sets'}', api_key: {KEY}, locality_probes: 4, job_timeout_s: 6, "
        f"min_locality_kept: 0, {EDITOR}}}", "deployments.editor.resources.num_cpus=0.25", *extra])


def measure_fuzz(url: str, cases: int) -> dict:
    began = time.perf_counter()
    report = fuzz(url, cases_per_operation=cases, models=("tiny-chat", "rag"))
    return {"cases": report.cases, "server_errors": len(report.server_errors),
            "schema_violations": len(report.schema_violations), "seconds": round(time.perf_counter() - began, 1),
            "statuses": {name: {str(k): v for k, v in sorted(counts.items())}
                         for name, counts in report.statuses.items()},
            "examples": (report.server_errors + report.schema_violations)[:5]}


def measure_replica_kill(url: str) -> dict:
    import ray

    killed = replica_name("ChatDeployment")
    answers, unanswered = load_with_fault(url, 48, lambda: ray.kill(ray.get_actor(killed, namespace="serve"),
                                                                    no_restart=True))
    recovered = seconds_until_answered(url)
    statuses = sorted({a.status_code for a in answers if isinstance(a, httpx.Response)})
    return {"name": "chat replica killed", **summary(answers), "unanswered_at_fault": unanswered,
            "statuses": statuses, "recovered_after_s": round(recovered, 2)}


def measure_controller_kill(url: str) -> dict:
    import ray

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    answers, unanswered = load_with_fault(url, 32, lambda: ray.kill(controller, no_restart=False))
    return {"name": "serve controller killed", **summary(answers), "unanswered_at_fault": unanswered}


def measure_edit_interrupted(url: str) -> dict:
    import ray

    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=120).json()["choices"][0]["message"]
    job = httpx.post(f"{url}/v1/edits", json={"edits": EDITS, "wait": False}, headers=headers, timeout=120).json()
    began = time.monotonic()
    ray.kill(ray.get_actor(replica_name("EditorDeployment"), namespace="serve"), no_restart=False)
    while (status := httpx.get(f"{url}/v1/edits/{job['id']}", headers=headers, timeout=60).json())["status"] == "running":
        time.sleep(0.5)
    after = httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=120).json()["choices"][0]["message"]
    served = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]]
    # The job fails (as it must); lost: its edit set served anyway, half made.
    return {"name": "edit job's editor replica killed", "requests": 1, "failed": int(status["status"] == "failed"),
            "lost": int(f"edit-{job['id']}" in served), "status": status["status"],
            "reported_after_s": round(time.monotonic() - began, 1), "base_answer_unchanged": after == before}


def measure_node_removal(models: dict[str, str], folder: Path) -> dict:
    """On its own 3-node cluster (this process reconnects to a local one afterwards)."""
    import ray

    nodes, workers = start_cluster()
    try:
        report = remove_node_mid_stage(nodes, workers, make_checkpoint(models["llama"], folder / "node-removal"),
                                       folder / "node-removal")
    finally:
        ray.shutdown()
        nodes.shutdown()
    missing = report.get("missing", report["examples"])
    return {"name": "worker node removed mid feature stage", "requests": report["examples"],
            "failed": missing + report.get("duplicated", 0), "lost": missing, "duplicated": report.get("duplicated"),
            "identical_to_uninterrupted": report.get("identical"),
            "max_abs_difference": report.get("max_abs_difference"),
            "shards_done_at_removal": report["shards_done_at_removal"], "shards": report["shards"],
            "seconds": report["seconds"], "error": report["error"]}


def measure_autoscaling(url: str, seconds: float, clients: int) -> dict:
    """Load from `clients` async openai clients for `seconds`, replica counts polled meanwhile and until the scale
    down."""
    import openai
    from ray import serve

    replicas: list[tuple[float, int]] = []
    stop_polling = threading.Event()
    began = time.monotonic()

    def poll() -> None:
        while not stop_polling.is_set():
            deployment = serve.status().applications["trustray"].deployments["ChatDeployment"]
            replicas.append((time.monotonic() - began, deployment.replica_states.get("RUNNING", 0)))
            time.sleep(0.25)

    async def load() -> tuple[int, int]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        done = failed = 0

        async def one_client() -> None:
            nonlocal done, failed
            while time.monotonic() - began < seconds:
                try:
                    await client.chat.completions.create(model="tiny-chat", messages=BODY["messages"], max_tokens=48)
                    done += 1
                except openai.OpenAIError:
                    failed += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
        return done, failed

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    done, failed = asyncio.run(load())
    load_ended = time.monotonic() - began
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (replicas and replicas[-1][0] > load_ended and replicas[-1][1] == 1):
        time.sleep(0.5)
    stop_polling.set()
    poller.join()
    up = next((t for t, count in replicas if count >= 2), None)
    down = next((t for t, count in replicas if t > load_ended and count == 1), None)
    return {"clients": clients, "load_seconds": seconds, "requests": done + failed, "failed_requests": failed,
            "max_replicas_seen": max(count for _, count in replicas),
            "scale_up_s": round(up, 1) if up is not None else None,
            "scale_down_s": round(down - load_ended, 1) if down is not None else None,
            "settings": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 2,
                         "downscale_delay_s": 10}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz-cases", type=int, default=200, help="cases per operation")
    parser.add_argument("--load-seconds", type=float, default=40)
    parser.add_argument("--clients", type=int, default=12)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    from trustray.actors.cluster import init_ray
    from trustray.serve_apps.openai_app import run_app, shutdown

    folder = Path(tempfile.mkdtemp(prefix="reliability-"))
    models = tiny_models(folder)
    node_removal = measure_node_removal(models, folder)
    logger.info("node removal: %s", node_removal)
    init_ray(num_cpus=2)
    url = run_app(serve_config(models, folder, []))
    fuzzed = measure_fuzz(url, args.fuzz_cases)
    logger.info("fuzz: %s", {k: v for k, v in fuzzed.items() if k != "statuses"})
    faults = [measure_replica_kill(url), measure_controller_kill(url), measure_edit_interrupted(url), node_removal]
    logger.info("faults: %s", faults)
    shutdown()
    scaling = ["deployments.chat.autoscaling={min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2, "
               "upscale_delay_s: 2, downscale_delay_s: 10}", "edits=null", "rag=null"]
    url = run_app(serve_config(models, folder, scaling))
    autoscaling = measure_autoscaling(url, args.load_seconds, args.clients)
    logger.info("autoscaling: %s", autoscaling)
    shutdown()
    machine = machine_info()
    atomic_write_text(RESULTS / "autoscaling.json", json.dumps({"machine": machine, **autoscaling}, indent=2) + "\n")
    result = {"machine": machine, "model": "tiny random Llama (tests/conftest.py)", "fuzz": fuzzed, "faults": faults,
              "autoscaling": autoscaling}
    atomic_write_text(RESULTS / "reliability.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
