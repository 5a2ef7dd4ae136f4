"""Active preference learning: an online loop that asks a labeler only about the pairs the models are unsure of.

    trustray run active_preference --config configs/active_preference/<tiny|cpu|gpu>.yaml [key=value ...]
    python -m trustray.pipelines.active_preference --config ...

The task's prompts (`trustray.data.preferences`) are split by the seed into three disjoint sets:
- the **pool**: per prompt, `samples_per_prompt` responses sampled from the policy (temperature one), paired
  (0, 1), (2, 3), ... — the candidate pairs the loop may ask about;
- the **eval** prompts: the trained policy answers them (greedy and at `eval_temperature`), and the oracle's gold
  reward judges each answer against the initial policy's answer (win rate, ties counted one half);
- the **held-out** prompts: their sampled pairs are labelled once by the oracle to measure the reward model
  (accuracy, and calibration: the temperature is fitted on half of them, by prompt, and ECE reported on the other
  half). These are the evaluation's labels: never trained on, never counted in a budget.

One round per entry of `budgets` (the number of labels asked for so far; ties and skips count, they were asked):
1. candidates: the pool's pairs not asked about yet (sampled once from the initial policy; with `regenerate`,
   sampled again from the current policy every round). With `probe` (selective generation), every pool prompt
   first gets a few short sampled prefixes, whose per-token log-probabilities under the policy estimate its
   predictive entropy, and only the `probe.keep` share of prompts with the highest entropy get full responses:
   fewer generated tokens for the same labels (`probe.rank_by: random` keeps a random share instead, without
   prefixes: the control that tells the probe's choice from merely having fewer candidates);
2. the statistics the acquisition function needs (`trustray.core.align.acquisition`), computed by the policy
   worker and the reward model: the policy's predictive entropy of each prompt (from its sampled responses'
   log-probabilities under the current policy), DPO's implicit reward margin, the reward ensemble's disagreement,
   the Mahalanobis OOD score. Before any preference is known there is no reward model: a first round that needs
   one picks at random, and says so in the log and in its metrics (`acquired_by`);
3. the acquired pairs are labelled — by the oracle (`trustray.data.preferences`), or by people: the pairs go into
   the labeling service's database (`labeler: service`, `trustray label` serves them) and the round waits for
   their labels up to `service.timeout_s` — and written to `labels.jsonl` before anything is trained on them, so a
   killed run never asks for a label twice;
4. the reward ensemble is refitted on every preference so far (frozen features, `trustray.core.align.reward`);
5. DPO trains fresh LoRA adapters on every preference so far (`trustray.core.align.dpo`), on Ray Train, one
   worker (or in this process with `resources.in_process`: many short runs, as the benchmark grid makes, would
   otherwise spend more time starting Ray Train than training); checkpoints are resumable;
6. the new adapter is swapped into the policy worker in place, and the round is evaluated: win rates, the reward
   model's held-out accuracy and calibration, and selective generation (the greedy answers' rewards as a filter:
   risk–coverage and AURC against the oracle's `acceptable_reward` bar, thresholds calibrated on half the eval
   prompts and reported on the other half). The round's reward model is saved servable (`reward_model/`: the
   ensemble with its calibrated temperature, the OOD Gaussian and threshold, the risk table), and `metrics.json`
   is written last: a round without it is redone from the first step it has not finished.

Output folder: `metadata.json` (the settings a resume must agree with; budgets may grow), `pool.json`,
`fixtures.json` (eval and held-out responses of the initial policy), `rounds/labels-<n>/{labels.jsonl, dpo/,
reward_model/, metrics.json}`, and at the end `preferences.jsonl` (every preference, TRL's conversational
format) and `summary.json` (settings and per-round metrics).

Where `chat.engine` resolves to vLLM (`vllm`, or `auto` on a CUDA machine: `trustray.models.engine_factory`), every
response — candidates, probes, eval answers — is sampled on a `GenerationPool` of vLLM chat-model actors
(`resources.generators`) holding the current policy's adapter, and the policy worker (always transformers) only
scores; otherwise the policy worker samples too. vLLM and transformers sample different responses from the same
seed, so the engine that samples is a setting a resumed run must agree with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from trustray.artifacts import atomic_write_text, check_metadata, write_metadata
from trustray.config import ActorResources, BaseConfig, PipelineConfig, PoolResources, TrainWorkerResources
from trustray.core.align.dpo import DPOSettings
from trustray.models.engines import EngineConfig
from trustray.models.sources import model_fingerprint
from trustray.pipelines import prepare_output
from trustray.pipelines.training import STEP_FILE, SteppedTrainerTask, TrainingPlan, WorkerContext

logger = logging.getLogger(__name__)


class PromptCounts(BaseConfig):
    """How many of the task's prompts go to each disjoint set."""

    pool: int = Field(192, ge=1, description="Prompts whose response pairs the loop may ask about.")
    eval: int = Field(48, ge=2, description="Prompts the trained policy answers for the win rate "
                      "(half of them also calibrate selective generation, the other half report it).")
    heldout: int = Field(48, ge=2, description="Prompts whose oracle-labelled pairs measure the reward model.")


