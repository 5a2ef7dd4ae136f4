"""Engine behaviour on the tiny random Llama: generation, stop strings, streaming, scoring, adapters, deltas.

The `check_*` functions take any engine; `test_vllm_engine.py` runs them against `VLLMEngine` on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trustray.models.engine_factory import build_engine
from trustray.models.engines import Completion, Engine, EngineConfig, SamplingParams, render_request
from trustray.models.hf_engine import HFEngine

PROMPTS = [
    "The capital of",
    "Water boils",
    "Albert Einstein developed the theory of relativity. Who",
    [{"role": "user", "content": "What is the capital of France?"}],
]
SCORE_PROMPTS = ["The capital", "Water boils at", "Apple is headquartered in Cupertino, California. Microsoft"]
SCORE_CONTINUATIONS = [" of France", " 100 degrees Celsius at sea level", " is"]
GREEDY = SamplingParams(max_tokens=8)


# -- helpers shared with test_vllm_engine.py --------------------------------------------------------
def make_lora_adapters(model_dir: str, out_dir: Path) -> list[str]:
    """Two peft LoRA adapters on q/v with different random, non-zero B weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        folder = out_dir / f"lora-{seed}"
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def manual_scores(model, tokenizer, prompts, continuations) -> list[list[float]]:
    """Per-token log-probabilities from a plain forward pass of one unpadded sequence at a time."""
    results = []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        c = tokenizer.encode(continuation, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        results.append([logprobs[len(p) - 1 + j, token].item() for j, token in enumerate(c)])
    return results


def assert_close(a: list[list[float]], b: list[list[float]], atol: float) -> None:
    assert [len(row) for row in a] == [len(row) for row in b]
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a == pytest.approx(row_b, abs=atol, rel=0)


def texts(engine: Engine, requests, sampling: SamplingParams, adapter: str | None = None) -> list[str]:
    return [c.text for c in engine.generate(requests, sampling, adapter)]


def streamed(engine: Engine, request, sampling: SamplingParams) -> str:
    """The streamed text; the stream must end with the same `Completion` (text, usage, finish reason) that
    `generate` returns for the request."""
    *pieces, final = engine.stream(request, sampling)
    assert all(isinstance(piece, str) for piece in pieces) and isinstance(final, Completion)
    assert final.text == "".join(pieces)
    assert final == engine.generate([request], sampling)[0]
    return final.text


def check_greedy_deterministic_and_batch_invariant(engine: Engine) -> None:
    alone = [texts(engine, [request], GREEDY)[0] for request in PROMPTS]
    # Each request next to longer and shorter ones (left padding in HF) decodes as it does alone, every time.
    assert texts(engine, PROMPTS, GREEDY) == alone
    assert texts(engine, PROMPTS[::-1], GREEDY) == alone[::-1]


def check_max_tokens(engine: Engine) -> None:
    full = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    assert any(c.finish_reason == "length" for c in full)  # the tiny model rarely emits EOS: not vacuous
    for limit in (1, 4):
        for request, long in zip(PROMPTS, full, strict=True):
            cut = engine.generate([request], SamplingParams(max_tokens=limit))[0]
            assert cut.completion_tokens <= limit
            assert cut.prompt_tokens == long.prompt_tokens > 0
            if long.completion_tokens > limit:
                assert cut.finish_reason == "length" and cut.completion_tokens == limit
                assert long.text.startswith(cut.text)


def check_stop_strings(engine: Engine) -> None:
    checked = 0
    for request in PROMPTS:
        full = texts(engine, [request], GREEDY)[0]
        if len(full) < 6:
            continue
        for stop in (full[3:6], full[-3:]):  # early and late in the completion
            completion = engine.generate([request], SamplingParams(max_tokens=8, stop=["never-there", stop]))[0]
            assert completion.text == full[: full.index(stop)]
            assert completion.finish_reason == "stop"
            assert stop not in completion.text
        checked += 1
    assert checked >= 2


def boundary_stop(engine: Engine) -> tuple[str, str]:
    """A prompt and a stop string that spans the prompt's end and the completion's start but never occurs in
    the completion: a stop string must only match generated text."""
    for prompt in ("Albert Einstein developed the theory of relativity.", "Mount Everest is the highest mountain."):
        full = texts(engine, [prompt], GREEDY)[0]
        stop = prompt[-3:] + full[:1]
        if full and stop not in full:
            return prompt, stop
    raise AssertionError("no prompt gives a boundary-spanning stop string; extend the candidates")


def check_stop_only_matches_completion(engine: Engine) -> None:
    prompt, stop = boundary_stop(engine)
    full = engine.generate([prompt], GREEDY)[0]
    completion = engine.generate([prompt], SamplingParams(max_tokens=8, stop=[stop]))[0]
    assert (completion.text, completion.finish_reason) == (full.text, full.finish_reason)


def check_seeded_sampling(engine: Engine) -> None:
    def sample(seed: int) -> list[str]:
        return texts(engine, PROMPTS[:2], SamplingParams(max_tokens=16, temperature=1.0, seed=seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def check_stream_matches_generate(engine: Engine) -> None:
    prompt, boundary = boundary_stop(engine)
    cases = [(prompt, [boundary])]
    for request in (PROMPTS[0], PROMPTS[3]):  # a plain and a chat request
        full = texts(engine, [request], GREEDY)[0]
        assert streamed(engine, request, GREEDY) == full
        if len(full) >= 6:
            cases.append((request, [full[3:6]]))
    for request, stop in cases:
        sampling = SamplingParams(max_tokens=8, stop=stop)
        assert streamed(engine, request, sampling) == texts(engine, [request], sampling)[0]


def check_scores(engine: Engine, model, atol: float) -> None:
    expected = manual_scores(model, engine.tokenizer, SCORE_PROMPTS, SCORE_CONTINUATIONS)
    assert_close(engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS), expected, atol)
    for i in range(len(SCORE_PROMPTS)):  # one at a time equals batched (different lengths)
        assert_close(engine.score([SCORE_PROMPTS[i]], [SCORE_CONTINUATIONS[i]]), [expected[i]], atol)


def check_chat_rendering(engine: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    rendered = engine.render(messages)
    assert rendered == engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.render("plain prompt") == "plain prompt"
    assert texts(engine, [messages], GREEDY) == texts(engine, [rendered], GREEDY)
    with pytest.raises(ValueError, match="at least one message"):
        engine.render([])


def check_adapters(engine: Engine, adapter_dirs: list[str], atol: float) -> None:
    base = engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS)
    engine.load_adapter("one", adapter_dirs[0])
    engine.load_adapter("two", adapter_dirs[1])
    one = engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="one")
    two = engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="two")
    assert one != base and two != base and one != two
    for _ in range(2):  # switching back and forth
        assert_close(engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="two"), two, atol)
        assert_close(engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS), base, atol)
        assert_close(engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="one"), one, atol)
    engine.remove_adapter("one")
    assert_close(engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="two"), two, atol)
    engine.remove_adapter("two")
    assert_close(engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS), base, atol)
    with pytest.raises(KeyError, match="not loaded"):
        engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="one")


