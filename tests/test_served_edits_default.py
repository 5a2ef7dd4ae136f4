"""Edits through the API on the embedded default, as a user sends them (prompt and new answer, nothing else): the
served editor (memit, scoped to its edit keys) writes the new answers, keeps the unedited model's greedy answers
to the 50 held-out probe questions after one edit and after 16 in one request, and an edit set below the locality
threshold is refused, not served."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from trustray.config import load_config
from trustray.serve_apps.config import ServeConfig

# The 16-edit request runs MEMIT on the default model (~4 min alone here, machines differ up to 4x), and its
# fixture counts against the test that first asks for it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

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


def test_sixteen_edits_are_served_and_keep_95_percent_of_unrelated_answers(client, http, sixteen):
    edits, made = sixteen
    assert made["status"] == "succeeded", made
    assert made["metrics"]["locality_probes"] == 50 and made["metrics"]["locality_kept"] >= 0.95
    assert http.get(f"/v1/edits/{made['id']}").json()["metrics"] == made["metrics"]
    replies = [_ask(client, made["model"], edit["prompt"]) for edit in edits]
    # 15 of 16: one target stays short of memit's NLL stop (benchmarks/results/served_edit_locality.json)
    assert sum(e["target_new"].lower() in r.lower() for e, r in zip(edits, replies, strict=True)) >= 15


def test_an_edit_set_below_the_threshold_is_refused_not_served(client, http):
    """Edits that rewrite probe questions themselves change their answers: the check sees it and refuses."""
    import openai

    from trustray.data.edits import locality_probe_questions

    edits = [{"prompt": question, "target_new": "Lyon"} for question in locality_probe_questions(50)[:5]]
    made = http.post("/v1/edits", json={"edits": edits}).json()
    assert made["status"] == "rejected" and "min_locality_kept" in made["error"], made
    assert made["metrics"]["locality_kept"] < 0.95
    assert http.get(f"/v1/edits/{made['id']}").json()["status"] == "rejected"
    with pytest.raises(openai.NotFoundError):
        _ask(client, made["model"], edits[0]["prompt"])