class OracleSettings(BaseConfig):
    """The programmatic labeler (`trustray.data.preferences`)."""

    temperature: float = Field(0.1, ge=0, description="Bradley–Terry noise τ of its labels (0: deterministic).")
    tie_margin: float = Field(0.0, ge=0, description="Gold-reward gaps up to this are labelled a tie.")
    skip_rate: float = Field(0.0, ge=0, lt=1, description="Share of questions the labeler skips.")
    seed: int = Field(0, description="Seeds the labels' noise.")


class ServiceLabelerSettings(BaseConfig):
    """People labeling through the labeling service (`trustray label`), which shares this SQLite file."""

    db: str = Field("outputs/labels/labels.sqlite", description="The labeling service's database file.")
    timeout_s: float = Field(3600.0, gt=0, description="How long a round waits for its labels; pairs still "
                             "unlabelled then count as skipped (asked, no answer) and are logged.")
    poll_s: float = Field(2.0, gt=0, description="Seconds between looks at the database.")


class RewardModelSettings(BaseConfig):
    """The reward ensemble on frozen features (`trustray.core.align.reward`)."""

    heads: int = Field(5, ge=1, description="Bootstrap heads.")
    l2: float = Field(1.0, ge=0, description="L2 penalty of each head.")
    pooling: Literal["last", "mean"] = Field("mean", description="Feature pooling over the response.")


class PublishSettings(BaseConfig):
    """Where each round's policy adapter is published for the serving chat deployment (its `adapters.store_dir`)."""

    store_dir: str = Field(..., description="The adapter store folder the Serve app reads.")
    name: str = Field("aligned", description="The public model name the policy is served as.")


class ProbeSettings(BaseConfig):
    """Selective generation on the acquisition side: short sampled prefixes of every pool prompt estimate the
    policy's predictive entropy, and only the most uncertain prompts get full response pairs."""

    samples: int = Field(4, ge=2, description="Prefixes sampled per prompt.")
    tokens: int = Field(6, ge=1, description="Tokens per prefix.")
    keep: float = Field(0.5, gt=0, le=1, description="Share of the pool prompts that get full responses.")
    rank_by: Literal["entropy", "random"] = Field("entropy", description="entropy: keep the prompts whose prefixes "
                                                  "have the highest predictive entropy; random: a control that keeps "
                                                  "a random `keep` share and samples no prefixes.")


class LoopResources(BaseConfig):
    """Where the loop's models run."""

    in_process: bool = Field(False, description="Run the policy worker and the DPO updates in this process instead "
                             "of a Ray actor and Ray Train.")
    policy: ActorResources = Field(default_factory=ActorResources, description="The policy worker actor.")
    generators: PoolResources = Field(default_factory=lambda: PoolResources(size=1), description="The vLLM actors "
                                      "that sample responses when chat.engine resolves to vLLM (size 1 in process).")
    train: TrainWorkerResources = Field(default_factory=TrainWorkerResources, description="The DPO worker.")


class ActivePreferenceConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/active_preference"

    task: Literal["factual", "sentiment"] = Field("sentiment", description="The preference task.")
    acquisition: str = Field("random", description="Acquisition function (trustray.core.align.acquisition).")
    seed: int = Field(0, description="Seeds the prompt split, the sampling, the acquisition's tie-breaks and DPO.")
    prompts: PromptCounts = Field(default_factory=PromptCounts, description="Prompt sets.")
    samples_per_prompt: int = Field(4, ge=2, description="Responses sampled per pool prompt (an even number).")
    max_tokens: int = Field(24, ge=1, description="Longest response generated.")
    budgets: list[int] = Field(default_factory=lambda: [32, 64, 128],
                               description="Labels asked for by the end of each round (increasing).")
    regenerate: bool = Field(False, description="Sample the pool again from the current policy every round.")
    probe: ProbeSettings | None = Field(None, description="Probe the pool prompts before sampling full responses "
                                        "(selective generation); None: every pool prompt gets full responses.")
    eval_temperature: float = Field(0.7, gt=0, le=2, description="Sampling temperature of the second win rate.")
    acceptable_reward: float = Field(0.5, description="Selective generation: an answer whose gold reward is at least "
                                     "this is acceptable (factual: the gold answer is in it; sentiment: clearly "
                                     "positive).")
    labeler: Literal["oracle", "service"] = Field("oracle", description="Who labels: the task's programmatic "
                                                  "oracle, or people through the labeling service.")
    oracle: OracleSettings = Field(default_factory=OracleSettings, description="The oracle (it also judges the "
                                   "evaluation's win rates and labels its held-out pairs either way).")
    service: ServiceLabelerSettings = Field(default_factory=ServiceLabelerSettings, description="labeler: service.")
    reward_model: RewardModelSettings = Field(default_factory=RewardModelSettings, description="The reward model.")
    dpo: DPOSettings = Field(default_factory=DPOSettings, description="DPO updates of the policy.")
    chat: EngineConfig = Field(default_factory=EngineConfig, description="The chat model (the initial policy).")
    publish: PublishSettings | None = Field(None, description="Publish each round's policy to a serving app's "
                                            "adapter store (hot-swapped there without a restart); None: do not.")
    resources: LoopResources = Field(default_factory=LoopResources, description="Resources.")

    @field_validator("acquisition")
    @classmethod
    def _known_acquisition(cls, name: str) -> str:
        from trustray.core.align.acquisition import get_acquisition

        get_acquisition(name)
        return name

    @model_validator(mode="after")
    def _check(self) -> ActivePreferenceConfig:
        if self.samples_per_prompt % 2:
            raise ValueError(f"samples_per_prompt must be even (responses are paired), got {self.samples_per_prompt}")
        if not self.budgets or any(b <= a for a, b in zip([0, *self.budgets], self.budgets, strict=False)):
            raise ValueError(f"budgets must be positive and increasing, got {self.budgets}")
        return self


# -- the parts a round is made of --------------------------------------------------------------------------------


def split_prompts(config: ActivePreferenceConfig) -> dict[str, list]:
    """The task's prompts, shuffled by the seed, cut into the pool, eval and held-out sets."""
    from trustray.data.preferences import load_prompts

    counts = config.prompts
    prompts = load_prompts(config.task, counts.pool + counts.eval + counts.heldout, seed=config.seed)
    return {"pool": prompts[: counts.pool], "eval": prompts[counts.pool : counts.pool + counts.eval],
            "heldout": prompts[counts.pool + counts.eval :]}


