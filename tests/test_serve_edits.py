"""Edit sets served next to the base model: /v1/edits with an API key, multiplexed routing, the openai client, and the
locality check that keeps an edit set from being served when it changes unrelated answers.

Every test runs once with the `ft` baseline and once with a MALMEN editor meta-trained for two steps in a fixture.
The server's `min_locality_kept` is above 1, so every edit set fails the check: requests that must be served accept
the locality loss explicitly, and one without that flag shows the rejection.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from faults import replica_name

from trustray.config import load_config
from trustray.serve_apps.config import ServeConfig

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "tiny.yaml"
KEY = "test-edit-key"
TARGET = "bright purple"
QUESTION = [{"role": "user", "content": "What is the colour of the tower?"}]
PROBES = 8
JOB_TIMEOUT_S = 6
EDITS = {"name": "tower colour", "accept_locality_loss": True, "edits": [
    {"prompt": "What is the colour of the tower?", "target_new": TARGET,
     "paraphrases": ["Which colour does the tower have?"],
     "locality": [{"prompt": "Where is the river?", "answer": "north"}]},
]}
# Each editor's settings, tuned so the random tiny Llama (whose activations are small) learns the edit for sure.
EDITORS = {
    "ft": "editor: ft, editor_settings: {modules: {layers: [-1]}, max_length: 96, steps: 20, lr: 0.05, norm_bound: 3.0}",
    "malmen": "editor: malmen, editor_dir: '{editor_dir}'",
}


@pytest.fixture(scope="module")
def malmen_editor_dir(ray_local, tiny_llama_dir, tmp_path_factory) -> str:
    """A MALMEN editor meta-trained two steps on the tiny Llama; η and λ start where the tiny model's small
    activations and gradients need them (the identity hyper-network already writes the edit there)."""
    from trustray.pipelines.edit_train import EditTrainConfig, run

    settings = {"modules": {"layers": [-1]}, "rank": 8, "batch_size": 8, "max_length": 96,
                "lr_init": 1000.0, "log_lambda_init": -10.0}
    config = EditTrainConfig(model=tiny_llama_dir, editor="malmen", editor_settings=settings, steps=2,
                             edits_per_step=8, eval_every=2, eval_edits=8, checkpoint_every=2,
                             output_dir=str(tmp_path_factory.mktemp("malmen") / "train"))
    return str(run(config))


@pytest.fixture(scope="module", params=sorted(EDITORS))
def url(request, ray_local, tiny_llama_dir, tmp_path_factory, free_port):
    from trustray.serve_apps.openai_app import run_app, shutdown

    editor = EDITORS[request.param]
    if request.param == "malmen":  # trained before Serve starts: its replicas would hold the CPUs training needs
        editor = editor.format(editor_dir=request.getfixturevalue("malmen_editor_dir"))
    store = tmp_path_factory.mktemp("edit-sets")
    config = load_config(ServeConfig, TINY_CONFIG, [
        f"port={free_port}", f"chat.model={tiny_llama_dir}", "rag=null",
        f"edits={{store_dir: '{store}', api_key: {KEY}, min_locality_kept: 1.01, locality_probes: {PROBES}, {editor}}}",
        "deployments.editor.resources.num_cpus=0.25", f"edits.job_timeout_s={JOB_TIMEOUT_S}",
    ])
    base = run_app(config)
    yield base
    shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _ask(client, model: str) -> str:
    # Room for the whole target (9 tokens of the tiny tokenizer) and a little more.
    response = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    return response.choices[0].message.content


@pytest.fixture(scope="module")
def created(http):
    response = http.post("/v1/edits", json=EDITS, headers=_auth())
    assert response.status_code == 200, response.text
    return response.json()


# Routes that answer without changing anything; every other POST, PUT, PATCH or DELETE must need the key.
READ_ONLY_POSTS = {"/v1/chat/completions", "/v1/completions", "/v1/rewards"}


def test_the_edits_api_needs_the_key(http):
    document = http.get("/openapi.json").json()
    mutating = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations
                if method in ("post", "put", "patch", "delete") and path not in READ_ONLY_POSTS}
    assert mutating == {("POST", "/v1/edits"), ("DELETE", "/v1/edits/{edit_id}")}
    for method, path in (("POST", "/v1/edits"), ("GET", "/v1/edits/0123456789ab"), ("DELETE", "/v1/edits/0123456789ab")):
        for headers in ({}, _auth("wrong")):
            response = http.request(method, path, json=EDITS if method == "POST" else None, headers=headers)
            assert response.status_code == 401, (method, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body", [
    {"edits": []},
    {"edits": [{"prompt": "x?"}]},
    {"edits": [{"prompt": "", "target_new": "y"}]},
    {"edits": [{"prompt": "x?", "target_new": "y", "colour": "red"}]},
    {"edit": []},
])
def test_malformed_edits_get_a_4xx_with_the_reason(http, body):
    response = http.post("/v1/edits", json=body, headers=_auth())
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["message"]


def test_an_edit_set_answers_with_the_new_target_and_the_base_model_stays(client, http, created, request):
    before = _ask(client, "tiny-chat")
    assert TARGET not in before.lower()
    model = created["model"]
    assert created["status"] == "succeeded" and created["n_edits"] == 1 and model == f"edit-{created['id']}"
    assert model in [m.id for m in client.models.list().data]
    edited = _ask(client, model)
    assert TARGET in edited.lower()
    assert _ask(client, "tiny-chat") == before  # other requests never see the edit
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == edited
    status = http.get(f"/v1/edits/{created['id']}", headers=_auth()).json()
    assert status["status"] == "succeeded" and status["metrics"]["es"] > 0.5
    assert status["metrics"] == created["metrics"] and status["metrics"]["locality_probes"] == PROBES
    assert 0.0 <= status["metrics"]["locality_kept"] <= 1.0
    assert status["editor"] == created["editor"] == request.node.callspec.params["url"]


def test_an_edit_set_failing_the_locality_check_is_rejected_and_not_served(client, http):
    import openai

    body = {key: value for key, value in EDITS.items() if key != "accept_locality_loss"}
    response = http.post("/v1/edits", json=body, headers=_auth())
    assert response.status_code == 200, response.text
    made = response.json()
    assert made["status"] == "rejected" and "min_locality_kept" in made["error"]
    assert made["metrics"]["locality_probes"] == PROBES and made["metrics"]["locality_kept"] < 1.01
    assert "es" in made["metrics"]
    status = http.get(f"/v1/edits/{made['id']}", headers=_auth()).json()
    assert status["status"] == "rejected" and status["metrics"] == made["metrics"]
    assert made["model"] not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        _ask(client, made["model"])
    background = http.post("/v1/edits", json={**body, "wait": False}, headers=_auth())
    assert background.status_code == 202
    assert _poll(http, background.json()["id"])["status"] == "rejected"
    for edit_id in (made["id"], background.json()["id"]):
        assert http.delete(f"/v1/edits/{edit_id}", headers=_auth()).json()["deleted"] is True
        assert http.get(f"/v1/edits/{edit_id}", headers=_auth()).status_code == 404


def test_deleting_an_edit_set_removes_its_model(client, http):
    made = http.post("/v1/edits", json=EDITS, headers=_auth()).json()
    assert http.delete(f"/v1/edits/{made['id']}", headers=_auth()).json()["deleted"] is True
    assert http.get(f"/v1/edits/{made['id']}", headers=_auth()).status_code == 404
    import openai

    with pytest.raises(openai.NotFoundError):
        _ask(client, made["model"])
    assert http.get("/v1/edits/not-an-id", headers=_auth()).status_code == 404


def _poll(http, edit_id: str) -> dict:
    import time

    for _ in range(240):
        status = http.get(f"/v1/edits/{edit_id}", headers=_auth()).json()
        if status["status"] != "running":
            return status
        time.sleep(0.5)
    raise AssertionError(f"edit set {edit_id} still running")


def test_an_edit_job_can_run_in_the_background(client, http):
    response = http.post("/v1/edits", json={**EDITS, "wait": False}, headers=_auth())
    assert response.status_code == 202 and response.json()["status"] == "running"
    done = _poll(http, response.json()["id"])
    assert done["status"] == "succeeded" and "es" in done["metrics"]
    assert _ask(client, done["model"]) == _ask(client, done["model"])

    too_long = {"edits": [{"prompt": "why " * 200 + "?", "target_new": "y"}], "wait": False}
    failed = http.post("/v1/edits", json=too_long, headers=_auth())
    assert failed.status_code == 202
    status = _poll(http, failed.json()["id"])
    assert status["status"] == "failed" and "max_length" in status["error"]
    assert http.delete(f"/v1/edits/{status['id']}", headers=_auth()).json()["deleted"] is True
    assert http.get(f"/v1/edits/{status['id']}", headers=_auth()).status_code == 404
    assert http.post("/v1/edits", json={**too_long, "wait": True}, headers=_auth()).status_code == 400


def test_an_interrupted_job_is_reported_failed_and_changes_nothing(client, http, request):
    import ray

    if request.node.callspec.params["url"] != "ft":
        pytest.skip("the job's bookkeeping is the editor's own: one editor is enough (and saves CI a minute)")

    before = _ask(client, "tiny-chat")
    many = {**EDITS, "wait": False, "edits": EDITS["edits"] * 24}  # long enough to be killed while it runs
    response = http.post("/v1/edits", json=many, headers=_auth())
    assert response.status_code == 202
    edit_id = response.json()["id"]
    # Serve replaces it.
    ray.kill(ray.get_actor(replica_name("EditorDeployment"), namespace="serve"), no_restart=False)
    assert http.get(f"/v1/edits/{edit_id}", headers=_auth()).json()["status"] == "running"
    status = _poll(http, edit_id)
    assert status["status"] == "failed" and status["error"].startswith("interrupted"), status
    assert f"edit-{edit_id}" not in [model.id for model in client.models.list().data]
    assert _ask(client, "tiny-chat") == before
    assert http.delete(f"/v1/edits/{edit_id}", headers=_auth()).json()["deleted"] is True
