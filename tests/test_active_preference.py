"""The active preference loop on the tiny model: every round trains and evaluates, a killed run resumes without
asking for a label twice, Ray mode (actor + Ray Train) runs from the command line, bad settings are refused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from trustray import cli
from trustray.config import load_config
from trustray.data import preferences
from trustray.pipelines import active_preference
from trustray.pipelines.active_preference import ActivePreferenceConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "active_preference" / "tiny.yaml"


@dataclass
class LengthOracle(preferences.Oracle):
    """A test labeler whose gold reward is the response's length: the tiny random model's answers are noise, which
    the packaged oracles score as ties, while lengths differ. Counts the questions it is asked."""

    task: ClassVar[str] = "factual"
    asked: ClassVar[list[str]] = []

    def reward(self, prompt, response: str) -> float:
        return float(len(response))

    def label(self, prompt, a: str, b: str):
        LengthOracle.asked.append(prompt.id)
        return super().label(prompt, a, b)


@pytest.fixture(autouse=True)
def length_oracle(monkeypatch):
    LengthOracle.asked = []
    monkeypatch.setitem(preferences.ORACLES, "factual", LengthOracle)


def _config(tiny_llama_dir: str, folder: Path, *overrides: str) -> ActivePreferenceConfig:
    return load_config(ActivePreferenceConfig, CONFIG, [f"chat.model={tiny_llama_dir}", f"output_dir={folder}",
                                                        "resources.in_process=true", *overrides])


@pytest.mark.parametrize("acquisition", ["ensemble", "ood"])  # hybrid, the preset's, runs in the tests below
def test_every_round_trains_evaluates_and_records(tiny_llama_dir, tmp_path, acquisition):
    summary = json.loads(active_preference.run(_config(tiny_llama_dir, tmp_path, f"acquisition={acquisition}"))
                         .read_text())
    rounds = summary["rounds"]
    assert [r["labels"] for r in rounds] == [3, 6]
    # The reward-model statistics do not exist before the first preference: that round says it went random.
    expected_first = ["random"] if acquisition in ("ensemble", "ood") else [acquisition]
    assert rounds[0]["acquired_by"] == expected_first and rounds[1]["acquired_by"] == [acquisition]
    for metrics in rounds:
        assert 0 <= metrics["win_rate_greedy"] <= 1 and 0 <= metrics["rm_accuracy"] <= 1
        assert metrics["dpo_steps"] >= 1 and metrics["generated_tokens"] > 0
    # 6 labels asked in all, each pair once; 6 held-out pairs labelled once for the evaluation.
    labels = [json.loads(line) for budget in (3, 6)
              for line in (tmp_path / "rounds" / f"labels-{budget}" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 6 and len({row["pair_key"] for row in labels}) == 6
    assert len(LengthOracle.asked) == 6 + 6
    exported = preferences.read_preferences(tmp_path / "preferences.jsonl")
    assert len(exported) == sum(row["label"] in ("a", "b") for row in labels)
    # The trained adapter loads as a plain peft adapter; each round's reward model is saved servable.
    assert (Path(summary["adapter"]) / "adapter_config.json").is_file()
    from trustray.core.align.reward import load_reward_model

    ensemble, gaussian, metadata = load_reward_model(tmp_path / "rounds" / "labels-6" / "reward_model")
    assert metadata["preferences"] == rounds[-1]["preferences"] and metadata["temperature"] == pytest.approx(
        rounds[-1]["rm_temperature"])
    assert metadata["selective"]["table"] and metadata["ood_threshold"] > 0
    assert 0 <= rounds[-1]["selective"]["aurc"] <= 1


def test_a_killed_run_resumes_without_asking_again(tiny_llama_dir, tmp_path, monkeypatch):
    def crash(self, round_dir):
        raise KeyboardInterrupt("killed during DPO")

    with monkeypatch.context() as patch:
        patch.setattr(active_preference.Loop, "train_policy", crash)
        with pytest.raises(KeyboardInterrupt):
            active_preference.run(_config(tiny_llama_dir, tmp_path))
    asked_before = len(LengthOracle.asked)
    assert (tmp_path / "rounds" / "labels-3" / "labels.jsonl").is_file()
    first = json.loads(active_preference.run(_config(tiny_llama_dir, tmp_path, "budgets=[3]")).read_text())
    assert len(LengthOracle.asked) == asked_before  # round 1's labels were reused
    extended = json.loads(active_preference.run(_config(tiny_llama_dir, tmp_path)).read_text())
    assert extended["rounds"][0] == first["rounds"][0]  # the finished round is read back, not redone
    assert len(LengthOracle.asked) == asked_before + 3  # only round 2's new pairs
    with pytest.raises(Exception, match="metadata|differ|settings"):
        active_preference.run(_config(tiny_llama_dir, tmp_path, "dpo.beta=0.5"))


def test_ray_mode_from_the_command_line(tiny_llama_dir, tmp_path, ray_local):
    assert cli.main(["run", "active_preference", "--config", str(CONFIG), f"chat.model={tiny_llama_dir}",
                     f"output_dir={tmp_path}", "acquisition=certainty", "budgets=[3]"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"][0]["labels"] == 3


@pytest.mark.parametrize("override, message", [
    ("acquisition=nope", "unknown acquisition"),
    ("budgets=[4,4]", "increasing"),
    ("samples_per_prompt=3", "even"),
])
def test_bad_settings_are_refused(tiny_llama_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _config(tiny_llama_dir, tmp_path, override)


def test_people_label_through_the_service_database(tiny_llama_dir, tmp_path):
    """A person (a thread answering through the store, as the labeling page does) labels each round's pairs."""
    import threading

    from trustray.data.label_store import LabelStore

    db = tmp_path / "labels.sqlite"
    done = threading.Event()

    def person() -> None:
        store = LabelStore(db)
        answered = 0
        while not done.is_set():
            shown = store.next_item("ann")
            if shown is None:
                done.wait(0.2)
                continue
            choice = "first" if len(shown.first) >= len(shown.second) else "second"
            store.submit(shown.item_id, "ann", choice, f"key-{answered:04d}")
            answered += 1

    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    try:
        summary = json.loads(active_preference.run(_config(
            tiny_llama_dir, tmp_path / "run", "labeler=service", f"service.db={db}", "service.poll_s=0.2"))
            .read_text())
    finally:
        done.set()
        thread.join()
    assert [r["labels"] for r in summary["rounds"]] == [3, 6]
    assert LabelStore(db).counts()["labelled"] == 6
    asked_of_oracle = len(LengthOracle.asked)
    assert asked_of_oracle == 6  # only the held-out evaluation pairs: the loop's labels came from the person


