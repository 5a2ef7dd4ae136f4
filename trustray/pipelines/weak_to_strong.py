"""Weak-to-strong supervision: how much of the gap between a weak supervisor and a strong ceiling does a strong
student trained on the supervisor's labels recover (PGR, Burns et al. 2023)?

    trustray run weak_to_strong --config configs/weak_to_strong/<tiny|cpu|gpu>.yaml [key=value ...]
    python -m trustray.pipelines.weak_to_strong --config ...

Every task follows one protocol (`trustray.core.w2s.protocol`), once per seed: the training examples are cut in
halves by the seed (classification tasks: within each class, so both halves keep the balance); the **weak**
supervisor learns half 1's ground truth and labels half 2 with its class probabilities; a **student** (the strong
model) learns those soft labels, once per loss (`xent`, `logconf`, `product`: `trustray.core.w2s.losses`); the
**ceiling** (the strong model again) learns half 2's ground truth. All are scored on the task's test set, and
each student's PGR = (student − weak) / (ceiling − weak).

Tasks:
- classification (`classification:`; `trustray.data.w2s_tasks`): answer verification and confusable topic pairs.
  The strong model is the chat model's last-token state into a zero-initialised head, its top
  `strong_trainable_layers` blocks trained (`trustray.core.w2s.classifier`); the weak supervisor is chosen per task
  (`weak.kind`): `lm` (the same model cut to its first `weak.layers` layers, the paper's smaller model of the same
  family), `embedding` (MiniLM sentence embeddings and a linear head) or `tfidf` (TF-IDF and logistic regression,
  scikit-learn). The frozen layers' outputs are computed once per task and cached (`inputs/`).
- reward models (`reward:`; the preference tasks and oracles of `trustray.data.preferences`): the chat model samples
  `samples_per_prompt` answers per prompt; every pair of a training prompt's answers gets the oracle's label; the
  weak reward model is a Bradley–Terry head on the features after the first `weak_layers` layers, the strong one on
  the final features (`trustray.core.align.features`). Halves are cut by prompt. Scored on held-out prompts' pairs
  against the gold reward's order (`kind: reward_model`), and, as a discriminator supervising a generator, by the
  mean gold reward of the best-of-n answer each reward model picks for each held-out prompt (`kind: generation`).

Every training (weak model, ceiling, student) is a resumable unit on Ray Train (or in this process with
`resources.in_process`), with its checkpoints and, once scored, its `predictions.npz`: a rerun computes only what is
missing. Output folder: `metadata.json`, `<task>/inputs/` (cached inputs), `<task>/seed-<s>/<weak|ceiling|
student-<loss>>/` (checkpoints, and `predictions.npz` once scored: the unit is done), and `results.json` (every row and the per-(task, kind, loss) summary with intervals over seeds).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from trustray.artifacts import atomic_folder, atomic_write_text, check_metadata, write_metadata
from trustray.config import ActorResources, BaseConfig, PipelineConfig, TrainWorkerResources
from trustray.core.w2s.classifier import TrainSettings
from trustray.models.sources import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER, model_fingerprint
from trustray.pipelines import prepare_output
from trustray.pipelines.active_preference import OracleSettings
from trustray.pipelines.training import SteppedTrainerTask, TrainingPlan, WorkerContext

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.npz"


class WeakSupervisor(BaseConfig):
    """A classification task's weak supervisor."""

    kind: Literal["lm", "embedding", "tfidf"] = Field("lm", description="lm: the chat model cut to its first "
                                                      "`layers` layers with a head; embedding: sentence embeddings "
                                                      "and a linear head; tfidf: TF-IDF and logistic regression.")
    layers: int = Field(4, ge=1, description="lm: decoder layers kept.")
    trainable_layers: int = Field(1, ge=0, description="lm: top blocks trained (0: a linear probe).")
    embedder: str = Field(DEFAULT_EMBEDDER, description="embedding: the sentence embedder.")
    regularisation: float = Field(1.0, gt=0, description="tfidf: inverse L2 strength C of the logistic regression.")