def unfused_delta(model, scale: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random delta on weights every backend stores unfused (attention output, MLP down, final norm)."""
    shapes = {key: param.shape for key, param in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    keys = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    return {key: torch.randn(shapes[key], generator=generator) * scale for key in keys}


def check_delta_round_trip(engine: Engine, model, atol: float) -> None:
    base = engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS)
    delta = unfused_delta(model)
    engine.apply_delta("edit", delta)
    edited = engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS)
    assert all(e != pytest.approx(b, abs=atol) for e, b in zip(edited, base, strict=True))
    with pytest.raises(ValueError, match="already applied"):
        engine.apply_delta("edit", delta)
    engine.revert_delta("edit")
    assert_close(engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS), base, atol)
    with pytest.raises(KeyError, match="no delta named"):
        engine.revert_delta("edit")
    bad_shape = {"model.layers.0.self_attn.o_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="shape"):
        engine.apply_delta("bad", bad_shape)
    with pytest.raises(KeyError, match="lacks"):
        engine.apply_delta("bad", {"model.layers.99.mlp.down_proj.weight": torch.zeros(1)})


def check_bad_inputs(engine: Engine) -> None:
    too_long = "The capital of France is Paris. " * 200
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([too_long], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.score([too_long], [" x"])
    with pytest.raises(ValueError, match="continuations"):
        engine.score(["a", "b"], [" c"])
    with pytest.raises(KeyError, match="not loaded"):
        engine.generate(["The capital of"], GREEDY, adapter="missing")
    with pytest.raises(KeyError, match="not loaded"):
        engine.remove_adapter("missing")


# -- HFEngine --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def config(tiny_llama_dir) -> EngineConfig:
    # One intra-op thread: a tiny model gains nothing from more, and on a busy 2-core machine spinning
    # OpenMP threads made generation about 100x slower.
    return EngineConfig(model=tiny_llama_dir, engine="hf", max_model_len=128, max_batch_size=4, torch_threads=1)


@pytest.fixture(scope="module")
def engine(config) -> HFEngine:
    """Shared by tests that leave no adapter or delta behind."""
    return HFEngine(config, device="cpu")


@pytest.fixture()
def fresh_engine(config) -> HFEngine:
    return HFEngine(config, device="cpu")


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> list[str]:
    return make_lora_adapters(tiny_llama_dir, tmp_path_factory.mktemp("adapters"))


def test_greedy_is_deterministic_and_batch_invariant(engine):
    check_greedy_deterministic_and_batch_invariant(engine)


def test_batches_larger_than_max_batch_size(engine):
    requests = PROMPTS[:3] * 2  # 6 requests in chunks of 4
    assert texts(engine, requests, GREEDY) == texts(engine, PROMPTS[:3], GREEDY) * 2


def test_max_tokens(engine):
    check_max_tokens(engine)


def test_stop_strings(engine):
    check_stop_strings(engine)


def test_stop_string_only_matches_generated_text(engine):
    check_stop_only_matches_completion(engine)


def test_seeded_sampling(engine):
    check_seeded_sampling(engine)


def test_stream_matches_generate(engine):
    check_stream_matches_generate(engine)


def test_stream_yields_several_pieces(engine):
    assert len([piece for piece in engine.stream(PROMPTS[0], GREEDY) if isinstance(piece, str)]) > 1


def test_scores_match_manual_log_softmax(engine, hf_model):
    check_scores(engine, hf_model, atol=1e-5)


def test_score_of_empty_prompt_conditions_on_bos(engine, hf_model):
    bos = engine.tokenizer.bos_token
    assert_close(engine.score([""], [" Paris"]), manual_scores(hf_model, engine.tokenizer, [bos], [" Paris"]), 1e-5)


def test_chat_rendering(engine):
    check_chat_rendering(engine)
    assert engine.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_render_without_chat_template():
    class Plain:
        chat_template = None

    rendered = render_request(Plain(), [{"role": "user", "content": "hi"}])
    assert rendered == "user: hi\nassistant:"


def test_count_tokens(engine):
    text = "The capital of France is Paris."
    assert engine.count_tokens(text) == len(engine.tokenizer.encode(text, add_special_tokens=False)) > 0


def test_lora_adapters(fresh_engine, adapter_dirs):
    check_adapters(fresh_engine, adapter_dirs, atol=0.0)
    # Generation honours the adapter too, and the base is back once every adapter is removed.
    base = texts(fresh_engine, PROMPTS[:2], GREEDY)
    fresh_engine.load_adapter("one", adapter_dirs[0])
    assert texts(fresh_engine, PROMPTS[:2], GREEDY, adapter="one") != base
    assert texts(fresh_engine, PROMPTS[:2], GREEDY) == base


def test_reloading_an_adapter_name_replaces_it(fresh_engine, adapter_dirs):
    fresh_engine.load_adapter("first", adapter_dirs[0])
    first = fresh_engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="first")
    fresh_engine.load_adapter("first", adapter_dirs[1])
    second = fresh_engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="first")
    fresh_engine.load_adapter("second", adapter_dirs[1])
    assert second != first
    assert second == fresh_engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS, adapter="second")


def weights(engine: HFEngine) -> dict[str, torch.Tensor]:
    return {key: param.detach().clone() for key, param in engine.model.named_parameters()}


def test_delta_round_trip_is_bit_exact(fresh_engine, hf_model):
    before = weights(fresh_engine)
    check_delta_round_trip(fresh_engine, hf_model, atol=0.0)
    after = weights(fresh_engine)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_rejected_delta_changes_nothing(fresh_engine, hf_model):
    before = weights(fresh_engine)
    delta = unfused_delta(hf_model)
    delta["model.norm.weight"] = torch.zeros(3)  # the last entry is bad: none may be applied
    with pytest.raises(ValueError, match="shape"):
        fresh_engine.apply_delta("bad", delta)
    assert all(torch.equal(before[key], param) for key, param in fresh_engine.model.named_parameters())


def test_delta_with_adapters_loaded(fresh_engine, hf_model, adapter_dirs):
    """Deltas name weights by their HF names even while peft wraps the model."""
    base = fresh_engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS)
    fresh_engine.load_adapter("one", adapter_dirs[0])
    fresh_engine.apply_delta("edit", unfused_delta(hf_model))
    assert fresh_engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS) != base
    fresh_engine.remove_adapter("one")  # unwraps the model; the delta stays applied
    assert fresh_engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS) != base
    fresh_engine.revert_delta("edit")
    assert fresh_engine.score(SCORE_PROMPTS, SCORE_CONTINUATIONS) == base


def test_bad_inputs(engine):
    check_bad_inputs(engine)


def test_build_engine_auto_is_hf_without_vllm(config, monkeypatch, caplog):
    import importlib.util
    import logging

    import trustray.models.engine_factory as engine_factory

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(engine_factory.importlib.util, "find_spec",
                        lambda name, *args: None if name == "vllm" else find_spec(name, *args))
    with caplog.at_level(logging.INFO, logger="trustray.models.engine_factory"):
        engine = build_engine(config.model_copy(update={"engine": "auto"}))
    assert isinstance(engine, HFEngine) and isinstance(engine, Engine)
    assert "hf (auto: vLLM is not installed)" in caplog.text
    assert isinstance(build_engine(config), HFEngine)


def test_auto_engine_choice_says_why(config, monkeypatch):
    import trustray.models.engine_factory as engine_factory

    auto = config.model_copy(update={"engine": "auto"})
    monkeypatch.setattr(engine_factory.importlib.util, "find_spec", lambda name, *args: object())
    monkeypatch.setattr(engine_factory.torch.cuda, "is_available", lambda: True)
    assert engine_factory.choose_engine(auto) == ("vllm", "auto: vLLM is installed and a CUDA GPU is visible")
    monkeypatch.setattr(engine_factory.torch.cuda, "is_available", lambda: False)
    choice, reason = engine_factory.choose_engine(auto)
    assert choice == "hf" and "engine: vllm" in reason
    assert engine_factory.choose_engine(config.model_copy(update={"engine": "vllm"})) == ("vllm", "named in the config")


def test_lora_rank_is_one_vllm_accepts():
    with pytest.raises(ValueError, match="ranks vLLM accepts"):
        EngineConfig(max_lora_rank=4)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineConfig(max_loras=4, max_cpu_loras=2)
    assert EngineConfig(max_lora_rank=320, max_loras=2, max_cpu_loras=8).max_cpu_loras == 8
