"""Do the reward models know when they are unsure? Accuracy, calibration and OOD scores on the embedded default.

For each preference task (`trustray.data.preferences`: factual, sentiment): `--prompts` prompts, and per prompt
`SAMPLES` responses sampled from the chat model (temperature 1, `--max-tokens` tokens), paired two by two. The
task's oracle (Bradley–Terry noise `ORACLE_TEMPERATURE`) labels each pair; ties and skips are dropped and
counted. Prompts of the held-out topic `OOD_TOPIC` are kept out of training; the others are split by prompt into
train / calibration / test (`SPLIT`). The features are the frozen chat model's (`trustray.core.align.features`).

The L2 penalty of the heads (`L2_GRID`) and the feature pooling (`POOLINGS`) are chosen by the NLL on the
calibration split, which then also fits the temperature; the test split is only reported. Sampled responses are
cached under outputs/benchmarks/ (keyed by task, prompts and tokens), so a rerun does not generate them again.

The LoRA variant (`LoraRewardModel`: adapters on the top layers under `HEADS` bootstrap heads, fixed settings
`LORA`) is trained on the same train split, calibrated on the same calibration split and reported on the same test
split, next to the frozen-feature ensemble.

Reported per task: the reward ensemble's (`RewardEnsemble`, `HEADS` heads) pair accuracy on the test split
against the oracle's labels and against the gold reward's order; ECE (15 bins), Brier and NLL before and after
temperature scaling fitted on the calibration split; and how well three scores single out the held-out topic's
responses among the test responses (AUROC): the Mahalanobis distance to the training responses' features, its
relative variant against generic text (chat turns answered by the first sentence of Wikipedia intros outside
the edit evaluation's pool), and the ensemble's disagreement on the pairs.
Writes benchmarks/results/reward_uncertainty.json and reward_uncertainty.png (reliability diagrams of the test
split, before and after temperature scaling).
Run: .venv/bin/python benchmarks/reward_uncertainty.py [--prompts 200] [--max-tokens 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from trustray.artifacts import atomic_write_text
from trustray.core.align.calibration import (
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    reliability,
)
from trustray.core.align.features import response_features
from trustray.core.align.reward import RewardEnsemble
from trustray.core.align.uncertainty import MahalanobisOOD, auroc
from trustray.core.rag.passages import split_sentences
from trustray.data.corpus import edit_train_texts
from trustray.data.preferences import build_oracle, load_prompts
from trustray.models.engines import EngineConfig, SamplingParams
from trustray.models.hf_engine import HFEngine
from trustray.models.sources import DEFAULT_CHAT_MODEL
from trustray.runtime import apply_offline_defaults, machine_info, save_figure, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = 4
HEADS = 5
ORACLE_TEMPERATURE = 0.1
OOD_TOPIC = "Biology and health sciences"
SPLIT = {"train": 0.6, "calibration": 0.2}  # the rest is the test split
GENERIC_TEXTS = 200
L2_GRID = [0.01, 0.1, 1.0, 10.0, 100.0]
POOLINGS = ["last", "mean"]
CACHE = ROOT / "outputs" / "benchmarks" / "reward_uncertainty"
# The LoRA reward model's fixed settings: adapters on the attention of the top four layers, AdamW.
LORA = {"r": 8, "layers": [-4, -3, -2, -1], "epochs": 3, "lr": 1e-3}
logger = logging.getLogger("reward_uncertainty")


def split_of(prompt_id: str) -> str:
    """A stable split by prompt id (the same prompt always lands in the same split)."""
    fraction = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if fraction < SPLIT["train"]:
        return "train"
    return "calibration" if fraction < SPLIT["train"] + SPLIT["calibration"] else "test"


def sampled_pairs(engine: HFEngine, task: str, prompts: list, max_tokens: int) -> tuple[list[dict], float]:
    """`SAMPLES` sampled responses per prompt, paired (0, 1), (2, 3), ..., and the seconds generating them took
    (cached with them)."""
    cache = CACHE / f"{task}-{len(prompts)}-{max_tokens}-{SAMPLES}.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        responses, seconds = cached["responses"], cached["generation_seconds"]
    else:
        began = time.perf_counter()
        responses = []
        for sample in range(SAMPLES):
            sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=sample)
            responses.append([c.text for c in engine.generate([p.messages() for p in prompts], sampling)])
        seconds = round(time.perf_counter() - began, 1)
        atomic_write_text(cache, json.dumps({"responses": responses, "generation_seconds": seconds}))
    pairs = [{"prompt": p, "a": responses[i][row], "b": responses[i + 1][row]}
             for row, p in enumerate(prompts) for i in range(0, SAMPLES, 2)]
    return pairs, seconds


def features_of(engine: HFEngine, pairs: list[dict], side: str, pooling: str) -> torch.Tensor:
    return response_features(engine.model, engine.tokenizer, [pair["prompt"].messages() for pair in pairs],
                             [pair[side] for pair in pairs], pooling=pooling)


def generic_features(engine: HFEngine, pooling: str) -> torch.Tensor:
    """Features of generic chat turns: "Tell me about <intro's subject>." answered by the intro's first sentence."""
    texts = edit_train_texts(GENERIC_TEXTS)
    prompts = [[{"role": "user", "content": f"Tell me about {text.split(' is ')[0][:60]}."}] for text in texts]
    return response_features(engine.model, engine.tokenizer, prompts, [split_sentences(t)[0] for t in texts],
                             pooling=pooling)