class ClassificationTaskSettings(BaseConfig):
    name: Literal["verification", "topics"] = Field(..., description="Task (trustray.data.w2s_tasks).")
    train: int = Field(..., ge=4, description="Training examples (halved by the protocol).")
    test: int = Field(..., ge=2, description="Test examples.")
    max_tokens: int = Field(64, ge=2, description="Tokens of an example's text read (its start).")
    seed: int = Field(0, description="Seeds the task's draw (its test set, verification's candidates); tune "
                      "settings on another seed than the one reported.")
    topics: list[str] | None = Field(None, description="topics: the two (or more) corpus topics (None: the default "
                                     "Physical sciences vs Technology).")
    max_words: int = Field(40, ge=1, description="topics: words of a page's introduction.")
    weak: WeakSupervisor = Field(default_factory=WeakSupervisor, description="The weak supervisor.")

    def task_settings(self) -> dict[str, Any]:
        if self.name != "topics":
            return {}
        return {"max_words": self.max_words, **({"topics": self.topics} if self.topics else {})}


class RewardPromptCounts(BaseConfig):
    train: int = Field(192, ge=2, description="Prompts whose answer pairs train the reward models (halved).")
    test: int = Field(64, ge=1, description="Held-out prompts: pair accuracy and best-of-n.")


class RewardTaskSettings(BaseConfig):
    name: Literal["factual", "sentiment"] = Field(..., description="Preference task (trustray.data.preferences).")
    prompts: RewardPromptCounts = Field(default_factory=RewardPromptCounts, description="Prompt counts.")
    samples_per_prompt: int = Field(4, ge=2, description="Answers sampled per prompt (n of best-of-n).")
    max_tokens: int = Field(24, ge=1, description="Longest answer sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the answers.")
    weak_layers: int = Field(2, ge=1, description="The weak reward model reads the features after this many layers.")
    pooling: Literal["last", "mean"] = Field("mean", description="Feature pooling over the answer.")
    max_length: int = Field(160, ge=8, description="Longest prompt + answer read, in tokens.")
    oracle: OracleSettings = Field(default_factory=OracleSettings, description="The oracle labelling training pairs.")


class Trainings(BaseConfig):
    """Training settings: of models with transformer blocks, and of linear heads on fixed features."""

    blocks: TrainSettings = Field(default_factory=TrainSettings, description="lm weak models and ceilings (and "
                                  "students, unless `transfer` is set).")
    transfer: TrainSettings | None = Field(None, description="Students trained on weak labels (the paper's "
                                           "transfer_epochs / transfer_lr); None: as `blocks`.")
    heads: TrainSettings = Field(default_factory=lambda: TrainSettings(epochs=10, learning_rate=1e-2),
                                 description="Linear heads (embedding weak models, reward models).")
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")


class W2SResources(BaseConfig):
    in_process: bool = Field(False, description="Train in this process instead of on Ray Train, and run the chat "
                             "model here instead of in an actor.")
    policy: ActorResources = Field(default_factory=ActorResources, description="The chat-model actor (reward tasks).")
    train: TrainWorkerResources = Field(default_factory=TrainWorkerResources, description="Each training's worker.")
    torch_threads: int | None = Field(None, ge=1, description="torch threads of this process (None: torch's default).")


class WeakToStrongConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/weak_to_strong"

    model: str = Field(DEFAULT_CHAT_MODEL, description="The strong model (a Llama-shaped causal LM).")
    dtype: str = Field("float32", description="Its dtype when loaded.")
    strong_trainable_layers: int = Field(2, ge=0, description="Top blocks the strong model trains (0: a probe).")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Seeds (splits and training order).")
    losses: list[str] = Field(default_factory=lambda: ["xent", "logconf", "product"],
                              description="Student losses (trustray.core.w2s.losses).")
    loss_settings: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {"logconf": {"aux_coef": 0.5, "warmup_fraction": 0.2}},
        description="Per loss, its settings (e.g. logconf's aux_coef).")
    classification: list[ClassificationTaskSettings] = Field(default_factory=list, description="Classification tasks.")
    reward: list[RewardTaskSettings] = Field(default_factory=list, description="Reward-model tasks.")
    training: Trainings = Field(default_factory=Trainings, description="Training settings.")
    resources: W2SResources = Field(default_factory=W2SResources, description="Resources.")

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, losses: list[str]) -> list[str]:
        from trustray.core.w2s.losses import loss_names

        unknown = sorted(set(losses) - set(loss_names()))
        if unknown or not losses or len(set(losses)) != len(losses):
            raise ValueError(f"losses must be distinct names of {loss_names()}; got {losses}")
        return losses

    @model_validator(mode="after")
    def _check(self) -> WeakToStrongConfig:
        from trustray.core.w2s.losses import build_loss

        for name, settings in self.loss_settings.items():
            build_loss(name, **settings)  # unknown names and settings fail here, not after hours of training
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        names = [task.name for task in self.classification] + [task.name for task in self.reward]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"give at least one task and each task once; got {names}")
        for task in self.classification:
            if task.weak.kind == "lm" and task.weak.trainable_layers > task.weak.layers:
                raise ValueError(f"{task.name}: weak.trainable_layers ({task.weak.trainable_layers}) exceeds weak.layers")
        return self


