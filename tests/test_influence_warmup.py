"""LoRA warmup: training lowers the loss, checkpoints round-trip, the Ray Train stage runs, reuses and refuses."""

from __future__ import annotations

import json

import pytest
import torch

from trustray.artifacts import ArtifactMismatchError, read_metadata
from trustray.config import load_config
from trustray.core.influence.warmup import (
    CHECKPOINT_FILE,
    OPTIMIZER_FILE,
    LoraSettings,
    WarmupSettings,
    add_lora,
    load_checkpoint,
    save_checkpoint,
    train_lora,
)
from trustray.core.lm.batching import encode_chat

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
    calls: list[tuple[int, float, float]] = []
    log = train_lora(
        model, encoded_facts(tiny_llama_dir), settings,
        lambda step, lr, peft_model, optimizer, epoch: calls.append((step, lr, epoch)),
    )
    assert len(log) == 25  # 4 examples, 2 x 2 per step: one step per epoch
    # The first logged loss is the untrained model's; the logit scale of a random tiny Llama bounds the drop.
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert [step for step, _, _ in calls] == list(range(1, 26))
    assert calls[0][1] == pytest.approx(1e-2)  # no warmup: the first step runs at the peak rate
    assert calls[-1][2] == pytest.approx(25.0)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_checkpoint_round_trip(tiny_llama_dir, tmp_path):
    from peft import get_peft_model_state_dict

    torch.manual_seed(0)
    model = add_lora(load_model(tiny_llama_dir), LoraSettings(r=4, alpha=8))
    settings = WarmupSettings(learning_rate=1e-3, epochs=2, batch_size=2, grad_accumulation=1, warmup_ratio=0.5)
    saved: dict[int, dict] = {}

    def on_checkpoint(step, lr, peft_model, optimizer, epoch):
        folder = save_checkpoint(tmp_path / f"checkpoint-{step}", peft_model, optimizer, step, lr, epoch)
        saved[step] = {
            "folder": folder,
            "lora": {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()},
            "exp_avg": [optimizer.state[p]["exp_avg"].clone() for p in optimizer.param_groups[0]["params"]],
            "lr": lr,
        }

    train_lora(model, encoded_facts(tiny_llama_dir), settings, on_checkpoint)
    assert sorted(saved) == [2, 4]
    record = saved[2]
    folder = record["folder"]
    assert (folder / OPTIMIZER_FILE).is_file() and (folder / "adapter_model.safetensors").is_file()
    restored, optimizer_state, info = load_checkpoint(folder, load_model(tiny_llama_dir))
    assert info["step"] == 2 and info["epoch"] == pytest.approx(1.0)
    assert info["learning_rate"] == pytest.approx(record["lr"])
    restored_lora = get_peft_model_state_dict(restored)
    assert restored_lora.keys() == record["lora"].keys()
    for key, value in record["lora"].items():
        assert torch.equal(restored_lora[key], value), key
    for index, exp_avg in enumerate(record["exp_avg"]):
        assert torch.equal(optimizer_state["state"][index]["exp_avg"], exp_avg)
    # Parameter names in optimizer order let later stages pair moments with LoRA modules.
    trainable = [n for n, p in restored.named_parameters() if p.requires_grad]
    assert info["param_names"] == trainable
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp folders


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
    assert metadata["checkpoints"][-1]["learning_rate"] > 0
    for checkpoint in metadata["checkpoints"]:
        folder = out / "warmup" / checkpoint["path"]
        assert (folder / OPTIMIZER_FILE).is_file() and (folder / "adapter_config.json").is_file()
        assert json.loads((folder / CHECKPOINT_FILE).read_text())["step"] == checkpoint["step"]

    # Stages b-e: reduction, train/target feature stores per checkpoint, scores and selection.
    assert read_metadata(out / "reduction")["state"]["dim"] == 32
    for role, count in (("train", 40), ("target", 6)):
        for checkpoint in metadata["checkpoints"]:
            store = read_metadata(out / "features" / role / checkpoint["path"])
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
