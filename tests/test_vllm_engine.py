"""The engine behaviour checks of test_engines.py, run against VLLMEngine (needs vllm and a CUDA GPU).

Model: `$TRUSTRAY_VLLM_TEST_MODEL` (a local folder) if set, else a tiny random Llama with 64-dim heads (a head size
every vLLM attention backend supports). dtype: `$TRUSTRAY_VLLM_TEST_DTYPE`, float32 by default so that greedy
decoding of a random model has no near-ties flipped by rounding and scores can be compared tightly with
transformers; with bfloat16 the score tolerance is looser.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.vllm

if not torch.cuda.is_available():
    pytest.skip("vLLM tests need a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

from test_engines import (  # noqa: E402  (after the skips: vllm must not be imported without a GPU)
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
from trustray.models.engines import EngineConfig  # noqa: E402

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
    config = EngineConfig(
        model=model_dir, engine="vllm", dtype=DTYPE, max_model_len=256, gpu_memory_utilization=0.4, max_lora_rank=8
    )
    return build_engine(config)


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
