"""The preference loop's vLLM generation pool, two actors in Ray: the policy's adapter reaches every actor, greedy
samples equal transformers' under the same adapter, and a seeded sample does not depend on which actor drew it."""

from __future__ import annotations

import pytest
from test_engines import make_lora_adapters

from trustray.config import PoolResources
from trustray.models.engines import EngineConfig, SamplingParams

pytestmark = pytest.mark.vllm

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("Name a colour.", "What is two plus two?", "Where is Paris?", "Say hello.", "Count to three.")]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory) -> str:
    from trustray.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-vllm"), hidden_size=256))  # 64-dim heads


def test_two_actors_sample_the_policy_as_one_engine_would(vllm_model_dir, tmp_path, ray_local):
    from trustray.actors.generation import GenerationPool
    from trustray.models.hf_engine import HFEngine

    adapter = make_lora_adapters(vllm_model_dir, tmp_path)[0]
    config = EngineConfig(model=vllm_model_dir, engine="vllm", dtype="float32", max_model_len=256,
                          cpu_kv_cache_gib=0.25, max_lora_rank=8, max_batch_size=8)
    pool = GenerationPool(config, PoolResources(size=2, num_cpus=0.5))
    try:
        base = pool.sample(PROMPTS, 1, 8, 0.0, 0, None)
        assert pool.load_adapter("policy", adapter) > 0
        greedy = pool.sample(PROMPTS, 1, 8, 0.0, 0, "policy")
        sampled = pool.sample(PROMPTS, 3, 8, 1.0, 11, "policy")
        alone = pool.sample(PROMPTS[3:4], 3, 8, 1.0, 11, "policy")  # drawn by the other actor this time
    finally:
        pool.close()

    hf = HFEngine(config.model_copy(update={"engine": "hf"}))
    hf.load_adapter("policy", adapter)
    greedy_sampling = SamplingParams(max_tokens=8, temperature=0.0)
    assert [rows[0]["text"] for rows in base] == [c.text for c in hf.generate(PROMPTS, greedy_sampling)]
    expected = hf.generate(PROMPTS, greedy_sampling, adapter="policy")
    assert [rows[0]["text"] for rows in greedy] == [c.text for c in expected]
    assert [rows[0]["tokens"] for rows in greedy] == [c.completion_tokens for c in expected]
    assert [rows[0]["text"] for rows in greedy] != [rows[0]["text"] for rows in base]  # the adapter is in use
    assert all(len({row["text"] for row in rows}) == 3 for rows in sampled)  # seeds seed + s differ
    assert alone[0] == sampled[3]