def fitted(features: dict, outcomes: dict, l2: float) -> RewardEnsemble:
    train_a, train_b = features["train"]
    a_won = outcomes["train"].bool()[:, None]
    return RewardEnsemble(heads=HEADS, l2=l2, seed=0).fit(torch.where(a_won, train_a, train_b),
                                                          torch.where(a_won, train_b, train_a))


def task_report(engine: HFEngine, task: str, count: int, max_tokens: int) -> dict:
    oracle = build_oracle(task, temperature=ORACLE_TEMPERATURE, seed=0)
    pairs, generation_seconds = sampled_pairs(engine, task, load_prompts(task, count), max_tokens)
    for pair in pairs:
        pair["label"] = oracle.label(pair["prompt"], pair["a"], pair["b"])
        pair["gold_gap"] = oracle.reward(pair["prompt"], pair["a"]) - oracle.reward(pair["prompt"], pair["b"])
        pair["split"] = "ood" if pair["prompt"].topic == OOD_TOPIC else split_of(pair["prompt"].id)
    labelled = [pair for pair in pairs if pair["label"] in ("a", "b")]
    splits = {name: [pair for pair in labelled if pair["split"] == name]
              for name in ("train", "calibration", "test", "ood")}
    outcomes = {name: torch.tensor([float(pair["label"] == "a") for pair in rows]) for name, rows in splits.items()}
    choices, pooled = [], {}
    for pooling in POOLINGS:
        pooled[pooling] = {name: (features_of(engine, rows, "a", pooling), features_of(engine, rows, "b", pooling))
                           for name, rows in splits.items()}
        for l2 in L2_GRID:
            model = fitted(pooled[pooling], outcomes, l2)
            probability = model.compare(*pooled[pooling]["calibration"]).probability
            choices.append({"pooling": pooling, "l2": l2,
                            "calibration_nll": round(negative_log_likelihood(probability, outcomes["calibration"]), 4)})
            logger.info("%s %s", task, choices[-1])
    best = min(choices, key=lambda choice: choice["calibration_nll"])
    features = pooled[best["pooling"]]
    generic = generic_features(engine, best["pooling"])
    model = fitted(features, outcomes, best["l2"])
    before = model.compare(*features["test"])
    temperature = model.calibrate(*features["calibration"], outcomes["calibration"])
    after = model.compare(*features["test"])
    test_outcome = outcomes["test"]
    gold_order = torch.tensor([pair["gold_gap"] > 0 for pair in splits["test"]])

    def calibration(probability: torch.Tensor) -> dict:
        return {"ece": round(expected_calibration_error(probability, test_outcome), 4),
                "brier": round(brier_score(probability, test_outcome), 4),
                "nll": round(negative_log_likelihood(probability, test_outcome), 4)}

    in_test = torch.cat(features["test"])
    held_out = torch.cat(features["ood"])
    is_ood = torch.cat([torch.zeros(len(in_test)), torch.ones(len(held_out))])
    responses = torch.cat([in_test, held_out])
    train_responses = torch.cat(features["train"])
    disagreement = torch.cat([model.compare(*features["test"]).variance, model.compare(*features["ood"]).variance])
    pair_is_ood = torch.cat([torch.zeros(len(splits["test"])), torch.ones(len(splits["ood"]))])
    lora = lora_report(splits, outcomes, gold_order)
    logger.info("%s lora: %s", task, lora)
    return {
        "task": task, "prompts": count, "pairs": len(pairs), "ties_or_skips": len(pairs) - len(labelled),
        "lora": lora,
        "pairs_per_split": {name: len(rows) for name, rows in splits.items()},
        "generation_seconds": generation_seconds, "selection": choices,
        "pooling": best["pooling"], "l2": best["l2"],
        "accuracy_vs_labels": round(float(((after.probability > 0.5).double() == test_outcome).double().mean()), 4),
        "accuracy_vs_gold": round(float(((after.probability > 0.5) == gold_order).double().mean()), 4),
        "temperature": round(temperature, 3),
        "calibration_before": calibration(before.probability),
        "calibration_after": calibration(after.probability),
        "reliability_before": reliability(before.probability, test_outcome),
        "reliability_after": reliability(after.probability, test_outcome),
        "ood_topic": OOD_TOPIC,
        "ood_auroc": {
            "mahalanobis": round(auroc(MahalanobisOOD(train_responses).score(responses), is_ood), 4),
            "relative_mahalanobis": round(auroc(MahalanobisOOD(train_responses, relative_to=generic)
                                                .score(responses), is_ood), 4),
            "ensemble_disagreement": round(auroc(disagreement, pair_is_ood), 4),
        },
    }