# -- one training unit (weak model, ceiling or student) -----------------------------------------------------------


def build_classifier(spec: dict[str, Any], device: Any):
    """The classifier a unit trains, from its picklable spec: `lm` (cut chat model + head) or `linear` (a head)."""
    import torch

    from trustray.core.w2s.classifier import LastTokenClassifier, LinearHead

    if spec["kind"] == "lm":
        from trustray.models.loading import load_causal_lm

        model = load_causal_lm(spec["model"], device, spec["dtype"])
        classifier = LastTokenClassifier(model, spec["num_layers"], spec["trainable_layers"], spec["num_classes"])
        del model
        return classifier
    head = LinearHead(spec["dimension"], spec["num_classes"], bias=spec["bias"])
    training = torch.load(spec["inputs_file"], map_location="cpu", weights_only=True)[spec["train_indices"]]
    return head.standardise_with(training, centre=spec["bias"])


class ClassifierTraining(SteppedTrainerTask):
    """A unit as a task of the shared training loop (`trustray.pipelines.training`)."""

    def __init__(self, data: dict[str, Any], context: WorkerContext):
        import torch

        from trustray.core.w2s.classifier import ClassifierTrainer
        from trustray.core.w2s.losses import build_loss

        torch.manual_seed(data["seed"])
        spec = data["classifier"]
        self.inputs = torch.load(spec["inputs_file"], map_location="cpu", weights_only=True)
        classifier = build_classifier(spec, context.device)
        self.trainer = ClassifierTrainer(classifier, [self.inputs[i] for i in spec["train_indices"]],
                                         torch.tensor(data["targets"]), build_loss(data["loss"], **data["loss_settings"]),
                                         data["settings"], seed=data["seed"], device=context.device)

    def predict(self, indices: list[int]) -> np.ndarray:
        """[n, C] class probabilities of the inputs at `indices`."""
        return self.trainer.predict([self.inputs[i] for i in indices]).numpy()