def paired(prompt_index: int, responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A prompt's responses paired (0, 1), (2, 3), ...: `{"prompt_index", "a", "b", "tokens"}`."""
    return [{"prompt_index": prompt_index, "a": responses[i]["text"], "b": responses[i + 1]["text"],
             "tokens": responses[i]["tokens"] + responses[i + 1]["tokens"]} for i in range(0, len(responses), 2)]


def sampling_engine(chat: EngineConfig) -> tuple[str, str]:
    """The engine that samples the loop's responses ("vllm" or "hf"; module docstring) and why."""
    from trustray.models.engine_factory import choose_engine

    return choose_engine(chat)


def pair_key(pair: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([pair["prompt_index"], pair["a"], pair["b"]]).encode()).hexdigest()[:16]


class Loop:
    """One run's state between rounds and the calls a round makes; `call` reaches the policy worker wherever it
    runs."""

    def __init__(self, config: ActivePreferenceConfig, out: Path):
        from trustray.data.preferences import build_oracle

        self.config, self.out = config, out
        self.prompts = split_prompts(config)
        self.oracle = build_oracle(config.task, **config.oracle.model_dump())
        self.worker = self._start_worker()
        self.generators = self._start_generators()
        self.labels: list[dict[str, Any]] = []  # every question asked so far, in order
        self.adapter: Path | None = None  # the newest policy's adapter folder (None: the initial policy)
        self.loaded: Path | None = None  # the adapter the worker holds

    # -- the policy worker ---------------------------------------------------------------------------------------
    def _start_worker(self):
        from trustray.actors.policy import PolicyWorker, start_policy_worker

        config = self.config
        args = (config.chat, config.dpo.lora, config.dpo.max_length, config.reward_model.pooling)
        if config.resources.in_process:
            return PolicyWorker(*args)
        return start_policy_worker(*args, config.resources.policy)

    def _start_generators(self):
        """The vLLM generation pool, or None where the policy worker samples (module docstring)."""
        from trustray.actors.generation import GenerationPool

        engine, reason = sampling_engine(self.config.chat)
        logger.info("responses are sampled by %s (%s)", engine, reason)
        if engine != "vllm":
            return None
        resources = self.config.resources
        return GenerationPool(self.config.chat.model_copy(update={"engine": "vllm"}), resources.generators,
                              in_process=resources.in_process)

    def close(self) -> None:
        """Stop the policy worker's actor and the generation pool (their CPUs go back to Ray at once, not when the
        handles are collected)."""
        if self.generators is not None:
            self.generators.close()
        if not self.config.resources.in_process:
            import ray

            ray.kill(self.worker)

    def call(self, method: str, *args: Any) -> Any:
        if self.config.resources.in_process:
            return getattr(self.worker, method)(*args)
        import ray

        return ray.get(getattr(self.worker, method).remote(*args))

    def sample(self, prompts: list, samples: int, temperature: float, seed: int,
               max_tokens: int | None = None) -> list[list[dict[str, Any]]]:
        messages = [p.messages() for p in prompts]
        max_tokens = max_tokens or self.config.max_tokens
        if self.generators is not None:
            from trustray.actors.policy import POLICY

            return self.generators.sample(messages, samples, max_tokens, temperature, seed,
                                          POLICY if self.loaded is not None else None)
        return self.call("sample", messages, samples, max_tokens, temperature, seed)

    def load_policy(self, adapter: Path) -> float:
        """Swap `adapter` in as the policy wherever responses are scored or sampled; returns the seconds the swap
        took where it ran (the policy worker and the generation pool load it at the same time, or one after the
        other in this process)."""
        from trustray.actors.policy import POLICY

        if self.generators is None or self.config.resources.in_process:
            seconds = self.call("load_policy", str(adapter))
            if self.generators is not None:
                seconds += self.generators.load_adapter(POLICY, str(adapter))
        else:
            import ray

            loading = self.worker.load_policy.remote(str(adapter))
            seconds = max(self.generators.load_adapter(POLICY, str(adapter)), ray.get(loading))
        self.loaded = adapter
        return seconds

    def conversations(self, pairs: list[dict[str, Any]], prompts: list, side: str) -> list[tuple]:
        return [(prompts[pair["prompt_index"]].messages(), pair[side]) for pair in pairs]

    # -- cached inputs -------------------------------------------------------------------------------------------
    def cached(self, name: str, make) -> Any:
        """`name`.json in the output folder, made once by `make()` (the initial policy's samples)."""
        path = self.out / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = make()
        atomic_write_text(path, json.dumps(value))
        return value

    def pool_pairs(self, round_dir: Path) -> list[dict[str, Any]]:
        """The candidate pairs of a round: sampled once from the initial policy (`pool.json`), or with `regenerate`
        from the current policy in every round after the first (`candidates.json`). With `probe`, only the prompts
        the probe finds most uncertain get full responses (`<file>.probe.json` records it)."""
        path = (round_dir / "candidates.json" if self.config.regenerate and self.adapter is not None
                else self.out / "pool.json")
        if not path.is_file():
            atomic_write_text(path, json.dumps(self.sample_candidates(path.with_suffix(".probe.json"))))
        return json.loads(path.read_text())

    def sample_candidates(self, probe_file: Path) -> list[dict[str, Any]]:
        """Sample the pool prompts' responses and pair them; a probe first picks which prompts (module docstring)."""
        config, prompts = self.config, self.prompts["pool"]
        seed = config.seed * 1000 + len(self.labels)
        chosen, probe = list(range(len(prompts))), config.probe
        if probe is not None:
            keep = max(1, math.ceil(probe.keep * len(prompts)))
            if probe.rank_by == "random":
                chosen = sorted(np.random.default_rng(seed + 777).choice(len(prompts), keep, replace=False).tolist())
                tokens = 0
            else:
                prefixes = self.sample(prompts, probe.samples, 1.0, seed + 777, max_tokens=probe.tokens)
                conversations = [(prompts[i].messages(), row["text"]) for i, rows in enumerate(prefixes)
                                 for row in rows]
                scored = self.call("logprobs", conversations, True)
                per_token = np.array(scored["logprobs"]) / np.maximum(np.array(scored["lengths"]), 1)
                entropy = -per_token.reshape(len(prompts), probe.samples).mean(axis=1)
                chosen = sorted(np.argsort(-entropy, kind="stable")[:keep].tolist())
                tokens = sum(row["tokens"] for rows in prefixes for row in rows)
            atomic_write_text(probe_file, json.dumps({"tokens": tokens, "kept_prompts": chosen}))
        responses = self.sample([prompts[i] for i in chosen], config.samples_per_prompt, 1.0, seed)
        return [pair for index, rows in zip(chosen, responses, strict=True) for pair in paired(index, rows)]

    def generated_tokens(self, last_budget: int) -> int:
        """Tokens generated for candidates up to the round of `last_budget`: the pool, regenerated candidates and
        the probes' prefixes."""
        files = [self.out / "pool.json"] + [self.out / "rounds" / f"labels-{budget}" / "candidates.json"
                                            for budget in self.config.budgets if budget <= last_budget]
        total = 0
        for path in files:
            if path.is_file():
                total += sum(pair["tokens"] for pair in json.loads(path.read_text()))
                probe = path.with_suffix(".probe.json")
                total += json.loads(probe.read_text())["tokens"] if probe.is_file() else 0
        return total

    def ensure_policy(self) -> None:
        """The worker's policy is the newest adapter (after a resume it may still be the initial policy)."""
        if self.adapter is not None and self.loaded != self.adapter:
            self.load_policy(self.adapter)

    def fixtures(self) -> dict[str, Any]:
        """The initial policy's eval answers (greedy, sampled) and the held-out pairs with their oracle labels."""
        config = self.config

        def make() -> dict[str, Any]:
            heldout = [pair for index, rows in enumerate(self.sample(self.prompts["heldout"], config.samples_per_prompt,
                                                                     1.0, config.seed * 1000 + 500))
                       for pair in paired(index, rows)]
            for pair in heldout:
                pair["label"] = self.oracle.label(self.prompts["heldout"][pair["prompt_index"]], pair["a"], pair["b"])
            return {"eval_greedy": [rows[0]["text"] for rows in self.sample(self.prompts["eval"], 1, 0.0, 0)],
                    "eval_sampled": [rows[0]["text"] for rows in self.sample(self.prompts["eval"], 1,
                                                                              config.eval_temperature, 7)],
                    "heldout": heldout}

        return self.cached("fixtures", make)

    # -- one round -----------------------------------------------------------------------------------------------
    def preferences(self) -> list[dict[str, Any]]:
        """The questions so far that gave a preference (ties and skips carry none)."""
        return [row for row in self.labels if row["label"] in ("a", "b")]

    def reward_model(self):
        """The reward ensemble fitted on every preference so far (None before there is one)."""
        import torch

        from trustray.core.align.reward import RewardEnsemble

        preferences = self.preferences()
        if not preferences:
            return None
        prompts = self.prompts["pool"]
        a, b = (self.call("features", self.conversations(preferences, prompts, side)) for side in ("a", "b"))
        a_won = torch.tensor([row["label"] == "a" for row in preferences])[:, None]
        settings = self.config.reward_model
        return RewardEnsemble(heads=settings.heads, l2=settings.l2, seed=self.config.seed).fit(
            torch.where(a_won, a, b), torch.where(a_won, b, a))

    def statistics(self, pairs: list[dict[str, Any]], needs: tuple[str, ...], reward_model) -> dict[str, np.ndarray]:
        """The acquisition statistics of the candidate pairs (module docstring, step 2)."""
        import torch

        from trustray.core.align.uncertainty import MahalanobisOOD, implicit_reward_margin

        prompts, stats = self.prompts["pool"], {}
        if {"policy_entropy", "implicit_margin"} & set(needs):
            conversations = self.conversations(pairs, prompts, "a") + self.conversations(pairs, prompts, "b")
            policy = self.call("logprobs", conversations, True)
            logprob, length = np.array(policy["logprobs"]), np.array(policy["lengths"])
            if "policy_entropy" in needs:  # −mean over the prompt's responses of log π(y|x) per token
                per_token = logprob / np.maximum(length, 1)
                index = np.array([pair["prompt_index"] for pair in pairs] * 2)
                entropy = {p: -per_token[index == p].mean() for p in set(index.tolist())}
                stats["policy_entropy"] = np.array([entropy[pair["prompt_index"]] for pair in pairs])
            if "implicit_margin" in needs:
                reference = np.array(self.call("logprobs", conversations, False)["logprobs"])
                n = len(pairs)
                stats["implicit_margin"] = implicit_reward_margin(
                    torch.tensor(logprob[:n]), torch.tensor(reference[:n]), torch.tensor(logprob[n:]),
                    torch.tensor(reference[n:]), self.config.dpo.beta).numpy()
        if {"ensemble_variance", "ood_score"} & set(needs):
            a, b = (self.call("features", self.conversations(pairs, prompts, side)) for side in ("a", "b"))
            if "ensemble_variance" in needs:
                stats["ensemble_variance"] = reward_model.compare(a, b).variance.numpy()
            if "ood_score" in needs:
                preferences = self.preferences()
                seen = torch.cat([self.call("features", self.conversations(preferences, prompts, side))
                                  for side in ("a", "b")])
                ood = MahalanobisOOD(seen)
                stats["ood_score"] = ((ood.score(a) + ood.score(b)) / 2).numpy()
        return stats

    def acquire(self, budget: int, round_dir: Path) -> tuple[list[dict[str, Any]], str]:
        """Step 1–3: the pairs to ask about, labelled by the oracle; and which function picked them."""
        from trustray.core.align.acquisition import CandidatePool, acquire, get_acquisition

        asked = {row["pair_key"] for row in self.labels}
        candidates = [pair for pair in self.pool_pairs(round_dir) if pair_key(pair) not in asked]
        name = self.config.acquisition
        needs = get_acquisition(name).needs
        reward_model = self.reward_model()
        if reward_model is None and {"ensemble_variance", "ood_score"} & set(needs):
            logger.warning("no preference yet, so no reward model: the first round of %r acquires at random", name)
            name, needs = "random", ()
        pool = CandidatePool(np.array([pair["prompt_index"] for pair in candidates]),
                             self.statistics(candidates, needs, reward_model))
        picked = acquire(name, pool, budget - len(self.labels), seed=self.config.seed * 1000 + budget)
        rows = []
        for index in picked:
            pair = candidates[index]
            prompt = self.prompts["pool"][pair["prompt_index"]]
            rows.append({"pair_key": pair_key(pair), "prompt_index": pair["prompt_index"], "prompt_id": prompt.id,
                         "a": pair["a"], "b": pair["b"], "budget": budget})
        self.label(rows)
        return rows, name

    def label(self, rows: list[dict[str, Any]]) -> None:
        """Step 3: each row's `label`, from the oracle or from people through the labeling service's database
        (rows already there from a killed run are not added again; their labels are read back)."""
        prompts = self.prompts["pool"]
        if self.config.labeler == "oracle":
            for row in rows:
                row["label"] = self.oracle.label(prompts[row["prompt_index"]], row["a"], row["b"])
            return
        from trustray.data.label_store import LabelStore

        settings = self.config.service
        store = LabelStore(settings.db)
        store.add_items({"id": row["pair_key"], "prompt": prompts[row["prompt_index"]].messages(), "a": row["a"],
                         "b": row["b"], "prompt_id": row["prompt_id"], "budget": row["budget"]} for row in rows)
        logger.info("waiting up to %.0f s for %d labels in %s", settings.timeout_s, len(rows), settings.db)
        labels = store.wait_for_labels([row["pair_key"] for row in rows], settings.timeout_s, settings.poll_s)
        for row in rows:
            row["label"] = labels.get(row["pair_key"], "skip")
            row["timed_out"] = row["pair_key"] not in labels
        timed_out = sum(row["timed_out"] for row in rows)
        if timed_out:
            logger.warning("%d of %d pairs got no label within %.0f s: counted as skipped", timed_out, len(rows),
                           settings.timeout_s)

    def train_policy(self, round_dir: Path) -> Path:
        """Step 5: DPO of fresh adapters on every preference so far; returns the adapter folder."""
        from trustray.models.loading import gpu_or_cpu
        from trustray.pipelines.training import run_in_process, run_training

        config = self.config
        prompts = self.prompts["pool"]
        pairs = [(prompts[row["prompt_index"]].messages(), *((row["a"], row["b"]) if row["label"] == "a"
                                                               else (row["b"], row["a"])))
                 for row in self.preferences()]
        steps = math.ceil(len(pairs) / config.dpo.batch_size) * config.dpo.epochs
        plan = TrainingPlan.every(round_dir / "dpo", steps, max(1, steps // 2), keep=1)
        data = {"model": config.chat.model, "dtype": config.chat.dtype, "settings": config.dpo, "pairs": pairs,
                "seed": config.seed}
        if config.resources.in_process:
            return run_in_process(DPOTraining, data, plan, gpu_or_cpu(config.resources.train.use_gpu))
        return run_training(DPOTraining, data, plan, config.resources.train, round_dir)

    def evaluate(self, fixtures: dict[str, Any], reward_model) -> tuple[dict[str, Any], dict[str, Any]]:
        """Step 6: win rates and gold rewards on the eval prompts; the reward model on the held-out pairs (accuracy,
        calibration, the OOD threshold) and as a selective-generation filter on the greedy answers. Returns the
        metrics and what the saved reward model carries (OOD threshold, risk table)."""
        import torch

        from trustray.core.align.calibration import expected_calibration_error
        from trustray.core.align.selective import aurc, risk_coverage, threshold_for_risk
        from trustray.core.align.uncertainty import GaussianFeatures

        config, prompts = self.config, self.prompts["eval"]
        metrics: dict[str, Any] = {}
        greedy: list[str] = []
        for mode, temperature, seed in (("greedy", 0.0, 0), ("sampled", config.eval_temperature, 7)):
            answers = [rows[0]["text"] for rows in self.sample(prompts, 1, temperature, seed)]
            greedy = greedy or answers
            ours = [self.oracle.reward(p, text) for p, text in zip(prompts, answers, strict=True)]
            initial = [self.oracle.reward(p, text) for p, text in zip(prompts, fixtures[f"eval_{mode}"], strict=True)]
            metrics[f"win_rate_{mode}"] = float(np.mean([1.0 if x > y else 0.5 if x == y else 0.0
                                                         for x, y in zip(ours, initial, strict=True)]))
            metrics[f"gold_reward_{mode}"] = float(np.mean(ours))
            metrics[f"initial_gold_reward_{mode}"] = float(np.mean(initial))
        heldout = [pair for pair in fixtures["heldout"] if pair["label"] in ("a", "b")]
        heldout_prompts = self.prompts["heldout"]
        a, b = (self.call("features", self.conversations(heldout, heldout_prompts, side)) for side in ("a", "b"))
        outcome = torch.tensor([float(pair["label"] == "a") for pair in heldout])
        calibration = torch.tensor([pair["prompt_index"] % 2 == 0 for pair in heldout])
        test = ~calibration
        before = reward_model.compare(a[test], b[test]).probability
        metrics["rm_accuracy"] = float(((before > 0.5).double() == outcome[test]).double().mean())
        metrics["ece_before"] = expected_calibration_error(before, outcome[test])
        metrics["rm_temperature"] = reward_model.calibrate(a[calibration], b[calibration], outcome[calibration])
        after = reward_model.compare(a[test], b[test]).probability
        metrics["ece_after"] = expected_calibration_error(after, outcome[test])
        # OOD: the Gaussian of the responses the reward model was trained on; held-out responses set the threshold.
        trained = torch.cat([self.call("features", self.conversations(self.preferences(), self.prompts["pool"], side))
                             for side in ("a", "b")])
        in_distribution = GaussianFeatures(trained)
        ood_threshold = float(torch.quantile(in_distribution.distance(torch.cat([a, b])), 0.95))
        # Selective generation: the greedy answers' rewards against the oracle's bar, calibrated on even prompts.
        rewards = reward_model.rewards(self.call("features", [(p.messages(), text) for p, text
                                                              in zip(prompts, greedy, strict=True)])).tolist()
        acceptable = [self.oracle.reward(p, text) >= config.acceptable_reward for p, text
                      in zip(prompts, greedy, strict=True)]
        halves = {name: [i for i in range(len(prompts)) if i % 2 == parity] for parity, name in
                  ((0, "calibration"), (1, "report"))}
        table = risk_coverage([rewards[i] for i in halves["calibration"]], [acceptable[i] for i in halves["calibration"]])
        report_scores = [rewards[i] for i in halves["report"]]
        report_ok = [acceptable[i] for i in halves["report"]]
        at_risk = []
        for max_risk in (0.1, 0.2, 0.3):
            threshold = threshold_for_risk(table, max_risk)
            kept = [ok for score, ok in zip(report_scores, report_ok, strict=True) if score >= threshold]
            at_risk.append({"max_risk": max_risk, "coverage": len(kept) / len(report_ok),
                            "risk": (1 - sum(kept) / len(kept)) if kept else None})
        metrics["selective"] = {"acceptable_share": float(np.mean(report_ok)),
                                "aurc": aurc(report_scores, report_ok), "at_risk": at_risk}
        return metrics, {"ood_threshold": ood_threshold, "in_distribution": in_distribution,
                         "selective": {"table": table, "acceptable_reward": config.acceptable_reward,
                                       "answers": len(halves["calibration"])}}


class DPOTraining(SteppedTrainerTask):
    """The DPO task of the shared training loop (`trustray.pipelines.training`): fresh adapters, seeded."""

    def __init__(self, data: dict[str, Any], context: WorkerContext):
        import torch

        from trustray.core.align.dpo import DPOTrainer
        from trustray.core.influence.warmup import add_lora
        from trustray.models.loading import load_causal_lm, load_tokenizer

        settings = data["settings"]
        torch.manual_seed(data["seed"])
        model = add_lora(load_causal_lm(data["model"], context.device, data["dtype"]), settings.lora)
        tokenizer = load_tokenizer(data["model"])
        self.trainer = DPOTrainer(model, tokenizer, data["pairs"], settings, seed=data["seed"])


def expected_metadata(config: ActivePreferenceConfig) -> dict[str, Any]:
    """What a resumed run must agree on: every setting but the budgets (a run may be extended), resources and where
    labels and policies go; settings left unset (None) are not recorded, so a run made before an optional setting
    existed still resumes."""
    settings = config.model_dump(mode="json", exclude_none=True, exclude={
        "budgets", "resources", "force", "name", "output_dir", "service", "publish"})
    # Recorded only for vLLM, so runs sampled by transformers before the pool existed still resume.
    sampled_by = {"sampled_by": "vllm"} if sampling_engine(config.chat)[0] == "vllm" else {}
    return {"kind": "active_preference", "model_fingerprint": model_fingerprint(config.chat.model), **settings,
            **sampled_by}


def run(config: ActivePreferenceConfig) -> Path:
    """Run (or resume) the loop up to the last budget; returns the run's `summary.json`."""
    out = prepare_output(config).resolve()
    if not check_metadata(out, expected_metadata(config), kind="active preference run"):
        write_metadata(out, expected_metadata(config))
    loop = Loop(config, out)
    try:
        return run_rounds(config, out, loop)
    finally:
        loop.close()


def run_rounds(config: ActivePreferenceConfig, out: Path, loop: Loop) -> Path:
    """Every round not finished yet (module docstring), then the exports; returns `summary.json`."""
    from trustray.core.align.reward import save_reward_model
    from trustray.data.preferences import labelled_row, write_preferences

    fixtures = loop.fixtures()
    rounds = []
    for budget in config.budgets:
        round_dir = out / "rounds" / f"labels-{budget}"
        labels_file, metrics_file = round_dir / "labels.jsonl", round_dir / "metrics.json"
        if metrics_file.is_file():  # a finished round: its labels and policy are what the next one starts from
            loop.labels.extend(json.loads(line) for line in labels_file.read_text().splitlines())
            rounds.append(json.loads(metrics_file.read_text()))
            loop.adapter = round_dir / "dpo" / f"step-{rounds[-1]['dpo_steps']}"
            continue
        began = time.perf_counter()
        loop.ensure_policy()
        if labels_file.is_file():
            new_labels = [json.loads(line) for line in labels_file.read_text().splitlines()]
            logger.info("reusing the %d labels already asked for in %s", len(new_labels), labels_file)
        else:
            new_labels, acquired_by = loop.acquire(budget, round_dir)
            for row in new_labels:
                row["acquired_by"] = acquired_by
            atomic_write_text(labels_file, "".join(json.dumps(row) + "\n" for row in new_labels))
        loop.labels.extend(new_labels)
        if not loop.preferences():
            raise RuntimeError(f"no preference among the {len(loop.labels)} labels so far (all ties or skips): "
                               "DPO has nothing to train on; raise the first budget")
        reward_model = loop.reward_model()
        loop.adapter = loop.train_policy(round_dir)
        swap_seconds = loop.load_policy(loop.adapter)
        evaluation, saved = loop.evaluate(fixtures, reward_model)
        save_reward_model(round_dir / "reward_model", reward_model, saved.pop("in_distribution"), {
            "task": config.task, "base_model": config.chat.model,
            "base_model_fingerprint": model_fingerprint(config.chat.model),
            "pooling": config.reward_model.pooling, "max_length": config.dpo.max_length,
            "preferences": len(loop.preferences()), **saved})
        metrics = {"labels": len(loop.labels), "preferences": len(loop.preferences()),
                   "acquired_by": sorted({row["acquired_by"] for row in new_labels}),
                   "generated_tokens": loop.generated_tokens(budget), "swap_seconds": round(swap_seconds, 3),
                   "dpo_steps": int(loop.adapter.name.split("-")[1]),
                   "dpo": json.loads((loop.adapter / STEP_FILE).read_text())["history"][-1], **evaluation}
        if config.publish is not None:
            from trustray.data.adapter_store import publish

            metrics["published"] = publish(config.publish.store_dir, config.publish.name, loop.adapter)
            logger.info("published the policy as %r version %s", config.publish.name, metrics["published"])
        metrics["seconds"] = round(time.perf_counter() - began, 1)
        atomic_write_text(metrics_file, json.dumps(metrics, indent=2))
        logger.info("round with %d labels: %s", budget, {k: v for k, v in metrics.items() if k != "dpo"})
        rounds.append(metrics)
    prompts = loop.prompts["pool"]
    rows = [labelled_row(prompts[row["prompt_index"]], row["a"], row["b"], row["label"], budget=row["budget"])
            for row in loop.labels]
    write_preferences([row for row in rows if row is not None], out / "preferences.jsonl")
    summary = {"config": config.model_dump(mode="json", exclude={"force"}), "rounds": rounds,
               "adapter": str(loop.adapter)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return out / "summary.json"


def table(summary_path: Path) -> str:
    """Per round: labels, win rates against the initial policy, reward-model accuracy and ECE."""
    rounds = json.loads(Path(summary_path).read_text())["rounds"]
    lines = ["labels  win(greedy)  win(T)  gold(greedy)  rm_acc  ece_after"]
    for metrics in rounds:
        lines.append(f"{metrics['labels']:>6}  {metrics['win_rate_greedy']:>11.3f}  {metrics['win_rate_sampled']:>6.3f}  "
                     f"{metrics['gold_reward_greedy']:>12.3f}  {metrics.get('rm_accuracy', float('nan')):>6.3f}  "
                     f"{metrics.get('ece_after', float('nan')):>9.3f}")
    return "\n".join(lines)


PIPELINE = {"config": ActivePreferenceConfig, "run": run, "table": table}


if __name__ == "__main__":
    # Run through the importable module, not `__main__`: Ray pickles functions defined in `__main__` by value.
    from trustray.pipelines import run_module

    run_module("active_preference")
