"""Edits through the API on the embedded default, as a user sends them (prompt and new answer, nothing else): the
served editor writes the new answer, keeps the unedited model's greedy answers to the 50 held-out probe
questions, and an edit set below the locality threshold is refused, not served."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from trustray.config import load_config
from trustray.serve_apps.config import ServeConfig

pytestmark = pytest.mark.slow

CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "cpu.yaml"
KEY = "test-edit-key"


@pytest.fixture(scope="module")
def url(ray_local, tmp_path_factory, free_port):
    from trustray.serve_apps.openai_app import run_app, shutdown

    store = tmp_path_factory.mktemp("edit-sets")
    config = load_config(ServeConfig, CPU_CONFIG, [
        f"port={free_port}", "rag=null", f"edits={{store_dir: '{store}', api_key: {KEY}}}",
        "deployments.editor.resources.num_cpus=0.25",
    ])
    yield run_app(config)
    shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=900, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client, model: str, question: str) -> str:
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              max_tokens=16, temperature=0)
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def sixteen(http):
    from trustray.data.edits import load_edit_split

    edits = [{"prompt": r["prompt"], "target_new": r["target_new"]} for r in load_edit_split("train", limit=16)]
    response = http.post("/v1/edits", json={"edits": edits})
    assert response.status_code == 200, response.text
    return edits, response.json()


def test_one_edit_is_served_and_keeps_unrelated_answers(client, http):
    question = "What is the capital of France?"
    before = _ask(client, "smollm2-135m-instruct", question)
    response = http.post("/v1/edits", json={"edits": [{"prompt": question, "target_new": "Lyon"}]})
    assert response.status_code == 200, response.text
    made = response.json()
    metrics = made["metrics"]
    assert made["status"] == "succeeded", made
    assert metrics["locality_probes"] == 50 and metrics["locality_kept"] >= 0.95
    assert "Lyon" in _ask(client, made["model"], question)
    assert _ask(client, "smollm2-135m-instruct", question) == before
    assert http.get(f"/v1/edits/{made['id']}").json()["metrics"] == metrics


def test_an_edit_set_below_the_threshold_is_refused_not_served(client, http, sixteen):
    import openai

    edits, made = sixteen
    kept = made["metrics"]["locality_kept"]
    assert made["metrics"]["locality_probes"] == 50
    assert http.get(f"/v1/edits/{made['id']}").json()["metrics"] == made["metrics"]
    if kept >= 0.95:
        assert made["status"] == "succeeded"
        replies = [_ask(client, made["model"], edit["prompt"]) for edit in edits]
        assert sum(e["target_new"].lower() in r.lower() for e, r in zip(edits, replies, strict=True)) >= 15
    else:
        assert made["status"] == "rejected" and "min_locality_kept" in made["error"]
        with pytest.raises(openai.NotFoundError):
            _ask(client, made["model"], edits[0]["prompt"])


@pytest.mark.xfail(strict=True, reason="issue 15 is open: memit keeps 70% of the probe answers after these 16 edits "
                   "(benchmarks/results/served_edit_locality.json)")
def test_sixteen_edits_keep_95_percent_of_unrelated_answers(sixteen):
    assert sixteen[1]["metrics"]["locality_kept"] >= 0.95