def total_steps(examples: int, settings: TrainSettings) -> int:
    return -(-examples // settings.batch_size) * settings.epochs


class Runner:
    """Trains units where the config says (Ray Train or this process) and scores them, skipping finished ones."""

    def __init__(self, config: WeakToStrongConfig):
        self.config = config

    def unit(self, folder: Path, classifier: dict[str, Any], targets: np.ndarray, loss: str, settings: TrainSettings,
             seed: int, predict: dict[str, list[int]]) -> dict[str, np.ndarray]:
        """Train one unit (resuming its checkpoints) and return its class probabilities on each index list of
        `predict`; a finished unit's are read back."""
        import torch

        from trustray.models.loading import gpu_or_cpu, resolve_device
        from trustray.pipelines.training import run_in_process, run_training

        if (folder / PREDICTIONS_FILE).is_file():
            return load_predictions(folder)
        resources = self.config.resources
        steps = total_steps(len(classifier["train_indices"]), settings)
        plan = TrainingPlan.every(folder / "checkpoints", steps, min(self.config.training.checkpoint_every, steps),
                                  keep=1)
        data = {"classifier": classifier, "targets": targets.astype(np.float32).tolist(), "loss": loss,
                "loss_settings": self.config.loss_settings.get(loss, {}), "settings": settings, "seed": seed}
        if resources.in_process:
            device = gpu_or_cpu(resources.train.use_gpu)
            final = run_in_process(ClassifierTraining, data, plan, device)
        else:
            final = run_training(ClassifierTraining, data, plan, resources.train, storage_dir=folder)
            device = resolve_device(None)  # scored here, where a worker's GPU may not be
        scorer = ClassifierTraining(data, WorkerContext(plan=plan, device=device))
        scorer.load(final)
        with torch.no_grad():
            return save_predictions(folder, {name: scorer.predict(indices) for name, indices in predict.items()})


def save_predictions(folder: Path, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A finished unit's class probabilities, written atomically: the file marks the unit done."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{PREDICTIONS_FILE}.tmp"
    with partial.open("wb") as handle:
        np.savez(handle, **predictions)
    partial.replace(folder / PREDICTIONS_FILE)
    return predictions


def load_predictions(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / PREDICTIONS_FILE) as saved:
        return {name: saved[name] for name in saved.files}


def model_depth(model: str) -> int:
    """The number of decoder layers of a causal LM, from its config alone."""
    from transformers import AutoConfig

    from trustray.models.sources import resolve_model_source

    return int(AutoConfig.from_pretrained(resolve_model_source(model)).num_hidden_layers)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[labels]


# -- classification tasks -----------------------------------------------------------------------------------------


def classification_inputs(config: WeakToStrongConfig, settings: ClassificationTaskSettings, task, folder: Path
                          ) -> dict[str, Path]:
    """The cached inputs of a task's examples (training ones first, then test): per needed layer, each example's
    hidden states entering it (`layer-<l>.pt`); sentence embeddings for an `embedding` weak model."""
    import torch
    from tqdm.auto import tqdm

    from trustray.core.lm.prefix import decoder_layers
    from trustray.core.w2s.classifier import layer_inputs
    from trustray.models.loading import gpu_or_cpu, load_causal_lm, load_tokenizer

    texts = [example.text for example in task.train + task.test]
    weak = settings.weak
    model = load_causal_lm(config.model, gpu_or_cpu(config.resources.train.use_gpu), config.dtype)
    depth = len(decoder_layers(model))
    if config.strong_trainable_layers > depth or (weak.kind == "lm" and weak.layers > depth):
        raise ValueError(f"{config.model} has {depth} decoder layers; strong_trainable_layers="
                         f"{config.strong_trainable_layers}, weak.layers={weak.layers}")
    layers = {depth - config.strong_trainable_layers}
    if weak.kind == "lm":
        layers.add(weak.layers - weak.trainable_layers)
    files = {f"layer-{layer}": folder / f"layer-{layer}.pt" for layer in sorted(layers)}
    if weak.kind == "embedding":
        files["embedding"] = folder / "embedding.pt"
    expected = {"kind": "w2s_inputs", "model_fingerprint": model_fingerprint(config.model), "dtype": config.dtype,
                "task": settings.model_dump(mode="json"), "files": sorted(files)}
    if check_metadata(folder, expected, kind="weak-to-strong inputs"):
        return files
    tokenizer = load_tokenizer(config.model)
    token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"][: settings.max_tokens] for text in texts]
    logger.info("%s: caching the frozen layers' outputs of %d examples (layers %s)", settings.name, len(texts),
                sorted(layers))
    states: dict[int, list] = {layer: [] for layer in layers}
    chunk = 128
    for start in tqdm(range(0, len(token_ids), chunk), desc=f"{settings.name}: frozen layers", unit="chunk"):
        for layer, part in layer_inputs(model, token_ids[start : start + chunk], sorted(layers)).items():
            states[layer] += part
    with atomic_folder(folder) as tmp:
        for layer in sorted(layers):
            torch.save(states[layer], tmp / f"layer-{layer}.pt")
        if weak.kind == "embedding":
            from trustray.models.embedders import Embedder, EmbedderConfig

            torch.save(torch.from_numpy(Embedder(EmbedderConfig(model=weak.embedder)).encode(texts)),
                       tmp / "embedding.pt")
        write_metadata(tmp, expected)
    return files


def tfidf_supervisor(settings: WeakSupervisor, texts: list[str], labels: np.ndarray, train: list[int],
                     predict: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """TF-IDF (words and bigrams) and logistic regression, trained on `train`'s ground truth."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          LogisticRegression(C=settings.regularisation, max_iter=1000))
    model.fit([texts[i] for i in train], labels[train])
    return {name: model.predict_proba([texts[i] for i in indices]) for name, indices in predict.items()}


def run_classification(config: WeakToStrongConfig, settings: ClassificationTaskSettings, out: Path,
                       runner: Runner) -> list[dict[str, Any]]:
    from trustray.core.w2s.protocol import split_halves
    from trustray.data.w2s_tasks import load_classification_task

    task = load_classification_task(settings.name, settings.train, settings.test, settings.seed,
                                    **settings.task_settings())
    folder = out / settings.name
    files = classification_inputs(config, settings, task, folder / "inputs")
    texts = [example.text for example in task.train + task.test]
    labels = np.array([example.label for example in task.train + task.test])
    classes = len(task.classes)
    test = list(range(len(task.train), len(texts)))
    depth = model_depth(config.model)

    def lm_spec(train: list[int], num_layers: int, trainable: int) -> dict[str, Any]:
        return {"kind": "lm", "model": config.model, "dtype": config.dtype, "num_layers": num_layers,
                "trainable_layers": trainable, "num_classes": classes, "train_indices": train,
                "inputs_file": str(files[f"layer-{num_layers - trainable}"])}

    weak = settings.weak
    rows = []
    for seed in config.seeds:
        half1, half2 = split_halves(len(task.train), seed, strata=labels[: len(task.train)].tolist())
        seed_dir = folder / f"seed-{seed}"
        predict = {"half2": half2, "test": test}
        if weak.kind == "tfidf":
            if not (seed_dir / "weak" / PREDICTIONS_FILE).is_file():
                save_predictions(seed_dir / "weak", tfidf_supervisor(weak, texts, labels, half1, predict))
            weak_probabilities = load_predictions(seed_dir / "weak")
        elif weak.kind == "embedding":
            spec = {"kind": "linear", "dimension": embedding_dimension(files["embedding"]), "num_classes": classes,
                    "bias": True, "train_indices": half1, "inputs_file": str(files["embedding"])}
            weak_probabilities = runner.unit(seed_dir / "weak", spec, one_hot(labels[half1], classes), "xent",
                                             config.training.heads, seed, predict)
        else:
            weak_probabilities = runner.unit(seed_dir / "weak", lm_spec(half1, weak.layers, weak.trainable_layers),
                                             one_hot(labels[half1], classes), "xent", config.training.blocks, seed,
                                             predict)
        weak_accuracy = accuracy(weak_probabilities["test"], labels[test])
        strong = lm_spec(half2, depth, config.strong_trainable_layers)
        ceiling = runner.unit(seed_dir / "ceiling", strong, one_hot(labels[half2], classes), "xent",
                              config.training.blocks, seed, {"test": test})
        ceiling_accuracy = accuracy(ceiling["test"], labels[test])
        for loss in config.losses:
            student = runner.unit(seed_dir / f"student-{loss}", strong, weak_probabilities["half2"], loss,
                                  config.training.transfer or config.training.blocks, seed, {"test": test})
            rows.append(row(settings.name, "classification", loss, seed, weak_accuracy, ceiling_accuracy,
                            accuracy(student["test"], labels[test]),
                            weak_label_accuracy=accuracy(weak_probabilities["half2"], labels[half2]),
                            student_agrees_with_weak=float((student["test"].argmax(1) ==
                                                            weak_probabilities["test"].argmax(1)).mean())))
        logger.info("%s seed %d: weak %.3f, ceiling %.3f, students %s", settings.name, seed, weak_accuracy,
                    ceiling_accuracy, {r["loss"]: round(r["student"], 3) for r in rows[-len(config.losses):]})
    return rows


def embedding_dimension(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True).shape[1])


def row(task: str, kind: str, loss: str, seed: int, weak: float, ceiling: float, student: float,
        **extra: Any) -> dict[str, Any]:
    from trustray.core.w2s.protocol import performance_gap_recovered

    pgr = performance_gap_recovered(weak, ceiling, student)
    return {"task": task, "kind": kind, "loss": loss, "seed": seed, "weak": weak, "ceiling": ceiling,
            "student": student, "pgr": None if np.isnan(pgr) else pgr, **extra}


# -- reward-model and generation tasks ----------------------------------------------------------------------------


def reward_inputs(config: WeakToStrongConfig, settings: RewardTaskSettings, folder: Path) -> dict[str, Any]:
    """The chat model's sampled answers to every prompt with their gold rewards (`samples.json`), and each answer's
    weak and strong features (`features.pt`), made once."""
    import torch

    from trustray.core.influence.warmup import LoraSettings
    from trustray.data.preferences import build_oracle, load_prompts
    from trustray.models.engines import EngineConfig

    samples_file, features_file = folder / "samples.json", folder / "features.pt"
    expected = {"kind": "w2s_reward_inputs", "model_fingerprint": model_fingerprint(config.model),
                "dtype": config.dtype, "task": settings.model_dump(mode="json")}
    if check_metadata(folder, expected, kind="weak-to-strong reward inputs"):
        features = torch.load(features_file, map_location="cpu", weights_only=True)
        return {**json.loads(samples_file.read_text()), "features": features}
    depth = model_depth(config.model)
    if settings.weak_layers >= depth:
        raise ValueError(f"weak_layers ({settings.weak_layers}) must be below the model's {depth} layers")
    counts = settings.prompts
    prompts = load_prompts(settings.name, counts.train + counts.test, seed=0)
    engine = EngineConfig(model=config.model, engine="hf", dtype=config.dtype,
                          torch_threads=config.resources.policy.torch_threads)
    worker_args = (engine, LoraSettings(), settings.max_length, settings.pooling)
    if config.resources.in_process:
        from trustray.actors.policy import PolicyWorker

        worker = PolicyWorker(*worker_args)

        def call(method: str, *args: Any) -> Any:
            return getattr(worker, method)(*args)
    else:
        import ray

        from trustray.actors.policy import start_policy_worker

        worker = start_policy_worker(*worker_args, config.resources.policy)

        def call(method: str, *args: Any) -> Any:
            return ray.get(getattr(worker, method).remote(*args))
    try:
        logger.info("%s: sampling %d answers to each of %d prompts", settings.name, settings.samples_per_prompt,
                    len(prompts))
        answers = call("sample", [p.messages() for p in prompts], settings.samples_per_prompt, settings.max_tokens,
                       settings.temperature, 0)
        texts = [[answer["text"] for answer in per_prompt] for per_prompt in answers]
        conversations = [(p.messages(), text) for p, per_prompt in zip(prompts, texts, strict=True)
                         for text in per_prompt]
        features = call("layer_features", conversations, [settings.weak_layers, depth])
    finally:
        if not config.resources.in_process:
            ray.kill(worker)
    oracle = build_oracle(settings.name)
    gold = [[oracle.reward(p, text) for text in per_prompt] for p, per_prompt in zip(prompts, texts, strict=True)]
    samples = {"prompts": [p.id for p in prompts], "texts": texts, "gold": gold}
    features = {"weak": features[settings.weak_layers], "strong": features[depth]}
    with atomic_folder(folder) as tmp:
        (tmp / "samples.json").write_text(json.dumps(samples))
        torch.save(features, tmp / "features.pt")
        write_metadata(tmp, expected)
    return {**samples, "features": features}


def prompt_pairs(prompts: list[int], samples: int, label, rng: random.Random
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of each prompt's answers as flat answer indices (a, b) in a random order, with the label
    `label(prompt, a, b)` returns (1: a wins, 0: b wins, None: no label, the pair is dropped)."""
    firsts, seconds, wins = [], [], []
    for prompt in prompts:
        for i, j in itertools.combinations(range(samples), 2):
            a, b = (i, j) if rng.random() < 0.5 else (j, i)
            won = label(prompt, a, b)
            if won is None:
                continue
            firsts.append(prompt * samples + a)
            seconds.append(prompt * samples + b)
            wins.append(won)
    return np.array(firsts, dtype=np.int64), np.array(seconds, dtype=np.int64), np.array(wins, dtype=np.int64)


def pair_head(inputs_file: Path, dimension: int, train: list[int]) -> dict[str, Any]:
    """A Bradley–Terry reward model: a bias-free linear head on answer-feature differences (see `LinearHead`)."""
    return {"kind": "linear", "dimension": dimension, "num_classes": 2, "bias": False, "train_indices": train,
            "inputs_file": str(inputs_file)}


def run_reward(config: WeakToStrongConfig, settings: RewardTaskSettings, out: Path, runner: Runner
               ) -> list[dict[str, Any]]:
    import torch

    from trustray.core.w2s.protocol import split_halves
    from trustray.data.preferences import build_oracle, load_prompts

    folder = out / settings.name
    inputs = reward_inputs(config, settings, folder / "inputs")
    counts, samples = settings.prompts, settings.samples_per_prompt
    prompts = load_prompts(settings.name, counts.train + counts.test, seed=0)
    texts, gold = inputs["texts"], inputs["gold"]
    oracle = build_oracle(settings.name, **settings.oracle.model_dump())

    def oracle_label(prompt: int, a: int, b: int) -> int | None:
        said = oracle.label(prompts[prompt], texts[prompt][a], texts[prompt][b])
        return {"a": 1, "b": 0}.get(said)

    def gold_label(prompt: int, a: int, b: int) -> int | None:
        difference = gold[prompt][a] - gold[prompt][b]
        return None if difference == 0 else int(difference > 0)

    test_prompts = list(range(counts.train, counts.train + counts.test))
    test_a, test_b, test_wins = prompt_pairs(test_prompts, samples, gold_label, random.Random(0))
    if len(test_wins) == 0:
        raise ValueError(f"{settings.name}: every held-out pair has equal gold rewards; nothing can be scored")
    # Best-of-n: each held-out answer compared with its prompt's first answer ranks the prompt's answers.
    answers = [prompt * samples + i for prompt in test_prompts for i in range(samples)]
    anchors = [prompt * samples for prompt in test_prompts for _ in range(samples)]
    gold_of = np.array([gold[p][i] for p in test_prompts for i in range(samples)]).reshape(len(test_prompts), samples)
    rows = []
    for seed in config.seeds:
        seed_dir = folder / f"seed-{seed}"
        half1, half2 = split_halves(counts.train, seed)
        train_a, train_b, train_wins = prompt_pairs(half1, samples, oracle_label, random.Random(seed))
        truth_a, truth_b, truth_wins = prompt_pairs(half2, samples, oracle_label, random.Random(seed + 1))
        pair_files = {}
        for side in ("weak", "strong"):
            features = inputs["features"][side]
            pairs = np.concatenate([[train_a, train_b], [truth_a, truth_b], [test_a, test_b],
                                    [np.array(answers), np.array(anchors)]], axis=1)
            pair_files[side] = seed_dir / "inputs" / f"{side}-pairs.pt"
            if not pair_files[side].is_file():
                pair_files[side].parent.mkdir(parents=True, exist_ok=True)
                tmp = pair_files[side].with_suffix(".tmp")
                torch.save(features[pairs[0]] - features[pairs[1]], tmp)
                tmp.rename(pair_files[side])
        offsets = np.cumsum([0, len(train_a), len(truth_a), len(test_a), len(answers)])
        part = {name: list(range(offsets[i], offsets[i + 1]))
                for i, name in enumerate(("half1", "half2", "test", "answers"))}
        dimension = int(inputs["features"]["weak"].shape[1])
        weak_head = pair_head(pair_files["weak"], dimension, part["half1"])
        strong_head = pair_head(pair_files["strong"], dimension, part["half2"])

        # Class 0 is "a wins": P(a ≻ b) is the first probability.
        def targets(wins: np.ndarray) -> np.ndarray:
            return one_hot(1 - wins, 2)

        heads = config.training.heads
        predict = {"test": part["test"], "answers": part["answers"]}
        weak = runner.unit(seed_dir / "weak", weak_head, targets(train_wins), "xent", heads, seed,
                           {**predict, "half2": part["half2"]})
        ceiling = runner.unit(seed_dir / "ceiling", strong_head, targets(truth_wins), "xent", heads,
                              seed, predict)

        def pair_accuracy(predictions: dict[str, np.ndarray]) -> float:
            return float(((predictions["test"][:, 0] > 0.5).astype(int) == test_wins).mean())

        def best_of_n(predictions: dict[str, np.ndarray]) -> float:
            picked = predictions["answers"][:, 0].reshape(len(test_prompts), samples).argmax(axis=1)
            return float(gold_of[np.arange(len(test_prompts)), picked].mean())

        references = {"random_answer": float(gold_of.mean()), "best_answer": float(gold_of.max(axis=1).mean())}
        for loss in config.losses:
            student = runner.unit(seed_dir / f"student-{loss}", strong_head, weak["half2"], loss,
                                  heads, seed, predict)
            rows.append(row(settings.name, "reward_model", loss, seed, pair_accuracy(weak), pair_accuracy(ceiling),
                            pair_accuracy(student), pairs={"half1": len(train_a), "half2": len(truth_a),
                                                           "test": len(test_a)},
                            weak_label_accuracy=float(((weak["half2"][:, 0] > 0.5) == truth_wins).mean())))
            rows.append(row(settings.name, "generation", loss, seed, best_of_n(weak), best_of_n(ceiling),
                            best_of_n(student), n=samples, **references))
        logger.info("%s seed %d: pair accuracy weak %.3f ceiling %.3f; best-of-%d gold reward weak %.3f ceiling %.3f",
                    settings.name, seed, pair_accuracy(weak), pair_accuracy(ceiling), samples, best_of_n(weak),
                    best_of_n(ceiling))
    return rows


# -- the run ------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, kind, loss): intervals over seeds of weak, ceiling, student, the gap and PGR."""
    from trustray.core.w2s.protocol import summarize_pgr

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for entry in rows:
        groups.setdefault((entry["task"], entry["kind"], entry["loss"]), []).append(entry)
    return [{"task": task, "kind": kind, "loss": loss,
             **summarize_pgr([r["weak"] for r in group], [r["ceiling"] for r in group], [r["student"] for r in group])}
            for (task, kind, loss), group in groups.items()]


def expected_metadata(config: WeakToStrongConfig) -> dict[str, Any]:
    """What a rerun must agree on: the model and the training settings (tasks, seeds and losses may be added)."""
    return {"kind": "weak_to_strong", "model_fingerprint": model_fingerprint(config.model), "dtype": config.dtype,
            "strong_trainable_layers": config.strong_trainable_layers,
            "loss_settings": config.loss_settings, "training": config.training.model_dump(mode="json")}


def run(config: WeakToStrongConfig) -> Path:
    """Every task, seed and loss not finished yet; returns `results.json`."""
    import torch

    from trustray.runtime import machine_info

    out = prepare_output(config).resolve()
    if not check_metadata(out, expected_metadata(config), kind="weak-to-strong run"):
        write_metadata(out, expected_metadata(config))
    if config.resources.torch_threads:
        torch.set_num_threads(config.resources.torch_threads)
    runner = Runner(config)
    rows = []
    for settings in config.classification:
        rows += run_classification(config, settings, out, runner)
    for settings in config.reward:
        rows += run_reward(config, settings, out, runner)
    results = out / "results.json"
    atomic_write_text(results, json.dumps({"machine": machine_info(), "config": config.model_dump(mode="json"),
                                           "rows": rows, "summary": summarize(rows)}, indent=2))
    return results


def table(results_path: Path) -> str:
    """PGR per task, kind and loss: mean over seeds with the weak and ceiling scores it sits between."""
    results = json.loads(Path(results_path).read_text())
    lines = [f"{'task':<14}{'kind':<16}{'loss':<9}{'weak':>7}{'ceiling':>9}{'student':>9}{'PGR':>8}"]
    for entry in results["summary"]:
        pgr = "-" if entry["pgr"] is None else f"{entry['pgr']['mean']:.2f}"
        lines.append(f"{entry['task']:<14}{entry['kind']:<16}{entry['loss']:<9}{entry['weak']['mean']:>7.3f}"
                     f"{entry['ceiling']['mean']:>9.3f}{entry['student']['mean']:>9.3f}{pgr:>8}")
    return "\n".join(lines)


PIPELINE = {"config": WeakToStrongConfig, "run": run, "table": table}

if __name__ == "__main__":
    from trustray.pipelines import run_module

    run_module("weak_to_strong")