def test_unanswered_pairs_time_out_as_skips(tiny_llama_dir, tmp_path):
    with pytest.raises(RuntimeError, match="no preference"):
        active_preference.run(_config(tiny_llama_dir, tmp_path / "run", "labeler=service",
                                      f"service.db={tmp_path / 'labels.sqlite'}", "service.timeout_s=0.5",
                                      "service.poll_s=0.1"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds" / "labels-3" / "labels.jsonl").read_text()
            .splitlines()]
    assert [row["label"] for row in rows] == ["skip"] * 3 and all(row["timed_out"] for row in rows)


def test_a_probe_gives_full_responses_to_the_most_uncertain_prompts_only(tiny_llama_dir, tmp_path):
    summary = json.loads(active_preference.run(_config(
        tiny_llama_dir, tmp_path, "budgets=[3]", "probe={samples: 2, tokens: 3, keep: 0.5}")).read_text())
    probe = json.loads((tmp_path / "pool.probe.json").read_text())
    pool = json.loads((tmp_path / "pool.json").read_text())
    assert len(probe["kept_prompts"]) == 4  # half of the 8 pool prompts
    assert {pair["prompt_index"] for pair in pool} == set(probe["kept_prompts"])
    assert 0 < probe["tokens"] <= 8 * 2 * 3
    assert summary["rounds"][0]["generated_tokens"] == probe["tokens"] + sum(pair["tokens"] for pair in pool)


def test_the_random_control_keeps_a_random_share_and_samples_no_prefixes(tiny_llama_dir, tmp_path):
    kept = []
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        summary = json.loads(active_preference.run(_config(
            tiny_llama_dir, folder, "budgets=[3]", f"seed={seed}",
            "probe={keep: 0.5, rank_by: random}")).read_text())
        probe = json.loads((folder / "pool.probe.json").read_text())
        pool = json.loads((folder / "pool.json").read_text())
        assert probe["tokens"] == 0 and len(probe["kept_prompts"]) == 4
        assert {pair["prompt_index"] for pair in pool} == set(probe["kept_prompts"])
        assert summary["rounds"][0]["generated_tokens"] == sum(pair["tokens"] for pair in pool)
        kept.append(probe["kept_prompts"])
    assert kept[0] != kept[1]  # drawn by the seed


@pytest.mark.vllm
def test_vllm_samples_the_responses_and_a_resume_must_agree(tmp_path):
    from trustray.models.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "model", hidden_size=256)  # 64-dim heads: vLLM's CPU attention runs them
    vllm_chat = ["chat.engine=vllm", "chat.max_model_len=512", "chat.cpu_kv_cache_gib=0.25", "chat.max_lora_rank=8"]
    run_dir = tmp_path / "run"
    summary = json.loads(active_preference.run(_config(str(model_dir), run_dir, *vllm_chat)).read_text())
    assert [r["labels"] for r in summary["rounds"]] == [3, 6]
    assert json.loads((run_dir / "metadata.json").read_text())["sampled_by"] == "vllm"
    # Greedy eval answers of the initial policy are vLLM's; on this float32 model they equal transformers'.
    from trustray.models.engines import SamplingParams
    from trustray.models.hf_engine import HFEngine

    config = _config(str(model_dir), run_dir, *vllm_chat)
    hf = HFEngine(config.chat.model_copy(update={"engine": "hf"}))
    eval_prompts = active_preference.split_prompts(config)["eval"]
    greedy = hf.generate([p.messages() for p in eval_prompts], SamplingParams(max_tokens=config.max_tokens,
                                                                               temperature=0.0))
    assert json.loads((run_dir / "fixtures.json").read_text())["eval_greedy"] == [c.text for c in greedy]
    with pytest.raises(Exception, match="metadata|differ|settings"):
        active_preference.run(_config(str(model_dir), run_dir, "chat.max_model_len=512"))