def lora_report(splits: dict, outcomes: dict, gold_order: torch.Tensor) -> dict:
    """The LoRA reward model (`LoraRewardModel`, `LORA` settings, fixed: not tuned) on the same splits: trained on the
    train pairs, temperature on the calibration pairs, reported on the test pairs; the heads' disagreement as an
    OOD score for the held-out topic."""
    from trustray.core.align.lora_reward import LoraRewardModel
    from trustray.core.influence.warmup import LoraSettings, add_lora
    from trustray.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    model = add_lora(load_causal_lm(DEFAULT_CHAT_MODEL, "cpu", "float32"), LoraSettings(r=LORA["r"], alpha=2.0 * LORA["r"], layers=LORA["layers"]))
    reward_model = LoraRewardModel(model, load_tokenizer(DEFAULT_CHAT_MODEL), heads=HEADS, pooling="mean",
                                   max_length=160, seed=0)

    def sides(rows: list[dict]) -> tuple[list, list]:
        return ([(pair["prompt"].messages(), pair["a"]) for pair in rows],
                [(pair["prompt"].messages(), pair["b"]) for pair in rows])

    train_a, train_b = sides(splits["train"])
    a_won = outcomes["train"].bool().tolist()
    chosen = [a if won else b for a, b, won in zip(train_a, train_b, a_won, strict=True)]
    rejected = [b if won else a for a, b, won in zip(train_a, train_b, a_won, strict=True)]
    began = time.perf_counter()
    losses = reward_model.fit(chosen, rejected, epochs=LORA["epochs"], batch_size=8, learning_rate=LORA["lr"])
    seconds = time.perf_counter() - began
    test_a, test_b = sides(splits["test"])
    before = reward_model.compare(test_a, test_b).probability
    temperature = reward_model.calibrate(*sides(splits["calibration"]), outcomes["calibration"])
    after = reward_model.compare(test_a, test_b)
    ood_a, ood_b = sides(splits["ood"])
    disagreement = torch.cat([after.variance, reward_model.compare(ood_a, ood_b).variance])
    is_ood = torch.cat([torch.zeros(len(test_a)), torch.ones(len(ood_a))])
    outcome = outcomes["test"]
    return {"settings": LORA, "train_losses": [round(loss, 4) for loss in losses], "train_seconds": round(seconds, 1),
            "accuracy_vs_labels": round(float(((after.probability > 0.5).double() == outcome).double().mean()), 4),
            "accuracy_vs_gold": round(float(((after.probability > 0.5) == gold_order).double().mean()), 4),
            "temperature": round(temperature, 3),
            "ece_before": round(expected_calibration_error(before, outcome), 4),
            "ece_after": round(expected_calibration_error(after.probability, outcome), 4),
            "ood_auroc_disagreement": round(auroc(disagreement, is_ood), 4)}


def plot_reliability(tasks: list[dict], machine: dict, path: Path) -> None:
    """Per task, accuracy against confidence per bin, before and after scaling; the title names the machine."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        axis.plot([0.5, 1], [0.5, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for key, label in (("reliability_before", "before"), ("reliability_after", "after temperature scaling")):
            rows = task[key]
            axis.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label)
        axis.set(title=f"{task['task']} (test pairs)", xlabel="confidence", ylabel="accuracy", xlim=(0.45, 1.02),
                 ylim=(0, 1.02))
        axis.legend(fontsize=8)
    figure.suptitle(f"{DEFAULT_CHAT_MODEL} frozen-feature reward ensemble", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path, machine)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts per task")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    apply_offline_defaults()
    setup_logging()
    engine = HFEngine(EngineConfig(model=DEFAULT_CHAT_MODEL, engine="hf", torch_threads=args.threads), "cpu")
    tasks = []
    for task in ("factual", "sentiment"):
        tasks.append(task_report(engine, task, args.prompts, args.max_tokens))
        logger.info("%s", tasks[-1])
    result = {"model": DEFAULT_CHAT_MODEL, "machine": machine_info(), "threads": args.threads,
              "samples_per_prompt": SAMPLES, "heads": HEADS, "oracle_temperature": ORACLE_TEMPERATURE,
              "tasks": tasks}
    path = RESULTS / "reward_uncertainty.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    plot_reliability(tasks, result["machine"], RESULTS / "reward_uncertainty.png")
    logger.info("wrote %s and its reliability diagrams", path)


if __name__ == "__main__":
    main()
