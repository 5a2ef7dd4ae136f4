"""The OpenAI-compatible Serve app with tiny models: the real `openai` client, streaming, RAG, bad and fuzzed input,
and, last, faults under load: a chat replica killed while requests are in flight (each request either succeeds or
gets a 503 a client can retry, and the app recovers by itself) and the Serve controller killed (the app keeps
serving)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from faults import load_with_fault, replica_name, seconds_until_answered, summary

from trustray.config import load_config
from trustray.serve_apps.config import ServeConfig

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "tiny.yaml"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def serve_config(tiny_llama_dir, tiny_embedder_dir, tiny_index_dir, free_port) -> ServeConfig:
    return load_config(
        ServeConfig,
        TINY_CONFIG,
        [
            f"port={free_port}",
            f"chat.model={tiny_llama_dir}",
            f"rag.index_dir={tiny_index_dir}",
            f"rag.embedder.model={tiny_embedder_dir}",
        ],
    )


@pytest.fixture(scope="module")
def url(ray_local, serve_config):
    from trustray.serve_apps.openai_app import run_app, shutdown

    base = run_app(serve_config)
    yield base
    # Later test modules need the CPUs the replicas hold.
    shutdown()


@pytest.fixture(scope="module")
def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local_engine(serve_config):
    from trustray.models.hf_engine import HFEngine

    return HFEngine(serve_config.chat)


def test_models_lists_chat_and_rag(client, serve_config):
    ids = [model.id for model in client.models.list().data]
    assert ids == [serve_config.model_name, serve_config.rag.model_name]


def test_chat_matches_in_process_engine(client, serve_config, local_engine):
    from trustray.models.engines import SamplingParams

    expected = local_engine.generate([MESSAGES], SamplingParams(max_tokens=12, temperature=0))[0]
    response = client.chat.completions.create(
        model=serve_config.model_name, messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens


def test_concurrent_requests_are_batched_and_agree(client, serve_config):
    def ask(_: int) -> str:
        response = client.chat.completions.create(
            model=serve_config.model_name, messages=MESSAGES, max_tokens=8, temperature=0
        )
        return response.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert len(set(answers)) == 1


def test_stream_equals_non_stream(client, serve_config):
    kwargs = {"model": serve_config.model_name, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completion(client, serve_config, local_engine):
    from trustray.models.engines import SamplingParams

    prompt = "The capital of Italy is"
    expected = local_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    response = client.completions.create(model=serve_config.model_name, prompt=prompt, max_tokens=10, temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text == expected.text
    assert response.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_rag_chat_returns_sources_and_context_tokens(client, serve_config):
    response = client.chat.completions.create(
        model=serve_config.rag.model_name,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    sources = response.model_extra["sources"]
    assert len(sources) == serve_config.rag.top_k
    assert all(set(source) == {"id", "title", "score"} for source in sources)
    assert response.model_extra["retrieval"] == {
        "retriever": "dense", "index": Path(serve_config.rag.index_dir).name, "embedder": serve_config.rag.embedder.model,
        "top_k": serve_config.rag.top_k, "compressor": None, "budget": None}
    usage = response.usage.model_extra
    assert usage["context_tokens"] > 0
    assert response.usage.prompt_tokens > usage["context_tokens"]


def test_rag_stream_sends_sources_first(url, serve_config):
    body = {"model": serve_config.rag.model_name, "messages": MESSAGES, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert len(first["sources"]) == serve_config.rag.top_k
    assert first["choices"][0]["delta"]["role"] == "assistant"


def _assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def _chat(model: str, **fields) -> dict:
    return {"model": model, "messages": MESSAGES, "max_tokens": 4, **fields}


def test_bad_requests_get_openai_errors(url, serve_config):
    chat_url = f"{url}/v1/chat/completions"
    name = serve_config.model_name
    limit = serve_config.limits.max_tokens
    with httpx.Client(timeout=60) as http:
        post = http.post
        _assert_error(post(chat_url, content=b"{not json", headers={"content-type": "application/json"}), 400)
        _assert_error(post(chat_url, json=["a", "list"]), 400)
        _assert_error(post(chat_url, json={"messages": MESSAGES}), 400, param="model")
        _assert_error(post(chat_url, json=_chat("no-such-model")), 404, param="model", code="model_not_found")
        _assert_error(post(chat_url, json=_chat(name, messages=[])), 400, param="messages")
        _assert_error(post(chat_url, json=_chat(name, max_tokens=0)), 400, param="max_tokens")
        _assert_error(post(chat_url, json=_chat(name, max_tokens=-3)), 400, param="max_tokens")
        _assert_error(post(chat_url, json=_chat(name, max_tokens=limit + 1)), 400, param="max_tokens")
        _assert_error(post(chat_url, json=_chat(name, n=2)), 400, param="n")
        _assert_error(post(chat_url, json=_chat(name, temperature=5)), 400, param="temperature")
        bad_role = [{"role": "tool", "content": "x"}]
        _assert_error(post(chat_url, json=_chat(name, messages=bad_role)), 400)
        _assert_error(post(f"{url}/v1/completions", json={"model": name, "prompt": ["a", "b"]}), 400, param="prompt")
        _assert_error(http.get(f"{url}/v1/nothing-here"), 404)
        # Found by fuzzing: an empty prompt has no token to continue; a seed beyond 64 bits overflowed torch.
        _assert_error(post(f"{url}/v1/completions", json={"model": name, "prompt": ""}), 400, param="prompt")
        _assert_error(post(chat_url, json=_chat(name, seed=2**64)), 400, param="seed")


def test_a_vanishing_temperature_decodes_greedily(client, serve_config):
    # Found by fuzzing: logits divided by 5e-324 overflowed into a 500; vLLM decodes greedily below 1e-5.
    answers = [client.chat.completions.create(model=serve_config.model_name, messages=MESSAGES, max_tokens=8,
                                              temperature=temperature).choices[0].message.content
               for temperature in (0, 5e-324, 1e-6)]
    assert answers[1:] == answers[:1] * 2


def test_prompt_longer_than_context_is_400(url, serve_config):
    long_text = "The capital of France is Paris. " * 200
    with httpx.Client(timeout=60) as http:
        for stream in (False, True):
            chat = _chat(serve_config.model_name, messages=[{"role": "user", "content": long_text}], stream=stream)
            response = http.post(f"{url}/v1/chat/completions", json=chat)
            _assert_error(response, 400, code="context_length_exceeded")
        completion = {"model": serve_config.model_name, "prompt": long_text, "max_tokens": 4}
        _assert_error(http.post(f"{url}/v1/completions", json=completion), 400, code="context_length_exceeded")
        # The service is still healthy afterwards.
        assert http.get(f"{url}/healthz").json() == {"status": "ok"}


def test_oversized_body_is_413(url, serve_config):
    limit = serve_config.limits.max_body_bytes
    big = _chat(serve_config.model_name, messages=[{"role": "user", "content": "x" * (limit + 10)}])
    payload = json.dumps(big).encode()
    with httpx.Client(timeout=60) as http:
        _assert_error(http.post(f"{url}/v1/chat/completions", content=payload), 413, code="request_too_large")

        def chunked():  # no Content-Length: the limit must hold on the bytes actually read
            for start in range(0, len(payload), 8192):
                yield payload[start : start + 8192]

        response = http.post(f"{url}/v1/chat/completions", content=chunked())
        assert "content-length" not in {key.lower() for key in response.request.headers}
        _assert_error(response, 413, code="request_too_large")


def test_index_built_with_another_embedder_is_rejected(tmp_path):
    from trustray.actors.retriever import check_index_embedder
    from trustray.artifacts import ArtifactMismatchError, write_metadata

    with pytest.raises(FileNotFoundError, match="not a finished passage index"):
        check_index_embedder(tmp_path, "some-embedder", "aaaa")
    write_metadata(tmp_path, {"embedder": "other-embedder"})
    with pytest.raises(FileNotFoundError, match="not a finished passage index"):
        check_index_embedder(tmp_path, "some-embedder", "aaaa")
    write_metadata(tmp_path, {"embedder": "other-embedder", "embedder_fingerprint": "aaaa"})
    with pytest.raises(ArtifactMismatchError, match="'other-embedder' \\(fingerprint aaaa\\).*fingerprint bbbb"):
        check_index_embedder(tmp_path, "some-embedder", "bbbb")
    check_index_embedder(tmp_path, "some-embedder", "aaaa")


def test_app_builder_and_serve_config_file(tiny_llama_dir):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from trustray.serve_apps.openai_app import app_builder

    root = TINY_CONFIG.parents[2]
    schema = ServeDeploySchema.model_validate(yaml.safe_load((root / "cluster" / "serve_config.yaml").read_text()))
    target = schema.applications[0]
    assert target.import_path == "trustray.serve_apps.openai_app:app_builder"
    assert (root / target.args["config"]).is_file()
    # Binding builds the deployment graph without starting anything.
    app_builder({"config": str(TINY_CONFIG), "overrides": [f"chat.model={tiny_llama_dir}", "rag=null"]})
    with pytest.raises(ValueError, match="unknown app_builder args"):
        app_builder({"config": str(TINY_CONFIG), "extra": 1})


def test_lone_surrogate_is_400(url, serve_config):
    # JSON may spell a lone UTF-16 surrogate; no UTF-8 tokenizer can encode it.
    bodies = {
        "/v1/chat/completions": '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "/v1/completions": '{"model": "%s", "prompt": "\\udfff"}',
    }
    with httpx.Client(timeout=60) as http:
        for path, body in bodies.items():
            for model in (serve_config.model_name, serve_config.rag.model_name):
                response = http.post(f"{url}{path}", content=(body % model).encode(),
                                     headers={"content-type": "application/json"})
                _assert_error(response, 400)
                assert "surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize(("path", "fields"), [
    ("/v1/chat/completions", {"logprobs": True}),
    ("/v1/chat/completions", {"top_logprobs": 2}),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/chat/completions", {"tool_choice": "auto"}),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"frequency_penalty": 0.5}),
    ("/v1/chat/completions", {"logit_bias": {"42": 5}}),
    ("/v1/completions", {"logprobs": 2}),
    ("/v1/completions", {"echo": True}),
    ("/v1/completions", {"best_of": 3}),
])
def test_unsupported_parameters_are_400_naming_them(url, serve_config, path, fields):
    body = _chat(serve_config.model_name, **fields)
    if path == "/v1/completions":
        body = {"model": serve_config.model_name, "prompt": "Paris is", "max_tokens": 4, **fields}
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    (name,) = fields
    _assert_error(response, 400, param=name)
    assert "not supported" in response.json()["error"]["message"]


def test_unsupported_parameters_at_their_off_value_are_accepted(client, serve_config):
    answer = client.chat.completions.create(
        model=serve_config.model_name, messages=MESSAGES, max_tokens=4, logprobs=False, frequency_penalty=0,
        response_format={"type": "text"}, tool_choice="none", user="someone",
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_openapi_declares_request_and_answer_models(url):
    document = httpx.get(f"{url}/openapi.json", timeout=60).json()
    expected = {("/v1/chat/completions", "post"): "ChatCompletionRequest",
                ("/v1/completions", "post"): "CompletionRequest", ("/v1/edits", "post"): "EditsRequest",
                ("/v1/rewards", "post"): "RewardsRequest"}
    schemas = document["components"]["schemas"]
    for (path, method), model in expected.items():
        operation = document["paths"][path][method]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert model in schemas
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert "422" not in chat and chat["default"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")
    assert {"logprobs", "tools", "response_format"} <= set(schemas["ChatCompletionRequest"]["properties"])
    assert httpx.get(f"{url}/docs", timeout=60).status_code == 200


def test_fuzzed_requests_get_no_server_error_and_match_the_schema(url, serve_config):
    from fuzzing import fuzz

    report = fuzz(url, cases_per_operation=100, models=(serve_config.model_name, serve_config.rag.model_name))
    assert report.server_errors == [] and report.schema_violations == []
    chat = report.statuses["POST /v1/chat/completions"]
    # Valid requests reached the model, invalid ones were refused with a 4xx.
    assert chat.get(200, 0) >= 5 and sum(count for status, count in chat.items() if 400 <= status < 500) >= 5
    assert report.cases >= 400


# Faults last: they kill the app's replicas and its controller.
def test_a_killed_chat_replica_costs_only_retryable_503s_and_recovers(url):
    killed = replica_name("ChatDeployment")
    answers, unanswered = load_with_fault(url, 48, lambda: ray.kill(ray.get_actor(killed, namespace="serve"),
                                                                    no_restart=True))
    assert unanswered > 0
    counts = summary(answers)
    assert counts["lost"] == 0 and counts["failed"] == counts["retryable"], counts
    for answer in answers:
        assert answer.status_code in (200, 503)
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "replica_unavailable" and answer.headers["retry-after"] == "1"
    # No operator: Serve starts a new replica and the next requests succeed.
    seconds_until_answered(url)
    assert replica_name("ChatDeployment") != killed


def test_a_killed_serve_controller_does_not_stop_serving(url):
    from ray import serve

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    answers, _ = load_with_fault(url, 32, lambda: ray.kill(controller, no_restart=False))
    assert [answer.status_code for answer in answers if isinstance(answer, httpx.Response)] == [200] * 32
    deadline = time.monotonic() + 120
    while True:  # the restarted controller takes the application back
        try:
            if serve.status().applications["trustray"].status == "RUNNING":
                break
        except ray.exceptions.RayError:  # the controller is still coming back
            pass
        assert time.monotonic() < deadline, "the Serve controller did not come back"
        time.sleep(0.5)
