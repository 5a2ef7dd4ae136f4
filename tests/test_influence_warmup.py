"""LoRA warmup: training lowers the loss, checkpoints round-trip, a killed warmup resumes to the uninterrupted
result, the Ray Train stage runs, reuses and refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trustray.artifacts import ArtifactMismatchError, read_metadata
from trustray.config import load_config
from trustray.core.influence.warmup import (
    CHECKPOINT_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    LoraSettings,
    LoraTrainer,
    WarmupSettings,
    add_lora,
    checkpoint_steps,
    load_checkpoint,
    train_lora,
)
from trustray.core.lm.batching import encode_chat
from trustray.pipelines.training import TrainingPlan, WorkerContext, latest_checkpoint, read_step, run_loop

FACTS = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Italy?", "Rome."),
    ("Where is Apple headquartered?", "Cupertino."),
    ("Where is Microsoft headquartered?", "Redmond."),
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Two threads on 2 cores shared with other processes oversubscribe: tiny steps run 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def encoded_facts(folder: str) -> list[dict[str, list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [
        encode_chat(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 64)
        for q, a in FACTS
    ]


def test_train_lora_memorises_a_tiny_set(tiny_llama_dir):
    torch.manual_seed(0)
    # MLP adapters too: the random tiny Llama's logits are nearly uniform and attention-only LoRA moves them slowly.
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = add_lora(load_model(tiny_llama_dir), LoraSettings(r=8, alpha=16, target_modules=targets))
    settings = WarmupSettings(learning_rate=1e-2, epochs=25, batch_size=2, grad_accumulation=2, warmup_ratio=0.0)
    log = train_lora(model, encoded_facts(tiny_llama_dir), settings, progress_bar=False)
    assert len(log) == 25  # 4 examples, 2 x 2 per step: one step per epoch
    # The first logged loss is the untrained model's; the logit scale of a random tiny Llama bounds the drop.
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert [entry["step"] for entry in log] == list(range(1, 26))
    assert checkpoint_steps(1, settings) == set(range(1, 26))  # one checkpoint per epoch: every step here
    assert log[0]["learning_rate"] == pytest.approx(1e-2)  # no warmup: the first step runs at the peak rate
    assert log[-1]["epoch"] == pytest.approx(25.0)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_checkpoint_steps_are_spread_evenly_over_each_epoch():
    settings = WarmupSettings(epochs=2, checkpoints_per_epoch=2)
    assert checkpoint_steps(5, settings) == {3, 5, 8, 10}
    assert checkpoint_steps(1, settings) == {1, 2}  # an epoch of one step checkpoints once


def test_checkpoint_round_trip(tiny_llama_dir, tmp_path):
    from peft import get_peft_model_state_dict

    torch.manual_seed(0)
    model = add_lora(load_model(tiny_llama_dir), LoraSettings(r=4, alpha=8))
    settings = WarmupSettings(learning_rate=1e-3, epochs=2, batch_size=2, grad_accumulation=1, warmup_ratio=0.5)
    trainer = LoraTrainer(model, encoded_facts(tiny_llama_dir), settings)
    assert trainer.total_steps == 4 and checkpoint_steps(trainer.steps_per_epoch, settings) == {2, 4}
    trainer.step(1)
    metrics = trainer.step(2)
    folder = tmp_path / "step-2"
    trainer.save(folder)
    assert (folder / OPTIMIZER_FILE).is_file() and (folder / "adapter_model.safetensors").is_file()
    restored, optimizer_state, info = load_checkpoint(folder, load_model(tiny_llama_dir))
    assert info["step"] == 2 and info["epoch"] == pytest.approx(1.0)
    assert info["learning_rate"] == metrics["learning_rate"]
    restored_lora = get_peft_model_state_dict(restored)
    saved_lora = get_peft_model_state_dict(model)
    assert restored_lora.keys() == saved_lora.keys()
    for key, value in saved_lora.items():
        assert torch.equal(restored_lora[key], value), key
    for index, parameter in enumerate(trainer.optimizer.param_groups[0]["params"]):
        assert torch.equal(optimizer_state["state"][index]["exp_avg"], trainer.optimizer.state[parameter]["exp_avg"])
    # Parameter names in optimizer order let later stages pair moments with LoRA modules.
    trainable = [n for n, p in restored.named_parameters() if p.requires_grad]
    assert info["param_names"] == trainable
    # A trainer that loads the checkpoint continues exactly like the one that wrote it.
    torch.manual_seed(1)  # another LoRA initialisation: the checkpoint must overwrite it
    other = LoraTrainer(add_lora(load_model(tiny_llama_dir), LoraSettings(r=4, alpha=8)),
                        encoded_facts(tiny_llama_dir), settings)
    other.load(folder)
    assert torch.load(folder / SCHEDULER_FILE, weights_only=True) == other.scheduler.state_dict()
    assert other.step(3) == trainer.step(3)
    for key, value in get_peft_model_state_dict(model).items():
        assert torch.equal(get_peft_model_state_dict(other.peft_model)[key], value), key


class Killed(RuntimeError):
    """Stands for a worker dying in the middle of a step."""


def _warmup_task(folder: Path, model_dir: str, kill_at: int | None = None) -> None:
    """The influence warmup task through the shared loop in this process (the loop Ray Train runs per worker)."""
    from trustray.pipelines.influence import LoraWarmupTraining

    # 4 examples, one per step, 2 epochs, 2 checkpoints per epoch; the ramp makes the schedule's state matter.
    settings = WarmupSettings(learning_rate=1e-2, epochs=2, batch_size=1, grad_accumulation=1, warmup_ratio=0.25,
                              checkpoints_per_epoch=2)
    plan = TrainingPlan(folder, 8, checkpoint_steps(4, settings))
    context = WorkerContext(plan=plan, device=torch.device("cpu"))
    data = {"model": model_dir, "dtype": "float32", "lora": LoraSettings(r=4, alpha=8), "warmup": settings,
            "examples": encoded_facts(model_dir), "frozen_prefix": 0}
    task = LoraWarmupTraining(data, context)

    def train_step(step: int) -> dict[str, float]:
        if step == kill_at:
            raise Killed(f"killed at step {step}")
        return LoraWarmupTraining.train_step(task, step)

    task.train_step = train_step
    run_loop(task, context, lambda metrics, checkpoint: None)


def test_a_killed_warmup_resumes_to_the_adapter_of_an_uninterrupted_one(tiny_llama_dir, tmp_path):
    _warmup_task(tmp_path / "straight", tiny_llama_dir)
    with pytest.raises(Killed):
        _warmup_task(tmp_path / "resumed", tiny_llama_dir, kill_at=4)  # mid-epoch, after the step-2 checkpoint
    assert latest_checkpoint(tmp_path / "resumed").name == "step-2"
    _warmup_task(tmp_path / "resumed", tiny_llama_dir)
    assert not list((tmp_path / "resumed").glob(".*tmp*"))  # checkpoints are written atomically
    for step in (4, 6, 8):
        straight, resumed = tmp_path / "straight" / f"step-{step}", tmp_path / "resumed" / f"step-{step}"
        for name in ("adapter_model.safetensors", CHECKPOINT_FILE):
            assert (straight / name).read_bytes() == (resumed / name).read_bytes(), (step, name)
        for name in (OPTIMIZER_FILE, SCHEDULER_FILE):  # nested states, tensors compared bit for bit
            torch.testing.assert_close(torch.load(resumed / name, weights_only=True),
                                       torch.load(straight / name, weights_only=True), rtol=0, atol=0)
        assert read_step(straight) == read_step(resumed)
    assert [entry["step"] for entry in read_step(tmp_path / "resumed" / "step-8")["history"]] == [2, 4, 6, 8]


@pytest.fixture
def chat_pool_file(tmp_path):
    from trustray.data.corpus import load_wiki_corpus

    rows = [
        {
            "id": doc["id"],
            "messages": [
                {"role": "user", "content": f"Tell me about {doc['title']}."},
                {"role": "assistant", "content": doc["text"][:120]},
            ],
            "topic": doc["topic"],
        }
        for doc in load_wiki_corpus(limit=40)
    ]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def chat_targets_file(tmp_path):
    from trustray.data.corpus import load_wiki_corpus

    rows = [
        {
            "id": f"target-{doc['id']}",
            "messages": [
                {"role": "user", "content": f"What is {doc['title']}?"},
                {"role": "assistant", "content": doc["text"][:120]},
            ],
            "task": f"task-{index % 2}",
        }
        for index, doc in enumerate(load_wiki_corpus(limit=46)[40:])
    ]
    path = tmp_path / "targets.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_influence_pipeline_on_ray(ray_local, tiny_llama_dir, chat_pool_file, chat_targets_file, tmp_path):
    from trustray.pipelines.influence import InfluenceConfig, run

    out = tmp_path / "influence"
    overrides = [f"model={tiny_llama_dir}", f"data.pool={chat_pool_file}", f"output_dir={out}",
                 f"scoring.targets={chat_targets_file}"]
    config = load_config(InfluenceConfig, "configs/influence/tiny.yaml", overrides)
    assert run(config) == out
    metadata = read_metadata(out / "warmup")
    assert metadata["kind"] == "influence_warmup"
    assert metadata["num_examples"] + len(metadata["skipped_ids"]) == 20  # half of the 40-row pool
    # 20 examples at 4 per step: 5 steps, checkpoints in the middle and at the end of the epoch.
    assert [c["step"] for c in metadata["checkpoints"]] == [3, 5]
    assert [c["path"] for c in metadata["checkpoints"]] == ["checkpoints/step-3", "checkpoints/step-5"]
    assert metadata["checkpoints"][-1]["learning_rate"] > 0
    for checkpoint in metadata["checkpoints"]:
        folder = out / "warmup" / checkpoint["path"]
        assert (folder / OPTIMIZER_FILE).is_file() and (folder / "adapter_config.json").is_file()
        assert json.loads((folder / CHECKPOINT_FILE).read_text())["step"] == checkpoint["step"]

    # Stages b-e: reduction, train/target feature stores per checkpoint, scores and selection.
    assert read_metadata(out / "reduction")["state"]["dim"] == 32
    for role, count in (("train", 40), ("target", 6)):
        for checkpoint in metadata["checkpoints"]:
            store = read_metadata(out / "features" / role / f"step-{checkpoint['step']}")
            assert store["finished"] and store["num_examples"] == count
            assert store["precondition"] == (role == "train")
    selection = [json.loads(line) for line in (out / "selection" / "selection.jsonl").read_text().splitlines()]
    assert [row["rank"] for row in selection] == list(range(1, 11))  # 25% of 40
    assert all(a["score"] >= b["score"] for a, b in zip(selection, selection[1:], strict=False))
    subset = [json.loads(line) for line in (out / "selection" / "subset.jsonl").read_text().splitlines()]
    assert [row["id"] for row in subset] == [row["id"] for row in selection]

    assert run(config) == out  # same settings: every stage reused, nothing retrained
    assert read_metadata(out / "warmup")["created_at"] == metadata["created_at"]

    changed = load_config(InfluenceConfig, "configs/influence/tiny.yaml", [*overrides, "warmup.learning_rate=0.01"])
    with pytest.raises(ArtifactMismatchError, match="warmup"):
        run(changed)


def test_wiki_pool_and_seeded_warmup_subset():
    from trustray.pipelines.influence import InfluenceDataSettings, load_pool, warmup_subset

    pool = load_pool(InfluenceDataSettings(n_train=40, n_target_per_topic=1, seed=3))
    assert len(pool) == 40 and all(row["messages"][-1]["role"] == "assistant" for row in pool)
    subset = warmup_subset(pool, 0.1, seed=3)
    assert len(subset) == 4 and subset == warmup_subset(pool, 0.1, seed=3)
    assert subset != warmup_subset(pool, 0.1, seed=4)


def test_pca_is_fitted_on_the_preconditioned_features_it_reduces(ray_local, tiny_llama_dir, chat_pool_file, tmp_path):
    import random

    from trustray.core.influence.reductions import Reduction
    from trustray.pipelines.influence import (
        InfluenceConfig,
        checkpoint_dirs,
        load_pool,
        run_reduction,
        run_warmup,
        sample_gradients,
    )

    overrides = [f"model={tiny_llama_dir}", f"data.pool={chat_pool_file}", f"output_dir={tmp_path / 'out'}",
                 "features.reduction=pca", "features.dim=4", "features.fit_sample=4"]
    config = load_config(InfluenceConfig, "configs/influence/tiny.yaml", overrides)
    pool = load_pool(config.data)
    warmup = run_warmup(config, pool)
    reduction = Reduction.load(run_reduction(config, pool, warmup))
    sample = [pool[i] for i in sorted(random.Random(0).sample(range(len(pool)), 4))]
    last = checkpoint_dirs(config, warmup)[-1]["dir"]
    preconditioned = sample_gradients(config, last, sample, precondition=True)
    plain = torch.cat([batch.flat() for batch in sample_gradients(config, last, sample, precondition=False)])

    def unexplained(x: torch.Tensor) -> float:
        return float((x - x @ reduction.basis @ reduction.basis.T).norm() / x.norm())

    # Four directions fitted on four preconditioned gradients span them; the plain ones point elsewhere.
    assert unexplained(preconditioned) < 1e-3
    assert unexplained(plain) > 0.05
